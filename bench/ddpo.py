"""The objectives bench's peer row: TRL 0.23.1's DDPOTrainer (the last TRL with DDPO) on the
task that `bench/objectives.py` gives RAFT, judged by the same evaluation.

What is the same as a RAFT run of `bench/objectives.py --task monet-cat`: the toy SD
(builtin:toy-shapes), the reward (the config's toy CLIP, through the project's RewardSet), the
training prompts in the order the RAFT loop draws them (`loop.draw_prompts`: prompts_per_iteration
b = 6 prompts, each samples_per_prompt K = 16 times, so one DDPO epoch = one RAFT iteration's
b x K = 96 samples), guidance 2.5, 20 DDIM steps, 64 px, the LoRA's rank, alpha and target modules,
the sample budget (--iterations RAFT iterations' worth, times --sample-multiplier), and the
evaluation: `loop.evaluate` on the split's eval prompts and seeds (the dev split: the dev wordings
and eval seed 1_000_003 + seed), with the config's judges. What is DDPO's own: the policy-gradient
update (PPO clip on per-step DDIM log-probabilities, sampling at eta 1), lr 3e-4 by default,
advantages normalised per prompt (TRL's PerPromptStatTracker over the K samples of a prompt), and
its own initial noise (TRL draws it from torch's global RNG, not from RAFT's per-sample seeds).
The LoRA is evaluated as RAFT's is, with the config's sampler (DDIM eta 0) and seeds.

One metrics.jsonl record per epoch, as the RAFT loop writes them for `objectives.curves()`:
"iteration" = epochs done - 1 (one epoch = one RAFT iteration's samples, so with
--sample-multiplier 2 the x axis runs to 2 x --iterations), "eval" every --every epochs and at the
end, "eval_before" (the base model) on the first, "seconds" (generate, score, train, eval),
"n_generated", plus DDPO's mean PPO loss, approx_kl and clipfrac.

    make bench-deps   # TRL 0.23.1 with --no-deps, and pandas (bench/requirements-ddpo.txt)
    python bench/ddpo.py --split eval --seeds 0 1 2 [--iterations 16 --every 4 --sample-multiplier 1
                         --device auto --threads 1]

Each run is a run directory under --root (default ~/.cache/raft-diffusion/bench/objectives), at
TASK/SPLIT/ddpo/seedS (ddpo-x2, ddpo-x4 with --sample-multiplier 2, 4) beside RAFT's runs; it holds
config.yaml (the task's RAFT config: model, prompts, generation, eval), ddpo.json (DDPO's
settings), metrics.jsonl, eval samples, checkpoints/ (one per epoch) and final/ (the LoRA as
pytorch_lora_weights.safetensors, like RAFT's). A finished run is read, not redone; an interrupted
one resumes from its last epoch. Writes bench/results/ddpo-TASK-SPLIT[-xM].json and prints the
objectives bench's table.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # the toy world is on disk; nothing may come from a hub
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

TRL_VERSION = "0.23.1"


def import_trl():
    """TRL's DDPO classes, or exit with one line saying how to install them."""
    try:
        import trl
        from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline
    except ImportError as e:
        raise SystemExit(f"bench/ddpo.py needs trl=={TRL_VERSION} and pandas ({e}): run `make bench-deps`") from None
    if trl.__version__ != TRL_VERSION:
        print(f"warning: trl {trl.__version__} installed; this bench was written for {TRL_VERSION}", flush=True)
    return trl.__version__, DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline


def run_name(multiplier: int) -> str:
    return "ddpo" if multiplier == 1 else f"ddpo-x{multiplier}"


def sample_batch_size(per_epoch: int, largest: int, train_batch: int) -> int:
    """The largest generation batch <= `largest` that splits an epoch evenly and that TRL's
    training batch divides (TRL refuses other sizes)."""
    fits = [d for d in range(1, largest + 1) if per_epoch % d == 0 and d % train_batch == 0]
    if not fits:
        raise SystemExit(f"no generation batch <= {largest} divides the {per_epoch} samples of an epoch and is a "
                         f"multiple of --train-batch-size {train_batch}")
    return fits[-1]


