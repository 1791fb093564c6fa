"""Which objective keeps the toy world's alignment climbing: raft, reward_weighted, negative_aware,
each with the base-model anchor off and on, over seeds, at the same sample budget.

Every run is a run directory under --root (default ~/.cache/raft-diffusion/bench/objectives), so
an interrupted bench continues where it stopped (finished runs are read, unfinished ones resumed).
Choose settings on `--split dev` (dev wordings, other eval seeds); report on `--split eval`.

    python bench/objectives.py --task monet-cat --split dev --seeds 0 [--iterations 16 --every 4]
    python bench/objectives.py --task resolution --split eval --seeds 0 1 2 --iterations 20

Writes bench/results/objectives-TASK-SPLIT.json (per run: eval curves, wall time) and prints a
table: the mean and spread over seeds of each judge at every evaluated iteration.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TASKS = {"monet-cat": "toy-monet-cat.yaml", "resolution": "toy-resolution.yaml"}
DEV_PROMPTS = {"monet-cat": "prompts/toy/monet_cat_dev.txt", "resolution": "prompts/toy/resolution_dev.txt"}
DEV_EVAL_SEED = 1_000_003  # eval seeds of the dev split: never those of the held-out eval
# (name, training overrides): the objectives, each without and with the anchor.
VARIANTS = {
    "raft": {"objective": "raft"},
    "reward_weighted": {"objective": "reward_weighted", "beta": 0.5},
    "negative_aware": {"objective": "negative_aware", "ema_decay": 0.9},
}
ANCHORS = (0.0, 1.0)


def run_config(task: str, variant: str, anchor: float, seed: int, split: str, iterations: int, every: int,
               root: Path, overrides: list[str] = ()):
    from raft_diffusion.config import load_config

    cfg = load_config(REPO / "configs" / TASKS[task], list(overrides))
    cfg.raft.iterations, cfg.raft.seed, cfg.eval.every = iterations, seed, every
    for key, value in {**VARIANTS[variant], "anchor_weight": anchor}.items():
        setattr(cfg.training, key, value)
    if split == "dev":
        cfg.prompts.eval, cfg.eval.seed = str(REPO / DEV_PROMPTS[task]), DEV_EVAL_SEED + seed
    else:
        cfg.prompts.eval = str(REPO / cfg.prompts.eval)
    cfg.prompts.train = str(REPO / cfg.prompts.train)
    cfg.output_dir = str(root / task / split / f"{variant}-anchor{anchor:g}" / f"seed{seed}")
    return cfg


def run_one(cfg) -> list[dict]:
    from raft_diffusion.run_dir import RunDirectory
    from raft_diffusion.train import run_training

    done = RunDirectory(cfg.output_dir).read_metrics()
    if (Path(cfg.output_dir) / "final").is_dir() and len(done) == cfg.raft.iterations:
        return done
    return run_training(cfg, resume=True, log=lambda line: print(f"  {line}", flush=True))


def curves(records: list[dict]) -> dict[str, dict[int, float]]:
    """judge -> {iteration (0 = the base model): mean}."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        if r.get("eval_before"):
            for k, v in r["eval_before"].items():
                out.setdefault(k, {})[0] = v
        for k, v in (r.get("eval") or {}).items():
            out.setdefault(k, {})[r["iteration"] + 1] = v
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, default="monet-cat")
    parser.add_argument("--split", choices=("dev", "eval"), default="dev")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--iterations", type=int, default=16)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--anchors", type=float, nargs="+", default=list(ANCHORS))
    parser.add_argument("--root", type=Path, default=Path.home() / ".cache/raft-diffusion/bench/objectives")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a config override for every run, e.g. --set generation.samples_per_prompt=8")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for variant in args.variants:
        for anchor in args.anchors:
            for seed in args.seeds:
                cfg = run_config(args.task, variant, anchor, seed, args.split, args.iterations, args.every, args.root,
                                 args.overrides)
                print(f"{args.task} {args.split} {variant} anchor {anchor:g} seed {seed} -> {cfg.output_dir}", flush=True)
                records = run_one(cfg)
                seconds = sum(sum(r["seconds"].values()) for r in records)
                results.append({"variant": variant, "anchor": anchor, "seed": seed, "curves": curves(records),
                                "seconds": seconds, "n_generated": sum(r["n_generated"] for r in records)})
    out = REPO / "bench/results" / f"objectives-{args.task}-{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"task": args.task, "split": args.split, "iterations": args.iterations,
                               "runs": results}, indent=1) + "\n")
    print_table(results)
    print(f"wrote {out}")
    return 0


def print_table(results: list[dict]) -> None:
    judges = sorted({j for r in results for j in r["curves"]})
    for judge in judges:
        print(f"\n{judge}: mean (min-max over seeds) at each evaluated iteration")
        for variant in dict.fromkeys(r["variant"] for r in results):
            for anchor in dict.fromkeys(r["anchor"] for r in results):
                runs = [r for r in results if r["variant"] == variant and r["anchor"] == anchor]
                if not runs:
                    continue
                its = sorted({i for r in runs for i in r["curves"].get(judge, {})}, key=int)
                cells = []
                for i in its:
                    values = [r["curves"][judge][i] for r in runs if i in r["curves"].get(judge, {})]
                    values = [v for v in values if v is not None]
                    if values:
                        cells.append(f"{i}:{statistics.mean(values):.3f}" + (
                            f"({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""))
                minutes = statistics.mean(r["seconds"] for r in runs) / 60
                print(f"  {variant:16} anchor {anchor:<4g} {' '.join(cells)}  [{minutes:.1f} min/run]")


if __name__ == "__main__":
    raise SystemExit(main())
