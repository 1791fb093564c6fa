"""Ranking: which generated samples RAFT fine-tunes on.

`per_prompt` keeps the best `top` of the K candidates of every prompt (the paper's 1/K
acceptance); `global` keeps the best `fraction` of all samples. Dropped samples (score NaN)
are never selected; a prompt whose samples were all dropped contributes nothing. Ties break
towards the lower sample index, so a selection is a pure function of the scores.

Groups without signal (`selection.min_spread`, `selection.min_reward`; RAFT++ / Reinforce-Rej, arXiv
2504.11343): a prompt whose candidates' rewards spread less than `min_spread` (max - min: ranking them
is ranking noise), or none of which reaches `min_reward`, is left out of the selection and of every
objective's targets (`without_signal`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _rank(indices: Sequence[int], scores: np.ndarray) -> list[int]:
    # Highest score first; equal scores keep index order (stable sort on -score).
    idx = np.asarray(indices, dtype=np.int64)
    order = np.argsort(-scores[idx], kind="stable")
    return idx[order].tolist()


def select_per_prompt(scores: Sequence[float], groups: Sequence[int], top: int) -> list[int]:
    """Indices of the best `top` valid samples of each group (prompt), in sample order."""
    s = np.asarray(scores, dtype=np.float64)
    keep: list[int] = []
    for g in dict.fromkeys(groups):  # groups in first-seen order
        members = [i for i, gi in enumerate(groups) if gi == g and math.isfinite(s[i])]
        keep += _rank(members, s)[:top]
    return sorted(keep)


def select_global(scores: Sequence[float], fraction: float) -> list[int]:
    """Indices of the best `fraction` of the valid samples (at least one if any is valid)."""
    s = np.asarray(scores, dtype=np.float64)
    valid = [i for i in range(len(s)) if math.isfinite(s[i])]
    if not valid:
        return []
    n = max(1, int(round(fraction * len(valid))))
    return sorted(_rank(valid, s)[:n])


def without_signal(scores: Sequence[float], groups: Sequence[int], min_spread: float | None,
                   min_reward: float | None) -> tuple[np.ndarray, list[int]]:
    """(scores with the samples of groups without signal set to NaN, those groups in first-seen order).
    A group whose samples were all dropped is not counted: it had nothing to rank anyway."""
    s = np.array(scores, dtype=np.float64)
    if min_spread is None and min_reward is None:
        return s, []
    g = np.asarray(groups)
    quiet = []
    for group in dict.fromkeys(g.tolist()):
        members = np.flatnonzero(g == group)
        valid = s[members][np.isfinite(s[members])]
        if valid.size == 0:
            continue
        if (min_spread is not None and valid.max() - valid.min() < min_spread) or \
                (min_reward is not None and valid.max() < min_reward):
            quiet.append(group)
            s[members] = np.nan
    return s, quiet


def select(scores: Sequence[float], groups: Sequence[int], strategy: str, top: int = 1,
           fraction: float = 0.125) -> list[int]:
    if strategy == "per_prompt":
        return select_per_prompt(scores, groups, top)
    if strategy == "global":
        return select_global(scores, fraction)
    raise ValueError(f"unknown selection strategy {strategy!r}")
