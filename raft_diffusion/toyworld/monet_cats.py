"""A folder of monet-style cats drawn by the toy world's renderer: the "human" expert of the
monet-cat demo with experts (`builtin:toy-monet-cats`, `configs/toy-monet-cat-experts.yaml`).

    python -m raft_diffusion.toyworld.monet_cats --out assets/toyworld/monet-cats [--per-prompt 4] [--seed 0]

For every training prompt of the monet-cat demo (`prompts/toy/monet_cat.txt`; never the dev or eval
prompts), `--per-prompt` pictures of what it asks: a cat, in the colour it names (a random one when
it names none), in monet style, intact (the judges' world: no brushwork dissolving it), at 64 px.
Writes the PNGs and `samples.jsonl` rows `{prompt, file}`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..checkpoint import write_dir_atomically
from ..paths import PROMPTS
from ..prompts import load_prompts
from . import oracle
from .data import COLOURS, JUDGE_WORLD, render, sample_scene

TRAIN_PROMPTS = PROMPTS / "toy/monet_cat.txt"


def draw(prompts: list[str], per_prompt: int, seed: int, size: int = 64) -> list[tuple[str, np.ndarray]]:
    """(prompt, picture) pairs, `per_prompt` of each prompt, in prompt order."""
    out = []
    for p, prompt in enumerate(prompts):
        named = oracle.parse_prompt(prompt)
        rng = np.random.default_rng([seed, p])
        for _ in range(per_prompt):
            colour = named.get("colour") or list(COLOURS)[rng.integers(len(COLOURS))]
            scene = sample_scene(rng, JUDGE_WORLD, style="monet", shape="cat", colour=colour)
            out.append((prompt, render(scene, size)))
    return out


def write(out: Path, prompts: list[str], per_prompt: int, seed: int) -> None:
    pictures = draw(prompts, per_prompt, seed)

    def fill(tmp: Path) -> None:
        rows = []
        for k, (prompt, picture) in enumerate(pictures):
            name = f"{k:04d}.png"
            Image.fromarray(picture).save(tmp / name, optimize=True)
            rows.append({"prompt": prompt, "file": name})
        (tmp / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    write_dir_atomically(out, fill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("assets/toyworld/monet-cats"))
    parser.add_argument("--per-prompt", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    prompts = load_prompts(str(TRAIN_PROMPTS), "--prompts")
    write(args.out, prompts, args.per_prompt, args.seed)
    print(f"wrote {len(prompts) * args.per_prompt} pictures of {len(prompts)} prompts to {args.out}")


if __name__ == "__main__":
    main()
