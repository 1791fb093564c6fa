"""How well does ranking cheap rollouts pick the winners ranking full renders would? (`generation.rollout_steps`)

On the toy world's base model (no training), for each prompt K candidates are rendered from the same seeds
at `--full` steps and at each of `--cheap` step counts, all scored by the toy CLIP (the training reward);
the oracle judges the full renders (cat in monet style: shape and style right). For each step count:

- `oracle of cheap-ranked winners`: the oracle rate of the full renders of the top `--top` by the cheap
  scores: what a run with rollout_steps trains on after re-rendering;
- `oracle of full-ranked winners`: the same with the full scores (a run without rollouts);
- `oracle of cheap renders`: the oracle rate of the cheap-ranked winners' cheap renders (training on the
  rollouts themselves, no re-render);
- `same winners`: the share of the full-ranked top that the cheap ranking also picks;
- `spearman`: the rank correlation of cheap and full scores within a prompt, averaged;
- `seconds`: generation time per candidate, against the full renders' (the saving).

    python bench/rollout_agreement.py [--split dev] [--k 16] [--top 2] [--cheap 2 5 10] [--full 20]

Writes bench/results/rollout-agreement-SPLIT.json. The dev split's prompts choose; report on eval.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = {"dev": "prompts/toy/monet_cat_dev.txt", "eval": "prompts/toy/monet_cat_eval.txt"}
SEED_BASE = {"dev": 7_000_000, "eval": 9_000_000}  # candidates' seeds: none of a run's own


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if ra.std() and rb.std() else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=PROMPTS, default="dev")
    parser.add_argument("--k", type=int, default=16, help="candidates per prompt")
    parser.add_argument("--top", type=int, default=2, help="winners per prompt")
    parser.add_argument("--cheap", type=int, nargs="+", default=[2, 5, 10], help="rollout step counts")
    parser.add_argument("--full", type=int, default=20, help="the full renders' steps (the demo's)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from accelerate import Accelerator

    from raft_diffusion.kinds import build_backend
    from raft_diffusion.config import load_config
    from raft_diffusion.prompts import load_prompts
    from raft_diffusion.rewards import build_reward

    config = load_config(REPO / "configs/toy-monet-cat.yaml", [f"generation.steps={args.full}"])
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    backend = build_backend(config, accelerator)
    clip = build_reward("clip", {"model": "builtin:toy-clip"}, accelerator.device)
    oracle = build_reward("oracle", {"attributes": ["shape", "style"]}, accelerator.device)
    prompts = load_prompts(str(REPO / PROMPTS[args.split]), "prompts")
    all_prompts = [p for p in prompts for _ in range(args.k)]
    seeds = [SEED_BASE[args.split] + i for i in range(len(all_prompts))]

    def render(steps: int | None):
        start = time.perf_counter()
        samples = backend.generate(all_prompts, seeds, f"{steps or args.full} steps", steps=steps)
        seconds = time.perf_counter() - start
        return samples.outputs, np.asarray(clip(samples.outputs, all_prompts), dtype=float), seconds

    full_images, full_scores, full_seconds = render(None)
    right = np.asarray(oracle(full_images, all_prompts), dtype=float)
    groups = np.repeat(np.arange(len(prompts)), args.k)

    def winners(scores: np.ndarray) -> list[int]:
        out = []
        for g in range(len(prompts)):
            idx = np.flatnonzero(groups == g)
            out += idx[np.argsort(-scores[idx], kind="stable")[:args.top]].tolist()
        return out

    full_top = winners(full_scores)
    rows = {"all candidates": float(right.mean()), "full-ranked winners": float(right[full_top].mean())}
    result = {"args": vars(args), "prompts": prompts, "oracle_all": rows["all candidates"],
              "oracle_full_ranked": rows["full-ranked winners"], "full_seconds": full_seconds, "cheap": {}}
    print(f"{args.split}: {len(prompts)} prompts x {args.k} candidates, top {args.top}, full {args.full} steps")
    print(f"  oracle of all candidates          {rows['all candidates']:.3f}")
    print(f"  oracle of full-ranked winners     {rows['full-ranked winners']:.3f}")
    print(f"{'steps':>6}{'cheap-ranked':>14}{'cheap renders':>15}{'same winners':>14}{'spearman':>10}{'time':>8}")
    for steps in args.cheap:
        images, scores, seconds = render(steps)
        top = winners(scores)
        cheap_right = np.asarray(oracle(images[top], [all_prompts[i] for i in top]), dtype=float)
        same = len(set(top) & set(full_top)) / len(full_top)
        rho = statistics.mean(spearman(scores[groups == g], full_scores[groups == g]) for g in range(len(prompts)))
        entry = {"oracle_cheap_ranked": float(right[top].mean()), "oracle_cheap_renders": float(cheap_right.mean()),
                 "same_winners": same, "spearman": rho, "seconds": seconds, "time_ratio": seconds / full_seconds}
        result["cheap"][str(steps)] = entry
        print(f"{steps:>6}{entry['oracle_cheap_ranked']:>14.3f}{entry['oracle_cheap_renders']:>15.3f}"
              f"{same:>14.2f}{rho:>10.2f}{entry['time_ratio']:>8.2f}")
    out = REPO / "bench" / "results" / f"rollout-agreement-{args.split}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
