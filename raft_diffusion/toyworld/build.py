"""Retrain every toy-world asset from a seed, in one command.

    python -m raft_diffusion.toyworld.build [--seed 0] [--assets assets/toyworld]

Runs, in order: the oracle, the toy CLIP with the toy aesthetic head, the toy SD, and the toy flow
model (SD 3's architecture, on the toy SD's VAE and text encoder). Each stage
checkpoints under ~/.cache/raft-diffusion/toyworld and resumes when run again, so an interrupted
build continues where it stopped. Long: run it in the background with its log in a file.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from .. import paths

ASSETS = paths.ASSETS / "toyworld"


def stages(assets: Path, seed: int) -> list[list[str]]:
    return [
        ["raft_diffusion.toyworld.oracle", "--out", str(assets / "oracle.safetensors"), "--seed", str(seed)],
        ["raft_diffusion.toyworld.train_clip", "--out", str(assets), "--seed", str(seed)],
        ["raft_diffusion.toyworld.train_sd", "--out", str(assets / "toy-shapes"), "--seed", str(seed)],
        # the flow model reuses toy-shapes' VAE and text encoder: after it
        ["raft_diffusion.toyworld.train_flow", "--out", str(assets / "toy-shapes-flow"), "--seed", str(seed)],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--assets", type=Path, default=ASSETS)
    args = parser.parse_args()
    start = time.time()
    for module, *rest in stages(args.assets, args.seed):
        t0 = time.time()
        print(f"== {module} {' '.join(rest)}", flush=True)
        subprocess.run([sys.executable, "-m", module, *rest], check=True)
        print(f"== {module}: {time.time() - t0:.0f}s", flush=True)
    print(f"all toy-world assets rebuilt in {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
