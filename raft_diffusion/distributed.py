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

import math
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from accelerate import Accelerator

from . import seeds
from .checkpoint import writing
from .errors import RunFailed, UserError
from .seeds import rank_seed

if TYPE_CHECKING:
    from .filters import FilterSet
    from .objectives import Targets
    from .protocols import Backend, Samples
    from .rewards.compose import RewardSet, Scored
    from .run_dir import RunDirectory

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


def training_generator(seed: int, accelerator: Accelerator) -> torch.Generator:
    """Training noise, timesteps, caption dropout and batch order: one stream per process."""
    return torch.Generator().manual_seed(rank_seed(seed, accelerator.process_index, seeds.PROCESS_TRAINING))


def seed_process(seed: int, accelerator: Accelerator) -> None:
    """Reseed Python, numpy and torch (LoRA dropout) per process, once every process holds the
    same initial LoRA; process 0 is left as it is."""
    rank = accelerator.process_index
    if rank == 0:
        return
    s = rank_seed(seed, rank, seeds.PROCESS_GLOBAL)
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


class Processes:
    """What the loop shares out to the processes and gathers back, behind one object (every method a
    no-op past the one process of a plain run): whose samples are whose, the scores, the training
    share, the losses, the sample files, the random streams."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.count, self.rank = accelerator.num_processes, accelerator.process_index

    def mine(self, n: int) -> range:
        """This process's share of `n` samples."""
        return share(n, self.count, self.rank)

    def gather(self, item: T) -> list[T]:
        return gather(self.accelerator, item)

    def together(self, phase: Callable[[], T]) -> T:
        return together(self.accelerator, phase)

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def score(self, reward: "RewardSet", samples: "Samples", groups: Sequence[int],
              filters: "FilterSet | None" = None) -> "Scored":
        """Every sample's scores: each process filters (`filters`, if any) and scores its share, and
        only the scores and the filters' verdicts travel."""
        def mine():
            rejected = filters(samples.outputs, samples.prompts) if filters else [None] * len(samples.prompts)
            return (*reward.raw_kept(samples.outputs, samples.prompts, rejected), rejected)

        parts, errors, rejected = self.together(mine)
        if self.count > 1:
            everyone = self.gather((parts, errors, rejected))
            parts = {k: np.concatenate([p[k] for p, _, _ in everyone]) for k in parts}
            rejected = [r for _, _, share in everyone for r in share]
            errors = {}
            for _, e, _ in everyone:
                for k, v in e.items():
                    errors.setdefault(k, v)
        if not filters:
            return reward.combine(parts, groups, errors)
        return reward.combine(parts, groups, errors, rejected, filters.names())

    def training_share(self, samples: "Samples", chosen: "Targets", n: int) -> "Samples":
        return training_samples(samples, chosen, n, self.accelerator)

    def mean(self, value: float) -> float:
        """The mean of the processes' values, leaving out the NaN of one that trained on padding only."""
        if self.count == 1:
            return value
        values = [v for v in self.gather(float(value)) if math.isfinite(v)]
        return sum(values) / len(values) if values else math.nan

    def save_samples(self, run: "RunDirectory", name: str, backend: "Backend", samples: "Samples", mine: range,
                     rows: list[dict[str, Any]], clear: bool = False) -> None:
        """samples/NAME: each process writes the files of its share (numbered in the iteration's
        order), the main process the one samples.jsonl."""
        if clear and self.main:
            run.clear_samples(name)
        if self.count > 1:
            self.wait()
        directory = run.samples(name)
        directory.mkdir(parents=True, exist_ok=True)
        with writing(directory):
            mine_written = backend.write_samples(samples, directory, mine.start)
        written = [row for part in self.gather(mine_written) for row in part]
        if self.main:
            run.write_rows(name, [{**fields, **row} for fields, row in zip(written, rows)])


def training_samples(samples: "Samples", chosen: "Targets", n: int, accelerator: Accelerator) -> "Samples":
    """The samples of this process's share (of the iteration's `n`) that the objective trains on,
    with its per-sample weights (if any) in the payload. With several processes, each trains on as
    many samples as the process holding most: the others repeat theirs at weight 0 (adding nothing
    to the loss, but keeping every process's optimizer steps in lockstep); no sample is moved."""
    indices, weights, optimality = list(chosen.indices), chosen.weights, chosen.optimality
    world = accelerator.num_processes
    if world == 1:
        subset = samples.select(indices)
    else:
        shares = [share(n, world, r) for r in range(world)]
        mine = shares[accelerator.process_index]
        held = [k for k, i in enumerate(indices) if i in mine]  # positions in the objective's targets
        most = max(sum(1 for i in indices if i in r) for r in shares)
        if held:
            positions, real = pad_to(held, most)
            subset = samples.select([indices[k] - mine.start for k in positions])
            weights = [(1.0 if weights is None else float(weights[k])) * r for k, r in zip(positions, real)]
            optimality = None if optimality is None else [float(optimality[k]) for k in positions]
        else:  # none of them is held here: repeat this process's own samples, at weight 0
            subset = samples.select([j % len(samples) for j in range(most)])
            weights = [0.0] * most
            optimality = None if optimality is None else [0.5] * most
    if weights is not None:
        subset.payload["weight"] = torch.as_tensor(weights, dtype=torch.float64)
    if optimality is not None:
        subset.payload["optimality"] = torch.as_tensor(optimality, dtype=torch.float64)
    return subset
