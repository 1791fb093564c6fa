"""Generative backends: `diffusion` (Stable Diffusion + LoRA) and `text` (causal LM + LoRA)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..config import RunConfig
    from ..protocols import Backend


def build_backend(config: "RunConfig", accelerator: "Accelerator") -> "Backend":
    if config.backend == "diffusion":
        from .diffusion import DiffusionBackend

        return DiffusionBackend(config, accelerator)
    if config.backend == "text":
        from .text import TextBackend

        return TextBackend(config, accelerator)
    from ..errors import UserError

    raise UserError("config backend", f"backend {config.backend!r} is not available", "use diffusion or text")
