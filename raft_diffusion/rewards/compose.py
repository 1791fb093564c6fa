"""The summed reward RAFT ranks by: weights, optional normalisation, dropped samples.

A sample whose reward is not finite, or whose reward call raises, is dropped (score NaN):
counted and logged, and the first reason kept per reward. The loop stops the run when too
many are dropped (`training.max_drop_fraction`); a `UserError` from a reward (a config
mistake) and `sys.exit()` inside one end the run at once instead of dropping samples.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import RewardSpec
from ..errors import RunFailed, UserError
from ..protocols import Reward, take
from . import build_reward

log = logging.getLogger(__name__)


def _as_scores(raw, n: int) -> np.ndarray:
    """A reward's return value as n float64 scores: a sequence or tensor of shape (n,) or (n, 1)."""
    if isinstance(raw, (str, bytes)) or not hasattr(raw, "__len__"):
        raise TypeError(f"returned {type(raw).__name__}, not one score per sample")
    values = raw.detach().cpu().tolist() if isinstance(raw, torch.Tensor) else (
        raw.tolist() if isinstance(raw, np.ndarray) else list(raw))
    values = [v[0] if isinstance(v, (list, tuple)) and len(v) == 1 else v for v in values]  # (n, 1)
    if len(values) != n:
        raise ValueError(f"returned {len(values)} scores for {n} samples")
    scores = []
    for v in values:
        if isinstance(v, (str, bytes)) or not isinstance(v, (int, float, np.number, bool)):
            raise TypeError(f"returned a {type(v).__name__} score ({v!r:.40}), not a number")
        scores.append(float(v))
    return np.asarray(scores, dtype=np.float64)


class RewardTimeout(Exception):
    pass


