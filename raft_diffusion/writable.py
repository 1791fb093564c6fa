"""Whether a run directory can be written, asked before anything is written into it."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError


def check_writable(path: str | Path, field: str) -> None:
    """Refuse (`UserError` naming `field`) a directory this process could neither write to nor create.

    A run that would fail only when it writes its first file has by then loaded its models and
    spent minutes; this asks the operating system first (read-only mounts and immutable
    directories included, which even root cannot write).
    """
    path = Path(path).expanduser().absolute()
    # The directory itself, or where mkdir would create it: its nearest existing parent.
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not os.path.isdir(existing):
        raise UserError(field, f"{existing} is not a directory", "choose another output directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = str(existing) if existing == path else f"{existing} (to create {path})"
        raise UserError(field, f"cannot write to {where}", "choose a directory you can write to, e.g. --output-dir")
