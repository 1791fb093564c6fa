"""Generative backends: `diffusion` (Stable Diffusion + LoRA) and `text` (causal LM + LoRA)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import Accelerator

    from torch import nn

    from ..config import RunConfig
    from ..protocols import Backend


def check_lora_targets(model: "nn.Module", targets: Sequence[str], what: str, examples: str) -> None:
    """Every `lora.target_modules` entry must name a module of `model` (exactly, or as a dotted suffix)."""
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        from ..errors import UserError

        raise UserError("config lora.target_modules", f"no {what} named {missing}", f"use names such as {examples}")


def build_backend(config: "RunConfig", accelerator: "Accelerator") -> "Backend":
    if config.backend == "diffusion":
        from .diffusion import DiffusionBackend

        return DiffusionBackend(config, accelerator)
    if config.backend == "text":
        from .text import TextBackend

        return TextBackend(config, accelerator)
    from ..errors import UserError

    raise UserError("config backend", f"backend {config.backend!r} is not available", "use diffusion or text")
