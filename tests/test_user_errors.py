"""Every mistake a user can make exits 2 with one short line naming the field, and writes nothing."""

import os

import pytest

from raft_diffusion.cli import main

from .conftest import TINY_CONFIG, deep_update, run_cli, write_yaml


def _setup(tmp_path, case):
    """Write the files of a bad-input case; return the argv."""
    cfg = deep_update(TINY_CONFIG, {})
    extra: list[str] = []
    path = tmp_path / "config.yaml"
    if case == "missing_config":
        return ["train", str(tmp_path / "nope.yaml")]
    if case == "yaml_syntax":
        path.write_text("backend: diffusion\nmodel: {path: [unclosed\n")
        return ["train", str(path)]
    if case == "unknown_key":
        cfg["trainig"] = {"epochs": 1}
    elif case == "wrong_type":
        cfg["generation"]["samples_per_prompt"] = "eight"
    elif case == "k_zero":
        cfg["generation"]["samples_per_prompt"] = 0
    elif case == "resolution_250":
        cfg["generation"]["resolution"] = 250
    elif case == "unknown_reward":
        cfg["rewards"] = [{"name": "jpeg_compresibility"}]
    elif case == "unknown_judge":
        cfg["eval"]["judges"] = [{"name": "orakle"}]
    elif case == "missing_prompts_file":
        cfg["prompts"] = {"train": str(tmp_path / "missing.txt")}
    elif case == "empty_prompts_file":
        (tmp_path / "empty.txt").write_text("\n# only a comment\n\n")
        cfg["prompts"] = {"train": str(tmp_path / "empty.txt")}
    elif case == "non_utf8_prompts":
        (tmp_path / "latin1.txt").write_bytes("a café in monet style\n".encode("latin-1"))
        cfg["prompts"] = {"train": str(tmp_path / "latin1.txt")}
    elif case == "missing_model_path":
        cfg["model"] = {"path": str(tmp_path / "no-such-model")}
    elif case == "fraction_out_of_range":
        cfg["selection"] = {"strategy": "global", "fraction": 1.5}
    elif case == "fraction_zero":
        cfg["selection"] = {"strategy": "global", "fraction": 0}
    elif case == "output_dir_in_use":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "notes.txt").write_text("someone's files")
    elif case == "unknown_set_key":
        extra = ["--set", "generation.resolutoin=64"]
    elif case == "set_without_equals":
        extra = ["--set", "raft.seed"]
    elif case == "unknown_builtin":
        cfg["model"] = {"path": "builtin:sd-99"}
    elif case == "top_above_k":
        cfg["selection"] = {"strategy": "per_prompt", "top": 5}
    elif case == "bad_lora_target":
        cfg["lora"]["target_modules"] = ["to_qq"]
    elif case == "text_reward_on_images":
        cfg["rewards"] = [{"name": "vader"}]
    elif case == "unknown_reward_option":
        cfg["rewards"] = [{"name": "clip", "options": {"modle": "ViT-B-32"}}]
    elif case in ("missing_clip_weights", "pickled_aesthetic_head"):
        import json

        import torch

        from .conftest import TINY_CLIP_CONFIG

        (tmp_path / "clip.json").write_text(json.dumps(TINY_CLIP_CONFIG))
        options = {"model_config": str(tmp_path / "clip.json"), "pretrained": str(tmp_path / "nope.safetensors")}
        if case == "pickled_aesthetic_head":
            torch.save(torch.nn.Linear(32, 1), tmp_path / "head.pth")
            options = {**options, "pretrained": "none", "head": str(tmp_path / "head.pth")}
        cfg["rewards"] = [{"name": "clip" if case == "missing_clip_weights" else "aesthetic", "options": options}]
    write_yaml(path, cfg)
    return ["train", str(path), "--output-dir", str(tmp_path / "run"), *extra]


CASES = {
    "missing_config": "config",
    "yaml_syntax": "YAML",
    "unknown_key": "trainig",
    "wrong_type": "generation.samples_per_prompt",
    "k_zero": "generation.samples_per_prompt",
    "resolution_250": "generation.resolution",
    "unknown_reward": "rewards.0.name",
    "unknown_judge": "eval.judges.0.name",
    "missing_prompts_file": "prompts.train",
    "empty_prompts_file": "prompts.train",
    "non_utf8_prompts": "prompts.train",
    "missing_model_path": "model.path",
    "fraction_out_of_range": "selection.fraction",
    "fraction_zero": "selection.fraction",
    "output_dir_in_use": "output_dir",
    "unknown_set_key": "resolutoin",
    "set_without_equals": "--set",
    "unknown_builtin": "model.path",
    "top_above_k": "selection.top",
    "bad_lora_target": "lora.target_modules",
    "text_reward_on_images": "rewards.0.name",
    "unknown_reward_option": "rewards.0.options",
    "missing_clip_weights": "rewards.0.options.pretrained",
    "pickled_aesthetic_head": "rewards.0.options.head",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capfd, case):
    argv = _setup(tmp_path, case)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = main(argv)
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert CASES[case] in lines[0]
    assert len(lines[0]) < 300
    assert "Traceback" not in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_debug_flag_shows_the_traceback(tmp_path, capfd):
    assert main(["--debug", "train", str(tmp_path / "nope.yaml")]) == 2
    assert "Traceback" in capfd.readouterr().err


def test_run_in_use_by_a_live_process_is_refused_even_with_resume(tmp_path, capfd):
    import fcntl

    argv = _setup(tmp_path, "ok")
    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live run holds it
        os.write(fd, str(os.getppid()).encode())
        assert main([*argv, "--resume"]) == 2
    finally:
        os.close(fd)
    assert "in use by running process" in capfd.readouterr().err


def test_cli_subprocess_reports_user_error_without_traceback(tmp_path):
    argv = _setup(tmp_path, "resolution_250")
    result = run_cli(*argv)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: config generation.resolution")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config", ["sd15-jpeg.yaml", "sd15-clip-aesthetic.yaml"])
def test_shipped_sd15_config_validates_and_fails_offline_with_exit_2(tmp_path, capfd, monkeypatch, config):
    from .conftest import REPO

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["train", str(REPO / "configs" / config), "--output-dir", str(tmp_path / "run")])
    err = capfd.readouterr().err
    assert code == 2 and "config model.path" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
