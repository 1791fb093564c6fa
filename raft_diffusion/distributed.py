"""What the loop needs past one process (all of it a no-op with one).

- Shares: sample `i` of an iteration lives on one process, which generates, scores, writes and
  trains on it; processes hold contiguous ranges of the sample order (`share`).
- Gathers carry Python objects (scores, rows, texts), never images or latents.
- Randomness: training noise, timesteps, caption dropout and LoRA dropout differ by process,
  derived from the run seed and the rank; process 0 keeps the one-process seeds, so a
  one-process run is what it always was.
- Failures: a process that fails in a phase where the others would wait for it (generation,
  scoring) tells them, and every process raises the same error (`together`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from accelerate import Accelerator

from .errors import RunFailed, UserError

T = TypeVar("T")


def share(n: int, world: int, rank: int) -> range:
    """Process `rank`'s contiguous share of `n` items among `world`: sizes differ by at most one."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def gather(accelerator: Accelerator, item: T) -> list[T]:
    """Every process's `item`, in rank order (a picklable object; keep it small)."""
    if accelerator.num_processes == 1:
        return [item]
    from accelerate.utils import gather_object

    return gather_object([item])


def rank_seed(seed: int, rank: int, purpose: int) -> int:
    """Process `rank`'s seed for `purpose` (3: the training generator, 4: the global RNGs); rank 0's is the run seed."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, purpose, rank]).generate_state(1)[0] & 0x7FFFFFFF)


def training_generator(seed: int, accelerator: Accelerator) -> torch.Generator:
    """Training noise, timesteps, caption dropout and batch order: one stream per process."""
    return torch.Generator().manual_seed(rank_seed(seed, accelerator.process_index, 3))


def seed_process(seed: int, accelerator: Accelerator) -> None:
    """Reseed Python, numpy and torch (LoRA dropout) per process, once every process holds the
    same initial LoRA; process 0 is left as it is."""
    rank = accelerator.process_index
    if rank == 0:
        return
    s = rank_seed(seed, rank, 4)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def together(accelerator: Accelerator, phase: Callable[[], T]) -> T:
    """`phase()` on every process; if it raised on any, every process raises it (a `UserError`
    or `RunFailed` as itself, anything else as a `RunFailed` naming the process)."""
    if accelerator.num_processes == 1:
        return phase()
    try:
        result, error = phase(), None
    except Exception as e:  # noqa: BLE001 - handed to every process below
        result, error = None, e
    reports = gather(accelerator, None if error is None else _report(error))
    if error is not None:
        raise error
    for rank, report in enumerate(reports):
        if report is not None:
            raise _rebuild(rank, report)
    return result


def _report(error: Exception) -> tuple[str, Any]:
    if isinstance(error, UserError):
        return "user", (error.field, error.problem, error.fix)
    if isinstance(error, RunFailed):
        return "run", str(error)
    return "other", f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def _rebuild(rank: int, report: tuple[str, Any]) -> Exception:
    kind, detail = report
    if kind == "user":
        return UserError(*detail)
    if kind == "run":
        return RunFailed(detail)
    return RunFailed(f"process {rank} failed: {detail}")


def pad_to(indices: Sequence[int], n: int) -> tuple[list[int], list[float]]:
    """`indices` (not empty) lengthened to `n` by repeating them, and a weight per entry: 1 for the
    real ones, 0 for the repeats (which then add nothing to the loss)."""
    out, weights = list(indices), [1.0] * len(indices)
    for k in range(n - len(out)):
        out.append(indices[k % len(indices)])
        weights.append(0.0)
    return out, weights
