"""Signs that a run was gamed or collapsed, in plain words, from its metrics.jsonl alone.

A reward model is a proxy; RAFT climbs whatever it says. Three signs that the climb stopped
meaning what the user wanted (thresholds: the config's `report` section):

- **judge**: the trained reward rose from the base model's evaluation to the last one while a
  held-out judge fell by more than `judge_drop` of its base value;
- **diversity / perplexity**: a diversity metric fell, or the perplexity under the base model
  rose, by more than `diversity_drop` / `perplexity_rise` of its base value (text runs);
- **collapse**: a reward or judge on the eval samples rose to a peak and ended more than
  `collapse_drop` of that gain below it (the monet-cat run at 35% held-out at iteration 4 and 8%
  at 12). Not the diversity metrics or the perplexity: a collapse of theirs is the rule above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .config import ReportConfig

DIVERSITY = ("distinct-1", "distinct-2", "unique-2", "msttr")
BACKEND_METRICS = (*DIVERSITY, "perplexity")


@dataclass(frozen=True)
class Flag:
    kind: str  # judge, diversity, perplexity, collapse
    metric: str
    message: str


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def evaluations(records: Sequence[dict[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    """(iteration, eval means) of the base model (iteration 0 = before training) and every later
    evaluation, iteration numbers counted from 1."""
    out = []
    if records and records[0].get("eval_before"):
        out.append((0, records[0]["eval_before"]))
    out += [(r["iteration"] + 1, r["eval"]) for r in records if r.get("eval")]
    return out


def judges_of(records: Sequence[dict[str, Any]], names: Sequence[str]) -> list[str]:
    """The held-out judges among eval metric `names`: not the trained reward, its parts, or a backend metric."""
    trained = {"reward"} | {k for r in records for k in (r.get("rewards") or {})}
    return [n for n in names if n not in trained and not n.startswith("reward:") and n not in BACKEND_METRICS]


def find(records: Sequence[dict[str, Any]], cfg: ReportConfig | None = None) -> list[Flag]:
    cfg = cfg or ReportConfig()
    evals = evaluations(records)
    if len(evals) < 2 or evals[0][0] != 0:
        return []
    base, last = evals[0][1], evals[-1][1]
    flags: list[Flag] = []
    names = list(dict.fromkeys(k for _, e in evals for k in e))

    def change(name: str) -> tuple[float, float] | None:
        b, a = base.get(name), last.get(name)
        return (b, a) if _finite(b) and _finite(a) else None

    reward = change("reward")
    if reward and reward[1] > reward[0]:
        for name in judges_of(records, names):
            pair = change(name)
            if pair and pair[0] - pair[1] > cfg.judge_drop * abs(pair[0]):
                flags.append(Flag("judge", name, f"held-out judge {name} fell from {pair[0]:.4g} to {pair[1]:.4g} "
                                  f"while the trained reward rose from {reward[0]:.4g} to {reward[1]:.4g}: the "
                                  "reward is being gamed, or does not measure what the judge does"))
    for name in DIVERSITY:
        pair = change(name)
        if pair and pair[0] - pair[1] > cfg.diversity_drop * abs(pair[0]):
            flags.append(Flag("diversity", name, f"{name} fell from {pair[0]:.4g} to {pair[1]:.4g} "
                              f"(by {1 - pair[1] / pair[0]:.0%}): the outputs are becoming alike"))
    pair = change("perplexity")
    if pair and pair[1] - pair[0] > cfg.perplexity_rise * abs(pair[0]):
        flags.append(Flag("perplexity", "perplexity", f"perplexity under the base model rose from {pair[0]:.4g} "
                          f"to {pair[1]:.4g}: the outputs are drifting away from fluent text"))
    for name in names:
        if name in BACKEND_METRICS:  # diversity and perplexity have their own rules above
            continue
        series = [(it, e[name]) for it, e in evals if _finite(e.get(name))]
        if len(series) < 3 or series[0][0] != 0:
            continue
        start = series[0][1]
        peak_it, peak = max(series[1:], key=lambda p: p[1])
        end_it, end = series[-1]
        gain = peak - start
        if gain > 0 and peak_it < end_it and peak - end > cfg.collapse_drop * gain:
            flags.append(Flag("collapse", name, f"{name} peaked at {peak:.4g} at iteration {peak_it} and "
                              f"ended at {end:.4g} at iteration {end_it}, giving back {(peak - end) / gain:.0%} "
                              f"of its gain over the base model ({start:.4g}): a checkpoint near iteration "
                              f"{peak_it} is the better adapter"))
    return flags
