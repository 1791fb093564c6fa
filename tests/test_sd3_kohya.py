"""The SD 3 LoRA under kohya's names on the MMDiT layout (`final/lora_kohya.safetensors`), the file
Forge loads (it maps no diffusers-format SD 3 LoRA), as ComfyUI and kohya's sd-scripts do.

What those loaders do, read in their repositories: ComfyUI's and Forge's `model_lora_keys_unet` map
`lora_unet_<checkpoint key less diffusion_model. and .weight, dots as underscores>` onto the
checkpoint's own weight, which gets `alpha / lora_down.shape[0] * (up.flatten(1) @ down.flatten(1))`
reshaped to the weight's shape. The checks here: every name is such a key of an SD 3 checkpoint whose
layout diffusers' own single-file converter reads back into the very transformer, and that update,
converted back by diffusers, is the diffusers LoRA's fused update, for every kind of layer (fused
q/k/v with a part left out, swapped adaLN halves, the patch convolution, SD 3.5's second attention
and q/k norms).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from raft_diffusion.backends.loading import load_pipeline
from raft_diffusion.backends.lora_io import load_lora
from raft_diffusion.errors import UserError
from raft_diffusion.lora_formats import KOHYA_FILE, sd3_kohya_state_dict, sd3_module, write_sd3_kohya
from raft_diffusion.train import run_training

from .conftest import copy_run, run_in_process
from .test_lora_roundtrip import assert_reproduces_eval

# every kind of layer an SD 3 LoRA can sit on; to_k left out, so one fused qkv has a part without LoRA
EVERY_KIND = ["to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
              "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
              "norm1_context.linear", "proj_out", "norm_out.linear", "context_embedder", "pos_embed.proj",
              "linear_1", "linear_2"]
NORMS = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
         "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
         "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}


def _transformer(sd35: bool) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    extra = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)} if sd35 else {}
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=16,
                                  pooled_projection_dim=12, out_channels=4, pos_embed_max_size=16, **extra)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def _checkpoint(model: SD3Transformer2DModel) -> dict[str, torch.Tensor]:
    """`model` in Stability's single-file layout, placed by `sd3_module` (linear layers) and NORMS."""
    n = model.config.num_layers
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in model.state_dict().items():
        module, _, kind = key.rpartition(".")
        if module == "pos_embed":
            out["pos_embed"] = value.clone()
            continue
        place = sd3_module(module, n)
        if place is None:
            block, _, rest = module.partition(".")[2].partition(".")
            out[f"joint_blocks.{block}.{NORMS[rest]}.{kind}"] = value.clone()
            continue
        target, part, swap = place
        value = torch.cat(value.chunk(2)[::-1]) if swap else value.clone()
        if part is None:
            out[f"{target}.{kind}"] = value
        else:
            fused.setdefault(f"{target}.{kind}", {})[part] = value
    for key, parts in fused.items():
        out[key] = torch.cat([parts[p] for p in range(3)])
    return out


def _random_lora(model: SD3Transformer2DModel, targets: list[str], rank: int = 2, alpha: float = 6.0):
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return get_peft_model_state_dict(model), {"r": rank, "lora_alpha": alpha}


