"""Every mistake a user can make exits 2 with one short line naming the field, and writes nothing."""

import os
import struct
import subprocess
import zlib

import numpy as np
import pytest
from PIL import Image

from raft_diffusion.cli import main

from .conftest import TEXT_CONFIG, TINY_CONFIG, deep_update, run_cli, write_yaml

SCORE = ["score", "--reward", "jpeg_compressibility"]


def _png_header_only(path, width, height):
    """A PNG that claims width x height gray pixels but holds almost no data (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b""))
    return path


def _setup(tmp_path, case):
    """Write the files of a bad-input case; return the argv."""
    cfg = deep_update(TINY_CONFIG, {})
    extra: list[str] = []
    path = tmp_path / "config.yaml"
    # Command-line usage: typer's own errors.
    if case == "no_arguments":
        return []
    if case == "unknown_command":
        return ["trian"]
    if case == "train_without_config":
        return ["train"]
    if case == "unknown_option":
        return ["train", str(write_yaml(path, cfg)), "--frobnicate"]
    if case == "n_not_a_number":
        return ["generate", "--model", "builtin:tiny-sd", "--prompt", "a cat", "--out", str(tmp_path / "out"),
                "-n", "abc"]
    # score: images and reward options.
    if case.startswith("reward_option_") and not case.startswith("reward_option_in_config"):
        Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "gray.png")
        value = "abc" if case == "reward_option_not_a_number" else "500"
        return [*SCORE, "--option", f"quality={value}", str(tmp_path / "gray.png")]
    if case == "truncated_png":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(tmp_path / "full.png")
        data = (tmp_path / "full.png").read_bytes()
        (tmp_path / "full.png").unlink()
        (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
        return [*SCORE, str(tmp_path / "cut.png")]
    if case == "decompression_bomb":  # over twice PIL's MAX_IMAGE_PIXELS: PIL raises
        return [*SCORE, str(_png_header_only(tmp_path / "bomb.png", 20000, 20000))]
    if case == "decompression_bomb_warning":  # between one and two times MAX_IMAGE_PIXELS: PIL only warns
        return [*SCORE, str(_png_header_only(tmp_path / "bomb.png", 10000, 10000))]
    if case == "float_tiff_out_of_range":
        Image.fromarray(np.full((32, 32), 300.0, np.float32)).save(tmp_path / "hdr.tif")
        return [*SCORE, str(tmp_path / "hdr.tif")]
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
    elif case == "reward_option_in_config_not_a_number":
        cfg["rewards"] = [{"name": "jpeg_compressibility", "options": {"quality": "high"}}]
    elif case == "seed_too_large":  # numpy's seeds stop at 2**32 - 1
        cfg["raft"]["seed"] = 2**32
    elif case == "python_tag_in_run_config":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "config.yaml").write_text("!!python/object/apply:os.system [echo hacked]\n")
        extra = ["--resume"]
    elif case.endswith("_in_diffusion_run"):
        name = case.removesuffix("_in_diffusion_run")
        section, value = {"temperature": ("generation", 0.7), "top_p": ("generation", 0.9),
                          "max_new_tokens": ("generation", 16), "gguf_file": ("model", "model.gguf"),
                          "trust_remote_code": ("model", True)}[name]
        cfg[section][name] = value
    elif case.endswith("_in_text_run"):
        name = case.removesuffix("_in_text_run")
        section = "training" if name == "caption_dropout" else "generation"
        value = {"resolution": 64, "steps": 4, "guidance_scale": 3.0, "scheduler": "dpm_solver", "eta": 0.5,
                 "negative_prompt": "blurry", "caption_dropout": 0.3}[name]
        cfg = deep_update(TEXT_CONFIG, {"model": {"path": str(tmp_path / "no-llama")}, section: {name: value}})
    elif case.startswith("expert_"):
        folder = tmp_path / "people"
        expert = {"samples": str(folder), "per_prompt": 1}
        if case != "expert_folder_missing":
            folder.mkdir()
            Image.new("RGB", (64, 64)).save(folder / "a.png")
            Image.new("RGB", (32, 32)).save(folder / "small.png")
            row = {"expert_row_not_json": "{prompt: a cat",
                   "expert_row_without_file": '{"prompt": "a cat in monet style"}',
                   "expert_text_rows_for_images": '{"prompt": "a cat in monet style", "text": "a cat"}',
                   "expert_picture_of_another_resolution": '{"prompt": "a cat in monet style", "file": "small.png"}',
                   "expert_picture_missing": '{"prompt": "a cat in monet style", "file": "b.png"}',
                   "expert_rows_for_no_training_prompt": '{"prompt": "a dog", "file": "a.png"}',
                   }.get(case, '{"prompt": "a cat in monet style", "file": "a.png"}')
            (folder / "samples.jsonl").write_text(row + "\n")
        if case == "expert_model_of_the_other_backend":  # a causal LM's directory in a diffusion run
            (tmp_path / "llama").mkdir()
            (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
            expert = {"model": str(tmp_path / "llama"), "per_prompt": 1}
        elif case == "expert_without_a_source":
            expert = {"per_prompt": 1}
        elif case == "expert_temperature_for_diffusion":
            expert = {"model": "builtin:tiny-sd", "per_prompt": 1, "temperature": 0.5}
        cfg["generation"]["experts"] = [expert]
        if case == "expert_diffusion_model_for_text":
            cfg = deep_update(TEXT_CONFIG, {"model": {"path": "builtin:smollm2-135m"}, "generation": {
                "experts": [{"model": "builtin:tiny-sd", "per_prompt": 1}]}})
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
    # usage errors (typer's, not ours)
    "no_arguments": "COMMAND",
    "unknown_command": "trian",
    "train_without_config": "CONFIG",
    "unknown_option": "--frobnicate",
    "n_not_a_number": "-n",
    # score
    "truncated_png": "IMAGE",
    "decompression_bomb": "IMAGE",
    "decompression_bomb_warning": "IMAGE",
    "float_tiff_out_of_range": "IMAGE",
    "reward_option_not_a_number": "options.quality",
    "reward_option_out_of_range": "options.quality",
    # train
    "reward_option_in_config_not_a_number": "rewards.0.options.quality",
    "seed_too_large": "raft.seed",
    "python_tag_in_run_config": "config.yaml",
    "temperature_in_diffusion_run": "generation.temperature",
    "top_p_in_diffusion_run": "generation.top_p",
    "max_new_tokens_in_diffusion_run": "generation.max_new_tokens",
    "gguf_file_in_diffusion_run": "model.gguf_file",
    "trust_remote_code_in_diffusion_run": "model.trust_remote_code",
    "resolution_in_text_run": "generation.resolution",
    "steps_in_text_run": "generation.steps",
    "guidance_scale_in_text_run": "generation.guidance_scale",
    "scheduler_in_text_run": "generation.scheduler",
    "eta_in_text_run": "generation.eta",
    "negative_prompt_in_text_run": "generation.negative_prompt",
    "caption_dropout_in_text_run": "training.caption_dropout",
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
    "expert_folder_missing": "generation.experts.0.samples",
    "expert_row_not_json": "generation.experts.0.samples",
    "expert_row_without_file": "generation.experts.0.samples",
    "expert_text_rows_for_images": "generation.experts.0.samples",
    "expert_picture_of_another_resolution": "generation.experts.0.samples",
    "expert_picture_missing": "generation.experts.0.samples",
    "expert_rows_for_no_training_prompt": "generation.experts.0.samples",
    "expert_model_of_the_other_backend": "generation.experts.0.model",
    "expert_diffusion_model_for_text": "generation.experts.0.model",
    "expert_without_a_source": "generation.experts.0",
    "expert_temperature_for_diffusion": "generation.experts.0.temperature",
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


@pytest.mark.parametrize("argv", [["train", "NOPE", "--debug"], ["train", "--debug", "NOPE"]])
def test_debug_flag_works_after_the_command_too(tmp_path, capfd, argv):
    argv = [str(tmp_path / "nope.yaml") if a == "NOPE" else a for a in argv]
    assert main(argv) == 2
    err = capfd.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: config: file not found")


def test_ctrl_c_in_train_says_how_to_continue_and_exits_130(tmp_path, capfd, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("raft_diffusion.train.run_training", interrupted)
    argv = _setup(tmp_path, "ok")
    assert main(argv) == 130
    assert capfd.readouterr().err.strip().splitlines() == ["interrupted; continue with --resume"]


def test_ctrl_c_in_another_command_exits_130(tmp_path, capfd, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("raft_diffusion.rewards.build_reward", interrupted)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "black.png")
    assert main([*SCORE, str(tmp_path / "black.png")]) == 130
    assert capfd.readouterr().err.strip().splitlines() == ["interrupted"]


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory this process cannot write to: mode 555, or, for root (whom modes do not stop), immutable."""
    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("root can be kept from writing only by chattr +i, which this file system lacks")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("where", [".", "run", "a/b", "../file/run"])
