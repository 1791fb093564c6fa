"""Atomic checkpoints and exact resume.

A checkpoint is a directory written under a temporary name, fsynced, then renamed into place;
`checkpoints/latest` (a one-line file) is replaced last. A run killed at any moment therefore
leaves either the previous complete checkpoint or the new one, never a half-written one.
Tensors go through safetensors; the optimizer state through `torch.save`, read back with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dir_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a fresh temporary directory, then move it to `target` in one rename."""
    target = Path(target)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    fsync_tree(tmp)
    if target.exists():  # an earlier attempt at this same checkpoint: replace it
        old = target.parent / f".old-{target.name}-{os.getpid()}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)
    _fsync_dir(target.parent)


def write_text_atomically(path: Path, text: str) -> None:
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state(generator: torch.Generator) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python, numpy and torch RNG states: JSON-able part and tensor part."""
    np_state = np.random.get_state()
    py = random.getstate()
    jsonable = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch": torch.get_rng_state(), "train_generator": generator.get_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    return jsonable, tensors


def set_rng_state(jsonable: dict[str, Any], tensors: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    py = jsonable["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = jsonable["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch"])
    generator.set_state(tensors["train_generator"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(root: Path, iteration: int, backend, state: dict[str, Any],
                    generator: torch.Generator, keep_last: int) -> Path:
    """Write `root/iter_NNNN` for a completed `iteration`, point `root/latest` at it, prune."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter_{iteration:04d}"

    def write(tmp: Path) -> None:
        save_file(backend.adapter_state(), str(tmp / "adapter.safetensors"))
        torch.save(backend.training_state(), tmp / "training_state.pt")
        jsonable, tensors = rng_state(generator)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "iteration": iteration, "rng": jsonable}))

    write_dir_atomically(root / name, write)
    write_text_atomically(root / "latest", name + "\n")
    done = sorted(p for p in root.glob("iter_*") if p.is_dir())
    for old in done[:-keep_last]:
        shutil.rmtree(old)
    return root / name


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: Path, backend, generator: torch.Generator) -> dict[str, Any]:
    """Restore adapter, optimizer and RNG states; returns the saved loop state."""
    backend.load_adapter_state(load_file(str(path / "adapter.safetensors")))
    backend.load_training_state(torch.load(path / "training_state.pt", weights_only=True, map_location="cpu"))
    state = json.loads((path / "state.json").read_text())
    set_rng_state(state.pop("rng"), load_file(str(path / "rng.safetensors")), generator)
    return state
