"""The commands a user types: demo, generate (with a trained LoRA), score, config-help."""

import json

import numpy as np
from PIL import Image

from raft_diffusion.cli import main
from raft_diffusion.rewards.jpeg import jpeg_kb

from .conftest import TINY_CONFIG, deep_update, run_cli, write_yaml


def test_demo_runs_end_to_end_and_prints_each_iteration(tmp_path):
    # As a user types it, in a process of its own; 3 of the demo's 10 iterations (its whole config runs
    # in tests/test_raft_moves_reward.py; a demo replacing its own run: tests/test_data_safety.py).
    result = run_cli("demo", "tiny", "--output-dir", str(tmp_path / "demo"), "--set", "raft.iterations=3")
    assert result.returncode == 0, result.stderr
    iterations = [line for line in result.stdout.splitlines() if line.startswith("iter ")]
    assert [line.split()[1] for line in iterations] == ["1/3", "2/3", "3/3"]
    assert all(" reward " in line for line in iterations)
    assert (tmp_path / "demo/final/pytorch_lora_weights.safetensors").is_file()


def test_generate_with_lora_and_score_the_images(tmp_path, capsys):
    config = write_yaml(tmp_path / "c.yaml", deep_update(TINY_CONFIG, {
        "generation": {"guidance_scale": 1.0}, "raft": {"iterations": 1}, "eval": {"every": 0},
        "training": {"learning_rate": 1e-2, "epochs": 3}}))
    assert main(["train", str(config), "--output-dir", str(tmp_path / "run")]) == 0
    common = ["--model", "builtin:tiny-sd", "--prompt", "a cat in monet style", "-n", "2",
              "--resolution", "64", "--steps", "4", "--guidance-scale", "1.0"]
    assert main(["generate", *common, "--out", str(tmp_path / "base")]) == 0
    assert main(["generate", *common, "--lora", str(tmp_path / "run/final"), "--out", str(tmp_path / "tuned")]) == 0
    base = sorted((tmp_path / "base").glob("*.png"))
    tuned = sorted((tmp_path / "tuned").glob("*.png"))
    assert [p.name for p in base] == ["000000.png", "000001.png"] == [p.name for p in tuned]
    assert not np.array_equal(np.asarray(Image.open(base[0])), np.asarray(Image.open(tuned[0])))
    capsys.readouterr()
    assert main(["score", "--reward", "jpeg_incompressibility", *map(str, base)]) == 0
    printed = [float(x) for x in capsys.readouterr().out.split()]
    import torch

    expected = [jpeg_kb(torch.from_numpy(np.asarray(Image.open(p)).copy()).permute(2, 0, 1)[None] / 255)[0] for p in base]
    np.testing.assert_allclose(printed, expected, rtol=1e-4)
    # Generating again into the same files is refused rather than overwriting them.
    assert main(["generate", *common, "--out", str(tmp_path / "base")]) == 2


def test_overwrite_replaces_a_finished_run(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", deep_update(TINY_CONFIG, {"raft": {"iterations": 1}, "eval": {"every": 0}}))
    run = tmp_path / "run"
    assert main(["train", str(config), "--output-dir", str(run), "--set", "raft.seed=5"]) == 0
    assert main(["train", str(config), "--output-dir", str(run), "--overwrite"]) == 0
    assert json.loads((run / "config.yaml").read_text().split("seed: ")[1].split()[0]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((run / "metrics.jsonl").read_text())["iteration"] == 0


def test_config_help_lists_fields_with_help(capsys):
    assert main(["config-help"]) == 0
    out = capsys.readouterr().out
    assert "generation.samples_per_prompt" in out and "K: candidates generated per prompt" in out


def test_score_reads_16_bit_and_float_images_on_the_8_bit_scale(tmp_path, capsys):
    # The same gray, 128 / 255, as 8-bit RGB, 16-bit gray PNG (128 * 257 / 65535) and float TIFF.
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "8.png")
    Image.fromarray(np.full((32, 32), 128 * 257, np.uint16)).save(tmp_path / "16.png")
    Image.fromarray(np.full((32, 32), 128 / 255, np.float32)).save(tmp_path / "f.tif")
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(tmp_path / "white.png")
    files = [str(tmp_path / name) for name in ("8.png", "16.png", "f.tif", "white.png")]
    assert main(["score", "--reward", "jpeg_incompressibility", *files]) == 0
    gray8, gray16, gray_float, white = [float(x) for x in capsys.readouterr().out.split()]
    assert gray16 == gray8 == gray_float != white  # not clipped to white (16-bit) nor read as black (float)