def test_train_into_an_unwritable_directory_exits_2_before_writing(tmp_path, capfd, unwritable_dir, where):
    (tmp_path / "file").write_text("not a directory")
    argv = _setup(tmp_path, "ok")
    argv[argv.index("--output-dir") + 1] = str(unwritable_dir / where)
    before = sorted(tmp_path.rglob("*"))
    assert main(argv) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: output_dir: cannot write to")
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("argv", [[], ["train", "config.yaml", "--frobnicate"]])
def test_cli_subprocess_usage_error_exits_2_without_traceback(tmp_path, argv):
    result = run_cli(*argv, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert list(tmp_path.iterdir()) == []


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


@pytest.mark.parametrize("config", ["sd15-jpeg.yaml", "sd15-clip-aesthetic.yaml", "sdxl-clip-aesthetic.yaml",
                                    "sd35-clip-aesthetic.yaml", "flux-dev-clip-aesthetic.yaml",
                                    "flux-schnell-clip-aesthetic.yaml", "sd15-vlm-pickscore.yaml",
                                    "sd35-ocr.yaml"])
def test_shipped_gpu_config_validates_and_fails_offline_with_exit_2(tmp_path, capfd, monkeypatch, config):
    from .conftest import REPO

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["train", str(REPO / "configs" / config), "--output-dir", str(tmp_path / "run")])
    err = capfd.readouterr().err
    assert code == 2 and "config model.path" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["run\x1b[2J\x1b[31m.yaml", "run\u202eslmy.yaml", "run\nerror: fine.yaml"])
def test_an_error_line_shows_control_characters_escaped(tmp_path, capfd, name):
    """A file name's terminal escape sequence, right-to-left override or newline cannot clear the
    screen, reorder the line or forge a second one: the line shows them escaped."""
    assert main(["train", str(tmp_path / name)]) == 2
    err = capfd.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not any(c in err.rstrip("\n") for c in "\x1b\u202e\n"), err
    assert "\\x1b" in err or "\\u202e" in err or "\\n" in err
