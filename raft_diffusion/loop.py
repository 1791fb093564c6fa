"""The RAFT loop (Dong et al. 2023, arXiv 2304.06767), backend-agnostic.

    for each iteration:
        1. Sample    K candidates for each of b prompts (one recorded seed per candidate), and
                     the candidates of other experts beside them (experts.py), if any
        2. Score     reward = sum of weight * reward_i(sample, prompt); failures are dropped
        3. Select    the best of each prompt (per_prompt) or the best fraction (global)
        4. Fine-tune the adapter on the selected (prompt, sample) pairs (`training.objective: raft`;
           other objectives weight every sample: objectives.py)
        5. Evaluate  fixed prompts and seeds: training reward and held-out judges
        6. Checkpoint atomically

`raft()` below is that box; the helpers after it hold the bookkeeping. The loop knows only the
`Backend` and `Reward` protocols of `protocols.py`, so images and texts run through the same code.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from .checkpoint import resume as load_latest, rng_state, save_checkpoint, write_dir_atomically, writing
from .config import RunConfig
from .ema import LoraEMA
from .distributed import gather, pad_to, seed_process, share, together, training_generator
from .errors import RunFailed
from .experts import POLICY, Experts, Slot, concat
from .objectives import Targets, targets
from .protocols import Backend, Samples
from .rewards.compose import RewardSet, Scored, nanmean
from .run_dir import RunDirectory
from .selection import select
from .trackers import log_iteration


def raft(config: RunConfig, backend: Backend, reward: RewardSet, judges: RewardSet,
         run: RunDirectory, accelerator: Accelerator, train_prompts: Sequence[str],
         eval_prompts: Sequence[str], log: Callable[[str], None] = print, resume: bool = False,
         experts: Experts | None = None) -> list[dict[str, Any]]:
    """Run the RAFT iterations of `config` (with `resume`, from `run`'s newest intact checkpoint)
    and return the metrics. A diverged training step or failing rewards raise `RunFailed` before
    anything of that iteration is saved. `experts` (`generation.experts`, loaded) add candidates to
    each prompt's group beside the policy's own."""
    K, b, seed = config.generation.samples_per_prompt, config.raft.prompts_per_iteration, config.raft.seed
    generator = training_generator(seed, accelerator)  # training noise, timesteps and batch order
    seed_process(seed, accelerator)  # LoRA dropout: every process its own, from here on
    state, start = {"data_position": 0}, 0
    main = accelerator.is_main_process
    ema = LoraEMA(backend.lora_params, config.training.ema_decay) if config.training.ema_decay else None
    backend.old_policy = ema  # what negative_aware contrasts with (config refuses it without an EMA)
    if resume:
        checkpoint, loaded = load_latest(run.checkpoints, backend, generator, warn=log if main else _silent, ema=ema,
                                         rank=accelerator.process_index, processes=accelerator.num_processes)
        if loaded is not None:
            state, start = loaded, loaded.pop("iteration") + 1
            if main:
                log(f"resumed from {checkpoint} at iteration {start}")
    if experts is not None and experts.fingerprint:  # the sample folders' content, in every checkpoint:
        state["experts"] = experts.fingerprint  # a resume with a changed folder is refused (train.py)
    if main:
        run.keep_metrics_before(start, warn=log)
    with sampler(ema):
        eval_before = evaluate(config, backend, reward, judges, run, accelerator, eval_prompts, "base") \
            if start == 0 and config.eval.every else None

    for it in range(start, config.raft.iterations):
        seconds: dict[str, float] = {}
        if main:
            run.clear_samples(f"iter_{it:04d}")
        prompts, state["data_position"] = draw_prompts(train_prompts, state["data_position"], b, seed)
        slots = candidate_slots(prompts, K, seed, it, experts)
        groups = [s.group for s in slots]
        everyone = [prompts[g] for g in groups], [s.seed for s in slots]
        mine = share(len(groups), accelerator.num_processes, accelerator.process_index)  # what this process holds

        with timed(seconds, "generate"), stopped_at(it), sampler(ema):  # 1. Sample (this process's share)
            samples = generate(backend, accelerator, *everyone, mine, trained=it > 0, slots=slots, experts=experts,
                               prompt_list=prompts, seconds=seconds)
        if "encode" in seconds:  # expert candidates made trainable: timed apart
            seconds["generate"] -= seconds["encode"]
        with timed(seconds, "score"), stopped_at(it):  # 2. Score it; only the scores are gathered
            scored = score(reward, accelerator, samples, groups)
        check_drops(scored, config, it)
        chosen = select(scored.total, groups, config.selection.strategy,  # 3. Select (the same on every process)
                        config.selection.top, config.selection.fraction)
        with timed(seconds, "train"), stopped_at(it):  # 4. Fine-tune (on what the objective makes of it)
            train_on = training_samples(samples, targets(scored.total, groups, chosen, config.training), len(groups),
                                        accelerator)
            loss = mean_over_processes(backend.train(train_on, generator), accelerator)
            if ema is not None:
                ema.update()
        with timed(seconds, "eval"), stopped_at(it), sampler(ema):  # 5. Evaluate
            due = config.eval.every and ((it + 1) % config.eval.every == 0 or it + 1 == config.raft.iterations)
            evaluation = evaluate(config, backend, reward, judges, run, accelerator, eval_prompts,
                                  f"iter_{it:04d}") if due else {}

        record = iteration_record(it, scored, chosen, loss, evaluation, seconds)  # 6. Record, checkpoint
        record["sources"] = source_counts(slots, chosen, experts)
        if it == 0 and eval_before is not None:
            record["eval_before"] = eval_before
        save_samples(run, accelerator, f"iter_{it:04d}", backend, samples, mine,
                     sample_rows(*everyone, scored, chosen, sources=[slot_fields(s) for s in slots]))
        rng = gather(accelerator, rng_state(generator))  # every process's random streams
        if main:
            run.append_metrics(record)
            log_iteration(accelerator, run.path, record, warn=log)
            save_checkpoint(run.checkpoints, it, backend, state, rng, config.checkpoint.keep_last, ema)
        accelerator.wait_for_everyone()
        if main:
            log(summary(record, config.raft.iterations))
            if evaluation or it + 1 == config.raft.iterations:
                write_report(run, log)

    if main:
        with sampler(ema):  # with EMA on, the average is what was sampled and evaluated: it is the result
            write_dir_atomically(run.final, backend.save_adapter, keep=run.keeps_in_final)
        if _report_is_stale(run):  # a run stopped after its last checkpoint, before its report
            write_report(run, log)
    accelerator.wait_for_everyone()
    return run.read_metrics()


def _report_is_stale(run: RunDirectory) -> bool:
    report = run.path / "report.html"
    try:
        return not report.is_file() or report.stat().st_mtime_ns < run.metrics.stat().st_mtime_ns
    except OSError:
        return False


def write_report(run: RunDirectory, log: Callable[[str], None]) -> None:
    """report.html, rewritten after each evaluation; a report that cannot be drawn never stops the run."""
    from .html_report import write

    try:
        write(run.path)
    except Exception as e:  # noqa: BLE001 - the run's results are safe; say why the page is missing
        log(f"warning: report.html not written ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")


# --- data and seeds ----------------------------------------------------------------------------


def draw_prompts(prompts: Sequence[str], position: int, b: int, seed: int) -> tuple[list[str], int]:
    """The next `b` prompts of an endless stream of shuffled epochs; returns them and the new position."""
    n = len(prompts)
    drawn = []
    for p in range(position, position + b):
        epoch, offset = divmod(p, n)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        drawn.append(prompts[order[offset]])
    return drawn, position + b


def sample_seed(seed: int, *key: int) -> int:
    """A sample's seed: a pure function of the run seed and its place (purpose, iteration, index)."""
    return int(np.random.SeedSequence([seed, *key]).generate_state(1)[0] & 0x7FFFFFFF)


# --- stopping a run that went wrong, before it saves anything ---------------------------------


def candidate_slots(prompts: Sequence[str], K: int, seed: int, it: int, experts: Experts | None) -> list[Slot]:
    """The iteration's candidates: the policy's K per prompt (the same with or without experts),
    then the experts' (experts.py)."""
    groups = [g for g in range(len(prompts)) for _ in range(K)]
    policy = [Slot(g, POLICY, sample_seed(seed, 1, it, j)) for j, g in enumerate(groups)]
    return policy if experts is None else policy + experts.slots(prompts, seed, it)


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


def check_drops(scored: Scored, config: RunConfig, it: int) -> None:
    """Stop when the rewards failed on every sample, or on more than training.max_drop_fraction."""
    n, dropped = len(scored.total), scored.n_dropped
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


def _silent(message: str) -> None:
    pass


def sampler(ema: LoraEMA | None):
    """The LoRA that generates: its EMA when `training.ema_decay` is set, else the trained weights."""
    return ema.applied() if ema is not None else contextlib.nullcontext()


def eval_seed(config: RunConfig) -> int:
    return config.raft.seed if config.eval.seed is None else config.eval.seed


def training_samples(samples: Samples, chosen: Targets, n: int, accelerator: Accelerator) -> Samples:
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


# --- process sharding (a no-op with one process) -----------------------------------------------


def generate(backend: Backend, accelerator: Accelerator, prompts: list[str], seeds: list[int], mine: range,
             trained: bool, desc: str = "generate", slots: Sequence[Slot] | None = None,
             experts: Experts | None = None, prompt_list: Sequence[str] = (),
             seconds: dict[str, float] | None = None) -> Samples:
    """This process's share (`mine`) of the samples of `prompts` and `seeds`, checked finite: the
    policy's own, then (with `experts`) the experts' candidates among `slots`."""
    def make() -> Samples:
        own = [i for i in mine if slots is None or slots[i].source == POLICY]
        samples = backend.generate([prompts[i] for i in own], [seeds[i] for i in own], desc) if own else None
        others = [slots[i] for i in mine if slots is not None and slots[i].source != POLICY]
        if others:
            extra = experts.make(backend, others, prompt_list, desc, seconds if seconds is not None else {})
            samples = concat([samples, extra]) if samples is not None else extra
        return check_finite(samples, trained)

    return together(accelerator, make)


def score(reward: RewardSet, accelerator: Accelerator, samples: Samples, groups: Sequence[int]) -> Scored:
    """Every sample's scores: each process scores its share, and only the scores travel."""
    parts, errors = together(accelerator, lambda: reward.raw(samples.outputs, samples.prompts))
    if accelerator.num_processes > 1:
        everyone = gather(accelerator, (parts, errors))
        parts = {k: np.concatenate([p[k] for p, _ in everyone]) for k in parts}
        errors = {}
        for _, e in everyone:
            for k, v in e.items():
                errors.setdefault(k, v)
    return reward.combine(parts, groups, errors)


def save_samples(run: RunDirectory, accelerator: Accelerator, name: str, backend: Backend, samples: Samples,
                 mine: range, rows: list[dict[str, Any]], clear: bool = False) -> None:
    """samples/NAME: each process writes the files of its share (numbered in the iteration's
    order), the main process the one samples.jsonl."""
    if clear and accelerator.is_main_process:
        run.clear_samples(name)
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
    directory = run.samples(name)
    directory.mkdir(parents=True, exist_ok=True)
    with writing(directory):
        mine_written = backend.write_samples(samples, directory, mine.start)
    written = [row for part in gather(accelerator, mine_written) for row in part]
    if accelerator.is_main_process:
        run.write_rows(name, [{**fields, **row} for fields, row in zip(written, rows)])


def mean_over_processes(value: float, accelerator: Accelerator) -> float:
    """The mean of the processes' values, leaving out the NaN of one that trained on padding only."""
    if accelerator.num_processes == 1:
        return value
    values = [v for v in gather(accelerator, float(value)) if math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


# --- evaluation and records --------------------------------------------------------------------


def evaluate(config: RunConfig, backend: Backend, reward: RewardSet, judges: RewardSet,
             run: RunDirectory, accelerator: Accelerator, prompts: Sequence[str], name: str) -> dict[str, float]:
    """Mean training reward, held-out judge scores and the backend's own metrics on fixed eval
    prompts and seeds (each process generates and scores its share)."""
    n = config.eval.samples_per_prompt
    groups = [g for g in range(len(prompts)) for _ in range(n)]
    everyone = [prompts[g] for g in groups], [sample_seed(eval_seed(config), 2, j) for j in range(len(groups))]
    mine = share(len(groups), accelerator.num_processes, accelerator.process_index)
    samples = generate(backend, accelerator, *everyone, mine, desc="eval",
                       trained=name != "base" and not name.startswith("reference"))
    scored = score(reward, accelerator, samples, groups)
    judged = score(judges, accelerator, samples, groups) if judges.specs else None
    result = {"reward": nanmean(scored.total)}
    result.update({k: nanmean(v) for k, v in eval_parts(scored, judged).items()})
    result.update(backend.eval_metrics(samples))  # e.g. text: perplexity under the base model, diversity
    save_samples(run, accelerator, f"{name}/eval" if name != "base" else "base_eval", backend, samples, mine,
                 sample_rows(*everyone, scored, [], judged), clear=True)
    return result


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
                     "reward": _num(scored.total[i]), "scores": scores, "selected": i in chosen_set})
    return rows


def iteration_record(it: int, scored: Scored, chosen: Sequence[int], loss: float,
                     evaluation: dict[str, float], seconds: dict[str, float]) -> dict[str, Any]:
    valid = scored.total[np.isfinite(scored.total)]
    return {
        "iteration": it,
        "reward_mean": _num(valid.mean()) if valid.size else None,
        "reward_std": _num(valid.std()) if valid.size else None,
        "reward_selected_mean": _num(np.mean(scored.total[list(chosen)])) if len(chosen) else None,
        "rewards": {k: _num(nanmean(v)) for k, v in scored.parts.items()},
        "n_generated": int(len(scored.total)),
        "n_selected": len(chosen),
        "n_dropped": scored.n_dropped,
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
            f"  loss {f(record['train_loss'])}" + (f"  eval[{ev}]" if ev else "")
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


class timed:
    """`with timed(seconds, "train"):` adds the block's wall time to seconds["train"]."""

    def __init__(self, seconds: dict[str, float], key: str):
        self.seconds, self.key = seconds, key

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds[self.key] = self.seconds.get(self.key, 0.0) + time.perf_counter() - self.start
        return False
