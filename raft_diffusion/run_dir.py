"""The run directory: resolved config, metrics, samples, checkpoints, final adapter.

Layout (DESIGN): config.yaml, metrics.jsonl, samples/iter_NNNN/, checkpoints/iter_NNNN/ with
checkpoints/latest, final/. Rules that keep a user's data safe:

- A run claims its directory with an exclusive lock (`flock` on `.lock`) before it reads or
  writes anything there; a second run in the same directory is refused, and a killed run's lock
  dies with it (no stale pid files).
- A directory is used only when it is empty or holds a run of ours: `--resume` continues it,
  `--overwrite` (and a demo re-run) removes only what a run writes, and anything else in the
  directory makes both refuse.
- A refused run leaves the directory as it found it, including directories it created itself.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .checkpoint import write_text_atomically
from .config import read_saved_config
from .errors import UserError

try:
    import fcntl
except ImportError:  # Windows: fall back to an O_EXCL pid file
    fcntl = None

# Fields a resumed run may change: how long it runs, and where it lives.
# report.*: what the report flags; logging.*: where the numbers are also sent
RESUMABLE_CHANGES = {("raft", "iterations"), ("output_dir",), ("report",), ("logging",)}
# Everything a run writes at the top of its directory; nothing else is ever removed.
RUN_ENTRIES = frozenset({
    "config.yaml", "run.json", "metrics.jsonl", "samples", "checkpoints", "final", ".lock",
    "before_after.png", "before_after.md", "reference.json", "report.html", "logs",
})
TEMPORARY_PREFIXES = (".tmp-", ".old-")  # write_dir_atomically's leftovers after a kill


def _first_difference(a: Any, b: Any, path: tuple = ()) -> tuple | None:
    if path in RESUMABLE_CHANGES:
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(dict.fromkeys([*a, *b])):
            found = _first_difference(a.get(key), b.get(key), path + (key,))
            if found is not None:
                return found
        return None
    return None if a == b else path


def _ours(name: str) -> bool:
    return name in RUN_ENTRIES or name.startswith(TEMPORARY_PREFIXES)


def _strict_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None: metrics stay strict JSON (no NaN tokens)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def dumps(record: Any) -> str:
    return json.dumps(_strict_json(record), allow_nan=False)


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.final = self.path / "final"
        self.lock = self.path / ".lock"
        self._lock_fd: int | None = None
        self._created: list[Path] = []  # directories this process created (removed again if refused)

    def samples(self, name: str) -> Path:
        return self.path / "samples" / name

    # -- claiming: lock first, then decide; refuse without leaving a trace -----------------------

    def claim(self, config: dict[str, Any], resume: bool, overwrite: bool, replaces: str | None = None) -> str:
        """Lock the directory for this process and say how the run uses it: 'new', 'resume' or
        'overwrite'. `replaces` (a demo name) lets a re-run of that demo replace its earlier run.
        Raises `UserError`, leaving nothing behind, when the directory must not be used."""
        if resume and overwrite:
            raise UserError("--resume/--overwrite", "both given", "choose one")
        if self.path.exists() and not self.path.is_dir():
            raise UserError("output_dir", f"{self.path} is a file", "choose a directory with --output-dir")
        self._make_dir()
        try:
            self._take_lock()
            return self._decide(config, resume, overwrite, replaces)
        except BaseException:
            self.abandon()
            raise

    def _make_dir(self) -> None:
        missing = []
        for parent in [self.path, *self.path.parents]:
            if parent.exists():
                break
            missing.append(parent)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._unwritable(e) from None
        self._created = missing

    def _unwritable(self, e: OSError) -> UserError:
        return UserError("output_dir", f"cannot write to {self.path}: {e.strerror or e}",
                         "choose a writable directory with --output-dir")

    def _take_lock(self) -> None:
        if fcntl is None:
            return self._take_pid_lock()
        while True:
            try:
                fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:  # a read-only directory fails here, before anything is written
                raise self._unwritable(e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise UserError("output_dir", f"{self.path} is in use by running process {holder}",
                                "wait for it to finish or choose another --output-dir") from None
            # The holder before us may have unlinked the file between our open and our flock:
            # then we hold a lock on a file nobody else sees, so try again on the current one.
            try:
                same = os.stat(self.lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _take_pid_lock(self) -> None:
        try:
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise UserError("output_dir", f"{self.path} is in use ({self.lock} exists)",
                            "wait for the other run, or delete the .lock file if no run is active") from None
        except OSError as e:
            raise self._unwritable(e) from None
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _decide(self, config: dict[str, Any], resume: bool, overwrite: bool, replaces: str | None) -> str:
        entries = sorted(p.name for p in self.path.iterdir() if p.name != ".lock")
        if not entries:
            return "new"
        foreign = [name for name in entries if not _ours(name)]
        saved = self.path / "config.yaml"
        has_run = saved.is_file()
        if not has_run or (foreign and not resume):
            what = f"'{foreign[0]}'" if foreign else "files that are not a raft-diffusion run (no config.yaml)"
            raise UserError("output_dir", f"{self.path} holds {what}",
                            "choose an empty or new --output-dir; a run never deletes files it did not write")
        if resume:
            diff = _first_difference(read_saved_config(saved), config)
            if diff is not None:
                raise UserError(f"config {'.'.join(map(str, diff))}", f"differs from the run's {saved}",
                                "resume with the same config (only raft.iterations may change) or use --overwrite")
            return "resume"
        if overwrite or (replaces is not None and self._made_by_demo(replaces)):
            return "overwrite"
        raise UserError("output_dir", f"{self.path} already holds a run",
                        "pass --resume to continue it, --overwrite to replace it, or another --output-dir")

    def _made_by_demo(self, name: str) -> bool:
        origin = self.origin()
        # Runs from before run.json existed: the demo's own default directory is taken as its run.
        return origin == f"demo {name}" or (origin is None and self.path.name == f"demo-{name}")

    def origin(self) -> str | None:
        """The command that made the run here ('train', 'demo monet-cat'), from run.json."""
        try:
            return json.loads((self.path / "run.json").read_text(encoding="utf-8")).get("command")
        except (OSError, ValueError, AttributeError):
            return None

    def abandon(self) -> None:
        """Undo a claim that did not become a run: release the lock, remove what the claim created."""
        self.release()
        for directory in self._created:
            try:
                directory.rmdir()  # only if still empty
            except OSError:
                break
        self._created = []

    def release(self) -> None:
        if self._lock_fd is None:
            return
        self.lock.unlink(missing_ok=True)  # still ours: unlinked before the lock is let go
        os.close(self._lock_fd)
        self._lock_fd = None

    # -- writing -----------------------------------------------------------------------------

    def open(self, mode: str, config_yaml: str, command: str = "train", final: str = "the LoRA as last trained"
             ) -> None:
        """Start writing: clear an overwritten run's files or a killed run's leftovers; write the config.
        `command` and `final` (which adapter final/ will hold) go into run.json."""
        self._created = []
        for entry in self.path.iterdir():
            if entry.name == ".lock":
                continue
            if mode == "overwrite" or entry.name.startswith(TEMPORARY_PREFIXES):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        if self.checkpoints.is_dir():
            for entry in self.checkpoints.iterdir():
                if entry.name.startswith(TEMPORARY_PREFIXES):
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        write_text_atomically(self.path / "config.yaml", config_yaml)
        if mode != "resume" or not (self.path / "run.json").exists():
            from . import __version__

            write_text_atomically(self.path / "run.json", json.dumps(
                {"command": command, "raft_diffusion": __version__, "final": final,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")

    def close(self) -> None:
        self.release()

    def read_metrics(self, warn=None) -> list[dict[str, Any]]:
        """The iteration records; a garbled line (a kill mid-write, a broken disk) is skipped, not
        the end of the file."""
        if not self.metrics.is_file():
            return []
        records = []
        for number, line in enumerate(self.metrics.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
                if warn is not None:
                    warn(f"warning: {self.metrics} line {number} is garbled; skipped")
                continue
            records.append(record)
        return records

    def keep_metrics_before(self, iteration: int, warn=None) -> None:
        """Drop records of iterations that the resumed run will redo."""
        kept = [r for r in self.read_metrics(warn) if r["iteration"] < iteration]
        write_text_atomically(self.metrics, "".join(dumps(r) + "\n" for r in kept))

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def clear_samples(self, name: str) -> None:
        """Remove what a killed attempt at this iteration left."""
        if self.samples(name).exists():
            shutil.rmtree(self.samples(name))

    def write_rows(self, name: str, rows: list[dict[str, Any]]) -> Path:
        """samples/NAME/samples.jsonl, one row per sample (its file or text, prompt, seed, scores)."""
        directory = self.samples(name)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "samples.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(dumps(row) + "\n")
        return directory
