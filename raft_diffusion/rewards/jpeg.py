"""JPEG (in)compressibility rewards, as in DDPO: the size of the image saved as JPEG, in kB.

They need no weights, so they are the rewards of the tiny-pipeline demo and tests.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import UserError


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) floats in [0, 1] -> (N, H, W, 3) uint8, rounded as PIL would."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def jpeg_kb(images: torch.Tensor, quality: int = 95) -> list[float]:
    sizes = []
    for array in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return sizes


def jpeg_compressibility(quality: int = 95, field: str = "options"):
    """Reward = minus the JPEG size in kB: smaller files (smoother images) score higher."""
    _check_quality(quality, field)

    def reward(images: torch.Tensor, prompts: Sequence[str]) -> list[float]:
        return [-s for s in jpeg_kb(images, quality)]

    return reward


def jpeg_incompressibility(quality: int = 95, field: str = "options"):
    """Reward = the JPEG size in kB: busier, more detailed images score higher."""
    _check_quality(quality, field)

    def reward(images: torch.Tensor, prompts: Sequence[str]) -> list[float]:
        return jpeg_kb(images, quality)

    return reward


def _check_quality(quality: int, field: str) -> None:
    # PIL's JPEG quality scale; outside it PIL fails (or clamps) only when the first image is scored.
    if not 0 <= quality <= 100:
        raise UserError(f"{field}.quality", f"{quality} is outside PIL's JPEG quality scale 0..100",
                        "use e.g. quality: 95")
