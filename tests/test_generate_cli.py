"""`raft-diffusion generate`: a run's final/ gives the run's own eval images; bad values exit 2, write nothing."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raft_diffusion.cli import main

from .conftest import TINY_CONFIG, deep_update, write_yaml

DEMO_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"]
# Every sampling option away from its default, so that generate must pass each one on.
RUN_GENERATION = {"resolution": 64, "steps": 4, "guidance_scale": 3.0, "scheduler": "dpm_solver",
                  "negative_prompt": "blurry", "batch_size": 1}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 1-iteration tiny-sd run whose LoRA covers the demos' attention + conv targets."""
    folder = tmp_path_factory.mktemp("generate")
    config = write_yaml(folder / "c.yaml", deep_update(TINY_CONFIG, {
        "lora": {"target_modules": DEMO_TARGETS}, "generation": RUN_GENERATION, "raft": {"iterations": 1},
        "eval": {"every": 1, "samples_per_prompt": 2}, "training": {"learning_rate": 1e-2, "epochs": 2}}))
    assert main(["train", str(config), "--output-dir", str(folder / "run")]) == 0
    return folder / "run"


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_generate_with_the_runs_settings_gives_its_eval_image(run, tmp_path):
    eval_dir = run / "samples/iter_0000/eval"
    rows = [json.loads(x) for x in (eval_dir / "samples.jsonl").read_text().splitlines()]
    g = RUN_GENERATION
    for row in rows[:2]:
        out = tmp_path / str(row["seed"])
        assert main(["generate", "--model", "builtin:tiny-sd", "--lora", str(run / "final"), "--prompt", row["prompt"],
                     "-n", "1", "--seed", str(row["seed"]), "--resolution", str(g["resolution"]),
                     "--steps", str(g["steps"]), "--guidance-scale", str(g["guidance_scale"]),
                     "--scheduler", g["scheduler"], "--negative-prompt", g["negative_prompt"],
                     "--out", str(out)]) == 0
        np.testing.assert_array_equal(_pixels(out / f"{row['seed']:06d}.png"), _pixels(eval_dir / row["file"]))


def test_generate_defaults_to_the_models_own_resolution(tmp_path):
    assert main(["generate", "--model", "builtin:toy-shapes", "--prompt", "a red cat", "-n", "1", "--steps", "1",
                 "--out", str(tmp_path / "out")]) == 0
    assert Image.open(tmp_path / "out/000000.png").size == (64, 64)  # the toy SD's R, not 256


def _bad_lora(kind: str, run: Path, folder: Path) -> Path:
    """A directory holding a LoRA file that must be refused: `kind` says what is wrong with it."""
    folder.mkdir()
    target = folder / "pytorch_lora_weights.safetensors"
    good = (run / "final/pytorch_lora_weights.safetensors").read_bytes()
    if kind == "garbage":
        target.write_text("not a safetensors file")
    elif kind == "truncated":
        target.write_bytes(good[: len(good) // 2])
    else:
        from diffusers import StableDiffusionPipeline
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict

        from raft_diffusion.tiny import tiny_unet

        # A LoRA trained for another UNet: wider text embeddings (shapes differ), or a third resnet
        # per block (layers this UNet lacks, which diffusers would skip with a log line).
        unet = tiny_unet(cross_attention_dim=64) if kind == "other-shapes" else _deeper_unet()
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "conv1"]))
        StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=get_peft_model_state_dict(unet),
                                                  unet_lora_adapter_metadata={"r": 4, "lora_alpha": 4,
                                                                              "target_modules": ["to_k", "conv1"]})
    return folder


def _deeper_unet():
    from diffusers import UNet2DConditionModel

    from raft_diffusion.tiny import tiny_unet

    config = dict(tiny_unet().config)
    config["layers_per_block"] = 3
    return UNet2DConditionModel.from_config(config)


@pytest.mark.parametrize("args, option", [
    (["--steps", "0"], "--steps"),
    (["--steps", "-5"], "--steps"),
    (["--resolution", "-64"], "--resolution"),
    (["--resolution", "0"], "--resolution"),
    (["--resolution", "60"], "--resolution"),
    (["--guidance-scale", "-1"], "--guidance-scale"),
    (["--guidance-scale", "inf"], "--guidance-scale"),
    (["--guidance-scale", "nan"], "--guidance-scale"),
    (["--scheduler", "euler"], "--scheduler"),
    (["--eta", "1.5"], "--eta"),
    (["--lora", "garbage"], "--lora"),
    (["--lora", "truncated"], "--lora"),
    (["--lora", "other-shapes"], "--lora"),
    (["--lora", "other-layers"], "--lora"),
])
def test_bad_generate_values_exit_2_with_one_line_and_write_nothing(run, tmp_path, capfd, args, option):
    if args[0] == "--lora":
        args = ["--lora", str(_bad_lora(args[1], run, tmp_path / args[1]))]
    out = tmp_path / "out"
    capfd.readouterr()
    code = main(["generate", "--model", "builtin:tiny-sd", "--prompt", "a cat", "-n", "2", "--steps", "2",
                 "--resolution", "64", *args, "--out", str(out)])
    err = capfd.readouterr().err
    assert code == 2
    assert err.startswith(f"error: {option}: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not out.exists()


def test_a_failure_while_writing_leaves_no_image(tmp_path, monkeypatch):
    saved = []

    def save_then_fail(self, path, *args, **kwargs):
        if saved:
            raise OSError("disk full")
        saved.append(path)
        return original(self, path, *args, **kwargs)

    original = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        main(["generate", "--model", "builtin:tiny-sd", "--prompt", "a cat", "-n", "3", "--steps", "1",
              "--resolution", "64", "--out", str(tmp_path / "out")])
    assert len(saved) == 1 and not (tmp_path / "out").exists()

