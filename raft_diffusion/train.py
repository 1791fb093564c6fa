"""A training run end to end: validate, claim the run directory, build, then write and loop.

Every check a user can fail (config, prompts, reward names, memory, output directory, model
path, resolution) runs before anything is written, and a refused run leaves the directory as it
found it: the claim (an exclusive lock) is undone when building fails.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import set_seed

from . import trackers
from .config import RunConfig, config_to_yaml
from .errors import UserError
from .precision import check_launcher
from .prompts import load_prompts
from .rewards import check_name, check_reads
from .run_dir import RunDirectory
from .checkpoint import write_text_atomically
from .experts import Experts
from .filters import FilterSet
from .kinds import build_backend, kind_of
from .loop import evaluate, raft
from .rewards.compose import RewardSet


def run_training(config: RunConfig, *, search: Sequence[Path] = (), resume: bool = False,
                 overwrite: bool = False, log: Callable[[str], None] = print, command: str = "train",
                 replaces: str | None = None, after: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Train per `config`; returns the metrics records. User mistakes raise `UserError`.

    `command` is recorded in run.json; `replaces` (a demo name) lets that demo's earlier run in the
    directory be replaced; `after` runs once the loop is done, still holding the directory's lock.
    """
    import yaml

    train_prompts = load_prompts(config.prompts.train, "config prompts.train", search)
    eval_prompts = (load_prompts(config.prompts.eval, "config prompts.eval", search)
                    if config.prompts.eval is not None else train_prompts)
    outputs = kind_of(config).outputs
    for i, spec in enumerate(config.rewards):
        check_name(spec.name, f"config rewards.{i}.name")
        check_reads(spec.name, outputs, f"config rewards.{i}.name", spec.options)
    for i, spec in enumerate(config.eval.judges):
        check_name(spec.name, f"config eval.judges.{i}.name")
        check_reads(spec.name, outputs, f"config eval.judges.{i}.name", spec.options)
    filters = FilterSet(config.filters, outputs, field="config filters")  # built now: a bad option writes nothing
    group = config.generation.samples_per_prompt + sum(e.per_prompt for e in config.generation.experts)
    if config.selection.strategy == "per_prompt" and config.selection.top > group:
        raise UserError("config selection.top", f"{config.selection.top} exceeds the {group} candidates of a prompt",
                        "keep top <= generation.samples_per_prompt (plus the experts' per_prompt)")
    experts = None
    if config.generation.experts:
        # Folders read and checked (every row's file inside its folder, every picture decoded), model
        # paths too: before any model loads, before the run's directory is claimed.
        experts = Experts(config, search)
        experts.check_prompts(train_prompts, "prompts.train")
    check_memory(config, len(eval_prompts), experts)
    check_launcher(config.training.mixed_precision)
    check_processes(config, len(eval_prompts))
    trackers.check_installed(config)
    run = RunDirectory(config.output_dir)
    config_yaml = config_to_yaml(config)
    main = os.environ.get("RANK", "0") == "0"  # other ranks of a multi-process run only read it
    mode = run.claim(yaml.safe_load(config_yaml), resume, overwrite, replaces) if main else "resume"
    try:
        if experts is not None and mode == "resume" and resume:
            experts.check_unchanged(run.checkpoints)  # the folders the checkpoints were made with
        accelerator, backend, reward, judges = _build(config)
        if experts is not None:
            experts.load(backend)
            experts.check_context(backend)  # texts against the policy's context: its tokenizer is loaded now
        reward.check_prompts(train_prompts, "config prompts.train")
        reward.check_prompts(eval_prompts, "config prompts.eval")
        judges.check_prompts(eval_prompts, "config prompts.eval")
    except BaseException:
        run.abandon()
        raise

    try:
        if main:
            ema = config.training.ema_decay
            run.open(mode, config_yaml, command,
                     f"the EMA of the LoRA (decay {ema})" if ema else "the LoRA as last trained")
        trackers.start(accelerator, config)
        accelerator.wait_for_everyone()
        metrics = raft(config, backend, reward, judges, run, accelerator, train_prompts, eval_prompts, log,
                       resume=mode == "resume" and resume, experts=experts, filters=filters)
        if after is not None:
            after()
        return metrics
    finally:
        trackers.end(accelerator)
        run.close()


