"""A FLUX.1 LoRA in the layout ComfyUI, Forge and kohya's sd-scripts load: BFL's module names under kohya's.

Black Forest Labs' FLUX.1 checkpoints (the single files ComfyUI and Forge load) name the transformer's
modules `double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, ...; kohya's sd-scripts
(networks/lora_flux.py) trains and saves LoRAs on those modules as `lora_unet_<module, dots as
underscores>`, and ComfyUI maps every `diffusion_model.<module>.weight` of a FLUX model to exactly that
name. diffusers splits BFL's fused layers:

- a double block's `img_attn.qkv` is diffusers' `attn.to_q`, `to_k`, `to_v`; `txt_attn.qkv` is
  `attn.add_q_proj`, `add_k_proj`, `add_v_proj`;
- a single block's `linear1` is `attn.to_q`, `to_k`, `to_v` and `proj_mlp` stacked by rows (3072 +
  3072 + 3072 + 12288 on FLUX.1), its `linear2` is `proj_out`;
- the final layer's modulation (`norm_out.linear`) has its shift and scale halves swapped.

The LoRAs of a fused layer's parts become one LoRA of the fused layer, as kohya's own `split_qkv`
saves them: the downs stacked, the ups block-diagonal, rank the sum of the parts' and `.alpha` scaled
with it so that alpha / rank stays the adapter's. A part the adapter did not train gets zero rows, so
every fused LoRA has all its parts (diffusers' kohya loader then reads it as block-diagonal, exactly).
The final layer's LoRAs carry their strength in the up weights with `.alpha` = rank: diffusers' kohya
FLUX reader (0.42) drops those two layers' alphas, ComfyUI and Forge apply them; this way both agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoint import write_file_atomically
from .errors import UserError
from .lora_formats import _peft_config, _swap_halves, block_parts, by_place, check_kohya, kohya_name
from .weights import canonical_safetensors

FLUX_MLP_RATIO = 4  # FluxSingleTransformerBlock's proj_mlp: 4 x the inner width (diffusers and BFL)

_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # diffusers swaps its shift and scale halves
}
_DOUBLE = {
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
}
# fused BFL layers: their diffusers parts in row order
_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}

Place = tuple[str, int | None, bool]  # (BFL module, which part of a fused layer or None, swapped halves)


def flux_module(module: str) -> Place | None:
    """Where diffusers' FLUX transformer module `module` lives in BFL's layout, or None."""
    if module in _TOP:
        return _TOP[module], None, module == "norm_out.linear"
    head, _, rest = module.partition(".")
    index, _, name = rest.partition(".")
    if not index.isdigit():
        return None
    if head == "transformer_blocks":
        block, plain, fused = f"double_blocks.{index}.", _DOUBLE, _DOUBLE_FUSED
    elif head == "single_transformer_blocks":
        block, plain, fused = f"single_blocks.{index}.", _SINGLE, _SINGLE_FUSED
    else:
        return None
    if name in plain:
        return block + plain[name], None, False
    for target, parts in fused.items():
        if name in parts:
            return block + target, parts.index(name), False
    return None


def fused_widths(target: str, transformer_config: dict[str, Any]) -> list[int]:
    """The row counts of a fused BFL layer's parts, from the transformer's config."""
    inner = int(transformer_config["num_attention_heads"]) * int(transformer_config["attention_head_dim"])
    return [inner] * 3 + ([FLUX_MLP_RATIO * inner] if target.endswith(".linear1") else [])


def flux_kohya_state_dict(layers: dict[str, torch.Tensor], config: dict[str, Any],
                          transformer_config: dict[str, Any], field: str = "config lora") -> dict[str, torch.Tensor]:
    """The kohya-named tensors (BFL layout) of a FLUX transformer LoRA under PEFT's names (with or
    without the `transformer.` prefix); every layer of rank `r`."""
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    fused = by_place(layers, config, flux_module, "the FLUX.1 layout ComfyUI and Forge load", field)
    out: dict[str, torch.Tensor] = {}
    for target in sorted(fused):
        parts = fused[target]
        if None in parts:
            down, up = parts[None]
        else:  # every part of the fused layer: downs stacked, ups block-diagonal, zeros where untrained
            widths = fused_widths(target, transformer_config)
            some_down = next(iter(parts.values()))[0]
            down = torch.zeros(len(widths) * rank, some_down.shape[1], dtype=some_down.dtype)
            up = torch.zeros(sum(widths), len(widths) * rank, dtype=some_down.dtype)
            for p, (part_down, part_up) in parts.items():
                if part_up.shape[0] != widths[p]:
                    raise UserError(field, f"{target}'s part {p} has {part_up.shape[0]} rows, not the model's "
                                    f"{widths[p]}", "pass the FLUX transformer the LoRA was trained on")
                start = sum(widths[:p])
                down[p * rank:(p + 1) * rank] = part_down
                up[start:start + widths[p], p * rank:(p + 1) * rank] = part_up
        name, file_alpha = kohya_name(target), alpha * down.shape[0] / rank
        if target.startswith("final_layer."):  # diffusers' kohya FLUX reader ignores these layers' alphas
            up, file_alpha = up * (file_alpha / down.shape[0]), float(down.shape[0])  # strength in the up weights
        out[f"{name}.lora_down.weight"] = down.detach().cpu().contiguous()
        out[f"{name}.lora_up.weight"] = up.detach().cpu().contiguous()
        out[f"{name}.alpha"] = torch.tensor(file_alpha, dtype=down.dtype)
    return out


def flux_kohya_to_peft(state: dict[str, torch.Tensor], module_names: list[str], transformer_config: dict[str, Any],
                       field: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A kohya-named FLUX LoRA (BFL layout: ours, kohya sd-scripts' or one ComfyUI users share) as
    diffusers' modules: PEFT names without prefix, and the LoRA config giving every module its file
    strength. A fused LoRA `up @ down` is split exactly by rows: q's LoRA is `up[:d] @ down`, and so on;
    a part whose rows are all zero (not trained) is left out."""
    by_target: dict[str, list[tuple[str, str, int | None, bool]]] = {}  # kohya name -> its diffusers modules
    for module in module_names:
        place = flux_module(module)
        if place is not None:
            by_target.setdefault(kohya_name(place[0]), []).append((module, *place))
    layers: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}
    for name in sorted(names):
        down, up = state.get(f"{name}.lora_down.weight"), state.get(f"{name}.lora_up.weight")
        if name not in by_target or down is None or up is None:
            raise UserError(field, f"{name} matches no layer of this FLUX transformer" if name not in by_target
                            else f"{name} lacks lora_{'up' if down is not None else 'down'}",
                            "pass a LoRA trained on this --model")
        r = int(down.shape[0])
        a = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else float(r)
        for module, target, part, swap in by_target[name]:
            part_down, part_rank, part_alpha = down, r, a
            if part is None:
                rows = up
            else:
                widths = fused_widths(target, transformer_config)
                if up.shape[0] != sum(widths):
                    raise UserError(field, f"{name} has {up.shape[0]} rows, not this model's {sum(widths)}",
                                    "pass a LoRA trained on this --model")
                blocks = block_parts(down, up, widths)
                if blocks is not None:  # block-diagonal (ours, kohya's split layers): each part exactly
                    part_down, rows = blocks[part]
                    part_rank, part_alpha = part_down.shape[0], a * part_down.shape[0] / r
                else:
                    start = sum(widths[:part])
                    rows = up[start:start + widths[part]]
                if not rows.any():  # a part the file does not train
                    continue
            layers[f"{module}.lora_A.weight"] = part_down.contiguous()
            layers[f"{module}.lora_B.weight"] = (_swap_halves(rows) if swap else rows).contiguous()
            ranks[module], alphas[module] = part_rank, part_alpha
    if not layers:
        raise UserError(field, "the file holds no lora_unet_ layers", "pass a LoRA trained on this --model")
    return layers, _peft_config(ranks, alphas)


