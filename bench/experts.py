"""The monet-cat task with and without experts, at the same 16 candidates per prompt: the policy's
16 alone, 14 + 2 rendered monet cats (`builtin:toy-monet-cats`), 14 + 2 of another model (the toy
flow model). Each arm is a `bench/objectives.py` run grid (plain `raft`, no anchor) under its own
root, so an interrupted bench resumes; the table adds the share of selections that came from the
experts (read from each run's metrics.jsonl).

    python bench/experts.py --split eval --seeds 0 1 [--jobs 2] [--iterations 16 --every 4]

Writes bench/results/experts-monet-cat-SPLIT.json and prints the held-out cat_in_monet rate per
evaluated iteration, mean and min-max over seeds, with the experts' share of the selections.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARMS = {
    "none": [],
    "rendered": ["generation.samples_per_prompt=14",
                 'generation.experts=[{samples: "builtin:toy-monet-cats", per_prompt: 2, label: rendered}]'],
    "flow-model": ["generation.samples_per_prompt=14",
                   'generation.experts=[{model: "builtin:toy-shapes-flow", per_prompt: 2, label: flow}]'],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=("dev", "eval"), default="eval")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--iterations", type=int, default=16)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--root", type=Path, default=Path.home() / ".cache/raft-diffusion/bench/experts")
    args = parser.parse_args()
    results = {}
    for arm in args.arms:
        out = REPO / f"bench/results/experts-{arm}-monet-cat-{args.split}.json"
        command = [sys.executable, str(REPO / "bench/objectives.py"), "--task", "monet-cat", "--split", args.split,
                   "--seeds", *map(str, args.seeds), "--iterations", str(args.iterations), "--every", str(args.every),
                   "--variants", "raft", "--anchors", "0", "--jobs", str(args.jobs), "--threads", str(args.threads),
                   "--root", str(args.root / arm),
                   "--out", str(out), *[a for s in ARMS[arm] for a in ("--set", s)]]
        print(f"== {arm}", flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        runs = json.loads(out.read_text())["runs"]
        rows = []
        for run in runs:
            metrics_file = args.root / arm / "monet-cat" / args.split / "raft-anchor0" / f"seed{run['seed']}/metrics.jsonl"
            records = [json.loads(x) for x in metrics_file.read_text().splitlines()]
            chosen = sum(r["n_selected"] for r in records)
            from_experts = sum(v["selected"] for r in records for k, v in r.get("sources", {}).items() if k != "policy")
            rows.append({"seed": run["seed"], "cat_in_monet": run["curves"]["cat_in_monet"],
                         "clip": run["curves"]["clip"], "toy_aesthetic": run["curves"].get("toy_aesthetic"),
                         "expert_share_of_selected": from_experts / chosen if chosen else 0.0,
                         "complete": run.get("complete", True)})
        results[arm] = rows
    path = REPO / f"bench/results/experts-monet-cat-{args.split}{'' if args.arms == list(ARMS) else '-' + '-'.join(args.arms)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"split": args.split, "seeds": args.seeds, "arms": results}, indent=2) + "\n")
    print(f"\ncat_in_monet ({args.split}): mean (min-max over seeds) at each evaluated iteration; "
          "share of the selected samples that came from the expert")
    for arm, rows in results.items():
        points = sorted({int(k) for r in rows for k in r["cat_in_monet"]})
        cells = []
        for p in points:
            values = [r["cat_in_monet"][str(p)] for r in rows if str(p) in r["cat_in_monet"]]
            cells.append(f"{p}:{statistics.mean(values):.3f}({min(values):.2f}-{max(values):.2f})")
        share = statistics.mean(r["expert_share_of_selected"] for r in rows)
        print(f"  {arm:11} n={len(rows)} {' '.join(cells)}  experts' share of selections {share:.0%}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
