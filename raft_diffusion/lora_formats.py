"""A LoRA under the names other programs load whole: kohya's, for SD 1.x/2.x, SDXL and SD 3.

ComfyUI, Forge, AUTOMATIC1111 and kohya's sd-scripts attach none of the layers of a diffusers/PEFT
file for SD 1.x/2.x (`unet.<module>.lora_A.weight`). They all read kohya's layout:

- `lora_unet_<diffusers module path, dots as underscores>.lora_down.weight` (PEFT's lora_A; for a
  convolution, the conv-shaped A), `.lora_up.weight` (lora_B) and `.alpha` (a scalar);
- the update is `up @ down * alpha / rank`, so `.alpha` must be the adapter's own `lora_alpha`
  (diffusers' `convert_state_dict_to_kohya` writes the rank there, which is wrong when alpha != rank);
- kohya's `ss_*` metadata in the safetensors header (dim, alpha, module, base model).

kohya's format has one rank and one alpha per layer and nothing else: a LoRA with per-layer rank or
alpha patterns, DoRA or rslora cannot be carried, and is refused (`check_kohya`) rather than
written wrong.

SDXL's kohya names are those of its original (SGM) UNet layout, as kohya's sdxl_train_network writes
them (below). SD 3 gets its kohya file too, on the MMDiT layout (below): ComfyUI also loads the
diffusers-format SD 3 file whole, but Forge does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .checkpoint import write_file_atomically
from .weights import canonical_safetensors

KOHYA_FILE = "lora_kohya.safetensors"  # beside pytorch_lora_weights.safetensors in a run's final/
KOHYA_PREFIX = "lora_unet_"


def check_kohya(config: dict[str, Any], field: str = "config lora") -> None:
    """Refuse a PEFT LoRA config (`LoraConfig.to_dict()`) that kohya's format cannot carry."""
    if config.get("rank_pattern"):
        raise UserError(field, "per-layer ranks (rank_pattern) cannot be written in kohya's format",
                        "use one rank for every layer")
    if config.get("alpha_pattern"):
        raise UserError(field, "per-layer alphas (alpha_pattern) cannot be written in kohya's format",
                        "use one alpha for every layer")
    if config.get("use_dora"):
        raise UserError(field, "a DoRA adapter cannot be written in kohya's LoRA format", "train a plain LoRA")
    if config.get("use_rslora"):
        raise UserError(field, "rslora (alpha / sqrt(rank) scaling) cannot be written in kohya's format",
                        "train without rslora")


def kohya_name(module: str) -> str:
    """kohya's name of a UNet module: `down_blocks.0.resnets.0.conv1` -> `lora_unet_down_blocks_0_resnets_0_conv1`."""
    return KOHYA_PREFIX + module.replace(".", "_")


def kohya_state_dict(layers: dict[str, torch.Tensor], config: dict[str, Any],
                     field: str = "config lora", name_of=kohya_name) -> dict[str, torch.Tensor]:
    """The kohya-named tensors of a UNet LoRA.

    `layers`: PEFT's names, `<module>.lora_A.weight` / `<module>.lora_B.weight`, with or without the
    `unet.` prefix that `save_lora_weights` adds; `config`: the adapter's PEFT config dict (its `r`
    and `lora_alpha`). Every layer must have rank `r`; `.alpha` is `lora_alpha`, in the weights' dtype.
    `name_of`: a diffusers module -> its kohya name (SDXL: `sdxl_kohya_name`).
    """
    check_kohya(config, field)
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    out: dict[str, torch.Tensor] = {}
    modules = _pairs(layers, "unet.", field)
    for module in sorted(modules):
        down, up = modules[module]
        if down.shape[0] != rank or up.shape[1] != rank:
            raise UserError(field, f"{module} has rank {down.shape[0]}, not the adapter's {rank}: kohya's format "
                            "has one rank per file", "use one rank for every layer")
        name = name_of(module)
        out[f"{name}.lora_down.weight"] = down.detach().cpu().contiguous()
        out[f"{name}.lora_up.weight"] = up.detach().cpu().contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=down.dtype)
    return out


