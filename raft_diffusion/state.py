"""What the RAFT loop carries from one iteration to the next, and a checkpoint restores: the
training generator (noise, timesteps, batch order), the LoRA's EMA, the position in the prompt
stream and the next iteration."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from .checkpoint import resume as load_latest
from .config import RunConfig
from .distributed import Processes, seed_process, training_generator
from .ema import LoraEMA
from .experts import Experts
from .objectives import Targets
from .errors import UserError
from .protocols import Backend
from .replay import Replay
from .run_dir import RunDirectory
from .seeds import epoch_order


class LoopState:
    def __init__(self, config: RunConfig, backend: Backend, processes: Processes, run: RunDirectory,
                 resume: bool, log: Callable[[str], None], experts: Experts | None):
        """A run's state at its start: fresh, or (with `resume`) that of `run`'s newest intact checkpoint."""
        self.config, self.backend, self.processes = config, backend, processes
        seed, accelerator = config.raft.seed, processes.accelerator
        self.generator = training_generator(seed, accelerator)  # training noise, timesteps and batch order
        seed_process(seed, accelerator)  # LoRA dropout: every process its own, from here on
        self.saved: dict[str, Any] = {"data_position": 0}  # what state.json records
        self.start = 0  # the next iteration
        decay = config.training.ema_decay
        self.ema = LoraEMA(backend.lora_params, decay) if decay else None  # also negative_aware's old policy
        replay = config.training.replay
        if replay and processes.count > 1:
            raise UserError("config training.replay", f"a replay of past winners is kept by one process, and this run "
                            f"has {processes.count}", "set training.replay: 0, or run on one process")
        self.replay = Replay(replay, config.training.replay_decay) if replay else None
        if resume:
            checkpoint, loaded = load_latest(run.checkpoints, backend, self.generator,
                                             warn=log if processes.main else _silent, ema=self.ema,
                                             rank=processes.rank, processes=processes.count, replay=self.replay)
            if loaded is not None:
                self.saved, self.start = loaded, loaded.pop("iteration") + 1
                if processes.main:
                    log(f"resumed from {checkpoint} at iteration {self.start}")
        if experts is not None and experts.fingerprint:  # the sample folders' content, in every checkpoint:
            self.saved["experts"] = experts.fingerprint  # a resume with a changed folder is refused (train.py)
        if processes.main:
            run.keep_metrics_before(self.start, warn=log)

    def sampler(self):
        """The LoRA that generates: its EMA when `training.ema_decay` is set, else the trained weights."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def draw_prompts(self, prompts: Sequence[str]) -> list[str]:
        """The iteration's `raft.prompts_per_iteration` prompts, the stream moved past them."""
        drawn, self.saved["data_position"] = draw_prompts(prompts, self.saved["data_position"],
                                                          self.config.raft.prompts_per_iteration, self.config.raft.seed)
        return drawn

    def fine_tune(self, samples, chosen: Targets, n: int, it: int = 0) -> float:
        """Train the LoRA on what the objective made of the iteration's `n` candidates (this process's
        share of `samples`), with the replay of past winners if any, then move the EMA; the loss,
        averaged over the processes."""
        train_on = self.processes.training_share(samples, chosen, n)
        if self.replay is not None:
            mixed = self.replay.mix(train_on, it)
            self.replay.push(train_on, it)
            train_on = mixed
        loss = self.processes.mean(self.backend.train(train_on, self.generator, old_policy=self.ema))
        if self.ema is not None:
            self.ema.update()
        return loss


def draw_prompts(prompts: Sequence[str], position: int, b: int, seed: int) -> tuple[list[str], int]:
    """The next `b` prompts of an endless stream of shuffled epochs; returns them and the new position."""
    n = len(prompts)
    drawn = []
    for p in range(position, position + b):
        epoch, offset = divmod(p, n)
        drawn.append(prompts[epoch_order(seed, epoch, n)[offset]])
    return drawn, position + b


def _silent(message: str) -> None:
    pass
