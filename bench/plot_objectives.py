"""Curves of the objectives bench: each judge against the iteration, the mean over seeds with the
spread (min to max) shaded; the anchor off as solid lines, on as dashed. Finished runs only.

    python bench/plot_objectives.py                      # bench/measured/ -> bench/results/objectives.png
    python bench/plot_objectives.py --inputs bench/results/objectives-monet-cat-eval.json --out x.png
    python bench/plot_objectives.py --inputs A.json B.json --anchors 0 --out y.png   # one task: one row

Inputs of the same task share a row (a variant two inputs both hold is drawn twice, the later one named by
its file); `--anchors` and `--variants` keep only those runs.

Needs matplotlib (`make bench-deps`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PANELS = {  # task -> (judge, axis title)
    "monet-cat": [("cat_in_monet", "cat in monet style (oracle)"), ("clip", "toy CLIP (the reward)"),
                  ("toy_aesthetic", "toy aesthetic")],
    "resolution": [("oracle", "oracle at 32 px"), ("aesthetic", "toy aesthetic (rewarded)"),
                   ("toy_clip", "toy CLIP")],
}


def series(runs: list[dict], judge: str) -> tuple[list[int], list[float], list[float], list[float]]:
    its = sorted({int(i) for r in runs for i in r["curves"].get(judge, {})})
    xs, mean, low, high = [], [], [], []
    for i in its:
        values = [r["curves"][judge].get(str(i), r["curves"][judge].get(i)) for r in runs]
        values = [v for v in values if v is not None]
        if len(values) == len(runs):
            xs.append(i), mean.append(statistics.mean(values)), low.append(min(values)), high.append(max(values))
    return xs, mean, low, high


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=Path, nargs="+", default=[
        REPO / "bench/measured/objectives-monet-cat-eval.json", REPO / "bench/measured/objectives-resolution-eval.json"])
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/objectives.png")
    parser.add_argument("--title", default="held-out eval prompts and seeds; mean and min-max over seeds")
    parser.add_argument("--anchors", type=float, nargs="+", help="keep only runs at these anchor weights")
    parser.add_argument("--variants", nargs="+", help="keep only these variants (as the bench names them)")
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_objectives: matplotlib is missing; run `make bench-deps`")
    data: list[dict] = []
    for p in args.inputs:  # inputs of one task are one row
        result = json.loads(p.read_text())
        runs = [r for r in result["runs"] if (args.anchors is None or r["anchor"] in args.anchors)
                and (args.variants is None or r["variant"] in args.variants)]
        same = [d for d in data if d["task"] == result["task"]]
        if same:
            taken = {r["variant"] for r in same[0]["runs"]}  # a variant another input has too: named by its file
            same[0]["runs"] += [dict(r, variant=f"{r['variant']} ({p.stem})") if r["variant"] in taken else r
                                for r in runs]
        else:
            data.append({"task": result["task"], "runs": runs})
    fig, axes = plt.subplots(len(data), 3, figsize=(15, 4.2 * len(data)), squeeze=False)
    colours = {}
    for row, result in zip(axes, data):
        task = result["task"]
        groups: dict[tuple[str, float], list[dict]] = {}
        for r in result["runs"]:
            if r.get("complete", True):
                groups.setdefault((r["variant"], r["anchor"]), []).append(r)
        for ax, (judge, title) in zip(row, PANELS[task]):
            for (variant, anchor), runs in groups.items():
                xs, mean, low, high = series(runs, judge)
                if not xs:
                    continue
                colour = colours.setdefault(variant, f"C{len(colours)}")
                label = f"{variant}, anchor {anchor:g} (n={len(runs)})"
                ax.plot(xs, mean, color=colour, linestyle="--" if anchor else "-", marker="o", markersize=3,
                        label=label)
                if len(runs) > 1:
                    ax.fill_between(xs, low, high, color=colour, alpha=0.12)
            ax.set_title(f"{task}: {title}", fontsize=10)
            ax.set_xlabel("RAFT iteration (0 = base model)")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(args.title, fontsize=11)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=75)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