def kohya_metadata(config: dict[str, Any], unet_config: dict[str, Any], model_path: str,
                   conv: bool, output_name: str = "lora_kohya") -> dict[str, str]:
    """kohya sd-scripts' `ss_*` header fields (strings, as kohya writes them) for this LoRA."""
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_sd_model_name": str(model_path),
        "ss_output_name": output_name,
        "ss_training_comment": "raft-diffusion RAFT fine-tune; pytorch_lora_weights.safetensors is the same "
                               "LoRA under diffusers' names",
    }
    width = unet_config.get("cross_attention_dim")
    if width is not None:  # unknown for a converted file whose LoRA has no cross-attention key or value
        v2 = int(width) == 1024  # SD 2.x: OpenCLIP ViT-H, 1024 wide; SD 1.x: CLIP ViT-L, 768
        # kohya's model_util.get_model_version_str_for_sd1_sd2: sd_v1, sd_v2, and _v for v-prediction
        v = "_v" if unet_config.get("prediction_type") == "v_prediction" else ""
        meta["ss_base_model_version"] = ("sd_v2" if v2 else "sd_v1") + v
        meta["ss_v2"] = str(v2)
    if conv:  # kohya's LoRA on 3x3 convolutions (LoCon): conv_dim / conv_alpha in its network args
        meta["ss_network_args"] = json.dumps({"conv_dim": str(rank), "conv_alpha": str(alpha)}, sort_keys=True)
    return meta


def write_kohya(path: str | Path, layers: dict[str, torch.Tensor], config: dict[str, Any],
                unet_config: dict[str, Any], model_path: str, field: str = "config lora") -> None:
    """`path`: the LoRA under kohya's names with its `ss_*` metadata, bytes fixed by the tensors.

    Everything is checked before anything is written: a refused LoRA leaves no file.
    """
    from safetensors.torch import save

    state = kohya_state_dict(layers, config, field)
    conv = any(t.ndim == 4 and t.shape[-1] > 1 for k, t in state.items() if k.endswith(".lora_down.weight"))
    meta = kohya_metadata(config, unet_config, model_path, conv, Path(path).stem)
    data = canonical_safetensors(save(state, metadata=meta))
    write_file_atomically(Path(path), lambda tmp: tmp.write_bytes(data))


# -- SDXL: kohya's names on Stability's SGM UNet layout ----------------------------------------------
#
# kohya's sd-scripts train SDXL on their copy of Stability's original UNet (sdxl_original_unet.py), so
# sdxl_train_network writes `lora_unet_<SGM module, dots as underscores>`:
# `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `..._input_blocks_1_0_in_layers_2`
# (a resnet's conv1), `lora_unet_label_emb_0_0` (the added conditioning); ComfyUI and Forge read
# those (their SDXL key map is the checkpoint's), and diffusers' loader maps them back
# (`_maybe_map_sgm_blocks_to_diffusers`). The module places are `ldm_layout.sgm_unet_module`'s.

SDXL_MODEL_VERSION = "sdxl_base_v1-0"  # kohya's sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0


def sdxl_kohya_name(module: str, unet_config: dict[str, Any], field: str = "config lora") -> str:
    """kohya's SDXL name of a diffusers UNet module: `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`
    -> `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`; a module with no SGM place is refused."""
    from .ldm_layout import sgm_unet_module

    place = sgm_unet_module(module, unet_config, field)
    if place is None:
        raise UserError(field, f"{module} has no place in SDXL's original UNet layout, which kohya, ComfyUI and "
                        "Forge load", "train the LoRA on the attention, resnet and sampler layers")
    return kohya_name(place)


def write_sdxl_kohya(path: str | Path, layers: dict[str, torch.Tensor], config: dict[str, Any],
                     unet_config: dict[str, Any], model_path: str, field: str = "config lora") -> None:
    """`path`: the SDXL UNet LoRA under kohya's SGM names with kohya's `ss_*` metadata."""
    from safetensors.torch import save

    state = kohya_state_dict(layers, config, field, lambda m: sdxl_kohya_name(m, unet_config, field))
    conv = any(t.ndim == 4 and t.shape[-1] > 1 for k, t in state.items() if k.endswith(".lora_down.weight"))
    meta = kohya_metadata(config, {}, model_path, conv, Path(path).stem)
    meta.update({"ss_base_model_version": SDXL_MODEL_VERSION, "ss_v2": "False"})
    if unet_config.get("prediction_type") == "v_prediction":
        meta["ss_v_parameterization"] = "True"
    data = canonical_safetensors(save(state, metadata=meta))
    write_file_atomically(Path(path), lambda tmp: tmp.write_bytes(data))


