"""Where an iteration's candidates come from: the policy's K per prompt, then the experts' (experts.py),
each process making its share, checked finite before anything scores or trains on them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import RunConfig
from .distributed import Processes
from .errors import RunFailed
from .experts import POLICY, Experts, Slot, concat
from .protocols import Backend, Samples
from .seeds import policy_seed


@dataclass
class Batch:
    """An iteration's candidates: every process knows every slot (prompt group, source, seed); each
    holds the samples of its share (`mine`)."""

    prompts: list[str]  # the iteration's prompts
    slots: list[Slot]  # every candidate, in the iteration's order
    samples: Samples  # this process's share of them
    mine: range

    @property
    def groups(self) -> list[int]:
        return [s.group for s in self.slots]

    @property
    def everyone(self) -> tuple[list[str], list[int | None]]:
        """(prompt, seed) of every candidate."""
        return [self.prompts[s.group] for s in self.slots], [s.seed for s in self.slots]


class Candidates:
    """The policy (the backend) and the experts, as one source of an iteration's candidates."""

    def __init__(self, config: RunConfig, backend: Backend, processes: Processes, experts: Experts | None):
        self.K, self.seed = config.generation.samples_per_prompt, config.raft.seed
        self.backend, self.processes, self.experts = backend, processes, experts
        self.rollout_steps = getattr(config.generation, "rollout_steps", None)

    def sample(self, prompts: list[str], it: int, seconds: dict[str, float]) -> Batch:
        """Iteration `it`'s candidates of `prompts`, this process's share made (the experts' time spent
        making their outputs trainable goes to `seconds["encode"]`); the policy's at
        `generation.rollout_steps` when that is set."""
        slots = candidate_slots(prompts, self.K, self.seed, it, self.experts)
        batch = Batch(list(prompts), slots, Samples([], [], []), self.processes.mine(len(slots)))
        batch.samples = generate(self.backend, self.processes, *batch.everyone, batch.mine, trained=it > 0,
                                 slots=slots, experts=self.experts, prompt_list=prompts, seconds=seconds,
                                 steps=self.rollout_steps)
        return batch

    def rerender(self, batch: Batch, indices: Sequence[int], it: int) -> tuple[Samples, int]:
        """(this process's share of the candidates with the policy's among `indices` re-rendered at
        `generation.steps` from their own seeds, how many were re-rendered in all): what a run with
        `rollout_steps` trains on. Experts' candidates are theirs already and stay as they are."""
        targets = [i for i in sorted(set(indices)) if batch.slots[i].source == POLICY]
        own = [i for i in targets if i in batch.mine]
        prompts, seeds = batch.everyone

        def make() -> Samples:
            if not own:
                return batch.samples
            fresh = check_finite(self.backend.generate([prompts[i] for i in own], [seeds[i] for i in own],
                                                       "re-render"), it > 0)
            where = {i: len(batch.samples) + k for k, i in enumerate(own)}
            order = [where.get(i, i - batch.mine.start) for i in batch.mine]
            return concat([batch.samples, fresh]).select(order)

        return self.processes.together(make), len(targets)

    def source_counts(self, batch: Batch, chosen: Sequence[int]) -> dict[str, dict[str, int]]:
        return source_counts(batch.slots, chosen, self.experts)


def candidate_slots(prompts: Sequence[str], K: int, seed: int, it: int, experts: Experts | None) -> list[Slot]:
    """The iteration's candidates: the policy's K per prompt (the same with or without experts),
    then the experts' (experts.py)."""
    groups = [g for g in range(len(prompts)) for _ in range(K)]
    policy = [Slot(g, POLICY, policy_seed(seed, it, j)) for j, g in enumerate(groups)]
    return policy if experts is None else policy + experts.slots(prompts, seed, it)


def generate(backend: Backend, processes: Processes, prompts: list[str], seeds: list[int], mine: range,
             trained: bool, desc: str = "generate", slots: Sequence[Slot] | None = None,
             experts: Experts | None = None, prompt_list: Sequence[str] = (),
             seconds: dict[str, float] | None = None, steps: int | None = None) -> Samples:
    """This process's share (`mine`) of the samples of `prompts` and `seeds`, checked finite: the
    policy's own (at `steps` when given: the cheap rollouts), then (with `experts`) the experts'
    candidates among `slots`."""
    def make() -> Samples:
        own = [i for i in mine if slots is None or slots[i].source == POLICY]
        more = {} if steps is None else {"steps": steps}
        samples = backend.generate([prompts[i] for i in own], [seeds[i] for i in own], desc, **more) if own else None
        others = [slots[i] for i in mine if slots is not None and slots[i].source != POLICY]
        if others:
            extra = experts.make(backend, others, prompt_list, desc, seconds if seconds is not None else {})
            samples = concat([samples, extra]) if samples is not None else extra
        return check_finite(samples, trained)

    return processes.together(make)


def slot_fields(slot: Slot) -> dict[str, Any]:
    """What samples.jsonl records of a candidate's origin: its source, and a folder row's line."""
    fields: dict[str, Any] = {"source": slot.source}
    if slot.row is not None:
        fields["origin"] = {"line": slot.row["line"], **({"file": slot.row["file"]} if "file" in slot.row else {})}
    return fields


def source_counts(slots: Sequence[Slot], chosen: Sequence[int], experts: Experts | None) -> dict[str, dict[str, int]]:
    """Per source (the policy, each expert): how many candidates it gave and how many were selected."""
    labels = experts.labels if experts is not None else [POLICY]
    counts = {label: {"candidates": 0, "selected": 0} for label in labels}
    for s in slots:
        counts[s.source]["candidates"] += 1
    for i in chosen:
        counts[slots[i].source]["selected"] += 1
    return counts


def check_finite(samples: Samples, trained: bool) -> Samples:
    """`samples`, unless generation produced NaN or inf (training on them would poison the LoRA).
    `trained`: the LoRA has been trained already, so it, not the settings, may be what diverged."""
    for name, value in [("outputs", samples.outputs), *samples.payload.items()]:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value.flatten(1))).any(1).sum()) if value.ndim > 1 else len(samples)
            likely = ("the LoRA diverged: lower training.learning_rate" if trained else
                      "check generation.guidance_scale and model.dtype: float16 overflows on some models")
            raise RunFailed(f"generation produced non-finite values ({name}) in {bad} of {len(samples)} samples "
                            f"({likely})")
    return samples
