"""Atomic checkpoints and exact resume.

A checkpoint is a directory written under a temporary name, fsynced, then renamed into place;
`checkpoints/latest` (a one-line file) is replaced last. A run killed at any moment therefore
leaves either the previous complete checkpoint or the new one, never a half-written one.
Tensors go through safetensors; the optimizer state through `torch.save`, read back with
`torch.load(weights_only=True)`. On resume every file of a checkpoint is checked (types, ranges,
finiteness, shapes, RNG states) before any of it is applied; a damaged one is skipped, with a
warning, for the previous intact one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file

from .errors import UserError


# The files of a checkpoint directory (save_checkpoint); nothing else there is ever removed.
CHECKPOINT_FILES = frozenset({"adapter.safetensors", "training_state.pt", "rng.safetensors", "state.json",
                              "ema.safetensors", "replay.safetensors"})


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
        for file in tmp.rglob("*"):
            if file.is_file() and not file.is_symlink():
                _shareable(file)
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


def _shareable(path: Path) -> None:
    """The mode a plain `open(path, "w")` gives (0644 under the usual umask 022): safetensors'
    `save_file` makes its files 0600, which ComfyUI or A1111 running as another user cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_file_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` makes the file under a temporary name beside `path`, then it is renamed into place."""
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    with writing(path):
        try:
            write(tmp)
            _shareable(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temporary behind
            raise
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def write_text_atomically(path: Path, text: str) -> None:
    write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


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
                    rng: list[tuple[dict[str, Any], dict[str, torch.Tensor]]], keep_last: int, ema=None,
                    replay=None) -> Path:
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
        if replay is not None:  # training.replay: the kept samples' tensors, and their lists in state.json
            record["replay"], tensors = replay.state()
            save_file(tensors, str(tmp / "replay.safetensors"))
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
    """A checkpoint file is missing, unreadable or holds damaged state; `path` names it."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


class CheckpointState(BaseModel):
    """state.json: the loop's position and process 0's RNG (checked further by `_check_rng_json`).
    Fields it does not know (added by a later version, or by the loop's state) are kept as they are."""

    model_config = ConfigDict(extra="allow", strict=True)

    iteration: int = Field(ge=0)
    data_position: int = Field(ge=0)
    processes: int = Field(1, ge=1)
    rng: dict[str, Any]
    rng_ranks: dict[str, dict[str, Any]] = {}


def _check_state(path: Path, state: Any) -> None:
    file = path / "state.json"
    if not isinstance(state, dict):
        raise CorruptCheckpoint(file, "holds no iteration and RNG state")
    try:
        checked = CheckpointState.model_validate(state)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the record"
        value = "" if first["type"] == "missing" else f" {_short(first.get('input'))}"
        raise CorruptCheckpoint(file, f"holds a bad {where}{value} ({first['msg'][:1].lower()}{first['msg'][1:]})"
                                ) from None
    if path.name.startswith("iter_") and path.name != f"iter_{checked.iteration:04d}":
        raise CorruptCheckpoint(file, f"says iteration {checked.iteration}, but it is the checkpoint {path.name}")
    expected = {str(r) for r in range(1, checked.processes)}
    if set(checked.rng_ranks) != expected:
        raise CorruptCheckpoint(file, f"holds the RNG state of processes {sorted(checked.rng_ranks) or 'none'} "
                                f"beside process 0, but says it was saved by {checked.processes}")
    for rank, jsonable in [("0", checked.rng), *sorted(checked.rng_ranks.items())]:
        problem = _check_rng_json(jsonable)
        if problem:
            where = "rng" if rank == "0" else f"rng_ranks.{rank}"
            raise CorruptCheckpoint(file, f"holds a bad {where}: {problem}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(x: Any) -> bool:
    return type(x) is int  # noqa: E721 - a bool is no RNG word


def _check_rng_json(jsonable: dict[str, Any]) -> str | None:
    """Why `rng_state`'s JSON half cannot be what it wrote (None when it can): each part is tried
    on a scratch generator, so nothing of the running process changes."""
    if set(jsonable) != {"python", "numpy"}:
        return f"entries {sorted(jsonable)}, not python and numpy"
    py = jsonable["python"]
    if not (isinstance(py, list) and len(py) == 3 and _is_int(py[0]) and isinstance(py[1], list)
            and all(_is_int(x) and 0 <= x < 2**32 for x in py[1])
            and (py[2] is None or (isinstance(py[2], float) and math.isfinite(py[2])))):
        return "python is not a Python random state"
    try:
        random.Random().setstate((py[0], tuple(py[1]), py[2]))
    except (ValueError, TypeError, OverflowError) as e:
        return f"python is not a Python random state ({e})"
    n = jsonable["numpy"]
    if not (isinstance(n, list) and len(n) == 5 and n[0] == "MT19937" and isinstance(n[1], list) and len(n[1]) == 624
            and all(_is_int(x) and 0 <= x < 2**32 for x in n[1]) and _is_int(n[2]) and 0 <= n[2] <= 624
            and n[3] in (0, 1) and _is_int(n[3]) and isinstance(n[4], float) and math.isfinite(n[4])):
        return "numpy is not a numpy MT19937 state"
    try:
        np.random.RandomState().set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    except (ValueError, TypeError, OverflowError) as e:
        return f"numpy is not a numpy MT19937 state ({e})"
    return None


RNG_TENSOR = re.compile(r"(?:rank(\d+)/)?(torch|train_generator|cuda_\d+)")


def _check_rng_tensors(path: Path, tensors: dict[str, torch.Tensor], processes: int) -> None:
    file = path / "rng.safetensors"
    for r in range(processes):
        for key in ("torch", "train_generator"):
            name = f"rank{r}/{key}" if r else key
            if name not in tensors:
                raise CorruptCheckpoint(file, f"lacks the RNG state {name}")
    for name, t in tensors.items():
        match = RNG_TENSOR.fullmatch(name)
        if match is None or int(match.group(1) or 0) >= processes or match.group(1) == "0":
            raise CorruptCheckpoint(file, f"holds {name!r}, which is no RNG state of its {processes} process(es)")
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise CorruptCheckpoint(file, f"{name} is a {t.dtype} tensor of shape {list(t.shape)}, not an RNG state")
        kind = match.group(2)
        try:
            if not kind.startswith("cuda_"):  # the global CPU stream and the (CPU) training generator
                torch.Generator().set_state(t)
            elif torch.cuda.is_available():
                torch.Generator(device="cuda").set_state(t)
        except RuntimeError as e:
            raise CorruptCheckpoint(file, f"{name} is not an RNG state ({str(e).splitlines()[0]})") from None


def _non_finite(value: Any) -> bool:
    """Whether tensors (a nested optimizer state, a dict of weights) hold a NaN or infinity."""
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not bool(torch.isfinite(value).all())
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    return False


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Every file of a checkpoint, read and checked (types, finiteness, RNG states) before anything
    is applied; `load_checkpoint` checks the shapes against the model."""
    parts: dict[str, Any] = {}
    readers = {
        "state.json": lambda f: json.loads(f.read_text(encoding="utf-8")),
        "adapter.safetensors": lambda f: load_file(str(f)),
        "training_state.pt": lambda f: torch.load(f, weights_only=True, map_location="cpu"),
        "rng.safetensors": lambda f: load_file(str(f)),
    }
    for optional in ("ema.safetensors", "replay.safetensors"):
        if (path / optional).is_file():
            readers[optional] = lambda f: load_file(str(f))
    for name, read in readers.items():
        file = path / name
        if not file.is_file():
            raise CorruptCheckpoint(file, "missing")
        try:
            parts[name] = read(file)
        except Exception as e:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
            raise CorruptCheckpoint(file, f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    state = parts["state.json"]
    _check_state(path, state)
    for name in ("adapter.safetensors", "ema.safetensors", "replay.safetensors"):
        if name in parts and _non_finite(parts[name]):
            raise CorruptCheckpoint(path / name, "holds non-finite weights")
    training = parts["training_state.pt"]
    optimizer = training.get("optimizer") if isinstance(training, dict) else None
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in optimizer["param_groups"])):
        raise CorruptCheckpoint(path / "training_state.pt", "holds no optimizer state")
    if _non_finite(training):
        raise CorruptCheckpoint(path / "training_state.pt", "holds non-finite optimizer state")
    _check_rng_tensors(path, parts["rng.safetensors"], state.get("processes", 1))
    return parts


def _check_fits(path: Path, parts: dict[str, Any], backend, ema) -> None:
    """Shapes: the adapter's and the optimizer's tensors are those of this model's LoRA, and so are the EMA's."""
    adapter, expected = parts["adapter.safetensors"], backend.adapter_state()
    file = path / "adapter.safetensors"
    missing, extra = sorted(set(expected) - set(adapter)), sorted(set(adapter) - set(expected))
    if missing:
        raise CorruptCheckpoint(file, f"lacks {len(missing)} tensor(s) of this LoRA (first: {missing[0]})")
    if extra:
        raise CorruptCheckpoint(file, f"holds {len(extra)} tensor(s) this LoRA does not have (first: {extra[0]})")
    for name, t in adapter.items():
        if t.shape != expected[name].shape:
            raise CorruptCheckpoint(file, f"{name} has shape {list(t.shape)}, this LoRA's {list(expected[name].shape)}")
    if ema is not None:
        if "ema.safetensors" not in parts:
            raise CorruptCheckpoint(path / "ema.safetensors", "missing (training.ema_decay is set)")
        try:
            ema.check_state(parts["ema.safetensors"])
        except ValueError as e:
            raise CorruptCheckpoint(path / "ema.safetensors", f"does not fit this LoRA ({e})") from None
    optimizer, params = parts["training_state.pt"]["optimizer"], list(backend.lora_params)
    file = path / "training_state.pt"
    order = [i for group in optimizer["param_groups"] for i in group["params"]]
    if len(order) != len(params) or len(set(order)) != len(order):
        raise CorruptCheckpoint(file, f"holds the optimizer state of {len(order)} tensors, this LoRA has {len(params)}")
    position = {i: n for n, i in enumerate(order)}
    for i, entry in optimizer["state"].items():
        if i not in position or not isinstance(entry, dict):
            raise CorruptCheckpoint(file, f"holds optimizer state for a tensor {i!r} it has no parameter group for")
        shape = params[position[i]].shape
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != shape:
                raise CorruptCheckpoint(file, f"optimizer {key} of tensor {i} has shape {list(value.shape)}, "
                                        f"the LoRA's {list(shape)}")


def load_checkpoint(path: Path, backend, generator: torch.Generator, parts: dict[str, Any] | None = None,
                    ema=None, rank: int = 0, replay=None) -> dict[str, Any]:
    """Restore adapter, optimizer, EMA and (process `rank`'s) RNG states; returns the saved loop
    state. Every file is checked (`read_checkpoint`, `_check_fits`) before anything is applied.
    A rank the checkpoint holds no RNG for (it was saved by fewer processes) keeps the streams it
    was started with."""
    parts = parts if parts is not None else read_checkpoint(path)
    _check_fits(path, parts, backend, ema)
    if replay is not None:  # checked whole before anything is applied
        if "replay.safetensors" not in parts or "replay" not in parts["state.json"]:
            raise CorruptCheckpoint(path / "replay.safetensors", "missing (training.replay is set)")
        try:
            replay.load(parts["state.json"]["replay"], parts["replay.safetensors"])
        except ValueError as e:
            raise CorruptCheckpoint(path / "replay.safetensors", f"does not fit state.json ({e})") from None
    if ema is not None:
        ema.load_state(parts["ema.safetensors"])
    try:
        backend.load_adapter_state(parts["adapter.safetensors"])
        backend.load_training_state(parts["training_state.pt"])
    except Exception as e:  # noqa: BLE001 - e.g. shapes of another model
        raise CorruptCheckpoint(path / "adapter.safetensors", f"does not fit this model ({type(e).__name__})") from e
    state = dict(parts["state.json"])
    state.pop("replay", None)
    jsonable, ranks = state.pop("rng"), state.pop("rng_ranks", {})
    tensors = parts["rng.safetensors"]
    if rank:
        jsonable = ranks.get(str(rank))
        prefix = f"rank{rank}/"
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if jsonable is not None and tensors:
        try:
            set_rng_state(jsonable, tensors, generator)
        except (ValueError, TypeError, OverflowError, RuntimeError, KeyError) as e:  # checked already; never half-used
            raise CorruptCheckpoint(path / "rng.safetensors", f"is not an RNG state ({type(e).__name__}: {e})") from e
    return state


def resume(root: Path, backend, generator: torch.Generator, warn: Callable[[str], None], ema=None,
           rank: int = 0, processes: int = 1, replay=None) -> tuple[Path | None, dict[str, Any] | None]:
    """Load the newest intact checkpoint under `root`; (None, None) when there is none at all.

    A missing `latest` pointer or a corrupt checkpoint falls back to the next newest one, with a
    one-line warning; when checkpoints exist but none is intact, raises `UserError` naming the file.
    """
    named, found = candidates(root)
    if not found:
        return None, None
    first_problem = None
    for path in found:
        try:
            state = load_checkpoint(path, backend, generator, read_checkpoint(path), ema, rank, replay)
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
