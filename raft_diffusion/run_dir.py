"""The run directory: resolved config, metrics, samples, checkpoints, final adapter.

Layout (DESIGN): config.yaml, metrics.jsonl, samples/iter_NNNN/, checkpoints/iter_NNNN/ with
checkpoints/latest, final/. Rules that keep a user's data safe:

- A run claims its directory with an exclusive lock (`flock` on `.lock`) before it reads or
  writes anything there; a second run in the same directory is refused, and a killed run's lock
  dies with it (no stale pid files).
- A directory is used only when it is empty or holds a run of ours, which its own record says
  (run.json, written when the run starts): `--resume` continues it, `--overwrite` (and a demo
  re-run) removes only the files a run writes (`RunDirectory.written`: fixed names, and the
  sample files its samples.jsonl rows name), and a foreign entry at the top makes all of them
  refuse. A file someone put inside a run's folders (`samples/my_picks.txt`, `final/README.md`)
  is kept, and said so; symlinks are never followed nor removed.
- A refused run leaves the directory as it found it, including directories it created itself.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any

from .checkpoint import CHECKPOINT_FILES, write_text_atomically, writing
from .config import read_saved_config
from .errors import UserError, printable
from .kinds import KINDS, kind_of
from . import __version__

try:
    import fcntl
except ImportError:  # Windows: fall back to an O_EXCL pid file
    fcntl = None

# Fields a resumed run may change: how long it runs, and where it lives.
# report.*: what the report flags; logging.*: where the numbers are also sent
# model.* / training.gradient_checkpointing: the memory knobs (a run that ran out of memory resumes with
# one on; all but vae_tiling change no result, and a run from before they existed has none of them)
MEMORY_KNOBS = {("model", "cache_prompt_embeddings"), ("model", "offload_text_encoders"), ("model", "vae_slicing"),
                ("model", "vae_tiling"), ("training", "gradient_checkpointing")}
RESUMABLE_CHANGES = {("raft", "iterations"), ("output_dir",), ("report",), ("logging",), *MEMORY_KNOBS}
# Everything a run writes at the top of its directory; nothing else is ever removed.
RUN_ENTRIES = frozenset({
    "config.yaml", "run.json", "metrics.jsonl", "samples", "checkpoints", "final", ".lock",
    "before_after.png", "before_after.md", "reference.json", "report.html", "logs",
})
TEMPORARY_PREFIXES = (".tmp-", ".old-")  # write_dir_atomically's leftovers after a kill
RUN_FOLDERS = ("samples", "checkpoints", "final", "logs")  # a file in their place is refused (claim)
# The files a run writes, folder by folder (`_written_in`).
TOP_FILES = RUN_ENTRIES - set(RUN_FOLDERS)
CHECKPOINT_DIR = re.compile(r"iter_\d{4,}")
# The LoRA files of final/, whatever the run's kind (kinds.KINDS); a run's final/ may also hold
# what its kind's library writes beside them (`_final_files`)
FINAL_FILES = frozenset().union(*(kind.final_files for kind in KINDS.values()))
SAMPLE_FILE = re.compile(r"\d{4,}\.png")  # a backend's numbered picture (write_samples), even before its row
TRACKER_FILE = re.compile(r"events\.out\.tfevents\..*")  # TensorBoard; wandb and mlflow keep to their folders
TRACKER_DIRS = frozenset({"wandb", "mlruns"})


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
        foreign = [name for name in entries if not _ours(name) or (self.path / name).is_symlink()]
        if foreign:
            raise UserError("output_dir", f"{self.path} holds '{foreign[0]}', which no raft-diffusion run writes",
                            "choose an empty or new --output-dir; a run never deletes files it did not write")
        for name in RUN_FOLDERS:  # a run's folder replaced by a file: refused, the file kept
            if (self.path / name).exists() and not (self.path / name).is_dir():
                raise UserError("output_dir", f"{self.path / name} is a file where the run keeps its {name}/ folder",
                                "move or rename that file, then run again; a run never deletes files it did not write")
        saved = self.path / "config.yaml"
        if not saved.is_file():
            raise UserError("output_dir", f"{self.path} holds files that are not a raft-diffusion run (no config.yaml)",
                            "choose an empty or new --output-dir; a run never deletes files it did not write")
        if resume:
            diff = _first_difference(read_saved_config(saved), config)
            if diff is not None:
                raise UserError(f"config {'.'.join(map(str, diff))}", f"differs from the run's {saved}",
                                "resume with the same config (only raft.iterations may change) or use --overwrite")
            return "resume"
        if self.origin() is None:
            raise UserError("output_dir", f"{self.path} has no run.json of a raft-diffusion run, so nothing there is "
                            "known to be a run's", "choose an empty or new --output-dir, or remove its files yourself")
        if overwrite or (replaces is not None and self._made_by_demo(replaces)):
            return "overwrite"
        raise UserError("output_dir", f"{self.path} already holds a run",
                        "pass --resume to continue it, --overwrite to replace it, or another --output-dir")

    def _made_by_demo(self, name: str) -> bool:
        return self.origin() == f"demo {name}"

    def origin(self) -> str | None:
        """The command that made the run here ('train', 'demo monet-cat'), from run.json; None when
        run.json is missing or is not a raft-diffusion run's record."""
        try:
            record = json.loads((self.path / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or "raft_diffusion" not in record or not isinstance(record.get("command"), str):
            return None
        return record["command"]

    # -- what a run wrote -------------------------------------------------------------------------

    def keeps_in_final(self, name: str) -> bool:
        """Whether final/NAME is someone else's file, carried over when final/ is replaced."""
        return not _written_in("final", Path(name), _final_files(self.path))

    def written(self) -> tuple[list[Path], list[Path]]:
        """(the files a run writes that are here, the other files and links inside the run's folders).
        Nothing is followed through a symlink, and a symlink is never a run's."""
        ours: list[Path] = []
        kept: list[Path] = []
        final_files = _final_files(self.path)
        for entry in sorted(self.path.iterdir()):
            name = entry.name
            if name == ".lock":
                continue
            if entry.is_symlink() or not _ours(name):
                kept.append(entry)
            elif name.startswith(TEMPORARY_PREFIXES) or name in TOP_FILES:
                ours.append(entry)
            else:  # one of the run's folders
                for path in _files_under(entry):
                    (ours if _written_in(entry.name, path.relative_to(entry), final_files) else kept).append(path)
        return ours, kept

    def remove_written(self) -> list[Path]:
        """Remove the files a run writes (`written`) and the folders that leaves empty; returns the
        files kept."""
        ours, kept = self.written()
        for path in ours:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        for folder in RUN_FOLDERS:
            _remove_empty_dirs(self.path / folder)
        return kept

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
        kept: list[Path] = []
        if mode == "overwrite":
            kept = self.remove_written()
        for folder in (self.path, self.checkpoints, self.samples("")):
            if folder.is_dir() and not folder.is_symlink():
                for entry in folder.iterdir():
                    if entry.name.startswith(TEMPORARY_PREFIXES) and not entry.is_symlink():
                        _rescue(entry, self.path)
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        if kept:
            shown = ", ".join(str(p.relative_to(self.path)) for p in kept[:3])
            more = f" and {len(kept) - 3} more" if len(kept) > 3 else ""
            print(printable(f"note: kept {len(kept)} file(s) in {self.path} that no run writes: {shown}{more}"),
                  file=sys.stderr)
        write_text_atomically(self.path / "config.yaml", config_yaml)
        if mode != "resume" or not (self.path / "run.json").exists():
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
            except (ValueError, RecursionError):  # garbled, a 5,000-digit number, nesting 5,000 deep
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
        with writing(self.metrics), open(self.metrics, "a", encoding="utf-8") as f:
            f.write(dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def clear_samples(self, name: str) -> None:
        """Remove what a killed attempt at this iteration left (only the files a run writes)."""
        directory = self.samples(name)
        if not directory.is_dir() or directory.is_symlink():
            return
        for path in _files_under(directory):
            if _written_in("samples", path.relative_to(self.samples("")), FINAL_FILES):
                path.unlink()
        _remove_empty_dirs(directory)

    def write_rows(self, name: str, rows: list[dict[str, Any]]) -> Path:
        """samples/NAME/samples.jsonl, one row per sample (its file or text, prompt, seed, scores)."""
        directory = self.samples(name)
        directory.mkdir(parents=True, exist_ok=True)
        with writing(directory / "samples.jsonl"), open(directory / "samples.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(dumps(row) + "\n")
        return directory


def _final_files(run: Path) -> frozenset[str]:
    """The files the run at `run` writes in final/: the LoRA files, and its kind's extras (kinds.py)."""
    try:
        kind = kind_of(read_saved_config(run / "config.yaml").get("backend", "diffusion"))
    except Exception:  # noqa: BLE001 - a damaged config.yaml: its runs' files are still recognised by name
        return FINAL_FILES
    return FINAL_FILES | kind.final_extras


def _files_under(folder: Path) -> list[Path]:
    """Every file and symlink below `folder` (a symlink itself, never what it points to)."""
    if folder.is_symlink() or not folder.is_dir():
        return [folder]
    found = []
    for root, dirs, files in os.walk(folder):  # does not descend into symlinked folders
        for name in dirs:
            if os.path.islink(os.path.join(root, name)):
                found.append(Path(root, name))
        found.extend(Path(root, name) for name in files)
    return sorted(found)


def _written_in(folder: str, rel: Path, final_files: frozenset[str]) -> bool:
    """Whether a run writes the file at `rel` inside its folder `folder` (samples, checkpoints,
    final, logs)."""
    parts = PurePosixPath(rel.as_posix()).parts
    if not parts or any(part.startswith(TEMPORARY_PREFIXES) for part in parts):
        return bool(parts)  # an atomic write's leftover
    name = parts[-1]
    if folder == "samples":  # samples/NAME[/eval]/: samples.jsonl and the files its rows name
        if len(parts) < 2:
            return False
        return name == "samples.jsonl" or SAMPLE_FILE.fullmatch(name) is not None
    if folder == "checkpoints":
        return parts == ("latest",) or (len(parts) == 2 and CHECKPOINT_DIR.fullmatch(parts[0]) is not None
                                         and name in CHECKPOINT_FILES)
    if folder == "final":
        return len(parts) == 1 and name in final_files
    if folder == "logs":
        return TRACKER_FILE.fullmatch(name) is not None or any(part in TRACKER_DIRS for part in parts[:-1])
    return False


def _remove_empty_dirs(folder: Path) -> None:
    if folder.is_symlink() or not folder.is_dir():
        return
    for root, dirs, _ in os.walk(folder, topdown=False):
        for name in dirs:
            path = Path(root, name)
            if not path.is_symlink():
                try:
                    path.rmdir()
                except OSError:  # holds a kept file
                    pass
    try:
        folder.rmdir()
    except OSError:
        pass


def _rescue(leftover: Path, run: Path) -> None:
    """Before a killed atomic replace of final/ leaves `.old-final-PID` to be removed: move back into
    final/ the files of it that no run writes (a user's file there survives a kill mid-replace)."""
    target = run / "final"
    if leftover.parent != run or not leftover.name.startswith(".old-final-") or not leftover.is_dir() \
            or not target.is_dir():
        return
    final_files = _final_files(run)
    for path in _files_under(leftover):
        rel = path.relative_to(leftover)
        if not _written_in("final", rel, final_files):
            destination = target / rel
            if not destination.exists():
                destination.parent.mkdir(parents=True, exist_ok=True)
                path.rename(destination)
