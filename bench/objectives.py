"""Which objective keeps the toy world's alignment climbing: raft, reward_weighted, negative_aware,
each with the base-model anchor off and on, over seeds, at the same sample budget.

Every run is a run directory under --root (default ~/.cache/raft-diffusion/bench/objectives), so
an interrupted bench continues where it stopped (finished runs are read, unfinished ones resumed).
Choose settings on `--split dev` (dev wordings, other eval seeds); report on `--split eval`.

A variant is `OBJECTIVE[:field=value,...]` over `training.*` fields, the objective's own block
(`training.OBJECTIVE.*`), and `selection.*` and `generation.*` fields, e.g. `reward_weighted:beta=0.25`,
`raft:ema_decay=0.9,learning_rate=3e-4` or `raft:replay=2,min_spread=2,rollout_steps=5`; the anchor is
the separate `--anchors` axis.

    python bench/objectives.py --task monet-cat --split dev --seeds 0 [--iterations 16 --every 4]
    python bench/objectives.py --task resolution --split eval --seeds 0 1 2 --iterations 20 --jobs 12
    python bench/objectives.py --pick bench/results/objectives-monet-cat-dev.json   # best variant per objective

`--jobs N` runs N runs at once, each its own process with one torch thread (on a GPU, where a toy
run leaves the device mostly idle, this is how a grid fits in minutes); `--deadline S` starts no run
after S seconds and stops unfinished ones at S + --grace (they resume on the next call). A TRL DDPO
run made by bench/ddpo.py under the same root and split is read in as the peer row.

Writes bench/results/objectives-TASK-SPLIT.json (per run: eval curves, seconds per phase, wall time)
and prints a table: the mean and spread over seeds of each judge at every evaluated iteration.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TASKS = {"monet-cat": "toy-monet-cat.yaml", "resolution": "toy-resolution.yaml"}
DEV_PROMPTS = {"monet-cat": "prompts/toy/monet_cat_dev.txt", "resolution": "prompts/toy/resolution_dev.txt"}
MAIN_JUDGE = {"monet-cat": "cat_in_monet", "resolution": "oracle"}
# Judges the bench adds to each task's own, so every run reports the toy CLIP and the toy aesthetic.
EXTRA_JUDGES = {
    "monet-cat": [{"name": "aesthetic", "label": "toy_aesthetic",
                   "options": {"model": "builtin:toy-clip", "head": "builtin:toy-aesthetic"}}],
    "resolution": [{"name": "clip", "label": "toy_clip", "options": {"model": "builtin:toy-clip"}}],
}
DEV_EVAL_SEED = 1_000_003  # eval seeds of the dev split: never those of the held-out eval
DEFAULT_VARIANTS = ("raft", "reward_weighted:beta=0.5", "negative_aware:ema_decay=0.9")
ANCHORS = (0.0, 1.0)
PEER = "ddpo"  # bench/ddpo.py's run directories: TASK/SPLIT/ddpo/seedS


def parse_variant(spec: str) -> tuple[str, dict]:
    """`OBJECTIVE[:k=v,...]` -> (directory name, training overrides)."""
    objective, _, rest = spec.partition(":")
    fields: dict = {"objective": objective}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"bench: variant {spec!r}: {item!r} is not field=value")
        fields[key.strip()] = float(value)
    name = objective + "".join(f"-{k}{v:g}" for k, v in fields.items() if k != "objective")
    return name, fields


def run_config(task: str, variant: str, anchor: float, seed: int, split: str, iterations: int, every: int,
               root: Path, overrides: list[str] = ()):
    from raft_diffusion.config import RewardSpec, load_config

    cfg = load_config(REPO / "configs" / TASKS[task], list(overrides))
    cfg.raft.iterations, cfg.raft.seed, cfg.eval.every = iterations, seed, every
    name, fields = parse_variant(variant)
    # selection.* and generation.* fields of a variant (min_spread, rollout_steps, guidance_scale, ...)
    for section in ("selection", "generation"):
        block = getattr(cfg, section)
        own = {k: fields.pop(k) for k in list(fields) if k in type(block).model_fields and k != "objective"}
        if own:
            typed = {k: int(v) if "int" in str(type(block).model_fields[k].annotation) and float(v).is_integer() else v
                     for k, v in own.items()}
            setattr(cfg, section, type(block).model_validate({**block.model_dump(), **typed}))
    training = type(cfg.training)
    objective = fields["objective"]
    block = getattr(cfg.training, objective, None)  # the objective's own knobs (training.reward_weighted.beta)
    knobs = {}
    for key in list(fields):
        if key not in training.model_fields:
            if block is None or key not in type(block).model_fields:
                raise SystemExit(f"bench: variant {variant!r}: training and training.{objective} have no field {key!r}")
            knobs[key] = fields.pop(key)
    fields = {k: int(v) if training.model_fields[k].annotation is int else v for k, v in fields.items()}
    if knobs:
        fields[objective] = {**block.model_dump(), **knobs}
    cfg.training = training.model_validate({**cfg.training.model_dump(), **fields, "anchor_weight": anchor})
    cfg.eval.judges = list(cfg.eval.judges) + [RewardSpec(**j) for j in EXTRA_JUDGES[task]]
    if split == "dev":
        cfg.prompts.eval, cfg.eval.seed = str(REPO / DEV_PROMPTS[task]), DEV_EVAL_SEED + seed
    else:
        cfg.prompts.eval = str(REPO / cfg.prompts.eval)
    cfg.prompts.train = str(REPO / cfg.prompts.train)
    cfg.output_dir = str(root / task / split / f"{name}-anchor{anchor:g}" / f"seed{seed}")
    return cfg


def finished(cfg) -> bool:
    from raft_diffusion.run_dir import RunDirectory

    done = RunDirectory(cfg.output_dir).read_metrics()
    return (Path(cfg.output_dir) / "final").is_dir() and len(done) == cfg.raft.iterations


def run_one(cfg) -> list[dict]:
    from raft_diffusion.run_dir import RunDirectory
    from raft_diffusion.train import run_training

    if finished(cfg):
        return RunDirectory(cfg.output_dir).read_metrics()
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


def summarise(variant: str, anchor: float, seed: int, records: list[dict], complete: bool,
              wall: float | None = None) -> dict:
    phases: dict[str, float] = {}
    for r in records:
        for k, v in r.get("seconds", {}).items():
            phases[k] = phases.get(k, 0.0) + v
    return {"variant": variant, "anchor": anchor, "seed": seed, "curves": curves(records),
            "seconds": sum(phases.values()), "phases": phases, "wall": wall, "complete": complete,
            "iterations_done": len(records), "n_generated": sum(r.get("n_generated", 0) for r in records)}


def run_pool(jobs: list[tuple[str, float, int]], args) -> dict[tuple, float]:
    """Each job in its own process (one torch thread), `args.jobs` at a time; returns wall seconds per job."""
    start, running, walls = time.monotonic(), {}, {}
    pending = list(jobs)
    logs = args.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    while pending or running:
        elapsed = time.monotonic() - start
        while pending and len(running) < args.jobs and (args.deadline is None or elapsed < args.deadline):
            variant, anchor, seed = pending.pop(0)
            cmd = [sys.executable, __file__, "--task", args.task, "--split", args.split, "--seeds", str(seed),
                   "--variants", variant, "--anchors", str(anchor), "--iterations", str(args.iterations),
                   "--every", str(args.every), "--root", str(args.root), "--threads", "1", "--no-write"]
            for o in args.overrides:
                cmd += ["--set", o]
            name = f"{args.task}-{args.split}-{parse_variant(variant)[0]}-anchor{anchor:g}-seed{seed}.log"
            log = open(logs / name, "w")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            running[proc] = ((variant, anchor, seed), time.monotonic(), log)
            print(f"[{elapsed:6.0f}s] start {name[:-4]}", flush=True)
        if args.deadline is not None and elapsed > args.deadline:
            pending.clear()
        if args.deadline is not None and elapsed > args.deadline + args.grace:
            for proc in running:
                proc.terminate()
        time.sleep(1.0)
        for proc in [p for p in running if p.poll() is not None]:
            job, t0, log = running.pop(proc)
            log.close()
            walls[job] = time.monotonic() - t0
            print(f"[{time.monotonic() - start:6.0f}s] done  {job} rc={proc.returncode} "
                  f"wall {walls[job]:.0f}s", flush=True)
    return walls


def collect_peer(args) -> list[dict]:
    from raft_diffusion.run_dir import RunDirectory

    out = []
    for seed in args.seeds:
        folder = args.root / args.task / args.split / PEER / f"seed{seed}"
        records = RunDirectory(folder).read_metrics() if folder.is_dir() else []
        if records:
            complete = (folder / "final").is_dir()
            out.append(summarise("ddpo (TRL 0.23.1)", 0.0, seed, records, complete))
    return out


def pick(path: Path) -> list[str]:
    """The best variant of each objective in a dev result: the highest main-judge mean over the
    evaluated iterations from the middle of the run on (climbing and holding, not a lucky peak)."""
    data = json.loads(path.read_text())
    judge, half = MAIN_JUDGE[data["task"]], data["iterations"] / 2
    best: dict[str, tuple[float, str]] = {}
    for r in data["runs"]:
        if not r.get("complete", True) or r["variant"].startswith(PEER):
            continue
        values = [v for i, v in r["curves"].get(judge, {}).items() if int(i) >= half and v is not None]
        if not values:
            continue
        score = statistics.mean(values)
        objective = r["variant"].split(":")[0]
        if objective not in best or score > best[objective][0]:
            best[objective] = (score, r["variant"])
    for spec in DEFAULT_VARIANTS:  # an objective with no finished dev run keeps its default
        best.setdefault(spec.split(":")[0], (float("-inf"), spec))
    return [best[spec.split(":")[0]][1] for spec in DEFAULT_VARIANTS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, default="monet-cat")
    parser.add_argument("--split", choices=("dev", "eval"), default="dev")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--iterations", type=int, default=16)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        help="OBJECTIVE[:training_field=value,...] each")
    parser.add_argument("--anchors", type=float, nargs="+", default=list(ANCHORS))
    parser.add_argument("--root", type=Path, default=Path.home() / ".cache/raft-diffusion/bench/objectives")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each its own process")
    parser.add_argument("--deadline", type=float, default=None, help="seconds after which no run starts")
    parser.add_argument("--grace", type=float, default=60.0, help="seconds past --deadline before runs stop")
    parser.add_argument("--out", type=Path, default=None, help="result file (default bench/results/...)")
    parser.add_argument("--no-write", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--collect", action="store_true", help="run nothing: read the runs under --root")
    parser.add_argument("--pick", type=Path, default=None, metavar="DEV_JSON",
                        help="print the best variant of each objective in a dev result, and exit")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a config override for every run, e.g. --set generation.samples_per_prompt=8")
    args = parser.parse_args(argv)
    if args.pick:
        print(" ".join(pick(args.pick)))
        return 0
    for variant in args.variants:
        parse_variant(variant)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    jobs = [(v, a, s) for s in args.seeds for v in args.variants for a in args.anchors]
    walls: dict[tuple, float] = {}
    if args.collect:
        args.jobs = max(args.jobs, 2)  # read, never run
    elif args.jobs > 1:
        walls = run_pool(jobs, args)
    else:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
    from raft_diffusion.run_dir import RunDirectory

    results = []
    for variant, anchor, seed in jobs:
        cfg = run_config(args.task, variant, anchor, seed, args.split, args.iterations, args.every, args.root,
                         args.overrides)
        if args.jobs == 1:
            print(f"{args.task} {args.split} {variant} anchor {anchor:g} seed {seed} -> {cfg.output_dir}", flush=True)
            t0 = time.monotonic()
            records = run_one(cfg)
            walls[(variant, anchor, seed)] = time.monotonic() - t0
        else:
            records = RunDirectory(cfg.output_dir).read_metrics()
        results.append(summarise(variant, anchor, seed, records, finished(cfg), walls.get((variant, anchor, seed))))
    if args.no_write:
        return 0
    results += collect_peer(args)
    out = args.out or REPO / "bench/results" / f"objectives-{args.task}-{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"task": args.task, "split": args.split, "iterations": args.iterations,
                               "every": args.every, "main_judge": MAIN_JUDGE[args.task], "runs": results},
                              indent=1) + "\n")
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
                missing = sum(not r.get("complete", True) for r in runs)
                runs = [r for r in runs if r.get("complete", True)]  # a cut-short run is no result
                if not runs and missing:
                    print(f"  {variant:34} anchor {anchor:<4g} n=0 ({missing} not finished)")
                if not runs:
                    continue
                its = sorted({int(i) for r in runs for i in r["curves"].get(judge, {})})
                cells = []
                for i in its:
                    values = [r["curves"][judge].get(i, r["curves"][judge].get(str(i))) for r in runs
                              if judge in r["curves"]]
                    values = [v for v in values if v is not None]
                    if values:
                        cells.append(f"{i}:{statistics.mean(values):.3f}" + (
                            f"({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""))
                minutes = statistics.mean(r["seconds"] for r in runs) / 60
                flag = f" [{missing} more not finished]" if missing else ""
                print(f"  {variant:34} anchor {anchor:<4g} n={len(runs)} {' '.join(cells)}  "
                      f"[{minutes:.1f} min/run]{flag}")


if __name__ == "__main__":
    raise SystemExit(main())
