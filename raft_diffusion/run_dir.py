"""The run directory: resolved config, metrics, samples, checkpoints, final adapter.

Layout (DESIGN): config.yaml, metrics.jsonl, samples/iter_NNNN/, checkpoints/iter_NNNN/ with
checkpoints/latest, final/. A directory that already holds a run is refused unless the user
asks to resume or overwrite it, and a live run holds a lock so that two never share one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .checkpoint import latest_checkpoint, write_text_atomically
from .config import read_saved_config
from .errors import UserError

# Fields a resumed run may change: how long it runs, and where it lives.
RESUMABLE_CHANGES = {("raft", "iterations"), ("output_dir",)}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _first_difference(a: Any, b: Any, path: tuple = ()) -> tuple | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(dict.fromkeys([*a, *b])):
            found = _first_difference(a.get(key), b.get(key), path + (key,))
            if found is not None:
                return found
        return None
    if path in RESUMABLE_CHANGES or a == b:
        return None
    return path


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.final = self.path / "final"
        self.lock = self.path / ".lock"

    def samples(self, name: str) -> Path:
        return self.path / "samples" / name

    # -- refusing what must not happen, before anything is written ---------------------------

    def holder(self) -> int | None:
        """pid of a live process that runs in this directory, if any."""
        try:
            pid = int(self.lock.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid != os.getpid() and _pid_alive(pid) else None

    def check(self, config: dict[str, Any], resume: bool, overwrite: bool) -> str:
        """'new', 'resume' or 'overwrite'; raises `UserError` when the directory is in use."""
        field = "output_dir"
        if self.path.exists() and not self.path.is_dir():
            raise UserError(field, f"{self.path} is a file", "choose a directory with --output-dir")
        pid = self.holder()
        if pid is not None:
            raise UserError(field, f"{self.path} is in use by running process {pid}",
                            "wait for it or choose another --output-dir")
        empty = not self.path.exists() or not any(self.path.iterdir())
        if resume and overwrite:
            raise UserError("--resume/--overwrite", "both given", "choose one")
        if overwrite:
            return "new" if empty else "overwrite"
        if resume:
            saved = self.path / "config.yaml"
            if empty or not saved.is_file():
                return "new"
            diff = _first_difference(read_saved_config(saved), config)
            if diff is not None:
                raise UserError(f"config {'.'.join(map(str, diff))}",
                                f"differs from the run's {saved}",
                                "resume with the same config (only raft.iterations may change) or use --overwrite")
            return "resume"
        if not empty:
            raise UserError(field, f"{self.path} already holds files",
                            "pass --resume to continue that run, --overwrite to replace it, or another --output-dir")
        return "new"

    # -- writing -----------------------------------------------------------------------------

    def open(self, mode: str, config_yaml: str) -> None:
        """Create (or take over) the directory and lock it for this process."""
        if mode == "overwrite":
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock.write_text(str(os.getpid()))
        write_text_atomically(self.path / "config.yaml", config_yaml)

    def close(self) -> None:
        if self.lock.exists() and self.lock.read_text().strip() == str(os.getpid()):
            self.lock.unlink()

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.checkpoints)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        records = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                break
        return records

    def keep_metrics_before(self, iteration: int) -> None:
        """Drop records of iterations that the resumed run will redo."""
        kept = [r for r in self.read_metrics() if r["iteration"] < iteration]
        write_text_atomically(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def clear_samples(self, name: str) -> None:
        """Remove what a killed attempt at this iteration left."""
        if self.samples(name).exists():
            shutil.rmtree(self.samples(name))

    def write_samples(self, name: str, backend, samples, rows: list[dict[str, Any]]) -> Path:
        """The backend's files of `samples` plus `samples.jsonl` (one row per sample) under samples/NAME."""
        directory = self.samples(name)
        directory.mkdir(parents=True, exist_ok=True)
        written = backend.write_samples(samples, directory)
        with open(directory / "samples.jsonl", "w", encoding="utf-8") as f:
            for fields, row in zip(written, rows):
                f.write(json.dumps({**fields, **row}) + "\n")
        return directory