class PromptStream:
    """TRL's prompt_fn: the RAFT loop's training prompts, in its order, each K times in a row."""

    def __init__(self, prompts: list[str], per_iteration: int, k: int, seed: int, position: int = 0):
        self.prompts, self.b, self.k, self.seed = prompts, per_iteration, k, seed
        self.position = position  # the RAFT loop's state["data_position"]
        self.queue: collections.deque[str] = collections.deque()
        self.drawn: list[str] = []  # the prompts drawn since the caller last emptied this

    def __call__(self) -> tuple[str, dict]:
        from raft_diffusion.loop import draw_prompts

        if not self.queue:
            drawn, self.position = draw_prompts(self.prompts, self.position, self.b, self.seed)
            self.drawn.extend(drawn)
            self.queue.extend(p for p in drawn for _ in range(self.k))
        return self.queue.popleft(), {}


class EpochMeter:
    """What one DDPO epoch did: seconds per phase, the rewards it saw, its PPO statistics."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.seconds: dict[str, float] = {"generate": 0.0, "score": 0.0, "train": 0.0, "eval": 0.0}
        self.totals: list = []
        self.parts: list[dict] = []
        self.ppo: dict[str, list] = {"loss": [], "approx_kl": [], "clipfrac": []}

    def ppo_means(self) -> dict[str, float | None]:
        import torch

        return {k: float(torch.stack(v).float().mean()) if v else None for k, v in self.ppo.items()}


def timed_method(obj, name: str, meter: EpochMeter, key: str) -> None:
    """Wrap `obj.name` (on this instance only) to add its wall time to meter.seconds[key]."""
    method = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            meter.seconds[key] += time.perf_counter() - start

    setattr(obj, name, wrapper)


def recorded_loss(trainer, meter: EpochMeter) -> None:
    """Keep each PPO minibatch's loss, approx_kl and clipfrac (TRL logs them to trackers only)."""
    method = trainer.calculate_loss

    def wrapper(*args, **kwargs):
        loss, approx_kl, clipfrac = method(*args, **kwargs)
        for key, value in (("loss", loss), ("approx_kl", approx_kl), ("clipfrac", clipfrac)):
            meter.ppo[key].append(value.detach())
        return loss, approx_kl, clipfrac

    trainer.calculate_loss = wrapper


def make_reward_fn(reward, meter: EpochMeter):
    """TRL's reward_function: the run's RewardSet on images in [0, 1], on the CPU as RAFT scores them."""
    import torch

    from raft_diffusion.errors import RunFailed

    def reward_fn(images, prompts, metadata):
        start = time.perf_counter()
        images = images.float().cpu()
        if not torch.isfinite(images).all():
            raise RunFailed("DDPO generated non-finite images (the LoRA diverged: lower --learning-rate)")
        prompts = list(prompts)
        groups = [list(dict.fromkeys(prompts)).index(p) for p in prompts]
        scored = reward(images, prompts, groups)
        if scored.n_dropped:
            raise RunFailed(f"the reward failed on {scored.n_dropped} of {len(prompts)} samples: {scored.errors}")
        meter.totals.append(scored.total)
        meter.parts.append(scored.parts)
        meter.seconds["score"] += time.perf_counter() - start
        return torch.as_tensor(scored.total, dtype=torch.float32), {}

    return reward_fn


def ddpo_pipeline(default_class, model_path: str, lora):
    """TRL's DefaultDDPOStableDiffusionPipeline on the project's model, with the config's LoRA.

    TRL loads a diffusers directory by path, and the toy asset has no tokenizer/, so the project's
    loader (which supplies the CLIP BPE tokenizer) saves a complete copy first. TRL's LoRA is
    rank 4 on attention only; get_trainable_layers is where a subclass sets its own.
    """
    from peft import LoraConfig

    from raft_diffusion.backends.loading import load_pipeline

    class ProjectLoraPipeline(default_class):
        def get_trainable_layers(self):
            unet = self.sd_pipeline.unet
            unet.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                        target_modules=list(lora.target_modules), init_lora_weights="gaussian"))
            for p in unet.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
            return unet

    with tempfile.TemporaryDirectory(prefix="raft-ddpo-pipeline-") as tmp:
        load_pipeline(model_path, "float32", field="model.path").save_pretrained(tmp)
        return ProjectLoraPipeline(tmp, use_lora=True)


