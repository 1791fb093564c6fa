"""What requirements-dev.lock pins for this interpreter, against what this venv holds (`pip freeze`).

`python tests/locked_versions.py --moved` prints the packages whose installed version is not the
lock's (`make test-latest` shows it before the suite); tests/test_packaging.py asserts that the venv
`make` built has none.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements-dev.lock"
PROJECT = "raft-diffusion"


def locked(lock: Path = LOCK) -> dict[str, str]:
    """name -> version of every requirement of the lock whose marker holds for this interpreter."""
    text = re.sub(r"\\\n", " ", lock.read_text(encoding="utf-8"))  # join continuation lines
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split(" --hash=")[0].split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        pins = [s.version for s in req.specifier if s.operator == "=="]
        if len(pins) != 1:
            raise ValueError(f"{lock.name}: {line!r} is not an exact pin")
        out[canonicalize_name(req.name)] = pins[0]
    return out


def frozen(python: str = sys.executable) -> dict[str, str]:
    """name -> version of every distribution in `python`'s environment (pip itself and the project aside)."""
    lines = subprocess.run([python, "-m", "pip", "freeze", "--all", "--exclude-editable"], check=True,
                           capture_output=True, text=True).stdout.splitlines()
    out = {}
    for line in lines:
        if "==" not in line or line.startswith(("#", "-e")):
            continue
        name, version = line.split("==", 1)
        out[canonicalize_name(name)] = version.strip()
    for own in ("pip", PROJECT):
        out.pop(own, None)
    return out


def moved(lock: dict[str, str], venv: dict[str, str]) -> list[str]:
    """One line per difference: a version other than the lock's, a package the lock lacks, or one missing."""
    lines = []
    for name in sorted(lock.keys() | venv.keys()):
        want, have = lock.get(name), venv.get(name)
        if want == have:
            continue
        if want is None:
            lines.append(f"{name}: {have} installed, not in the lock")
        elif have is None:
            lines.append(f"{name}: locked {want}, not installed")
        else:
            lines.append(f"{name}: locked {want}, installed {have}")
    return lines


if __name__ == "__main__":
    if sys.argv[1:] != ["--moved"]:
        sys.exit("usage: python tests/locked_versions.py --moved")
    diff = moved(locked(), frozen())
    print(f"against {LOCK.name}: " + (f"{len(diff)} moved" if diff else "nothing moved"))
    for line in diff:
        print("  " + line)