def _call(reward: Reward, outputs, prompts: list[str], timeout: float | None):
    """`reward(outputs, prompts)`, in inference mode; with `timeout`, in a thread given that many
    seconds (a call still running after it is left behind, and its result ignored). A batch that
    times out is then scored sample by sample, each call with the same timeout, as a batch that
    raised: only the samples the reward hangs on are dropped."""
    if timeout is None:
        with torch.inference_mode():
            return reward(outputs, prompts)
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            with torch.inference_mode():
                result["value"] = reward(outputs, prompts)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = e

    thread = threading.Thread(target=target, name="raft-reward", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise RewardTimeout(f"took longer than its timeout of {timeout:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def _safe_scores(reward: Reward, outputs, prompts: Sequence[str], errors: list[str],
                 timeout: float | None = None) -> np.ndarray:
    """Scores as float64; NaN where the reward raised, timed out or returned a non-finite value
    (the reason goes to `errors`)."""
    n = len(prompts)
    try:
        raw = _call(reward, outputs, list(prompts), timeout)
        scores = _as_scores(raw, n)
        if not np.isfinite(scores).all() and not errors:
            errors.append("returned a non-finite score")
        return np.where(np.isfinite(scores), scores, np.nan)
    except UserError:
        raise
    except SystemExit as e:  # a reward must not end the run without a word
        raise RunFailed(f"a reward called sys.exit({e.code!r})") from None
    except Exception as batch_error:  # noqa: BLE001 - isolate the failing samples below
        if not errors:
            errors.append(f"{type(batch_error).__name__}: {(str(batch_error).splitlines() or [''])[0]}"[:200])
        if n == 1:
            log.warning("reward failed on one sample: %s", batch_error)
            return np.array([np.nan])
        # Score one by one so that one bad sample does not drop the batch.
        return np.concatenate([_safe_scores(reward, take(outputs, [i]), [prompts[i]], errors, timeout)
                               for i in range(n)])


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
    errors: dict[str, str] = field(default_factory=dict)  # reward name -> first reason it dropped a sample
    # Per sample, the label of the filter (filters.py) that rejected it before scoring, or None;
    # empty when the run has no filters. A rejected sample is dropped: NaN in total and parts.
    filtered: list[str | None] = field(default_factory=list)
    filter_names: list[str] = field(default_factory=list)  # every filter's label, in the config's order

    @property
    def n_dropped(self) -> int:
        """Samples without a score: a reward failed on them, or a filter rejected them."""
        return int(np.isnan(self.total).sum())

    @property
    def n_filtered(self) -> int:
        return sum(r is not None for r in self.filtered)

    def filter_counts(self) -> dict[str, int]:
        """How many samples each filter rejected (every filter named, 0 included)."""
        counts = {label: 0 for label in self.filter_names}
        for r in self.filtered:
            if r is not None:
                counts[r] = counts.get(r, 0) + 1
        return counts


def unique_labels(specs: Sequence[Any]) -> list[str]:
    """Each spec's label, else its name; a second use of one gets `#2`, and so on (rewards, filters)."""
    seen: dict[str, int] = {}
    labels = []
    for s in specs:
        base = s.label or s.name
        seen[base] = seen.get(base, 0) + 1
        labels.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return labels


class RewardSet:
    """Several rewards, each loaded once, summed with weights."""

    def __init__(self, specs: Sequence[RewardSpec], device: torch.device, field: str = "rewards",
                 dtype: torch.dtype = torch.float32):
        self.specs = list(specs)
        self.fns = [build_reward(s.name, s.options, device, dtype, field=f"{field}.{i}")
                    for i, s in enumerate(self.specs)]

    def names(self) -> list[str]:
        # Unique labels, even when one reward appears twice with different options.
        return unique_labels(self.specs)

    def __call__(self, outputs, prompts: Sequence[str], groups: Sequence[int], batch_size: int = 64) -> Scored:
        parts, errors = self.raw(outputs, prompts, batch_size)
        return self.combine(parts, groups, errors)

    def raw_kept(self, outputs, prompts: Sequence[str], rejected: Sequence[str | None],
                 batch_size: int = 64) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """`raw` of the samples no filter rejected (`rejected[i]` None); NaN for the others, which
        no reward is called on."""
        kept = [i for i, r in enumerate(rejected) if r is None]
        if len(kept) == len(prompts):
            return self.raw(outputs, prompts, batch_size)
        parts, errors = self.raw(take(outputs, kept), [prompts[i] for i in kept], batch_size)
        full = {}
        for label, scores in parts.items():
            full[label] = np.full(len(prompts), np.nan)
            full[label][kept] = scores
        return full, errors

    def raw(self, outputs, prompts: Sequence[str], batch_size: int = 64) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Each reward's raw scores of `outputs` (NaN where it failed) and its first reason to fail.

        Chunk by chunk of `batch_size` samples, every reward on a chunk before the next chunk: the
        rewards that read the same CLIP embedding (clip, aesthetic) compute it once per chunk, and
        no more than one chunk of inputs is prepared at a time."""
        n = len(prompts)
        labels = self.names()
        chunks: dict[str, list[np.ndarray]] = {label: [] for label in labels}
        reasons: dict[str, list[str]] = {label: [] for label in labels}
        for i in range(0, n, batch_size):
            part, texts = take(outputs, range(i, min(n, i + batch_size))), list(prompts[i:i + batch_size])
            for label, fn, spec in zip(labels, self.fns, self.specs):
                chunks[label].append(_safe_scores(fn, part, texts, reasons[label], spec.timeout))
        parts = {label: np.concatenate(chunks[label]) if n else np.zeros(0) for label in labels}
        return parts, {label: r[0] for label, r in reasons.items() if r}

    def combine(self, parts: dict[str, np.ndarray], groups: Sequence[int], errors: dict[str, str],
                filtered: Sequence[str | None] = (), filter_names: Sequence[str] = ()) -> Scored:
        """The weighted (maybe normalised) sum of raw scores: what ranking reads. `filtered`: the
        filter that rejected each sample (or None), whose parts are NaN already."""
        n = len(groups)
        total = np.zeros(n)
        for label, spec in zip(self.names(), self.specs):
            total = total + spec.weight * _normalize(parts[label], groups, spec.normalize)
        dropped = int(np.isnan(total).sum()) - sum(r is not None for r in filtered)
        if dropped:
            log.warning("%d of %d samples dropped: a reward failed or was not finite", dropped, n)
        return Scored(total=total, parts=parts, errors=dict(errors), filtered=list(filtered),
                      filter_names=list(filter_names))

    def check_prompts(self, prompts: Sequence[str], field: str) -> None:
        """Refuse, before the run starts, prompts that a reward can never score (e.g. the oracle
        and a prompt outside the toy world): such a run would drop every sample."""
        for i, fn in enumerate(self.fns):
            check = getattr(fn, "check_prompts", None)
            if check is not None:
                check(prompts, f"{field} (with {self.specs[i].name})")


def nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    ok = x[np.isfinite(x)]
    return float(ok.mean()) if ok.size else math.nan