class TrainerState:
    """DDPO's LoRA and optimizer in the shape `raft_diffusion.checkpoint` saves and restores."""

    def __init__(self, trainer):
        self.trainer = trainer

    def adapter_state(self):
        from peft.utils import get_peft_model_state_dict

        unet = self.trainer.sd_pipeline.unet
        return {k: v.detach().cpu().clone().contiguous() for k, v in get_peft_model_state_dict(unet).items()}

    def load_adapter_state(self, state) -> None:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.trainer.sd_pipeline.unet, state)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"unexpected LoRA keys: {result.unexpected_keys[:3]}")

    def training_state(self):
        return {"optimizer": self.trainer.optimizer.state_dict()}

    def load_training_state(self, state) -> None:
        self.trainer.optimizer.load_state_dict(state["optimizer"])


def ddpo_settings(args, cfg, trl_version: str) -> dict:
    gen = cfg.generation
    per_epoch = cfg.raft.prompts_per_iteration * gen.samples_per_prompt
    return {
        "trainer": f"trl {trl_version} DDPOTrainer",
        "epochs": cfg.raft.iterations, "samples_per_epoch": per_epoch, "sample_multiplier": args.sample_multiplier,
        "sample_batch_size": sample_batch_size(per_epoch, gen.batch_size, args.train_batch_size),
        "sample_num_steps": gen.steps, "sample_guidance_scale": gen.guidance_scale, "sample_eta": args.eta,
        "train_learning_rate": args.learning_rate, "train_batch_size": args.train_batch_size,
        "train_gradient_accumulation_steps": args.gradient_accumulation_steps,
        "train_num_inner_epochs": args.inner_epochs, "train_clip_range": args.clip_range,
        "train_adv_clip_max": args.adv_clip_max, "train_cfg": True, "train_timestep_fraction": 1.0,
        "train_max_grad_norm": 1.0, "train_adam_weight_decay": 1e-4,
        "per_prompt_stat_tracking": True, "per_prompt_stat_tracking_buffer_size": gen.samples_per_prompt,
        "per_prompt_stat_tracking_min_count": gen.samples_per_prompt,
        "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "target_modules": list(cfg.lora.target_modules)},
    }


