"""Atomic checkpoints and exact resume.

A checkpoint is a directory written under a temporary name, fsynced, then renamed into place;
`checkpoints/latest` (a one-line file) is replaced last. A run killed at any moment therefore
leaves either the previous complete checkpoint or the new one, never a half-written one.
Tensors go through safetensors; the optimizer state through `torch.save`, read back with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
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


# The files of a checkpoint directory (save_checkpoint); nothing else there is ever removed.
CHECKPOINT_FILES = frozenset({"adapter.safetensors", "training_state.pt", "rng.safetensors", "state.json",
                              "ema.safetensors"})


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


@contextlib.contextmanager
def writing(path: Path):
    """Name `path` on an error raised while it is written (`exc.raft_writing`, the innermost one):
    a full disk then says which file it stopped (cli.py)."""
    try:
        yield
    except Exception as e:
        if getattr(e, "raft_writing", None) is None:
            with contextlib.suppress(AttributeError, TypeError):
                e.raft_writing = Path(path)
        raise


def write_dir_atomically(target: Path, write: Callable[[Path], None], keep: Callable[[str], bool] | None = None
                         ) -> None:
    """Call `write(tmp)` on a fresh temporary directory, then move it to `target` in one rename.
    Entries of an existing `target` that `write` did not make and `keep(name)` accepts (a user's
    file in final/) are moved into the new one."""
    with writing(target):
        _write_dir_atomically(Path(target), write, keep)


def _write_dir_atomically(target: Path, write: Callable[[Path], None], keep: Callable[[str], bool] | None) -> None:
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no half-written temporary behind
        raise
    if target.exists():  # an earlier attempt at this same checkpoint: replace it
        old = target.parent / f".old-{target.name}-{os.getpid()}"
        target.rename(old)
        tmp.rename(target)
        if keep is not None:
            for entry in sorted(old.iterdir()):
                if keep(entry.name) and not (target / entry.name).exists():
                    entry.rename(target / entry.name)
        shutil.rmtree(old)
    else:
        tmp.rename(target)
    _fsync_dir(target.parent)


def write_text_atomically(path: Path, text: str) -> None:
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    with writing(path):
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temporary behind
            raise
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
                    rng: list[tuple[dict[str, Any], dict[str, torch.Tensor]]], keep_last: int, ema=None) -> Path:
    """Write `root/iter_NNNN` for a completed `iteration`, point `root/latest` at it, prune.

    `rng` holds every process's `rng_state`, in rank order: process 0's under the plain names
    (state.json "rng", rng.safetensors "torch", ...), process r's under "rng_ranks"[r] and "rankR/..."."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter_{iteration:04d}"

    def write(tmp: Path) -> None:
        save_file(backend.adapter_state(), str(tmp / "adapter.safetensors"))
        torch.save(backend.training_state(), tmp / "training_state.pt")
        tensors = {f"rank{r}/{k}" if r else k: v.contiguous() for r, (_, t) in enumerate(rng) for k, v in t.items()}
        save_file(tensors, str(tmp / "rng.safetensors"))
        record = {**state, "iteration": iteration, "rng": rng[0][0], "processes": len(rng)}
        if len(rng) > 1:
            record["rng_ranks"] = {str(r): j for r, (j, _) in enumerate(rng) if r}
        (tmp / "state.json").write_text(json.dumps(record))
        if ema is not None:
            save_file(ema.state(), str(tmp / "ema.safetensors"))

    write_dir_atomically(root / name, write, keep=lambda entry: entry not in CHECKPOINT_FILES)
    write_text_atomically(root / "latest", name + "\n")
    # Prune only checkpoints older than this one: a later one (left by a run that resumed from an
    # earlier fallback) is replaced when its iteration comes round, never deleted unseen.
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and p.name <= name)
    for old in done[:-keep_last]:
        for entry in old.iterdir():  # only what a checkpoint holds: a file someone put there stays
            if entry.name in CHECKPOINT_FILES and not entry.is_symlink():
                entry.unlink()
        with contextlib.suppress(OSError):
            old.rmdir()
    return root / name


def candidates(root: Path) -> tuple[Path | None, list[Path]]:
    """(what `latest` names, if readable; the checkpoints to resume from, best first: the one
    `latest` names, then the others newest first)."""
    found = sorted((p for p in root.glob("iter_*") if p.is_dir()), reverse=True)
    named = None
    pointer = root / "latest"
    if pointer.is_file():
        try:
            named = root / pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            named = None
    if named is not None and named in found:
        found.remove(named)
        found.insert(0, named)
    return named, found