def write_flux_kohya(path: str | Path, layers: dict[str, torch.Tensor], config: dict[str, Any],
                     transformer_config: dict[str, Any], model_path: str, field: str = "config lora") -> None:
    """`path`: the FLUX LoRA under kohya's BFL names with kohya's `ss_*` metadata (networks.lora_flux)."""
    from safetensors.torch import save

    state = flux_kohya_state_dict(layers, config, transformer_config, field)
    meta = {
        "ss_network_module": "networks.lora_flux",
        "ss_network_dim": str(int(config["r"])),
        "ss_network_alpha": str(float(config["lora_alpha"])),
        "ss_base_model_version": "flux1",  # kohya's flux_utils.MODEL_VERSION_FLUX_V1
        "ss_v2": "False",
        "ss_sd_model_name": str(model_path),
        "ss_output_name": Path(path).stem,
        "ss_training_comment": "raft-diffusion RAFT fine-tune; fused qkv / linear1 LoRAs are block-diagonal, "
                               "alpha scaled with their rank; pytorch_lora_weights.safetensors is the same LoRA "
                               "under diffusers' names",
    }
    data = canonical_safetensors(save(state, metadata=meta))
    write_file_atomically(Path(path), lambda tmp: tmp.write_bytes(data))


def check_flux_kohya(config: dict[str, Any], field: str = "config lora") -> None:
    """Refuse, before training, a LoRA config the FLUX kohya file could not carry."""
    check_kohya(config, field)