@pytest.mark.parametrize("sd35", [False, True], ids=["sd3-medium", "sd3.5-with-attn2-and-qk-norm"])
def test_the_mmdit_file_is_what_comfyui_and_forge_apply_and_equals_the_diffusers_lora(sd35):
    model = _transformer(sd35)
    checkpoint = _checkpoint(model)
    # the layout is diffusers' own: its single-file converter reads it back into the same transformer
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(checkpoint))
    own = {k: v.clone() for k, v in model.state_dict().items()}
    assert back.keys() == own.keys() and all(torch.equal(back[k], own[k]) for k in own)

    targets = EVERY_KIND + (["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"] if sd35 else [])
    layers, config = _random_lora(model, targets)
    state = sd3_kohya_state_dict(layers, config, model.config.num_layers)
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}
    # ComfyUI's / Forge's key rule: lora_unet_ + a checkpoint weight's name, dots as underscores
    comfy = {"lora_unet_" + k[:-len(".weight")].replace(".", "_"): k for k in checkpoint if k.endswith(".weight")}
    assert names <= comfy.keys(), sorted(names - comfy.keys())[:3]
    assert all(re.fullmatch(r"lora_unet_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in state)

    patched = dict(checkpoint)
    for name in names:  # ComfyUI's (and Forge's) "lora" patch, as their weight_adapter applies it
        down, up, alpha = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"], state[f"{name}.alpha"]
        key = comfy[name]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(checkpoint[key].shape)
        patched[key] = checkpoint[key] + float(alpha) / down.shape[0] * delta
    patched_diffusers = convert_sd3_transformer_checkpoint_to_diffusers(patched)

    # the LoRA's own update, from PEFT's tensors: W + alpha / r * B @ A on exactly its layers
    expected = {k: v.clone() for k, v in own.items()}
    modules = {k.rpartition(".lora_")[0] for k in layers}
    for module in modules:
        down, up = layers[f"{module}.lora_A.weight"], layers[f"{module}.lora_B.weight"]
        weight = expected[f"{module}.weight"]
        expected[f"{module}.weight"] = weight + config["lora_alpha"] / config["r"] * (
            up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    assert patched_diffusers.keys() == expected.keys()
    for key, value in patched_diffusers.items():
        torch.testing.assert_close(value, expected[key], atol=1e-5, rtol=1e-5, msg=key)
    moved = {k for k in own if not torch.equal(patched_diffusers[k], own[k])}
    assert moved == {f"{m}.weight" for m in modules}  # to_k, in the same fused qkv as to_q and to_v, did not


def test_an_sd3_run_writes_the_file_and_it_loads_back_and_reproduces_the_eval_images(tiny_config, tmp_path,
                                                                                      capfd):
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "norm1.linear", "norm1_context.linear", "proj_out"]
    config = tiny_config(model={"path": "builtin:tiny-sd3"}, lora={"rank": 4, "alpha": 8, "target_modules": targets},
                         raft={"iterations": 1}, training={"learning_rate": 5e-3, "epochs": 2})
    run_training(config, log=lambda _: None)
    run = Path(config.output_dir)
    path = run / "final" / KOHYA_FILE
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_network_module"] == "networks.lora_sd3" and meta["ss_base_model_version"] == "medium"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    state = load_file(str(path))
    qkv = [k for k in keys if k.endswith("attn_qkv.lora_down.weight")]
    assert qkv and all(state[k].shape[0] == 12 and float(state[k.replace("lora_down.weight", "alpha")]) == 24
                       for k in qkv)  # three rank-4 parts stacked, alpha scaled with them: 24 / 12 = 8 / 4
    pipe = load_pipeline("builtin:tiny-sd3")
    load_lora(pipe, path)  # `generate --lora` and experts: every layer, at its strength
    # each fused q/k/v LoRA comes back as its three rank-4 parts, tensor for tensor: the same pixels
    assert_reproduces_eval(pipe, config, run / "samples/iter_0000/eval")
    with pytest.raises(UserError, match="match no layer|does not fit"):
        load_lora(load_pipeline("builtin:tiny-sd"), path)  # on an SD 1.x UNet: refused
    # a run made before final/ held the file: `export --format kohya` makes the same bytes from the diffusers file
    old = copy_run(run, tmp_path / "old-run")
    (old / "final" / KOHYA_FILE).unlink()
    out = tmp_path / KOHYA_FILE
    result = run_in_process(capfd, "export", str(old), "--format", "kohya", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == path.read_bytes()


def test_a_lora_with_a_layer_outside_the_mmdit_layout_is_refused_and_nothing_written(tmp_path):
    layers = {"transformer_blocks.0.attn.norm_q.lora_A.weight": torch.ones(2, 8),
              "transformer_blocks.0.attn.norm_q.lora_B.weight": torch.ones(8, 2)}
    out = tmp_path / KOHYA_FILE
    with pytest.raises(UserError, match="no place in the MMDiT layout"):
        write_sd3_kohya(out, layers, {"r": 2, "lora_alpha": 2}, {"num_layers": 2}, "builtin:tiny-sd3")
    assert list(tmp_path.iterdir()) == []