class CorruptCheckpoint(Exception):
    """A checkpoint file is missing or unreadable; `path` names it."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Every file of a checkpoint, read and checked before anything is applied."""
    parts: dict[str, Any] = {}
    readers = {
        "state.json": lambda f: json.loads(f.read_text(encoding="utf-8")),
        "adapter.safetensors": lambda f: load_file(str(f)),
        "training_state.pt": lambda f: torch.load(f, weights_only=True, map_location="cpu"),
        "rng.safetensors": lambda f: load_file(str(f)),
    }
    if (path / "ema.safetensors").is_file():
        readers["ema.safetensors"] = lambda f: load_file(str(f))
    for name, read in readers.items():
        file = path / name
        if not file.is_file():
            raise CorruptCheckpoint(file, "missing")
        try:
            parts[name] = read(file)
        except Exception as e:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
            raise CorruptCheckpoint(file, f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    state = parts["state.json"]
    if not isinstance(state, dict) or not isinstance(state.get("iteration"), int) or "rng" not in state:
        raise CorruptCheckpoint(path / "state.json", "holds no iteration and RNG state")
    adapter = parts["adapter.safetensors"]
    if any(not torch.isfinite(t).all() for t in adapter.values() if t.is_floating_point()):
        raise CorruptCheckpoint(path / "adapter.safetensors", "holds non-finite weights")
    return parts


def load_checkpoint(path: Path, backend, generator: torch.Generator, parts: dict[str, Any] | None = None,
                    ema=None, rank: int = 0) -> dict[str, Any]:
    """Restore adapter, optimizer, EMA and (process `rank`'s) RNG states; returns the saved loop
    state. A rank the checkpoint holds no RNG for (it was saved by fewer processes) keeps the
    streams it was started with."""
    parts = parts if parts is not None else read_checkpoint(path)
    if ema is not None:
        if "ema.safetensors" not in parts:
            raise CorruptCheckpoint(path / "ema.safetensors", "missing (training.ema_decay is set)")
        try:
            ema.load_state(parts["ema.safetensors"])
        except (ValueError, RuntimeError) as e:
            raise CorruptCheckpoint(path / "ema.safetensors", f"does not fit this LoRA ({e})") from e
    try:
        backend.load_adapter_state(parts["adapter.safetensors"])
        backend.load_training_state(parts["training_state.pt"])
    except Exception as e:  # noqa: BLE001 - e.g. shapes of another model
        raise CorruptCheckpoint(path / "adapter.safetensors", f"does not fit this model ({type(e).__name__})") from e
    state = dict(parts["state.json"])
    jsonable, ranks = state.pop("rng"), state.pop("rng_ranks", {})
    tensors = parts["rng.safetensors"]
    if rank:
        jsonable = ranks.get(str(rank))
        prefix = f"rank{rank}/"
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if jsonable is not None and tensors:
        set_rng_state(jsonable, tensors, generator)
    return state


def resume(root: Path, backend, generator: torch.Generator, warn: Callable[[str], None], ema=None,
           rank: int = 0, processes: int = 1) -> tuple[Path | None, dict[str, Any] | None]:
    """Load the newest intact checkpoint under `root`; (None, None) when there is none at all.

    A missing `latest` pointer or a corrupt checkpoint falls back to the next newest one, with a
    one-line warning; when checkpoints exist but none is intact, raises `UserError` naming the file.
    """
    from .errors import UserError

    named, found = candidates(root)
    if not found:
        return None, None
    first_problem = None
    for path in found:
        try:
            state = load_checkpoint(path, backend, generator, read_checkpoint(path), ema, rank)
        except CorruptCheckpoint as e:  # the next candidate overwrites whatever this one applied
            first_problem = first_problem or e
            continue
        if first_problem is not None:
            warn(f"warning: {first_problem}; resuming from the older {path.name} instead")
        elif named is None or named != path:
            warn(f"warning: {root / 'latest'} is missing or stale; resuming from {path.name}, the newest intact checkpoint")
        saved = state.pop("processes", 1)
        if saved != processes:
            warn(f"warning: {path.name} was saved by {saved} process{'es' * (saved != 1)} and this run has {processes}: "
                 "it continues, but its random streams differ from those of an uninterrupted run")
        return path, state
    raise UserError("--resume", f"no intact checkpoint in {root}: {first_problem}",
                    "restore the file, or start the run over with --overwrite")