def check_memory(config: RunConfig, n_eval_prompts: int, experts=None) -> None:
    """Refuse, before anything is written, a run whose samples cannot fit in memory.

    What is counted is what the run holds at once: an iteration's candidates from every source (the
    policy's samples_per_prompt and each expert's per_prompt, a folder's no more than its rows, times
    prompts_per_iteration), plus, when it evaluates (eval.every > 0), an evaluation's samples; the
    refusal names the field of the largest share."""
    if kind_of(config).output != "image":  # what a text sample holds is small
        return
    gen = config.generation
    b, K = config.raft.prompts_per_iteration, gen.samples_per_prompt
    policy = "raft.prompts_per_iteration" if b > K else "generation.samples_per_prompt"
    shares = [(policy, b * K, f"{b} x {K} of the policy")]
    for i, spec in enumerate(gen.experts):
        held = experts.held_per_prompt(i) if experts is not None else spec.per_prompt
        shares.append((f"generation.experts.{i}.per_prompt", b * held, f"{b} x {held} of expert {i}"))
    if config.eval.every:
        n_eval = n_eval_prompts * config.eval.samples_per_prompt
        shares.append(("eval.samples_per_prompt", n_eval,
                       f"{n_eval_prompts} x {config.eval.samples_per_prompt} of an evaluation"))
    n = sum(share[1] for share in shares)
    # Decoded float32 images plus latents (at most 4 channels at 1/64 the pixels): what a sample holds.
    need = n * (3 * gen.resolution ** 2 + 4 * gen.resolution ** 2 // 64) * 4
    available = _memory_bytes()
    if available and need > available // 2:
        field, _, _ = max(shares, key=lambda share: share[1])
        if gen.resolution > 1024:
            field = "generation.resolution"
        parts = " + ".join(share[2] for share in shares if share[1])
        fix = {"eval.samples_per_prompt": "lower eval.samples_per_prompt, give fewer prompts.eval, "
                                          "or set eval.every: 0",
               "generation.resolution": "lower generation.resolution",
               "raft.prompts_per_iteration": "lower raft.prompts_per_iteration"}.get(
            field, f"lower {field} or raft.prompts_per_iteration")
        raise UserError(f"config {field}", f"the run holds {n} samples at {gen.resolution} px ({parts}), about "
                        f"{need / 2**30:.1f} GiB, more than half of this machine's {available / 2**30:.0f} GiB", fix)


def check_processes(config: RunConfig, n_eval_prompts: int) -> None:
    """Refuse more processes than an iteration (or an evaluation) has samples: one would hold none."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    n = config.raft.prompts_per_iteration * config.generation.samples_per_prompt
    if world > n:
        raise UserError("config raft.prompts_per_iteration", f"an iteration has {n} samples for {world} processes",
                        f"give every process one at least: prompts_per_iteration x samples_per_prompt >= {world}")
    n_eval = n_eval_prompts * config.eval.samples_per_prompt
    if config.eval.every and world > n_eval:
        raise UserError("config eval.samples_per_prompt", f"an evaluation has {n_eval} samples for {world} processes",
                        f"give every process one at least: eval prompts x samples_per_prompt >= {world}")


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def evaluate_reference(config: RunConfig, resolution: int, *, search: Sequence[Path] = ()) -> dict[str, float]:
    """The base model (no LoRA) on the run's eval prompts and seeds at another `resolution`.

    The resolution demo's reference: the model at its native size. Writes the samples to
    samples/reference_R/eval/ and the means to reference.json in the run directory.
    """
    import json

    config = config.model_copy(deep=True)
    config.generation.resolution = resolution
    eval_prompts = load_prompts(config.prompts.eval if config.prompts.eval is not None else config.prompts.train,
                                "config prompts.eval", search)
    accelerator, backend, reward, judges = _build(config)  # a fresh LoRA starts at zero: the base model
    run = RunDirectory(config.output_dir)
    result = evaluate(config, backend, reward, judges, run, accelerator, eval_prompts, f"reference_{resolution}")
    if accelerator.is_main_process:
        write_text_atomically(Path(config.output_dir) / "reference.json",
                              json.dumps({"resolution": resolution, "eval": result}, indent=2) + "\n")
    return result


def _build(config: RunConfig):
    """(accelerator, backend, training rewards, judges) of a run: the model and every reward loaded once."""
    import torch

    # training.mixed_precision is the backends' own (precision.py): accelerate would scale fp16 a second time.
    accelerator = Accelerator(mixed_precision="no", cpu=not _cuda_wanted(), **trackers.accelerator_options(config))
    set_seed(config.raft.seed)  # python, numpy and torch: the LoRA's initial weights come from here
    backend = build_backend(config, accelerator)  # loads the model; checks resolution, LoRA targets
    dtype = getattr(torch, config.model.dtype)  # rewards run on the run's device and dtype
    reward = RewardSet(config.rewards, accelerator.device, field="config rewards", dtype=dtype)
    judges = RewardSet(config.eval.judges, accelerator.device, field="config eval.judges", dtype=dtype)
    return accelerator, backend, reward, judges


def _cuda_wanted() -> bool:
    import torch

    return torch.cuda.is_available() and os.environ.get("RAFT_DIFFUSION_CPU", "") != "1"
