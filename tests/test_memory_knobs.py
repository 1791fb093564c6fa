"""What a 24 GB GPU needs for SDXL and FLUX.1, each knob shown to change what it should (activations
kept for backward, text-encoder passes, where the encoders live, the VAE's batch and tile) and not a
run's result. On a GPU the memory itself is measured by bench/gpu_check.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raft_diffusion.backends.diffusion import DiffusionBackend
from raft_diffusion.backends.loading import load_pipeline
from raft_diffusion.backends.sampling import TEXT_ENCODERS, PromptEncoder, decode_latents
from raft_diffusion.config import RunConfig
from raft_diffusion.train import run_training

from .conftest import TINY_CONFIG, deep_update

FLUX = {"model": {"path": "builtin:tiny-flux"},
        "lora": {"target_modules": ["to_q", "to_k", "to_v", "add_q_proj", "to_add_out", "proj_mlp", "proj_out"]}}


def _run(tmp_path: Path, name: str, **overrides) -> tuple[list[dict], bytes]:
    data = deep_update(TINY_CONFIG, {"output_dir": str(tmp_path / name), **overrides})
    records = run_training(RunConfig.model_validate(data), log=lambda _: None)
    final = (tmp_path / name / "final/pytorch_lora_weights.safetensors").read_bytes()
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records], final  # all but the timings


@pytest.mark.parametrize("family", [{}, FLUX], ids=["sd", "flux"])
def test_gradient_checkpointing_keeps_fewer_activations_and_changes_no_result(tmp_path, monkeypatch, family):
    saved: list[int] = []
    train = DiffusionBackend.train

    def counting(self, samples, generator, old_policy=None):  # bytes autograd keeps for the backward pass
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = train(self, samples, generator, old_policy)
        saved.append(total[0])
        return out

    monkeypatch.setattr(DiffusionBackend, "train", counting)
    plain = _run(tmp_path, "plain", **family, raft={"iterations": 1})
    kept = saved.pop()
    checkpointed = _run(tmp_path, "checkpointed", **deep_update(family, {"training": {"gradient_checkpointing": True}}),
                        raft={"iterations": 1})
    assert saved.pop() < kept / 4  # the denoiser's blocks are recomputed in the backward pass
    assert checkpointed == plain  # the same loss and the same LoRA, byte for byte


def _spy_on_encoders(monkeypatch) -> list[PromptEncoder]:
    made: list[PromptEncoder] = []
    init = PromptEncoder.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(PromptEncoder, "__init__", spy)
    return made


def test_kept_prompt_embeddings_encode_each_prompt_once_and_change_no_result(tmp_path, monkeypatch):
    made = _spy_on_encoders(monkeypatch)
    settings = {"raft": {"iterations": 3, "prompts_per_iteration": 2, "seed": 0}}
    every_time = _run(tmp_path, "every-time", **deep_update(settings, {"model": {"cache_prompt_embeddings": False}}))
    passes_without = made.pop().encoded
    once = _run(tmp_path, "once", **settings)
    encoder = made.pop()
    assert once == every_time
    distinct = {p for p, _, _ in encoder.kept}
    assert encoder.encoded == len(encoder.kept) == len(distinct) <= 4 + 1  # the train prompts and "" at most
    assert passes_without > encoder.encoded  # three iterations of two prompts, and the eval prompts, again


def test_offloaded_text_encoders_visit_the_device_only_to_encode_new_prompts(tmp_path, monkeypatch):
    moves: list[str] = []
    to = torch.nn.Module.to

    def spy(self, *args, **kwargs):
        if getattr(self, "_raft_role", None):
            moves.append(str(args[0] if args else kwargs.get("device")))
        return to(self, *args, **kwargs)

    pipe = load_pipeline("builtin:tiny-flux")
    for name in TEXT_ENCODERS:
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name)._raft_role = name
    monkeypatch.setattr(torch.nn.Module, "to", spy)
    gen = RunConfig.model_validate(deep_update(TINY_CONFIG, FLUX)).generation
    plain = PromptEncoder(load_pipeline("builtin:tiny-flux"))(["a red square", "a blue star"], gen)
    encoder = PromptEncoder(pipe, keep=True, offload=True)
    assert moves == ["cpu", "cpu"]  # both encoders (CLIP, T5) parked at once
    first = encoder(["a red square", "a blue star"], gen)
    assert moves[2:] == ["cpu", "cpu", "cpu", "cpu"]  # to the denoiser's device (the CPU here) and back
    assert all(torch.equal(first[0][k], plain[0][k]) for k in plain[0])
    encoder(["a blue star", "a red square"], gen)
    assert len(moves) == 6  # nothing new to encode: the encoders stay where they are
    assert all(m.device.type == "cpu" for name in TEXT_ENCODERS if (m := getattr(pipe, name, None)) is not None)

    # a whole run with them offloaded: the same result
    assert _run(tmp_path, "offloaded", **deep_update(FLUX, {"model": {"offload_text_encoders": True}}),
                raft={"iterations": 1}) == _run(tmp_path, "plain", **FLUX, raft={"iterations": 1})


def test_vae_slicing_decodes_one_image_at_a_time_and_tiling_in_tiles(tmp_path):
    pipe = load_pipeline("builtin:toy-shapes")  # a trained VAE: its tiles' seams blend
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    seen: list[tuple[int, ...]] = []
    pipe.vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    whole = decode_latents(pipe, latents)
    assert seen == [(4, 4, 16, 16)]
    pipe.vae.enable_slicing()
    sliced = decode_latents(pipe, latents)
    assert seen[1:] == [(1, 4, 16, 16)] * 4  # the decoder's activations are a quarter of the batch's
    torch.testing.assert_close(sliced, whole, atol=1e-4, rtol=0)  # batched convolutions: the last bits only
    pipe.vae.disable_slicing()
    pipe.vae.enable_tiling()
    pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 8 * pipe.vae_scale_factor, 8  # SDXL: 1024 px
    seen.clear()
    tiled = decode_latents(pipe, latents)
    assert tiled.shape == whole.shape and max(s[-1] for s in seen) < 16  # tiles, never the whole latent
    assert (tiled - whole).abs().mean() < 0.1  # random latents, blended seams: close, not equal

    # the config fields reach the run's VAE
    config = RunConfig.model_validate(deep_update(TINY_CONFIG, {"output_dir": str(tmp_path / "run"),
                                                                "model": {"vae_slicing": True, "vae_tiling": True}}))
    from accelerate import Accelerator

    backend = DiffusionBackend(config, Accelerator(cpu=True))
    assert backend.pipe.vae.use_slicing and backend.pipe.vae.use_tiling


def test_a_run_resumes_with_a_memory_knob_switched_but_not_with_another_setting_changed(tmp_path):
    import yaml

    from raft_diffusion.config import config_to_yaml
    from raft_diffusion.errors import UserError
    from raft_diffusion.run_dir import RunDirectory

    cfg = RunConfig.model_validate(deep_update(TINY_CONFIG, {"output_dir": str(tmp_path / "run")}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    knobs = yaml.safe_load(config_to_yaml(cfg))
    knobs["model"].update(offload_text_encoders=True, vae_slicing=True, cache_prompt_embeddings=False)
    knobs["training"]["gradient_checkpointing"] = True
    directory = RunDirectory(run)
    assert directory.claim(knobs, resume=True, overwrite=False) == "resume"
    directory.abandon()
    knobs["model"]["dtype"] = "bfloat16"
    with pytest.raises(UserError, match="config model.dtype: differs from the run's"):
        RunDirectory(run).claim(knobs, resume=True, overwrite=False)
