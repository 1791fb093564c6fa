"""The RAFT loop (Dong et al. 2023, arXiv 2304.06767), backend-agnostic.

    for each iteration:
        1. Sample    K candidates for each of b prompts (one recorded seed per candidate), and
                     the candidates of other experts beside them (experts.py), if any
        2. Score     reward = sum of weight * reward_i(sample, prompt); failures are dropped, and so
                     are the candidates a discard filter rejects first (filters.py)
        3. Select    the best of each prompt (per_prompt) or the best fraction (global), leaving out
                     the prompts whose candidates carry no signal (selection.min_spread, min_reward)
        4. Fine-tune the adapter on the selected (prompt, sample) pairs (`training.objective: raft`;
           other objectives weight every sample: objectives.py); with generation.rollout_steps, the
           candidates were cheap and those trained on are first re-rendered at generation.steps
        5. Evaluate  fixed prompts and seeds: training reward and held-out judges
        6. Checkpoint atomically

`raft()` below is that box. Around it: `LoopState` (state.py: what a checkpoint restores),
`Candidates` (candidates.py: the policy and the experts), `Processes` (distributed.py: what the
processes share and gather) and the observers (observers.py: what follows an iteration). The loop
knows only the `Backend` and `Reward` protocols of `protocols.py`, so images and texts run through
the same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from accelerate import Accelerator

from .candidates import Candidates, generate
from .config import RunConfig
from .distributed import Processes
from .errors import RunFailed
from .experts import Experts
from .filters import FilterSet
from .objectives import extremes, targets
from .observers import Iteration, run_observers
from .protocols import Backend
from .records import eval_parts, iteration_record, sample_rows, summary
from .rewards.compose import RewardSet, Scored, nanmean
from .run_dir import RunDirectory
from .seeds import eval_seed
from .selection import select, without_signal
from .state import LoopState, draw_prompts

__all__ = ["raft", "evaluate", "draw_prompts", "summary", "eval_parts", "iteration_record"]


def raft(config: RunConfig, backend: Backend, reward: RewardSet, judges: RewardSet,
         run: RunDirectory, accelerator: Accelerator, train_prompts: Sequence[str],
         eval_prompts: Sequence[str], log: Callable[[str], None] = print, resume: bool = False,
         experts: Experts | None = None, filters: FilterSet | None = None) -> list[dict[str, Any]]:
    """Run the RAFT iterations of `config` (with `resume`, from `run`'s newest intact checkpoint)
    and return the metrics. A diverged training step or failing rewards raise `RunFailed` before
    anything of that iteration is saved. `experts` (`generation.experts`, loaded) add candidates to
    each prompt's group beside the policy's own; `filters` (`filters`, built) drop candidates before
    they are scored."""
    processes = Processes(accelerator)
    state = LoopState(config, backend, processes, run, resume, log, experts)
    candidates = Candidates(config, backend, processes, experts)
    observers = run_observers(config, run, processes, backend, state, log)
    sel = config.selection

    def evaluation(name: str) -> dict[str, float]:
        return evaluate(config, backend, reward, judges, run, accelerator, eval_prompts, name)

    with state.sampler():
        eval_before = evaluation("base") if state.start == 0 and config.eval.every else None
    for it in range(state.start, config.raft.iterations):
        seconds: dict[str, float] = {}
        observers.starting(it)
        prompts = state.draw_prompts(train_prompts)
        with timed(seconds, "generate"), stopped_at(it), state.sampler():  # 1. Sample K per prompt (and experts')
            batch = candidates.sample(prompts, it, seconds)
        with timed(seconds, "score"), stopped_at(it):  # 2. Score; only the scores are gathered
            scored = processes.score(reward, batch.samples, batch.groups, filters)
        check_drops(scored, config, it)
        ranked, quiet = without_signal(scored.total, batch.groups, sel.min_spread, sel.min_reward)
        chosen = select(ranked, batch.groups, sel.strategy, sel.top, sel.fraction)  # 3. Select
        if quiet and not chosen and processes.main:
            log(f"warning: iteration {it + 1}: every prompt's candidates were without signal (selection.min_spread, "
                "min_reward): nothing to train on")
        trained_on, train_samples = targets(ranked, batch.groups, chosen, config.training), batch.samples
        if candidates.rollout_steps is not None:  # the cheap candidates ranked; the trained ones re-rendered
            trained_on = extremes(trained_on, ranked, batch.groups, sel.top)
            with timed(seconds, "rerender"), stopped_at(it), state.sampler():
                train_samples, rerendered = candidates.rerender(batch, trained_on.indices, it)
        with timed(seconds, "train"), stopped_at(it):  # 4. Fine-tune (on what the objective makes of it)
            loss = state.fine_tune(train_samples, trained_on, len(batch.slots), it)
        with timed(seconds, "eval"), stopped_at(it), state.sampler():  # 5. Evaluate
            result = evaluation(f"iter_{it:04d}") if evaluation_due(config, it) else {}
        record = iteration_record(it, scored, chosen, loss, result, seconds)  # 6. Record, checkpoint
        record["sources"] = candidates.source_counts(batch, chosen)
        if candidates.rollout_steps is not None:
            record["rerendered"] = rerendered
        if sel.min_spread is not None or sel.min_reward is not None:
            record["groups_without_signal"] = {"dropped": len(quiet), "of": len(prompts),
                                               "share": round(len(quiet) / len(prompts), 6)}
        if it == 0 and eval_before is not None:
            record["eval_before"] = eval_before
        observers.iteration(Iteration(it, record, batch, scored, chosen, evaluated=bool(result)))
    observers.finished()
    return run.read_metrics()


def evaluation_due(config: RunConfig, it: int) -> bool:
    """Whether iteration `it` ends with an evaluation: every `eval.every`, and the last."""
    return bool(config.eval.every) and ((it + 1) % config.eval.every == 0 or it + 1 == config.raft.iterations)


# --- stopping a run that went wrong, before it saves anything ---------------------------------


def check_drops(scored: Scored, config: RunConfig, it: int) -> None:
    """Stop when the filters rejected every candidate, or the rewards failed on every sample they
    scored, or on more than training.max_drop_fraction of them (filtered candidates are not counted:
    rejecting is what a filter is for)."""
    filtered = scored.n_filtered
    if filtered and filtered == len(scored.total):
        counts = ", ".join(f"{k}: {v}" for k, v in scored.filter_counts().items() if v)
        raise RunFailed(f"iteration {it + 1}: the filters rejected every candidate ({counts}), leaving nothing "
                        "to train on (loosen the filters); nothing of this iteration was saved")
    n, dropped = len(scored.total) - filtered, scored.n_dropped - filtered
    limit = config.training.max_drop_fraction
    if n == 0 or (dropped < n and dropped <= limit * n):
        return
    why = "; ".join(f"{k}: {v}" for k, v in scored.errors.items()) or "scores were not finite"
    share = "every sample" if dropped == n else f"{dropped} of {n} samples, more than training.max_drop_fraction {limit}"
    raise RunFailed(f"iteration {it + 1}: the rewards failed on {share} ({why}); nothing of this iteration was saved")



class stopped_at:
    """`with stopped_at(it):` prefixes a `RunFailed` raised inside with the iteration."""

    def __init__(self, it: int):
        self.it = it

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if isinstance(error, RunFailed) and not str(error).startswith("iteration "):
            raise RunFailed(f"iteration {self.it + 1}: {error}; nothing of this iteration was saved") from error
        return False



# --- evaluation ----------------------------------------------------------------------------------


def evaluate(config: RunConfig, backend: Backend, reward: RewardSet, judges: RewardSet,
             run: RunDirectory, accelerator: Accelerator, prompts: Sequence[str], name: str) -> dict[str, float]:
    """Mean training reward, held-out judge scores and the backend's own metrics on fixed eval
    prompts and seeds (each process generates and scores its share)."""
    processes = Processes(accelerator)
    n = config.eval.samples_per_prompt
    groups = [g for g in range(len(prompts)) for _ in range(n)]
    everyone = [prompts[g] for g in groups], [eval_seed(eval_base_seed(config), j) for j in range(len(groups))]
    mine = processes.mine(len(groups))
    samples = generate(backend, processes, *everyone, mine, desc="eval",
                       trained=name != "base" and not name.startswith("reference"))
    scored = processes.score(reward, samples, groups)
    judged = processes.score(judges, samples, groups) if judges.specs else None
    result = {"reward": nanmean(scored.total)}
    result.update({k: nanmean(v) for k, v in eval_parts(scored, judged).items()})
    result.update(backend.eval_metrics(samples))  # e.g. text: perplexity under the base model, diversity
    processes.save_samples(run, f"{name}/eval" if name != "base" else "base_eval", backend, samples, mine,
                           sample_rows(*everyone, scored, [], judged), clear=True)
    return result


def eval_base_seed(config: RunConfig) -> int:
    return config.raft.seed if config.eval.seed is None else config.eval.seed



class timed:
    """`with timed(seconds, "train"):` adds the block's wall time to seconds["train"]."""

    def __init__(self, seconds: dict[str, float], key: str):
        self.seconds, self.key = seconds, key

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds[self.key] = self.seconds.get(self.key, 0.0) + time.perf_counter() - self.start
        return False

