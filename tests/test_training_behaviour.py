"""Dropped samples, no VAE encode in training, and the training step itself."""

import json
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL

from raft_diffusion.backends.diffusion import DiffusionBackend
from raft_diffusion.config import RewardSpec
from raft_diffusion.rewards.compose import RewardSet
from raft_diffusion.train import run_training


def test_failing_and_nan_rewards_drop_samples_and_the_run_goes_on(tiny_config):
    config = tiny_config(
        rewards=[{"name": "python:tests.rewards_for_tests:flaky_jpeg"}],
        generation={"samples_per_prompt": 4}, eval={"every": 0},
    )
    metrics = run_training(config, log=lambda s: None)
    assert len(metrics) == 2
    rows = [json.loads(x) for it in range(2) for x in
            (Path(config.output_dir) / f"samples/iter_{it:04d}/samples.jsonl").read_text().splitlines()]
    dropped = sum(r["reward"] is None for r in rows)
    assert sum(m["n_dropped"] for m in metrics) == dropped
    assert all(not r["selected"] for r in rows if r["reward"] is None)
    assert (Path(config.output_dir) / "final/pytorch_lora_weights.safetensors").is_file()


def test_reward_set_drops_exactly_the_bad_samples():
    def half_bad(images, prompts):
        if len(prompts) > 1:
            raise ValueError("batch failed")
        value = float(images[0].mean())
        if value > 0.6:
            raise ValueError("too bright")
        return [np.nan if value < 0.3 else value]

    import raft_diffusion.rewards as registry

    registry.REGISTRY["half_bad_for_test"] = lambda: half_bad
    try:
        rewards = RewardSet([RewardSpec(name="half_bad_for_test")], torch.device("cpu"))
        images = torch.stack([torch.full((3, 4, 4), v) for v in (0.1, 0.5, 0.9, 0.4)])
        scored = rewards(images, ["p"] * 4, [0, 0, 1, 1])
    finally:
        del registry.REGISTRY["half_bad_for_test"]
    assert scored.n_dropped == 2
    assert np.isnan(scored.total[[0, 2]]).all()
    np.testing.assert_allclose(scored.total[[1, 3]], [0.5, 0.4], rtol=1e-6)


def test_training_never_encodes_with_the_vae(tiny_config, monkeypatch):
    calls = []
    original = AutoencoderKL.encode

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", spy)
    config = tiny_config(eval={"every": 0})
    backend = DiffusionBackend(config, Accelerator(cpu=True))
    samples = backend.generate(["a cat", "a dog"], [1, 2])
    before = [p.detach().clone() for p in backend.lora_params]
    loss = backend.train(samples, torch.Generator().manual_seed(0))
    assert np.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, backend.lora_params))
    assert calls == []
    # The spy is live: an explicit encode is counted.
    backend.pipe.vae.encode(torch.zeros(1, 3, 64, 64))
    assert calls == [1]


def test_only_lora_parameters_train(tiny_config):
    backend = DiffusionBackend(tiny_config(), Accelerator(cpu=True))
    trainable = [n for n, p in backend.pipe.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(p.requires_grad for p in backend.pipe.vae.parameters())
    assert not any(p.requires_grad for p in backend.pipe.text_encoder.parameters())


def test_same_seed_gives_same_sample_whatever_the_batch(tiny_config):
    backend = DiffusionBackend(tiny_config(generation={"batch_size": 3}), Accelerator(cpu=True))
    together = backend.generate(["a cat", "a dog", "a cat"], [5, 6, 7])
    alone = backend.generate(["a cat"], [7])
    torch.testing.assert_close(together.payload["latents"][2], alone.payload["latents"][0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(together.payload["latents"][0], together.payload["latents"][2])


def test_v_prediction_model_trains_on_the_velocity_target(tiny_config):
    backend = DiffusionBackend(tiny_config(model={"path": "builtin:tiny-sd-v"}), Accelerator(cpu=True))
    assert backend.noise_scheduler.config.prediction_type == "v_prediction"
    samples = backend.generate(["a cat"], [1])
    assert np.isfinite(backend.train(samples, torch.Generator().manual_seed(0)))


def test_dpm_solver_sampler_generates_deterministically(tiny_config):
    backend = DiffusionBackend(tiny_config(generation={"scheduler": "dpm_solver", "steps": 5}), Accelerator(cpu=True))
    assert type(backend.pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    a = backend.generate(["a cat", "a dog"], [1, 2])
    b = backend.generate(["a cat", "a dog"], [1, 2])
    assert torch.equal(a.outputs, b.outputs) and a.outputs.shape == (2, 3, 64, 64)


def test_caption_dropout_trains_a_share_of_samples_on_the_empty_prompt(tiny_config):
    backend = DiffusionBackend(tiny_config(training={"caption_dropout": 0.5}), Accelerator(cpu=True))
    empty = backend.pipe.encode_prompt([""], backend.device, 1, False)[0]
    text = backend.pipe.encode_prompt(["a cat"], backend.device, 1, False)[0].repeat(64, 1, 1)
    dropped = backend._drop_captions({"prompt_embeds": text}, torch.Generator().manual_seed(0))["prompt_embeds"]
    is_empty = torch.tensor([torch.equal(row, empty[0]) for row in dropped])
    kept = torch.tensor([torch.equal(row, original) for row, original in zip(dropped, text)])
    assert 16 <= int(is_empty.sum()) <= 48 and bool((is_empty ^ kept).all())
    backend.config.training.caption_dropout = 0.0
    unchanged = {"prompt_embeds": text}
    assert backend._drop_captions(unchanged, torch.Generator().manual_seed(0)) is unchanged


def test_lora_dropout_never_acts_when_sampling_even_before_any_training(tiny_config):
    backend = DiffusionBackend(tiny_config(lora={"dropout": 0.5}), Accelerator(cpu=True))
    a = backend.generate(["a cat"], [3]).outputs
    b = backend.generate(["a cat"], [3]).outputs
    assert torch.equal(a, b)
