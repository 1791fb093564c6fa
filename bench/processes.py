"""One process against several: the same run, seconds per phase side by side.

Runs CONFIG (default: the monet-cat demo's, a few iterations) once in one process with all the
threads, then under torchrun with N processes and threads/N each, alternating `--repeats` times
so both see the same machine load. Reads each run's metrics.jsonl (`seconds` per phase) and
prints the median per phase and the ratios one / N.

    python bench/processes.py [--config configs/toy-monet-cat.yaml] [--iterations 3] [--processes 2]

Writes bench/results/processes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def run(processes: int, threads: int, config: Path, out: Path, overrides: list[str]) -> dict:
    command = [sys.executable, "-m", "raft_diffusion", "train", str(config), "--output-dir", str(out)]
    if processes > 1:
        command[1:3] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                        "-m", "raft_diffusion"]
    for o in overrides:
        command += ["--set", o]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{processes}-process run failed:\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    later = records[1:] or records  # iteration 1 also pays for the first evaluation and warm-up
    phases = {k: statistics.mean(r["seconds"][k] for r in later) for k in later[0]["seconds"]}
    phases["iteration"] = sum(phases.values())
    return {"wall": wall, "per_iteration": phases, "final_eval": records[-1]["eval"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "toy-monet-cat.yaml")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads in all")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    args = parser.parse_args()
    overrides = [f"raft.iterations={args.iterations}", *args.overrides]
    results: dict[str, list[dict]] = {"one": [], "many": []}
    with tempfile.TemporaryDirectory(prefix="raft-processes-") as tmp:
        for r in range(args.repeats):
            results["one"].append(run(1, args.threads, args.config, Path(tmp) / f"one-{r}", overrides))
            results["many"].append(run(args.processes, max(1, args.threads // args.processes), args.config,
                                       Path(tmp) / f"many-{r}", overrides))
    median = {name: {k: statistics.median(x["per_iteration"][k] for x in rs) for k in rs[0]["per_iteration"]}
              for name, rs in results.items()}
    wall = {name: statistics.median(x["wall"] for x in rs) for name, rs in results.items()}
    print(f"{args.config.name}, {args.iterations} iterations, {args.threads} threads in all: 1 process "
          f"against {args.processes} (seconds per iteration after the first, median of {args.repeats})")
    print(f"{'phase':12}{'1 process':>12}{f'{args.processes} processes':>14}{'ratio 1/N':>11}")
    for k in median["one"]:
        ratio = median["one"][k] / median["many"][k] if median["many"][k] else float("nan")
        print(f"{k:12}{median['one'][k]:12.2f}{median['many'][k]:14.2f}{ratio:11.2f}")
    print(f"{'wall (run)':12}{wall['one']:12.1f}{wall['many']:14.1f}{wall['one'] / wall['many']:11.2f}")
    out = HERE / "results" / "processes.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "median_per_iteration": median,
                               "median_wall": wall, "runs": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
