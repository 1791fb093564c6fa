"""Prompt sources: a file with one prompt a line (blank lines and `#` comments skipped) or a list."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import UserError


def resolve_path(path: str, search: Sequence[Path]) -> Path:
    """`path` as given if it exists, else relative to each of `search` in turn."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    for base in search:
        if (base / p).exists():
            return base / p
    return p


def load_prompts(spec: str | list[str], field: str, search: Sequence[Path] = ()) -> list[str]:
    if isinstance(spec, list):
        prompts = [p.strip() for p in spec if p.strip()]
        if not prompts:
            raise UserError(field, "the prompt list is empty", "give at least one prompt")
        return prompts
    path = resolve_path(spec, search)
    if not path.is_file():
        raise UserError(field, f"prompts file not found: {spec}", "give an existing file, one prompt a line")
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) must not start the first prompt
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(field, f"{spec} is not UTF-8 (bad byte at offset {e.start})", "save the file as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UserError(field, f"{spec} holds no prompts", "write one prompt a line")
    return prompts
