"""A LoRA under the names other programs load whole: kohya's, for SD 1.x/2.x.

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

SD 3 gets no kohya file: ComfyUI loads the diffusers-format SD 3 file (`transformer.` keys) whole,
so `final/pytorch_lora_weights.safetensors` is already the file to use there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

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
                     field: str = "config lora") -> dict[str, torch.Tensor]:
    """The kohya-named tensors of a UNet LoRA.

    `layers`: PEFT's names, `<module>.lora_A.weight` / `<module>.lora_B.weight`, with or without the
    `unet.` prefix that `save_lora_weights` adds; `config`: the adapter's PEFT config dict (its `r`
    and `lora_alpha`). Every layer must have rank `r`; `.alpha` is `lora_alpha`, in the weights' dtype.
    """
    check_kohya(config, field)
    if any("lora_magnitude_vector" in k for k in layers):
        raise UserError(field, "a DoRA adapter cannot be written in kohya's LoRA format", "train a plain LoRA")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    out: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in layers.items():
        name = key[len("unet."):] if key.startswith("unet.") else key
        module, sep, part = name.rpartition(".lora_")
        if not sep or part not in ("A.weight", "B.weight"):
            raise UserError(field, f"{key} is not a LoRA A/B weight kohya's format can carry",
                            "train a plain LoRA on the UNet")
        modules.setdefault(module, {})[part[0]] = value
    for module in sorted(modules):
        parts = modules[module]
        if set(parts) != {"A", "B"}:
            raise UserError(field, f"{module} lacks lora_{'B' if 'A' in parts else 'A'}", "save the whole adapter")
        down, up = parts["A"], parts["B"]
        if down.shape[0] != rank or up.shape[1] != rank:
            raise UserError(field, f"{module} has rank {down.shape[0]}, not the adapter's {rank}: kohya's format "
                            "has one rank per file", "use one rank for every layer")
        name = kohya_name(module)
        out[f"{name}.lora_down.weight"] = down.detach().cpu().contiguous()
        out[f"{name}.lora_up.weight"] = up.detach().cpu().contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=down.dtype)
    return out


def kohya_metadata(config: dict[str, Any], unet_config: dict[str, Any], model_path: str,
                   conv: bool, output_name: str = "lora_kohya") -> dict[str, str]:
    """kohya sd-scripts' `ss_*` header fields (strings, as kohya writes them) for this LoRA."""
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    v2 = int(unet_config.get("cross_attention_dim") or 768) == 1024  # SD 2.x: OpenCLIP ViT-H, 1024 wide
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sd_v2" if v2 else "sd_v1",
        "ss_v2": str(v2),
        "ss_sd_model_name": str(model_path),
        "ss_output_name": output_name,
        "ss_training_comment": "raft-diffusion RAFT fine-tune; pytorch_lora_weights.safetensors is the same "
                               "LoRA under diffusers' names",
    }
    if conv:  # kohya's LoRA on 3x3 convolutions (LoCon): conv_dim / conv_alpha in its network args
        meta["ss_network_args"] = json.dumps({"conv_dim": str(rank), "conv_alpha": str(alpha)}, sort_keys=True)
    return meta


def write_kohya(path: str | Path, layers: dict[str, torch.Tensor], config: dict[str, Any],
                unet_config: dict[str, Any], model_path: str, field: str = "config lora") -> None:
    """`path`: the LoRA under kohya's names with its `ss_*` metadata, bytes fixed by the tensors.

    Everything is checked before anything is written: a refused LoRA leaves no file.
    """
    from safetensors.torch import save

    from .checkpoint import write_file_atomically
    from .weights import canonical_safetensors

    state = kohya_state_dict(layers, config, field)
    conv = any(t.ndim == 4 and t.shape[-1] > 1 for k, t in state.items() if k.endswith(".lora_down.weight"))
    meta = kohya_metadata(config, unet_config, model_path, conv, Path(path).stem)
    data = canonical_safetensors(save(state, metadata=meta))
    write_file_atomically(Path(path), lambda tmp: tmp.write_bytes(data))


def is_kohya(state: dict[str, Any]) -> bool:
    """Whether a LoRA state dict (or its keys) is kohya-named."""
    return any(k.startswith(KOHYA_PREFIX) for k in state)
