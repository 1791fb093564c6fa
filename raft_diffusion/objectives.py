"""What the backend fine-tunes on, given an iteration's scored samples: the objective seam.

An objective sees every scored sample of the iteration (its reward, its group = prompt, and
whether the selection kept it) and returns the samples to train on with a weight each, or no
weights for a plain average. The backends turn weights into a weighted average of per-sample
losses, so an objective is written once for images and texts alike. Adding one means adding a
function here and its name to `OBJECTIVES`, as a reward is added in `rewards/__init__.py`.

- `raft` (default): the paper's RAFT, supervised fine-tuning on the selected samples, each
  counted once (no weights: the backends' loss is exactly the one before this seam existed).
- `reward_weighted`: every valid sample of a group, weighted by exp(A / beta) where A is its
  reward z-scored within the group and beta is `training.reward_weighted.beta` (reward-weighted
  regression, Peters & Schaal 2007; the group-relative advantage of GRPO); weights are
  normalised to mean 1 within each group, so a group's total weight is its number of valid
  samples whatever beta is.
- `negative_aware` (diffusion): DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117). Every valid
  sample gets an optimality probability r = 1/2 + 1/2 clip(A / c, -1, 1), c being
  `training.negative_aware.advantage_clip`; the backend trains the implicit positive policy
  v+ = (1 - b) v_old + b v_theta towards the sample where r is high and the implicit negative
  policy v- = (1 + b) v_old - b v_theta where it is low, b being `training.negative_aware.beta`
  (the paper's eq. 5-6 on the scheduler's own target, epsilon or v, in place of flow matching's
  velocity), with the EMA of the LoRA (`training.ema_decay`) as the old policy v_old.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .config import DiffusionTrainingConfig, TrainingConfig


@dataclass
class Targets:
    """Indices of the samples to train on, in sample order, and their weights (None: all equal)."""

    indices: list[int]
    weights: np.ndarray | None = None
    optimality: np.ndarray | None = None  # negative_aware: r in [0, 1] per sample


def raft(scores: np.ndarray, groups: Sequence[int], selected: Sequence[int], cfg: TrainingConfig) -> Targets:
    """The selected samples, unweighted: RAFT as the paper defines it."""
    return Targets(indices=sorted(selected))


def group_advantages(scores: np.ndarray, groups: Sequence[int]) -> np.ndarray:
    """Each valid score z-scored within its group (NaN for dropped samples; 0 for a group of one
    or of equal scores)."""
    scores = np.asarray(scores, dtype=np.float64)
    out = np.full(len(scores), np.nan)
    groups = np.asarray(groups)
    for g in dict.fromkeys(groups.tolist()):
        idx = np.flatnonzero((groups == g) & np.isfinite(scores))
        if idx.size == 0:
            continue
        values = scores[idx]
        std = values.std()
        out[idx] = (values - values.mean()) / std if std > 0 else 0.0
    return out


def reward_weighted(scores: np.ndarray, groups: Sequence[int], selected: Sequence[int],
                    cfg: TrainingConfig) -> Targets:
    """Every valid sample, weighted by exp(A / beta) normalised to mean 1 within its group."""
    advantages = group_advantages(scores, groups)
    valid = np.flatnonzero(np.isfinite(advantages))
    weights = np.zeros(len(scores))
    groups = np.asarray(groups)
    for g in dict.fromkeys(groups[valid].tolist()):
        idx = valid[groups[valid] == g]
        logits = advantages[idx] / cfg.reward_weighted.beta
        w = np.exp(logits - logits.max())  # shifted: no overflow at small beta
        weights[idx] = w * len(idx) / w.sum()
    return Targets(indices=valid.tolist(), weights=weights[valid])


def negative_aware(scores: np.ndarray, groups: Sequence[int], selected: Sequence[int],
                   cfg: DiffusionTrainingConfig) -> Targets:
    """Every valid sample with its optimality probability r = 1/2 + 1/2 clip(A / c, -1, 1)."""
    advantages = group_advantages(scores, groups)
    valid = np.flatnonzero(np.isfinite(advantages))
    r = 0.5 + 0.5 * np.clip(advantages[valid] / cfg.negative_aware.advantage_clip, -1.0, 1.0)
    return Targets(indices=valid.tolist(), optimality=r)


OBJECTIVES: dict[str, Callable[..., Targets]] = {"raft": raft, "reward_weighted": reward_weighted,
                                                 "negative_aware": negative_aware}


def extremes(chosen: Targets, scores: np.ndarray, groups: Sequence[int], k: int) -> Targets:
    """`chosen` restricted to the best and the worst `k` of each group (their weights and optimality
    kept): what a run with `generation.rollout_steps` re-renders and trains on when its objective
    weighs every sample (Sol-RL trains on a pool's extremes)."""
    if chosen.weights is None and chosen.optimality is None:
        return chosen  # raft: the selected, already
    scores, groups = np.asarray(scores, dtype=np.float64), np.asarray(groups)
    picked = set()
    for g in dict.fromkeys(groups[chosen.indices].tolist()):
        members = [i for i in chosen.indices if groups[i] == g]
        order = sorted(members, key=lambda i: (-scores[i], i))
        picked.update(order[:k] + order[-k:])
    keep = [n for n, i in enumerate(chosen.indices) if i in picked]
    return Targets(indices=[chosen.indices[n] for n in keep],
                   weights=None if chosen.weights is None else chosen.weights[keep],
                   optimality=None if chosen.optimality is None else chosen.optimality[keep])


def targets(scores: np.ndarray, groups: Sequence[int], selected: Sequence[int], cfg: TrainingConfig) -> Targets:
    """What `cfg.objective` trains on this iteration."""
    return OBJECTIVES[cfg.objective](scores, groups, selected, cfg)
