"""The records of a run: metrics.jsonl's per-iteration record, samples.jsonl's rows, the console line."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .rewards.compose import Scored, nanmean

def eval_parts(scored: Scored, judged: Scored | None) -> dict[str, np.ndarray]:
    """Per-sample scores by name: the training rewards, then the judges under their own names (a
    training reward that a judge shares a name with, e.g. clip with another model, becomes reward:clip)."""
    judges = judged.parts if judged is not None else {}
    parts = {(f"reward:{k}" if k in judges or k == "reward" else k): v for k, v in scored.parts.items()}
    return {**parts, **judges}


def sample_rows(prompts: Sequence[str], seeds: Sequence[int], scored: Scored, chosen: Sequence[int],
                judged: Scored | None = None, sources: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    chosen_set = set(chosen)
    parts = eval_parts(scored, judged) if judged is not None else scored.parts
    rows = []
    for i in range(len(prompts)):
        scores = {k: _num(v[i]) for k, v in parts.items()}
        rows.append({"prompt": prompts[i], "seed": seeds[i], **(sources[i] if sources is not None else {}),
                     "reward": _num(scored.total[i]), "scores": scores, "selected": i in chosen_set,
                     **({"filtered": scored.filtered[i]} if scored.filtered else {})})
    return rows


def iteration_record(it: int, scored: Scored, chosen: Sequence[int], loss: float,
                     evaluation: dict[str, float], seconds: dict[str, float]) -> dict[str, Any]:
    valid = scored.total[np.isfinite(scored.total)]
    seconds = dict(seconds)
    if "encode" in seconds:  # expert candidates made trainable, inside generate: timed apart
        seconds["generate"] -= seconds["encode"]
    return {
        "iteration": it,
        "reward_mean": _num(valid.mean()) if valid.size else None,
        "reward_std": _num(valid.std()) if valid.size else None,
        "reward_selected_mean": _num(np.mean(scored.total[list(chosen)])) if len(chosen) else None,
        "rewards": {k: _num(nanmean(v)) for k, v in scored.parts.items()},
        "n_generated": int(len(scored.total)),
        "n_selected": len(chosen),
        "n_dropped": scored.n_dropped,
        **({"n_filtered": scored.n_filtered, "filtered": scored.filter_counts()} if scored.filter_names else {}),
        "train_loss": _num(loss),
        "eval": evaluation,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def summary(record: dict[str, Any], iterations: int) -> str:
    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    ev = " ".join(f"{k}={f(v)}" for k, v in record["eval"].items())
    return (f"iter {record['iteration'] + 1}/{iterations}  reward {f(record['reward_mean'])}{raw_rewards(record)}"
            f"  selected {f(record['reward_selected_mean'])}  dropped {record['n_dropped']}"
            + (f" (filtered {record['n_filtered']})" if record.get("n_filtered") else "")
            + (f"  no signal {record['groups_without_signal']['dropped']}/{record['groups_without_signal']['of']}"
               if record.get("groups_without_signal") else "")
            + f"  loss {f(record['train_loss'])}" + (f"  eval[{ev}]" if ev else "")
            + f"  ({', '.join(f'{k} {v:.1f}s' for k, v in record['seconds'].items())})")


def raw_rewards(record: dict[str, Any]) -> str:
    """" (aesthetic 3.20, clip 31.00)": each reward's raw mean, when the weighted (maybe normalised)
    sum alone does not show them."""
    parts = record.get("rewards") or {}
    only = next(iter(parts.values())) if len(parts) == 1 else None
    if not parts or (only is not None and record["reward_mean"] is not None and abs(only - record["reward_mean"]) < 1e-9):
        return ""
    return " (" + ", ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in parts.items()) + ")"


def _num(x: Any) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None