def run_seed(args, seed: int, trl_parts, log=print) -> list[dict]:
    """Train DDPO for one seed in its run directory (or read the finished run); the records."""
    import torch
    import yaml

    from objectives import run_config
    from raft_diffusion.checkpoint import (resume, rng_state, save_checkpoint, write_dir_atomically,
                                           write_text_atomically)
    from raft_diffusion.config import config_to_yaml
    from raft_diffusion.errors import UserError
    from raft_diffusion.loop import evaluate, iteration_record
    from raft_diffusion.prompts import load_prompts
    from raft_diffusion.rewards.compose import Scored
    from raft_diffusion.run_dir import RunDirectory
    from raft_diffusion.train import _build

    trl_version, DDPOConfig, DDPOTrainer, DefaultPipeline = trl_parts
    epochs = args.iterations * args.sample_multiplier
    cfg = run_config(args.task, "raft", 0.0, seed, args.split, epochs, args.every, args.root, args.overrides)
    cfg.output_dir = str(args.root / args.task / args.split / run_name(args.sample_multiplier) / f"seed{seed}")
    run = RunDirectory(cfg.output_dir)
    done = run.read_metrics()
    if run.final.is_dir() and len(done) == epochs:
        log(f"  finished: {len(done)} epochs read from {run.metrics}")
        return done

    settings = ddpo_settings(args, cfg, trl_version)
    gen = cfg.generation
    train_prompts = load_prompts(cfg.prompts.train, "config prompts.train")
    eval_prompts = load_prompts(cfg.prompts.eval, "config prompts.eval")
    config_yaml = config_to_yaml(cfg)
    mode = run.claim(yaml.safe_load(config_yaml), resume=True, overwrite=False)
    try:
        saved = run.path / "ddpo.json"
        if mode == "resume" and saved.is_file():
            before = json.loads(saved.read_text(encoding="utf-8"))
            changed = sorted(k for k in {**before, **settings} if k != "epochs" and before.get(k) != settings.get(k))
            if changed:
                raise UserError("ddpo.json", f"{changed} differ from the run in {run.path}",
                                "resume with the same settings, or choose another --root")
        accelerator, backend, reward, judges = _build(cfg)  # the eval side, exactly as a RAFT run builds it
        reward.check_prompts(train_prompts, "config prompts.train")
        reward.check_prompts(eval_prompts, "config prompts.eval")
        judges.check_prompts(eval_prompts, "config prompts.eval")
        from accelerate import PartialState

        PartialState()  # TRL's pipeline logs through accelerate while it is built
        pipeline = ddpo_pipeline(DefaultPipeline, cfg.model.path, cfg.lora)
        native = pipeline.unet.config.sample_size * pipeline.sd_pipeline.vae_scale_factor
        if gen.resolution != native:  # TRL samples at the UNet's own size, whatever the config says
            raise UserError("config generation.resolution", f"{gen.resolution}, but TRL's DDPO samples at the "
                            f"model's native {native} px", "bench a task at the model's native resolution")
        meter = EpochMeter()
        stream = PromptStream(train_prompts, cfg.raft.prompts_per_iteration, gen.samples_per_prompt, seed)
        config = DDPOConfig(
            seed=seed, mixed_precision="no", allow_tf32=False, save_freq=10**9, num_epochs=epochs,
            accelerator_kwargs={"cpu": args.device == "cpu"},
            sample_num_steps=settings["sample_num_steps"], sample_eta=settings["sample_eta"],
            sample_guidance_scale=settings["sample_guidance_scale"],
            sample_batch_size=settings["sample_batch_size"],
            sample_num_batches_per_epoch=settings["samples_per_epoch"] // settings["sample_batch_size"],
            train_batch_size=args.train_batch_size, train_learning_rate=args.learning_rate,
            train_gradient_accumulation_steps=args.gradient_accumulation_steps,
            train_num_inner_epochs=args.inner_epochs, train_clip_range=args.clip_range,
            train_adv_clip_max=args.adv_clip_max, train_cfg=True, train_timestep_fraction=1.0,
            train_max_grad_norm=1.0, train_adam_weight_decay=1e-4,
            per_prompt_stat_tracking=True,
            per_prompt_stat_tracking_buffer_size=settings["per_prompt_stat_tracking_buffer_size"],
            per_prompt_stat_tracking_min_count=settings["per_prompt_stat_tracking_min_count"],
            negative_prompts=gen.negative_prompt,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "DDPOTrainer is deprecated": we know
            trainer = DDPOTrainer(config, make_reward_fn(reward, meter), stream, pipeline)
        pipeline.set_progress_bar_config(disable=True)
        timed_method(trainer, "_generate_samples", meter, "generate")
        recorded_loss(trainer, meter)
    except BaseException:
        run.abandon()
        raise

    try:
        run.open(mode, config_yaml, command="bench ddpo", final="the DDPO LoRA as last trained")
        write_text_atomically(run.path / "ddpo.json", json.dumps(settings, indent=2) + "\n")
        state_io, rng_holder = TrainerState(trainer), torch.Generator()  # DDPO's randomness is torch's global RNG
        checkpoint, loaded = resume(run.checkpoints, state_io, rng_holder, warn=log)
        start, global_step = 0, 0
        if loaded is not None:
            start, global_step = loaded["iteration"] + 1, loaded["global_step"]
            stream.position = loaded["data_position"]
            trainer.stat_tracker.stats = {p: collections.deque(v, maxlen=trainer.stat_tracker.buffer_size)
                                          for p, v in loaded["tracker"].items()}
            log(f"  resumed from {checkpoint} at epoch {start}")
        run.keep_metrics_before(start, warn=log)

        def evaluate_lora(name: str) -> dict:
            if name != "base":  # the base model: the eval backend's fresh LoRA, zero until trained, as in RAFT
                backend.load_adapter_state(state_io.adapter_state())
            return evaluate(cfg, backend, reward, judges, run, accelerator, eval_prompts, name)

        eval_before, started = None, time.perf_counter()
        if start == 0 and cfg.eval.every:
            eval_before = evaluate_lora("base")
            log(f"  base: {fmt(eval_before)} ({time.perf_counter() - started:.1f}s)")
        for it in range(start, epochs):
            meter.reset()
            stream.drawn = []
            run.clear_samples(f"iter_{it:04d}")
            started = time.perf_counter()
            global_step = trainer.step(it, global_step)
            meter.seconds["train"] = time.perf_counter() - started - meter.seconds["generate"] - meter.seconds["score"]
            due = cfg.eval.every and ((it + 1) % cfg.eval.every == 0 or it + 1 == epochs)
            started = time.perf_counter()
            evaluation = evaluate_lora(f"iter_{it:04d}") if due else {}
            meter.seconds["eval"] = time.perf_counter() - started if due else 0.0

            ppo = meter.ppo_means()
            parts = {k: torch.cat([torch.as_tensor(p[k]) for p in meter.parts]).numpy() for k in meter.parts[0]}
            scored = Scored(total=torch.cat([torch.as_tensor(t) for t in meter.totals]).numpy(), parts=parts)
            record = iteration_record(it, scored, [], ppo["loss"] if ppo["loss"] is not None else math.nan,
                                      evaluation, meter.seconds)
            record["ddpo"] = {"approx_kl": ppo["approx_kl"], "clipfrac": ppo["clipfrac"], "global_step": global_step,
                              "prompts": stream.drawn}
            if it == 0 and eval_before is not None:
                record["eval_before"] = eval_before
            run.append_metrics(record)
            tracker = {p: [float(x) for x in v] for p, v in trainer.stat_tracker.stats.items()}
            save_checkpoint(run.checkpoints, it, state_io,
                            {"data_position": stream.position, "global_step": global_step, "tracker": tracker},
                            [rng_state(rng_holder)], cfg.checkpoint.keep_last)
            log(f"  epoch {it + 1}/{epochs}  reward {record['reward_mean']:.4f}  loss {ppo['loss']:.4g}  "
                f"approx_kl {ppo['approx_kl']:.3g}  clipfrac {ppo['clipfrac']:.3f}"
                + (f"  eval[{fmt(evaluation)}]" if evaluation else "")
                + "  (" + ", ".join(f"{k} {v:.1f}s" for k, v in meter.seconds.items()) + ")")
        backend.load_adapter_state(state_io.adapter_state())
        write_dir_atomically(run.final, backend.save_adapter)
        return run.read_metrics()
    finally:
        run.close()


def fmt(evaluation: dict) -> str:
    return " ".join(f"{k}={v:.4f}" if v is not None else f"{k}=n/a" for k, v in evaluation.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["monet-cat"], default="monet-cat",
                        help="the objectives bench's task (resolution: TRL samples at the native size only)")
    parser.add_argument("--split", choices=("dev", "eval"), default="dev")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--iterations", type=int, default=16, help="the sample budget, in RAFT iterations")
    parser.add_argument("--every", type=int, default=4, help="evaluate every N epochs (N RAFT iterations' samples)")
    parser.add_argument("--sample-multiplier", type=int, default=1,
                        help="DDPO gets this many times RAFT's samples (1, 2, 4): that many times the epochs")
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta while DDPO samples (its policy's noise)")
    parser.add_argument("--train-batch-size", type=int, default=4)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=2,
                        help="samples per optimizer step = train batch x this (every step sums all 20 timesteps)")
    parser.add_argument("--inner-epochs", type=int, default=1)
    parser.add_argument("--clip-range", type=float, default=1e-4, help="PPO clip range (TRL's default)")
    parser.add_argument("--adv-clip-max", type=float, default=5.0)
    parser.add_argument("--root", type=Path, default=Path.home() / ".cache/raft-diffusion/bench/objectives")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a config override, as in bench/objectives.py (a rehearsal: "
                             "--set raft.prompts_per_iteration=2 --set generation.samples_per_prompt=4)")
    args = parser.parse_args(argv)
    if args.sample_multiplier < 1 or args.iterations < 1 or args.every < 0:
        parser.error("--sample-multiplier and --iterations must be positive, --every at least 0")
    trl_parts = import_trl()
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if args.device == "cpu":
        os.environ["RAFT_DIFFUSION_CPU"] = "1"  # the project's eval side stays on the CPU too
    if args.threads:
        torch.set_num_threads(args.threads)
    from objectives import print_table, summarise
    from raft_diffusion.errors import RunFailed, UserError

    name = run_name(args.sample_multiplier)
    results = []
    for seed in args.seeds:
        print(f"{args.task} {args.split} {name} seed {seed} ({args.device})", flush=True)
        try:
            records = run_seed(args, seed, trl_parts, log=lambda line: print(line, flush=True))
        except (UserError, RunFailed) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2 if isinstance(e, UserError) else 1
        results.append({**summarise(name, 0.0, seed, records, complete=True), "device": args.device})
    out = REPO / "bench/results" / f"ddpo-{args.task}-{args.split}{name[4:]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"task": args.task, "split": args.split, "iterations": args.iterations,
                               "sample_multiplier": args.sample_multiplier, "runs": results}, indent=1) + "\n")
    print_table(results)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
