"""Stable Diffusion 3 (flow matching, MMDiT transformer) on the same loop: builtin:tiny-sd3, the
flow-matching loss, every objective, the LoRA through StableDiffusion3Pipeline.load_lora_weights,
loading from a local directory, and the errors a flow model adds."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import load_file

from raft_diffusion.backends.loading import load_pipeline
from raft_diffusion.backends.lora_io import load_lora
from raft_diffusion.backends.families import StableDiffusion3
from raft_diffusion.cli import main
from raft_diffusion.errors import UserError
from raft_diffusion.train import run_training

from .conftest import TINY_CONFIG, deep_update, write_yaml
from .test_lora_roundtrip import assert_reproduces_eval

# SD 3's attention: the image stream's projections and the text stream's (add_*), as diffusers' SD 3 LoRA scripts
SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
SD3 = {"model": {"path": "builtin:tiny-sd3"}, "lora": {"rank": 4, "alpha": 8, "target_modules": SD3_TARGETS}}


@pytest.fixture
def sd3_config(tiny_config):
    def make(**overrides):
        return tiny_config(**deep_update(SD3, overrides))
    return make


def test_tiny_sd3_is_sd3_without_t5_and_the_same_every_time():
    pipe = load_pipeline("builtin:tiny-sd3")
    assert type(pipe) is StableDiffusion3Pipeline and isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.text_encoder_3 is None
    again = load_pipeline("builtin:tiny-sd3")
    assert all(torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), again.transformer.parameters()))


def test_the_flow_loss_noises_towards_sigma_and_targets_the_velocity():
    family = StableDiffusion3()
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    x0 = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noisy, t, target = family.noised(sched, x0, torch.Generator().manual_seed(1), "cpu")
    noise = target + x0  # target = noise - x0
    sigma = t / 1000  # the scheduler's timesteps are its sigmas x 1000
    torch.testing.assert_close(noisy, (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(noise.std(), torch.tensor(1.0), atol=0.05, rtol=0)  # the noise is N(0, 1)
    # logit-normal, then SD 3's shift 3 towards noise: the median sigma is 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert 0.6 < float(sigma.median()) < 0.85 and 0 < float(sigma.min()) and float(sigma.max()) <= 1


@pytest.mark.parametrize("training", [
    {},
    {"objective": "reward_weighted", "reward_weighted": {"beta": 0.5}, "ema_decay": 0.5, "anchor_weight": 1.0},
    {"objective": "negative_aware", "ema_decay": 0.5, "caption_dropout": 0.5},
], ids=["raft", "reward_weighted-ema-anchor", "negative_aware-ema-caption_dropout"])
def test_tiny_sd3_trains_two_iterations_with_each_objective(sd3_config, training):
    config = sd3_config(training={"learning_rate": 5e-3, "epochs": 2, **training})
    records = run_training(config, log=lambda _: None)
    run = Path(config.output_dir)
    assert [r["iteration"] for r in records] == [0, 1]
    assert all(np.isfinite(r["train_loss"]) for r in records)
    first, last = (load_file(str(run / f"checkpoints/iter_000{i}/adapter.safetensors")) for i in (0, 1))
    assert first.keys() == last.keys() and any(not first[k].equal(last[k]) for k in first)  # it trained
    layers = {k.split(".lora_")[0] for k in first}
    assert {t for t in SD3_TARGETS if any(layer.endswith("." + t) for layer in layers)} == set(SD3_TARGETS)


def test_the_sd3_lora_loads_in_plain_diffusers_and_reproduces_the_eval_images(sd3_config):
    config = sd3_config(raft={"iterations": 1}, training={"learning_rate": 5e-3, "epochs": 2})
    run_training(config, log=lambda _: None)
    run = Path(config.output_dir)
    trained = load_file(str(run / "checkpoints/iter_0000/adapter.safetensors"))
    saved = load_file(str(run / "final/pytorch_lora_weights.safetensors"))
    assert set(saved) == {f"transformer.{k}" for k in trained}  # diffusers' SD 3 layout, PEFT names

    pipe = load_pipeline(config.model.path)
    pipe.load_lora_weights(str(run / "final"))  # diffusers' own loader
    (adapter,) = pipe.transformer.peft_config
    assert pipe.transformer.peft_config[adapter].lora_alpha == 8
    assert_reproduces_eval(pipe, config, run / "samples/iter_0000/eval")

    checked = load_pipeline(config.model.path)  # `generate --lora`: every tensor must land
    load_lora(checked, run / "final")
    with pytest.raises(UserError, match="match no layer|does not fit this model"):
        load_lora(load_pipeline("builtin:tiny-sd"), run / "final")  # an SD 3 LoRA on an SD 1.x UNet


def test_a_local_sd3_directory_without_tokenizers_loads(tmp_path):
    pipe = load_pipeline("builtin:tiny-sd3")
    pipe.save_pretrained(tmp_path / "sd3")
    for name in ("tokenizer", "tokenizer_2"):  # as the toy assets ship: CLIP's BPE comes from open_clip
        for f in (tmp_path / "sd3" / name).iterdir():
            f.unlink()
        (tmp_path / "sd3" / name).rmdir()
    loaded = load_pipeline(str(tmp_path / "sd3"))
    assert type(loaded) is StableDiffusion3Pipeline and loaded.tokenizer_2 is not None
    x = torch.randn(1, 4, 8, 8)
    text, pooled = torch.randn(1, 77 + 256, 64), torch.randn(1, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.transformer(x, text, pooled, torch.tensor([500.0])).sample,
                                   pipe.transformer(x, text, pooled, torch.tensor([500.0])).sample)


def test_an_sd3_single_file_is_told_apart_from_sd1(tmp_path):
    from safetensors.torch import save_file

    from raft_diffusion.backends.loading import _single_file_class

    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(2)}, tmp_path / "sd3.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, tmp_path / "sd1.safetensors")
    assert _single_file_class(tmp_path / "sd3.safetensors") is StableDiffusion3Pipeline
    assert _single_file_class(tmp_path / "sd1.safetensors").__name__ == "StableDiffusionPipeline"


@pytest.mark.parametrize("setting, field", [
    ({"generation": {"scheduler": "dpm_solver"}}, "config generation.scheduler"),
    ({"generation": {"eta": 0.5}}, "config generation.eta"),
    ({"lora": {"target_modules": ["conv1"]}}, "config lora.target_modules"),
    ({"generation": {"resolution": 72}}, "config generation.resolution"),  # 8 x patch 2: multiples of 16
])
def test_what_a_flow_model_cannot_take_is_a_user_error(tmp_path, capfd, setting, field):
    config = write_yaml(tmp_path / "c.yaml", deep_update(deep_update(TINY_CONFIG, SD3), setting))
    code = main(["train", str(config), "--output-dir", str(tmp_path / "run")])
    err = capfd.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: {field}") and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_toy_demo_lora_list_runs_on_sd3_with_the_unet_only_layers_skipped(sd3_config, capfd):
    # the toy demos target UNet convolutions too (proj_in, conv1, conv2): on a transformer, those are skipped
    config = sd3_config(lora={"target_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2"]},
                        raft={"iterations": 1})
    run_training(config, log=lambda _: None)
    assert "proj_in, conv1, conv2" in capfd.readouterr().err
    saved = load_file(str(Path(config.output_dir) / "final/pytorch_lora_weights.safetensors"))
    assert any(".to_q." in k for k in saved) and not any(".conv1." in k for k in saved)
