"""An exponential moving average of the LoRA weights, the policy RAFT samples from when
`training.ema_decay` is set.

Training updates the raw weights; after each iteration's fine-tuning the average moves
`1 - decay` of the way towards them. Candidates and evaluations are generated with the average
swapped in, and the final adapter is the average: a slowly moving sampler that keeps the loop
from chasing its own latest, noisiest step (the "old policy" of DiffusionNFT and PPO-style
methods, arXiv 2509.16117). Its tensors go into every checkpoint, so resume stays exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


class LoraEMA:
    def __init__(self, params: Sequence[torch.Tensor], decay: float):
        self.params = list(params)
        self.decay = decay
        self.average = [p.detach().clone() for p in self.params]  # starts at the initial LoRA

    @torch.no_grad()
    def update(self) -> None:
        """average <- decay * average + (1 - decay) * weights."""
        for avg, p in zip(self.average, self.params):
            avg.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The average in place of the trained weights for the duration of the block."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, avg in zip(self.params, self.average):
                p.copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"ema.{i}": avg.detach().cpu().contiguous() for i, avg in enumerate(self.average)}

    def check_state(self, state: dict[str, torch.Tensor]) -> None:
        """Raise ValueError unless `state` is one of `state()`'s: a finite tensor of each weight's
        own shape (copy_ would broadcast a smaller one silently)."""
        if len(state) != len(self.average) or any(f"ema.{i}" not in state for i in range(len(self.average))):
            raise ValueError(f"EMA state has {len(state)} tensors, the LoRA {len(self.average)}")
        for i, avg in enumerate(self.average):
            t = state[f"ema.{i}"]
            if t.shape != avg.shape:
                raise ValueError(f"ema.{i} has shape {list(t.shape)}, the weight {list(avg.shape)}")
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ValueError(f"ema.{i} is not finite")

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.check_state(state)
        with torch.no_grad():
            for i, avg in enumerate(self.average):
                avg.copy_(state[f"ema.{i}"])
