"""FLUX.1 (dev and schnell) on the same loop: builtin:tiny-flux / tiny-flux-schnell, FLUX's shifted
flow-matching loss and guidance embedding, every objective, the LoRA through FluxPipeline.load_lora_weights,
the BFL-layout kohya file ComfyUI and Forge load (checked against diffusers' own kohya FLUX reader at
FLUX.1's widths), an expert of another family, and the errors FLUX adds."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from raft_diffusion.backends.families import Flux
from raft_diffusion.backends.families.flux import flux_sigmas
from raft_diffusion.backends.loading import _single_file_class, load_pipeline
from raft_diffusion.backends.lora_io import load_lora
from raft_diffusion.cli import main
from raft_diffusion.errors import UserError
from raft_diffusion.lora_formats import KOHYA_FILE
from raft_diffusion.lora_formats_flux import flux_kohya_state_dict, flux_module, fused_widths, write_flux_kohya
from raft_diffusion.tiny_flux import flux_scheduler
from raft_diffusion.train import run_training

from .conftest import TINY_CONFIG, copy_run, deep_update, one_error_line, run_in_process, write_yaml
from .test_lora_roundtrip import assert_reproduces_eval

# diffusers' FLUX LoRA script's attention targets, and the single blocks' MLP and output projections
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "proj_mlp", "proj_out"]
FLUX = {"model": {"path": "builtin:tiny-flux"}, "lora": {"rank": 4, "alpha": 8, "target_modules": FLUX_TARGETS}}


@pytest.fixture
def flux_config(tiny_config):
    def make(**overrides):
        return tiny_config(**deep_update(FLUX, overrides))
    return make


def test_the_tiny_fluxes_are_dev_and_schnell_and_the_same_every_time():
    dev, schnell = load_pipeline("builtin:tiny-flux"), load_pipeline("builtin:tiny-flux-schnell")
    assert type(dev) is FluxPipeline and isinstance(dev.transformer, FluxTransformer2DModel)
    assert dev.transformer.config.guidance_embeds and dev.scheduler.config.use_dynamic_shifting
    assert not schnell.transformer.config.guidance_embeds and not schnell.scheduler.config.use_dynamic_shifting
    again = load_pipeline("builtin:tiny-flux")
    assert all(torch.equal(a, b) for a, b in zip(dev.transformer.parameters(), again.transformer.parameters()))
    assert len(dev.tokenizer_2("a cat in monet style").input_ids) > 1  # the shipped Unigram T5 tokenizer


def test_the_flux_loss_is_shifted_by_the_image_s_token_count_and_targets_the_velocity():
    family, sched = Flux(), flux_scheduler(dev=True)
    half = torch.tensor([0.5])
    # FLUX.1-dev: mu = 0.5 at 256 tokens (512 px), 1.15 at 4096 (1024 px); u = 1/2 -> sigma = e^mu / (e^mu + 1)
    for tokens, mu in ((256, 0.5), (4096, 1.15)):
        assert math.isclose(float(flux_sigmas(sched, half, tokens)), math.exp(mu) / (math.exp(mu) + 1), rel_tol=1e-5)
    schnell = flux_scheduler(dev=False)
    torch.testing.assert_close(flux_sigmas(schnell, torch.tensor([0.2, 0.7]), 4096), torch.tensor([0.2, 0.7]))

    x0 = torch.randn(64, 4, 32, 32, generator=torch.Generator().manual_seed(0))  # 16 x 16 = 256 packed tokens
    noisy, t, target = family.noised(sched, x0, torch.Generator().manual_seed(1), "cpu")
    noise, sigma = target + x0, (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - sigma) * x0 + sigma * noise)
    # logit-normal u around 1/2, shifted by mu 0.5 towards noise: the median sigma is about 0.62
    assert 0.55 < float(sigma.median()) < 0.7 and float(sigma.max()) < 1


def test_dev_s_guidance_value_reaches_its_transformer_and_schnell_has_none():
    x = torch.randn(1, 4, 8, 8)
    for name, differs in (("builtin:tiny-flux", True), ("builtin:tiny-flux-schnell", False)):
        pipe = load_pipeline(name)
        cond = {"prompt_embeds": torch.randn(1, 7, 32), "pooled_prompt_embeds": torch.randn(1, 32)}
        with torch.no_grad():
            low, high = (Flux().predict(pipe.transformer, x, torch.tensor([500.0]), cond, g) for g in (1.0, 3.5))
        assert low.shape == x.shape and (not torch.equal(low, high)) == differs


@pytest.mark.parametrize("model, training", [
    ("builtin:tiny-flux", {"ema_decay": 0.5, "anchor_weight": 1.0}),
    ("builtin:tiny-flux", {"objective": "reward_weighted", "reward_weighted": {"beta": 0.5}, "ema_decay": 0.5,
                           "anchor_weight": 1.0}),
    ("builtin:tiny-flux", {"objective": "negative_aware", "ema_decay": 0.5, "anchor_weight": 1.0}),
    ("builtin:tiny-flux-schnell", {"objective": "negative_aware", "ema_decay": 0.5, "anchor_weight": 1.0}),
], ids=["dev-raft-ema-anchor", "dev-reward_weighted-ema-anchor", "dev-negative_aware-ema-anchor",
        "schnell-negative_aware-ema-anchor"])
def test_tiny_flux_trains_two_iterations_with_each_objective(flux_config, model, training):
    config = flux_config(model={"path": model}, training={"learning_rate": 5e-3, "epochs": 2, **training})
    records = run_training(config, log=lambda _: None)
    run = Path(config.output_dir)
    assert [r["iteration"] for r in records] == [0, 1] and all(np.isfinite(r["train_loss"]) for r in records)
    first, last = (load_file(str(run / f"checkpoints/iter_000{i}/adapter.safetensors")) for i in (0, 1))
    assert first.keys() == last.keys() and any(not first[k].equal(last[k]) for k in first)  # it trained
    layers = {k.split(".lora_")[0] for k in first}
    assert any(m.startswith("single_transformer_blocks.0.proj_mlp") for m in layers)
    assert (run / "final" / KOHYA_FILE).is_file()


def test_the_flux_lora_loads_in_diffusers_and_as_kohya_and_both_reproduce_the_eval_images(flux_config, tmp_path,
                                                                                        capfd):
    config = flux_config(raft={"iterations": 1}, training={"learning_rate": 5e-3, "epochs": 2},
                         generation={**TINY_CONFIG["generation"], "guidance_scale": 3.5})
    run_training(config, log=lambda _: None)
    run = Path(config.output_dir)
    saved = load_file(str(run / "final/pytorch_lora_weights.safetensors"))
    assert saved and all(k.startswith("transformer.") for k in saved)  # diffusers' FLUX layout, PEFT names

    pipe = load_pipeline(config.model.path)
    pipe.load_lora_weights(str(run / "final"))  # diffusers' own loader
    (adapter,) = pipe.transformer.peft_config
    assert pipe.transformer.peft_config[adapter].lora_alpha == 8
    assert_reproduces_eval(pipe, config, run / "samples/iter_0000/eval")

    kohya = run / "final" / KOHYA_FILE
    with safe_open(str(kohya), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_base_model_version"] == "flux1"
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in keys
    checked = load_pipeline(config.model.path)
    load_lora(checked, kohya)  # `generate --lora`, ComfyUI's file: every layer at its strength
    assert_reproduces_eval(checked, config, run / "samples/iter_0000/eval")
    with pytest.raises(UserError, match="match(es)? no layer|does not fit"):
        load_lora(load_pipeline("builtin:tiny-sd3"), kohya)  # a FLUX LoRA on SD 3: refused

    # a run whose final/ lacks the file: `export --format kohya` makes the same bytes from the diffusers file
    old = copy_run(run, tmp_path / "old-run")
    (old / "final" / KOHYA_FILE).unlink()
    out = tmp_path / "exported.safetensors"
    result = run_in_process(capfd, "export", str(old), "--format", "kohya", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert load_file(str(out)).keys() == load_file(str(kohya)).keys()
    assert all(torch.equal(a, load_file(str(kohya))[k]) for k, a in load_file(str(out)).items())


# every kind of linear layer of a FLUX transformer, at FLUX.1's widths (3072 inner, 12288 MLP), one block each
FULL = {"num_attention_heads": 24, "attention_head_dim": 128, "guidance_embeds": True}
FULL_LAYERS = {
    **{f"transformer_blocks.0.attn.{m}": (3072, 3072) for m in ("to_q", "to_k", "to_v", "to_out.0")},
    **{f"transformer_blocks.0.attn.{m}": (3072, 3072) for m in ("add_q_proj", "add_v_proj", "to_add_out")},
    "transformer_blocks.0.ff.net.0.proj": (12288, 3072), "transformer_blocks.0.ff.net.2": (3072, 12288),
    "transformer_blocks.0.ff_context.net.0.proj": (12288, 3072), "transformer_blocks.0.ff_context.net.2": (3072, 12288),
    "transformer_blocks.0.norm1.linear": (18432, 3072), "transformer_blocks.0.norm1_context.linear": (18432, 3072),
    **{f"single_transformer_blocks.0.attn.{m}": (3072, 3072) for m in ("to_q", "to_k", "to_v")},  # no proj_mlp
    "single_transformer_blocks.0.proj_out": (3072, 15360), "single_transformer_blocks.0.norm.linear": (9216, 3072),
    "x_embedder": (3072, 64), "context_embedder": (3072, 4096),
    "time_text_embed.timestep_embedder.linear_1": (3072, 256), "time_text_embed.guidance_embedder.linear_2": (3072, 3072),
    "time_text_embed.text_embedder.linear_1": (3072, 768),
    "proj_out": (64, 3072), "norm_out.linear": (6144, 3072),
}


def _random_layers(shapes: dict[str, tuple[int, int]], rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for module, (rows, cols) in shapes.items():
        out[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, cols, generator=g) / 8
        out[f"transformer.{module}.lora_B.weight"] = torch.randn(rows, rank, generator=g) / 8
    return out


def _delta(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return scale * (b.double() @ a.double())


def _applied(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """A LoRA's update applied to fixed probe vectors: B A x (cheaper than B A at 3072 x 12288)."""
    x = torch.randn(a.shape[1], 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return scale * (b.double() @ (a.double() @ x))


def test_the_kohya_file_at_flux_1_s_widths_reads_back_in_diffusers_kohya_flux_loader(tmp_path):
    layers = _random_layers(FULL_LAYERS, rank=2)
    path = tmp_path / KOHYA_FILE
    write_flux_kohya(path, layers, {"r": 2, "lora_alpha": 6.0}, FULL, "black-forest-labs/FLUX.1-dev")
    read = FluxPipeline.lora_state_dict(str(path))  # diffusers' conversion of a kohya FLUX file
    for module in FULL_LAYERS:
        key = next(k for k in (f"transformer.{module}", module) if f"{k}.lora_A.weight" in read)
        got = _applied(read[f"{key}.lora_A.weight"], read[f"{key}.lora_B.weight"])  # it folds alpha / rank in
        want = _applied(layers[f"transformer.{module}.lora_A.weight"], layers[f"transformer.{module}.lora_B.weight"], 3.0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=module)
    # the parts nobody trained (add_k_proj, proj_mlp) read back as zero updates
    for module in ("transformer_blocks.0.attn.add_k_proj", "single_transformer_blocks.0.proj_mlp"):
        a, b = read.get(f"transformer.{module}.lora_A.weight"), read.get(f"transformer.{module}.lora_B.weight")
        assert a is None or not _applied(a, b).any()


def test_the_kohya_file_is_what_comfyui_applies_to_bfl_s_fused_layers():
    pipe = load_pipeline("builtin:tiny-flux")
    config = dict(pipe.transformer.config)
    shapes = {name: tuple(m.weight.shape) for name, m in pipe.transformer.named_modules()
              if isinstance(m, torch.nn.Linear) and flux_module(name) is not None and "to_k" not in name}
    layers = _random_layers(shapes, rank=2)
    state = flux_kohya_state_dict(layers, {"r": 2, "lora_alpha": 5.0}, config)
    assert all(re.fullmatch(r"lora_unet_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in state)
    # ComfyUI's "lora" patch on BFL's weight: W += alpha / rank * up @ down; its rows are the parts' updates
    for module in shapes:
        target, part, swap = flux_module(module)
        name = "lora_unet_" + target.replace(".", "_")
        down, up, alpha = (state[f"{name}.{x}"] for x in ("lora_down.weight", "lora_up.weight", "alpha"))
        fused = _delta(down, up, float(alpha) / down.shape[0])
        if part is not None:
            widths = fused_widths(target, config)
            fused = fused[sum(widths[:part]):sum(widths[:part + 1])]
        if swap:
            fused = torch.cat(fused.chunk(2)[::-1])
        want = _delta(layers[f"transformer.{module}.lora_A.weight"], layers[f"transformer.{module}.lora_B.weight"], 2.5)
        torch.testing.assert_close(fused, want, msg=module)
    to_k = _delta(state["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"],
                  state["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"])
    width = fused_widths("double_blocks.0.img_attn.qkv", config)[0]
    assert not to_k[width:2 * width].any()  # the part without a LoRA is left alone


def test_a_lora_with_a_layer_outside_the_bfl_layout_is_refused_and_nothing_written(tmp_path):
    layers = {"transformer_blocks.0.attn.norm_q.lora_A.weight": torch.ones(2, 8),
              "transformer_blocks.0.attn.norm_q.lora_B.weight": torch.ones(8, 2)}
    with pytest.raises(UserError, match="no place in the FLUX.1 layout"):
        write_flux_kohya(tmp_path / KOHYA_FILE, layers, {"r": 2, "lora_alpha": 2}, FULL, "builtin:tiny-flux")
    assert list(tmp_path.iterdir()) == []


def test_a_flux_run_takes_an_expert_of_another_family(flux_config):
    config = flux_config(generation={**TINY_CONFIG["generation"], "experts": [
        {"model": "builtin:tiny-sd", "per_prompt": 1, "steps": 2, "label": "sd"}]}, raft={"iterations": 1})
    records = run_training(config, log=lambda _: None)
    assert records[0]["sources"]["sd"]["candidates"] == 2 and records[0]["sources"]["policy"]["candidates"] == 6


def test_a_saved_flux_directory_and_a_bfl_single_file_are_recognised(tmp_path):
    pipe = load_pipeline("builtin:tiny-flux")
    pipe.save_pretrained(tmp_path / "flux")
    loaded = load_pipeline(str(tmp_path / "flux"))
    assert type(loaded) is FluxPipeline and loaded.tokenizer_2 is not None
    assert loaded.config.get("_t5_tokens") == pipe.config._t5_tokens == 32  # its T5 length comes back too
    assert all(torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), loaded.transformer.parameters()))
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2)}, tmp_path / "flux1-dev.safetensors")
    assert _single_file_class(tmp_path / "flux1-dev.safetensors") is FluxPipeline


@pytest.mark.parametrize("setting, field", [
    ({"generation": {"negative_prompt": "blurry"}}, "config generation.negative_prompt"),
    ({"generation": {"eta": 0.5}}, "config generation.eta"),
    ({"lora": {"target_modules": ["conv1"]}}, "config lora.target_modules"),
    ({"generation": {"resolution": 72}}, "config generation.resolution"),  # 8 x the 2x2 packing: multiples of 16
])
def test_what_flux_cannot_take_is_a_user_error(tmp_path, capfd, setting, field):
    config = write_yaml(tmp_path / "c.yaml", deep_update(deep_update(TINY_CONFIG, FLUX), setting))
    code = main(["train", str(config), "--output-dir", str(tmp_path / "run")])
    assert code == 2 and one_error_line(capfd.readouterr().err).startswith(f"error: {field}")
    assert not (tmp_path / "run").exists()