def is_kohya(state: dict[str, Any]) -> bool:
    """Whether a LoRA state dict (or its keys) is kohya-named."""
    return any(k.startswith(KOHYA_PREFIX) for k in state)


# -- SD 3 / 3.5: kohya's names on the original MMDiT layout ------------------------------------------
#
# Forge maps no diffusers-format SD 3 LoRA (its copy of ComfyUI's `model_lora_keys_unet` has the SD 3
# `transformer.` mapping commented out); it, ComfyUI and kohya's sd-scripts (networks/lora_sd3.py,
# "lora_unet ... make ComfyUI compatible") all read `lora_unet_<MMDiT module, dots as underscores>`,
# the module names of Stability's checkpoints: `joint_blocks.N.x_block.attn.qkv`, ... There q, k and
# v are one fused layer, so the LoRAs of diffusers' separate `to_q`, `to_k`, `to_v` become one LoRA of
# the fused layer: the downs stacked, the ups block-diagonal (as kohya's own `split_qkv` saves them),
# rank the sum of the parts', `.alpha` scaled with it so that alpha / rank stays the adapter's.

SD3_FILE_NOTE = "the same LoRA under kohya's SD 3 names (MMDiT layout), for Forge, ComfyUI, kohya sd-scripts"
_QKV = {"to_q": 0, "to_k": 1, "to_v": 2, "add_q_proj": 0, "add_k_proj": 1, "add_v_proj": 2}
_SD3_TOP = {
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # diffusers swaps its shift and scale halves
    "context_embedder": "context_embedder",
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
}
_SD3_BLOCK = {
    "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
    "attn2.to_out.0": "x_block.attn2.proj",
    "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
    "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
}


def sd3_module(module: str, num_layers: int) -> tuple[str, int | None, bool] | None:
    """Where diffusers' SD 3 transformer module `module` lives in the MMDiT layout: (MMDiT module,
    which third of a fused qkv or None, whether the output rows' two halves are swapped), or None."""
    if module in _SD3_TOP:
        return _SD3_TOP[module], None, module == "norm_out.linear"
    head, _, rest = module.partition(".")
    index, _, name = rest.partition(".")
    if head != "transformer_blocks" or not index.isdigit():
        return None
    block = f"joint_blocks.{index}."
    attn, _, layer = name.partition(".")
    if attn in ("attn", "attn2") and layer in _QKV:
        side = "context_block" if layer.startswith("add_") else "x_block"
        if attn == "attn2" and side == "context_block":
            return None
        return f"{block}{side}.{attn}.qkv", _QKV[layer], False
    if name in _SD3_BLOCK:
        last_context = name == "norm1_context.linear" and int(index) == num_layers - 1
        return block + _SD3_BLOCK[name], None, last_context
    return None


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def sd3_kohya_state_dict(layers: dict[str, torch.Tensor], config: dict[str, Any], num_layers: int,
                         field: str = "config lora") -> dict[str, torch.Tensor]:
    """The kohya-named tensors (MMDiT layout) of an SD 3 transformer LoRA under PEFT's names (with or
    without the `transformer.` prefix); every layer of rank `r`, `.alpha` so that alpha / rank is the
    adapter's `lora_alpha / r`."""
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    fused = by_place(layers, config, lambda m: sd3_module(m, num_layers), "the MMDiT layout Forge and ComfyUI load",
                     field)
    out: dict[str, torch.Tensor] = {}
    for target in sorted(fused):
        parts = fused[target]
        if None in parts:
            down, up = parts[None]
        else:  # q, k, v of one fused layer: downs stacked, ups block-diagonal (zeros for a part not trained)
            width = next(iter(parts.values()))[1].shape[0]
            down = torch.cat([parts[p][0] for p in sorted(parts)])
            up = torch.zeros(3 * width, down.shape[0], dtype=down.dtype)
            for column, p in enumerate(sorted(parts)):
                up[p * width:(p + 1) * width, column * rank:(column + 1) * rank] = parts[p][1]
        name = kohya_name(target)
        out[f"{name}.lora_down.weight"] = down.detach().cpu().contiguous()
        out[f"{name}.lora_up.weight"] = up.detach().cpu().contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha * down.shape[0] / rank, dtype=down.dtype)
    return out


