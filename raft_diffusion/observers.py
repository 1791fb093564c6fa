"""What follows a RAFT iteration, and the run: the sample files, metrics.jsonl, the trackers, the
checkpoint, the console line, report.html and, at the end, final/. Each is an observer the loop
calls in order, on every process (an observer that is the main process's alone says so itself),
so `raft()` keeps to the paper's box and a new output is one class here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .candidates import Batch, slot_fields
from .checkpoint import rng_state, save_checkpoint, write_dir_atomically
from .config import RunConfig
from .distributed import Processes
from .html_report import write as write_html_report
from .protocols import Backend
from .records import sample_rows, summary
from .rewards.compose import Scored
from .run_dir import RunDirectory
from .state import LoopState
from .trackers import log_iteration


@dataclass
class Iteration:
    """One finished iteration, as the observers see it."""

    it: int
    record: dict[str, Any]  # its metrics.jsonl record
    batch: Batch
    scored: Scored
    chosen: list[int]
    evaluated: bool  # whether it ran an evaluation


class Observer:
    def starting(self, it: int) -> None:
        """Before iteration `it` samples anything."""

    def iteration(self, done: Iteration) -> None:
        """After iteration `it`, in the order of the observers."""

    def finished(self) -> None:
        """After the last iteration (or a resume that found nothing left to do)."""


class SampleFiles(Observer):
    """samples/iter_NNNN/: each process writes its share's files, the main process samples.jsonl."""

    def __init__(self, run: RunDirectory, processes: Processes, backend: Backend):
        self.run, self.processes, self.backend = run, processes, backend

    def starting(self, it: int) -> None:
        if self.processes.main:  # what an interrupted attempt at this iteration left
            self.run.clear_samples(f"iter_{it:04d}")

    def iteration(self, done: Iteration) -> None:
        batch = done.batch
        rows = sample_rows(*batch.everyone, done.scored, done.chosen, sources=[slot_fields(s) for s in batch.slots])
        self.processes.save_samples(self.run, f"iter_{done.it:04d}", self.backend, batch.samples, batch.mine, rows)


class Metrics(Observer):
    """metrics.jsonl, and the trackers (logging.report_to) after it."""

    def __init__(self, run: RunDirectory, processes: Processes, log: Callable[[str], None]):
        self.run, self.processes, self.log = run, processes, log

    def iteration(self, done: Iteration) -> None:
        if self.processes.main:
            self.run.append_metrics(done.record)
            log_iteration(self.processes.accelerator, self.run.path, done.record, warn=self.log)


class Checkpoints(Observer):
    """checkpoints/iter_NNNN: the LoRA, its optimizer and EMA, every process's random streams and
    the loop's state; then every process waits for it."""

    def __init__(self, config: RunConfig, run: RunDirectory, processes: Processes, backend: Backend,
                 state: LoopState):
        self.config, self.run, self.processes, self.backend, self.state = config, run, processes, backend, state

    def iteration(self, done: Iteration) -> None:
        rng = self.processes.gather(rng_state(self.state.generator))  # every process's random streams
        if self.processes.main:
            save_checkpoint(self.run.checkpoints, done.it, self.backend, self.state.saved, rng,
                            self.config.checkpoint.keep_last, self.state.ema, self.state.replay)
        self.processes.wait()


class Console(Observer):
    """One line per iteration."""

    def __init__(self, processes: Processes, iterations: int, log: Callable[[str], None]):
        self.processes, self.iterations, self.log = processes, iterations, log

    def iteration(self, done: Iteration) -> None:
        if self.processes.main:
            self.log(summary(done.record, self.iterations))


class Report(Observer):
    """report.html after each evaluation and the last iteration, and at the end if it is older than
    metrics.jsonl (a run stopped after its last checkpoint, before its report). A report that cannot
    be drawn never stops the run."""

    def __init__(self, run: RunDirectory, processes: Processes, iterations: int, log: Callable[[str], None]):
        self.run, self.processes, self.iterations, self.log = run, processes, iterations, log

    def iteration(self, done: Iteration) -> None:
        if self.processes.main and (done.evaluated or done.it + 1 == self.iterations):
            write_report(self.run, self.log)

    def finished(self) -> None:
        if self.processes.main and _report_is_stale(self.run):
            write_report(self.run, self.log)


class FinalAdapter(Observer):
    """final/: the LoRA as it generates (its EMA when training.ema_decay is set), in its ecosystem's
    formats (`Backend.save_adapter`)."""

    def __init__(self, run: RunDirectory, processes: Processes, backend: Backend, state: LoopState):
        self.run, self.processes, self.backend, self.state = run, processes, backend, state

    def finished(self) -> None:
        if self.processes.main:
            with self.state.sampler():
                write_dir_atomically(self.run.final, self.backend.save_adapter, keep=self.run.keeps_in_final)


class Observers:
    """The run's observers, called in order."""

    def __init__(self, observers: list[Observer], processes: Processes):
        self.observers, self.processes = observers, processes

    def starting(self, it: int) -> None:
        for o in self.observers:
            o.starting(it)

    def iteration(self, done: Iteration) -> None:
        for o in self.observers:
            o.iteration(done)

    def finished(self) -> None:
        for o in self.observers:
            o.finished()
        self.processes.wait()


def run_observers(config: RunConfig, run: RunDirectory, processes: Processes, backend: Backend, state: LoopState,
                  log: Callable[[str], None]) -> Observers:
    """What every run writes, in the order it is written: final/ before the end-of-run report."""
    n = config.raft.iterations
    return Observers([SampleFiles(run, processes, backend), Metrics(run, processes, log),
                      Checkpoints(config, run, processes, backend, state), Console(processes, n, log),
                      FinalAdapter(run, processes, backend, state), Report(run, processes, n, log)], processes)


def write_report(run: RunDirectory, log: Callable[[str], None]) -> None:
    """report.html, rewritten after each evaluation; a report that cannot be drawn never stops the run."""
    try:
        write_html_report(run.path)
    except Exception as e:  # noqa: BLE001 - the run's results are safe; say why the page is missing
        log(f"warning: report.html not written ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")


def _report_is_stale(run: RunDirectory) -> bool:
    report = run.path / "report.html"
    try:
        return not report.is_file() or report.stat().st_mtime_ns < run.metrics.stat().st_mtime_ns
    except OSError:
        return False
