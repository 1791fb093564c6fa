"""A LoRA file attached to a loaded pipeline, every layer of it or a one-line refusal: diffusers'
names (a run's final/), kohya's for SD 1.x/2.x and SDXL (its SGM UNet layout), kohya's MMDiT layout
for SD 3 and BFL layout for FLUX."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from ..errors import UserError
from ..lora_formats import is_kohya
from ..weights import read_tensors
from .families import family_of

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # what save_adapter writes and load_lora_weights reads

def load_lora(pipe: StableDiffusionPipeline, directory: Path, field: str = "--lora",
              model: str = "this --model") -> None:
    """The LoRA saved in `directory` (a run's final/, or one LoRA .safetensors file: diffusers' names
    or kohya's: SD 1.x/2.x, SD 3's MMDiT layout, FLUX's BFL layout) attached to `pipe`'s denoiser (UNet or transformer), every layer of
    it, or a `UserError`.

    `pipe.load_lora_weights` leaves the layers it cannot place unattached, with a log line at most;
    a user would then sample from part of the LoRA. Here every denoiser tensor of the file must end
    up in the loaded adapter, value for value.
    """
    family = family_of(pipe)
    denoiser = getattr(pipe, family.denoiser)
    path = Path(directory) if Path(directory).is_file() else Path(directory) / LORA_WEIGHTS
    try:  # a garbage or truncated file: one line, before diffusers sees it
        state = read_tensors(path, field)
    except UserError as e:
        raise UserError(field, e.problem, "pass a run's final/ directory, as training saved it") from None
    if is_kohya(state):
        if family.denoiser == "unet":
            return _load_kohya(pipe, path, state, field, model)
        return _load_transformer_kohya(pipe, family, path, state, field, model)
    expected = family.lora_tensors(state)

    def load() -> None:
        if family.denoiser == "unet" and _mixes_names(state):
            # Earlier raft-diffusion saved attention layers under diffusers' old names and the rest
            # under PEFT's; diffusers reads one scheme per file, so rename them all to PEFT's.
            StableDiffusionPipeline.load_lora_into_unet({f"unet.{k}": v for k, v in expected.items()}, None,
                                                        pipe.unet, _pipeline=pipe, metadata=lora_metadata(path))
        else:
            pipe.load_lora_weights(str(directory) if path.parent == Path(directory) else str(path))

    _, attached = _attach(denoiser, load, path, field, model)
    lost = [k for k, v in expected.items() if k not in attached or not torch.equal(attached[k].cpu(), v)]
    if not attached or lost:
        total = len(expected) or len(state)
        example = f" (e.g. {lost[0]})" if lost else ""
        raise UserError(field, f"{len(lost) or total} of {total} LoRA tensors in {path} match no layer of this "
                        f"model's {'UNet' if family.denoiser == 'unet' else family.denoiser}{example}",
                        f"pass a LoRA trained on {model}")


def _load_kohya(pipe: StableDiffusionPipeline, path: Path, state: dict[str, torch.Tensor], field: str,
                model: str) -> None:
    """A kohya-named UNet LoRA file (SD 1.x/2.x: diffusers' module names; SDXL: the SGM layout's) through
    diffusers' own kohya loader, checked as load_lora checks a diffusers file: every `lora_unet_` layer
    attached, its up and down weights value for value and its strength (alpha / rank) the file's."""
    denoiser = pipe.unet
    family = family_of(pipe)
    unet_config = dict(denoiser.config)
    adapter, attached = _attach(denoiser, lambda: pipe.load_lora_weights(str(path)), path, field, model)
    found: dict[str, torch.Tensor | None] = {}
    for key, value in attached.items():
        module, _, part = key.rpartition(".lora_")
        try:
            base = family.client_lora_name(module, unet_config)
        except UserError:
            continue  # a module with no kohya name: its file tensors are the lost ones
        name = base + (".lora_down.weight" if part == "A.weight" else ".lora_up.weight")
        found[name] = value
        down = state.get(base + ".lora_down.weight")
        alpha = state.get(base + ".alpha")
        if part == "A.weight" and down is not None and alpha is not None:
            scaling = denoiser.get_submodule(module).scaling[adapter]
            if not math.isclose(scaling, float(alpha) / down.shape[0], rel_tol=1e-6):
                found[name] = None  # attached at the wrong strength
    expected = {k: v for k, v in state.items() if k.startswith("lora_unet_") and not k.endswith(".alpha")}
    lost = [k for k, v in expected.items() if found.get(k) is None or not torch.equal(found[k].cpu(), v)]
    if not attached or lost:
        example = f" (e.g. {lost[0]})" if lost else ""
        raise UserError(field, f"{len(lost) or len(expected)} of {len(expected)} LoRA tensors in {path} match no "
                        f"layer of this model's UNet{example}", f"pass a LoRA trained on {model}")


def _load_transformer_kohya(pipe, family, path: Path, state: dict[str, torch.Tensor], field: str, model: str) -> None:
    """A kohya-named SD 3 (MMDiT layout) or FLUX (BFL layout) LoRA file, ours or kohya sd-scripts', on
    diffusers' transformer: each fused LoRA (q/k/v; FLUX's linear1) split by rows into its parts
    (`family.kohya_to_peft`), then checked as `load_lora` checks a diffusers file, value for value and
    strength for strength."""
    transformer = pipe.transformer
    layers, config = family.kohya_to_peft(transformer, state, field)
    adapter, attached = _attach(transformer, lambda: family.load_transformer_lora(pipe, layers, config), path,
                                field, model)
    lost = [k for k, v in layers.items() if k not in attached or not torch.equal(attached[k].cpu(), v)]
    for module in config["target_modules"]:
        rank = config["rank_pattern"].get(module, config["rank_pattern"].get("^" + module, config["r"]))
        alpha = config["alpha_pattern"].get(module, config["alpha_pattern"].get("^" + module, config["lora_alpha"]))
        scaling = transformer.get_submodule(module).scaling.get(adapter) if adapter else None
        if scaling is None or not math.isclose(scaling, alpha / rank, rel_tol=1e-6):
            lost.append(f"{module} (strength)")
    if not attached or lost:
        raise UserError(field, f"{len(lost)} of {len(layers)} LoRA tensors in {path} match no layer of this "
                        f"model's transformer (e.g. {lost[0]})", f"pass a LoRA trained on {model}")


def _attach(denoiser, load: Callable[[], None], path: Path, field: str, model: str
            ) -> tuple[str | None, dict[str, torch.Tensor]]:
    """`load()` (one of diffusers' LoRA loaders, quiet: their partial-load notes are replaced by the
    caller's verdict); the adapter it added to `denoiser` and that adapter's tensors, or (None, {})."""
    before = set(getattr(denoiser, "peft_config", {}))
    try:
        with _libraries_quiet():
            load()
    except Exception as e:  # noqa: BLE001 - a file that does not fit this model is the user's to fix
        raise UserError(field, f"{path} does not fit this model: {_load_reason(e)}",
                        f"pass a LoRA trained on {model}") from None
    added = [name for name in getattr(denoiser, "peft_config", {}) if name not in before]
    return (added[0], get_peft_model_state_dict(denoiser, adapter_name=added[0])) if added else (None, {})


def _mixes_names(state: dict[str, torch.Tensor]) -> bool:
    old = any(".lora.down." in k or ".lora.up." in k for k in state)
    return old and any(".lora_A." in k or ".lora_B." in k for k in state)


def lora_metadata(path: Path) -> dict[str, Any] | None:
    """The LoRA config that `save_lora_weights` keeps in the file's header (rank, alpha, targets)."""
    with safe_open(str(path), "pt") as f:
        text = (f.metadata() or {}).get("lora_adapter_metadata")
    return json.loads(text) if text else None


@contextlib.contextmanager
def _libraries_quiet():
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(level)


def _load_reason(error: Exception) -> str:
    """The informative line of a failed load: the first size mismatch, else the first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    mismatch = [line for line in lines if line.startswith("size mismatch")]
    return (mismatch or lines or [type(error).__name__])[0]

