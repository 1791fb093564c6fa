"""The summed reward RAFT ranks by: weights, optional normalisation, dropped samples.

A sample whose reward is not finite, or whose reward call raises, is dropped (score NaN):
counted and logged, never fatal for the run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..config import RewardSpec
from ..protocols import Reward, take
from . import build_reward

log = logging.getLogger(__name__)


def _safe_scores(reward: Reward, outputs, prompts: Sequence[str]) -> np.ndarray:
    """Scores as float64; NaN where the reward raised or returned a non-finite value."""
    n = len(prompts)
    try:
        with torch.inference_mode():
            raw = reward(outputs, list(prompts))
        scores = np.asarray([float(x) for x in (raw.tolist() if hasattr(raw, "tolist") else raw)])
        if scores.shape != (n,):
            raise ValueError(f"returned {scores.shape[0]} scores for {n} samples")
        return np.where(np.isfinite(scores), scores, np.nan)
    except Exception as batch_error:  # noqa: BLE001 - isolate the failing samples below
        if n == 1:
            log.warning("reward failed on one sample: %s", batch_error)
            return np.array([np.nan])
        # Score one by one so that one bad sample does not drop the batch.
        return np.concatenate([_safe_scores(reward, take(outputs, [i]), [prompts[i]]) for i in range(n)])


def _normalize(x: np.ndarray, groups: Sequence[int], how: str) -> np.ndarray:
    if how == "none":
        return x
    out = np.full_like(x, np.nan)
    keys = [0] * len(x) if how == "batch" else list(groups)
    for g in set(keys):
        idx = np.array([i for i, k in enumerate(keys) if k == g])
        vals = x[idx]
        ok = np.isfinite(vals)
        if ok.sum() == 0:
            continue
        mean, std = vals[ok].mean(), vals[ok].std()
        out[idx] = (vals - mean) / (std + 1e-6)
    return out


@dataclass
class Scored:
    total: np.ndarray  # (N,) weighted sum, NaN for dropped samples
    parts: dict[str, np.ndarray]  # reward name -> raw (unnormalised) scores

    @property
    def n_dropped(self) -> int:
        return int(np.isnan(self.total).sum())


class RewardSet:
    """Several rewards, each loaded once, summed with weights."""

    def __init__(self, specs: Sequence[RewardSpec], device: torch.device, field: str = "rewards",
                 dtype: torch.dtype = torch.float32):
        self.specs = list(specs)
        self.fns = [build_reward(s.name, s.options, device, dtype, field=f"{field}.{i}")
                    for i, s in enumerate(self.specs)]

    def names(self) -> list[str]:
        # Unique labels, even when one reward appears twice with different options.
        seen: dict[str, int] = {}
        labels = []
        for s in self.specs:
            base = s.label or s.name
            seen[base] = seen.get(base, 0) + 1
            labels.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
        return labels

    def __call__(self, outputs, prompts: Sequence[str], groups: Sequence[int], batch_size: int = 64) -> Scored:
        n = len(prompts)
        parts: dict[str, np.ndarray] = {}
        total = np.zeros(n)
        for label, spec, fn in zip(self.names(), self.specs, self.fns):
            raw = np.concatenate([
                _safe_scores(fn, take(outputs, range(i, min(n, i + batch_size))), prompts[i:i + batch_size])
                for i in range(0, n, batch_size)
            ]) if n else np.zeros(0)
            parts[label] = raw
            total = total + spec.weight * _normalize(raw, groups, spec.normalize)
        dropped = int(np.isnan(total).sum())
        if dropped:
            log.warning("%d of %d samples dropped: a reward failed or was not finite", dropped, n)
        return Scored(total=total, parts=parts)


def nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    ok = x[np.isfinite(x)]
    return float(ok.mean()) if ok.size else math.nan
