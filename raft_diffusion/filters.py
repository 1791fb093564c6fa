"""Discard filters: candidates refused before any reward scores them (the config's `filters:`).

LMFlow's RAFT stopped a reward hack (texts full of '#') with such a filter before ranking. A
filter is a name -> factory registry, as the rewards' (rewards/__init__.py): a factory takes the
filter's `options` (keyword arguments, plus `field`, the config path of its options, if it declares
it) and returns a function `(outputs, prompts) -> list[bool]`, True = keep. `python:module:function`
names a user's own such function. A rejected candidate is dropped as a sample whose reward failed
(score NaN: never selected, never trained on), and counted per filter (`Scored.filtered`).

Filters run on the training candidates (the policy's and the experts'), not on evaluation samples:
the eval reward and the judges see what the policy makes. Every built-in is deterministic, so an
exact resume stays exact.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .errors import RunFailed, UserError

Filter = Callable[[Any, list[str]], Sequence[bool]]


def regex(pattern: str | None = None, action: str = "reject", ignore_case: bool = False,
          field: str = "filters") -> Filter:
    """Texts: `action: reject` drops the texts in which `pattern` is found (re.search); `action: keep`
    keeps only those."""
    if pattern is None:
        raise UserError(f"{field}.pattern", "the regex filter needs a pattern", 'e.g. options: {pattern: "#{3,}"}')
    if not isinstance(pattern, str):
        raise UserError(f"{field}.pattern", f"must be a regular expression, got {pattern!r}", 'e.g. pattern: "#{3,}"')
    if action not in ("reject", "keep"):
        raise UserError(f"{field}.action", f"must be reject or keep, got {action!r}", "e.g. action: reject")
    try:
        compiled = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    except re.error as e:
        raise UserError(f"{field}.pattern", f"{pattern!r} is not a valid regular expression ({e})",
                        "fix the pattern (Python's re syntax)") from None
    reject = action == "reject"

    def keep(outputs: Sequence[str], prompts: list[str]) -> list[bool]:
        return [(compiled.search(text) is None) == reject for text in outputs]

    return keep


def length(min: int = 0, max: int | None = None, field: str = "filters") -> Filter:  # noqa: A002 - the option names
    """Texts: keep those of `min` to `max` characters (not tokens), both included."""
    if max is not None and (isinstance(max, bool) or not isinstance(max, int)):
        raise UserError(f"{field}.max", f"length's max must be an integer, got {max!r}", "e.g. max: 2000")
    if min < 0 or (max is not None and max < min):
        raise UserError(f"{field}.min" if min < 0 else f"{field}.max", f"need 0 <= min <= max, got min {min}, max {max}",
                        "e.g. min: 1, max: 2000")
    lo, hi = min, max

    def keep(outputs: Sequence[str], prompts: list[str]) -> list[bool]:
        return [lo <= len(text) and (hi is None or len(text) <= hi) for text in outputs]

    return keep


def blank_image(min_std: float = 0.01, field: str = "filters") -> Filter:
    """Images (N, 3, H, W) in [0, 1]: drop those whose pixels vary less than `min_std` (the largest
    of the channels' standard deviations over the picture): blank and single-colour images."""
    if min_std < 0:
        raise UserError(f"{field}.min_std", f"must be >= 0, got {min_std!r}", "e.g. min_std: 0.01")

    def keep(outputs: torch.Tensor, prompts: list[str]) -> list[bool]:
        x = torch.as_tensor(outputs).detach().float()
        spread = x.flatten(2).std(dim=2, unbiased=False).amax(dim=1)  # (N,)
        return [bool(s >= min_std) for s in spread.cpu().tolist()]

    return keep


REGISTRY: dict[str, Callable[..., Filter]] = {
    "regex": regex,
    "length": length,
    "blank_image": blank_image,
}
# What each filter reads: images (N, 3, H, W) in [0, 1], or texts (list[str]).
READS = {"regex": "texts", "length": "texts", "blank_image": "images"}


def available() -> list[str]:
    return sorted(REGISTRY)


def check_name(name: str, field: str) -> None:
    if name.startswith("python:") or name in REGISTRY:
        return
    raise UserError(field, f"unknown filter {name!r}", f"available: {', '.join(available())}, or python:module:function")


def check_reads(name: str, outputs: str, field: str) -> None:
    """Refuse a registered filter that cannot read what the backend makes ("images" or "texts")."""
    reads = READS.get(name)
    if reads is not None and reads != outputs:
        usable = ", ".join(n for n in available() if READS[n] == outputs)
        raise UserError(field, f"filter {name!r} reads {reads}, but this backend makes {outputs}",
                        f"filters for {outputs}: {usable}, or python:module:function")


def build_filter(name: str, options: dict[str, Any], field: str) -> Filter:
    """The keep-function of a filter. `field` is the config path of the filter's entry."""
    from .rewards import _load_user_function, call_factory

    check_name(name, f"{field}.name")
    if name.startswith("python:"):
        if options:
            raise UserError(f"{field}.options", f"a python: filter takes no options, got {sorted(options)}",
                            "remove options")
        return _load_user_function(name, f"{field}.name")
    return call_factory(REGISTRY[name], f"filter {name}", options, {"field": f"{field}.options"}, f"{field}.options")


class FilterSet:
    """The run's filters, built (and so checked) once."""

    def __init__(self, specs: Sequence[Any], outputs: str | None = None, field: str = "config filters"):
        self.specs = list(specs)
        if outputs is not None:
            for i, s in enumerate(self.specs):
                check_name(s.name, f"{field}.{i}.name")
                check_reads(s.name, outputs, f"{field}.{i}.name")
        self.fns = [build_filter(s.name, s.options, f"{field}.{i}") for i, s in enumerate(self.specs)]

    def __bool__(self) -> bool:
        return bool(self.specs)

    def names(self) -> list[str]:
        """Unique labels (label, else name; a second use of one name gets #2), as the rewards'."""
        from .rewards.compose import unique_labels

        return unique_labels(self.specs)

    def __call__(self, outputs: Any, prompts: Sequence[str]) -> list[str | None]:
        """Per sample: the label of the first filter that rejected it, or None (kept). Each filter
        sees only the samples the filters before it kept."""
        from .protocols import take

        n = len(prompts)
        reasons: list[str | None] = [None] * n
        for label, fn in zip(self.names(), self.fns):
            alive = [i for i in range(n) if reasons[i] is None]
            if not alive:
                break
            keep = _as_flags(_call(fn, label, take(outputs, alive), [prompts[i] for i in alive]), len(alive), label)
            for i, k in zip(alive, keep):
                if not k:
                    reasons[i] = label
        return reasons

    def counts(self, reasons: Sequence[str | None]) -> dict[str, int]:
        """How many samples each filter rejected (every filter named, 0 included)."""
        counts = {label: 0 for label in self.names()}
        for r in reasons:
            if r is not None:
                counts[r] += 1
        return counts


def _call(fn: Filter, label: str, outputs: Any, prompts: list[str]) -> Any:
    try:
        with torch.inference_mode():
            return fn(outputs, prompts)
    except UserError:
        raise
    except SystemExit as e:
        raise RunFailed(f"filter {label} called sys.exit({e.code!r})") from None
    except Exception as e:  # noqa: BLE001 - a filter that fails stops the run: it would decide what trains
        raise RunFailed(f"filter {label} failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]) from None


def _as_flags(raw: Any, n: int, label: str) -> list[bool]:
    """A filter's return value as n booleans (True = keep)."""
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu().tolist()
    elif isinstance(raw, np.ndarray):
        raw = raw.tolist()
    if isinstance(raw, (str, bytes)) or not hasattr(raw, "__len__") or len(raw) != n:
        got = f"{len(raw)} values" if hasattr(raw, "__len__") and not isinstance(raw, (str, bytes)) else type(raw).__name__
        raise RunFailed(f"filter {label} returned {got} for {n} samples, not one True (keep) or False per sample")
    flags = []
    for v in raw:
        if not isinstance(v, (bool, np.bool_)) and not (isinstance(v, (int, np.integer)) and v in (0, 1)):
            raise RunFailed(f"filter {label} returned {v!r:.40}, not True (keep) or False")
        flags.append(bool(v))
    return flags