def by_place(layers: dict[str, torch.Tensor], config: dict[str, Any], place_of, layout: str, field: str
             ) -> dict[str, dict[int | None, tuple[torch.Tensor, torch.Tensor]]]:
    """A transformer LoRA's (down, up) pairs grouped by the original layout's module they belong to:
    target -> {part of a fused layer (None: not fused): (down, up with swapped halves undone)}.
    `place_of(module)`: (target, part, swap) or None; every layer of rank `r`, or a `UserError`."""
    check_kohya(config, field)
    rank = int(config["r"])
    fused: dict[str, dict[int | None, tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, (down, up) in sorted(_pairs(layers, "transformer.", field).items()):
        if down.shape[0] != rank or up.shape[1] != rank:
            raise UserError(field, f"{module} has rank {down.shape[0]}, not the adapter's {rank}: kohya's format "
                            "has one rank per file", "use one rank for every layer")
        place = place_of(module)
        if place is None:
            raise UserError(field, f"{module} has no place in {layout}",
                            "train the LoRA on the attention, feed-forward and modulation layers")
        target, part, swap = place
        fused.setdefault(target, {})[part] = (down, _swap_halves(up) if swap else up)
    return fused


def sd3_kohya_to_peft(state: dict[str, torch.Tensor], num_layers: int, targets: dict[str, str],
                      field: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A kohya-named SD 3 LoRA (MMDiT layout; ours or kohya sd-scripts') as diffusers' modules: PEFT
    names without prefix, and the LoRA config (`r`, `lora_alpha`, with rank and alpha patterns) that
    gives every module its file strength `alpha / rank`.

    A fused qkv LoRA `up @ down` is split exactly by rows: q's LoRA is `up[:d] @ down`, and so on.
    `targets`: MMDiT module -> diffusers module(s), from `sd3_targets`.
    """
    layers: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    by_target: dict[str, list[tuple[str, int | None, bool]]] = {}
    for module, (target, part, swap) in targets.items():
        by_target.setdefault(target, []).append((module, part, swap))
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}
    for name in sorted(names):
        matches = [t for t in by_target if kohya_name(t) == name]
        down, up = state.get(f"{name}.lora_down.weight"), state.get(f"{name}.lora_up.weight")
        if not matches or down is None or up is None:
            raise UserError(field, f"{name} matches no layer of this SD 3 transformer" if not matches
                            else f"{name} lacks lora_{'up' if down is not None else 'down'}",
                            "pass a LoRA trained on this --model")
        target = matches[0]
        r = int(down.shape[0])
        a = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else float(r)
        blocks = block_parts(down, up, [up.shape[0] // 3] * 3)
        for module, part, swap in by_target[target]:
            if part is not None and blocks is not None:  # kohya's own block-diagonal layout: each part exactly
                part_down, rows = blocks[part]
                ranks[module], alphas[module] = part_down.shape[0], a * part_down.shape[0] / r
            else:
                part_down = down
                rows = up if part is None else up[part * (up.shape[0] // 3):(part + 1) * (up.shape[0] // 3)]
                ranks[module], alphas[module] = r, a
            layers[f"{module}.lora_A.weight"] = part_down.contiguous()
            layers[f"{module}.lora_B.weight"] = (_swap_halves(rows) if swap else rows).contiguous()
    if not layers:
        raise UserError(field, "the file holds no lora_unet_ layers", "pass a LoRA trained on this --model")
    return layers, _peft_config(ranks, alphas)


def block_parts(down: torch.Tensor, up: torch.Tensor, widths: list[int]
                ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """A fused LoRA's parts, (down, up) each, where it is block-diagonal as kohya saves split layers
    (and we write them): rank n x r for n parts, part p's up rows zero outside columns p r .. (p + 1) r.
    Then each part is attached as the rank-r LoRA it was trained as, tensor for tensor; otherwise None
    (every part then takes the whole down and its rows of the up: the same update at n x the rank)."""
    n, rank = len(widths), down.shape[0] // len(widths)
    if rank == 0 or down.shape[0] % n or up.shape[0] != sum(widths):
        return None
    parts, start = [], 0
    for p, width in enumerate(widths):
        rows = up[start:start + width]
        inside = rows[:, p * rank:(p + 1) * rank]
        if rows.count_nonzero() != inside.count_nonzero():
            return None
        parts.append((down[p * rank:(p + 1) * rank], inside))
        start += width
    return parts


def _peft_config(ranks: dict[str, int], alphas: dict[str, float]) -> dict[str, Any]:
    """The LoRA config (`r`, `lora_alpha`, rank and alpha patterns) giving each module its rank and alpha."""
    base = max(set(ranks.values()), key=list(ranks.values()).count)
    base_alpha = max({a for m, a in alphas.items() if ranks[m] == base}, key=list(alphas.values()).count)
    def key(module: str) -> str:
        # PEFT matches a pattern key as a suffix (`(.*\.)?key$`): a module whose name ends another's
        # (FLUX's top-level proj_out, a single block's proj_out) is anchored, or both would take its value
        clash = any(other != module and other.endswith("." + module) for other in ranks)
        return "^" + module if clash else module

    return {"r": base, "lora_alpha": base_alpha, "target_modules": sorted(ranks),
            "rank_pattern": {key(m): r for m, r in ranks.items() if r != base},
            "alpha_pattern": {key(m): a for m, a in alphas.items() if a != base_alpha}}


def sd3_targets(module_names: list[str], num_layers: int) -> dict[str, tuple[str, int | None, bool]]:
    """Every diffusers module of an SD 3 transformer with an MMDiT place (`sd3_module`)."""
    places = {m: sd3_module(m, num_layers) for m in module_names}
    return {m: p for m, p in places.items() if p is not None}


def sd3_model_version(transformer_config: dict[str, Any]) -> str:
    """kohya's `ss_base_model_version` for an SD 3 model (sd3_utils: after `stable-diffusion-3-`)."""
    if not transformer_config.get("qk_norm"):
        return "medium"
    return "5-medium" if transformer_config.get("dual_attention_layers") else "5-large"


def write_sd3_kohya(path: str | Path, layers: dict[str, torch.Tensor], config: dict[str, Any],
                    transformer_config: dict[str, Any], model_path: str, field: str = "config lora") -> None:
    """`path`: the SD 3 LoRA under kohya's MMDiT names with kohya's `ss_*` metadata."""
    from safetensors.torch import save

    state = sd3_kohya_state_dict(layers, config, int(transformer_config["num_layers"]), field)
    meta = {
        "ss_network_module": "networks.lora_sd3",
        "ss_network_dim": str(int(config["r"])),
        "ss_network_alpha": str(float(config["lora_alpha"])),
        "ss_base_model_version": sd3_model_version(transformer_config),
        "ss_v2": "False",
        "ss_sd_model_name": str(model_path),
        "ss_output_name": Path(path).stem,
        "ss_training_comment": "raft-diffusion RAFT fine-tune; fused q/k/v LoRAs are block-diagonal, alpha "
                               "scaled with their rank; pytorch_lora_weights.safetensors is the same LoRA under "
                               "diffusers' names",
    }
    data = canonical_safetensors(save(state, metadata=meta))
    write_file_atomically(Path(path), lambda tmp: tmp.write_bytes(data))


def _pairs(layers: dict[str, torch.Tensor], prefix: str, field: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT A/B tensors by module (`prefix` dropped), or a `UserError`."""
    if any("lora_magnitude_vector" in k for k in layers):
        raise UserError(field, "a DoRA adapter cannot be written in kohya's LoRA format", "train a plain LoRA")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in layers.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        module, sep, part = name.rpartition(".lora_")
        if not sep or part not in ("A.weight", "B.weight"):
            raise UserError(field, f"{key} is not a LoRA A/B weight kohya's format can carry", "train a plain LoRA")
        found.setdefault(module, {})[part[0]] = value
    for module, parts in found.items():
        if set(parts) != {"A", "B"}:
            raise UserError(field, f"{module} lacks lora_{'B' if 'A' in parts else 'A'}", "save the whole adapter")
    return {m: (p["A"], p["B"]) for m, p in found.items()}
