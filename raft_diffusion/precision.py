"""`training.mixed_precision`: autocast for the forward passes, float32 LoRA weights, and for fp16
a gradient scaler whose state is part of every checkpoint.

accelerate skips both autocast and loss scaling for fp16 on the CPU (its scaler is CUDA-and-kin
only), so a `mixed_precision: fp16` run on the CPU would silently train in float32 and a resume
could not restore a scaler that was never there. Here the same code runs on every device:
`torch.autocast(device, dtype)` and `torch.amp.GradScaler(device)`; the Accelerator itself is
built with `mixed_precision="no"` so that it does not scale a second time.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from .errors import UserError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Precision:
    """Autocast and (fp16) loss scaling of one run's fine-tuning."""

    def __init__(self, mode: str, device: torch.device):
        self.mode = mode
        self.device_type = torch.device(device).type
        self.dtype = DTYPES.get(mode)
        self.scaler = torch.amp.GradScaler(self.device_type) if mode == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring the gradients back to their true size before clipping (fp16 only)."""
        if self.scaler is not None:
            self.scaler.unscale_(_inner(optimizer))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step; with fp16, skipped when a gradient overflowed, and the scale updated."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(_inner(optimizer))
        self.scaler.update()

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    # accelerate's AcceleratedOptimizer wraps the torch one; the scaler keeps per-optimizer state by identity.
    return getattr(optimizer, "optimizer", optimizer)


def check_launcher(mode: str) -> None:
    """Refuse a launcher's `--mixed_precision` that the config does not ask for (it would be ignored)."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched not in ("", "no") and launched != mode:
        raise UserError("config training.mixed_precision", f"is {mode!r} but the launcher asked for {launched!r}",
                        f"set training.mixed_precision: {launched} (or --set training.mixed_precision={launched}), "
                        "or launch without --mixed_precision")
