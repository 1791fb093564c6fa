"""The shell commands of the documentation that run offline, as tests/test_docs.py runs them.

A page marks such a block with an HTML comment on the line before its fence (invisible on the site and on
GitHub):

    <!-- docs-test -->
    ```bash
    .venv/bin/raft-diffusion demo tiny --output-dir runs/tiny
    ```

`<!-- docs-test: small="--set raft.iterations=1" -->` appends those arguments to every `raft-diffusion train`
and `raft-diffusion demo` command of the block (the page says so beside it). The blocks of one page run in
order, in one fresh directory that holds links to the repository's configs/, prompts/, assets/ and the venv
(as `.venv`), so what a block writes under runs/ is there for the next one. A line is one command (a
trailing backslash continues it); `#` starts a comment; a failing command fails the page's test with its
file, line, command and the end of its output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

MARK = re.compile(r"^<!--\s*docs-test(?::\s*(?P<options>.*?))?\s*-->\s*$")
SMALL = re.compile(r'small="(?P<args>[^"]*)"')
RAFT = re.compile(r"(?:^|\s)(?:\S*/)?raft-diffusion\s+(?:train|demo)\b")
LINKED = ("configs", "prompts", "assets", "notebooks")


@dataclass
class Command:
    page: Path
    line: int  # 1-based, where the command starts
    text: str


@dataclass
class Block:
    page: Path
    line: int  # the fence's line, 1-based
    commands: list[Command] = field(default_factory=list)


def blocks(page: Path) -> list[Block]:
    """The marked shell blocks of a markdown page, their commands with the page's small settings applied."""
    lines = page.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        mark = MARK.match(lines[i].strip())
        if not mark:
            i += 1
            continue
        fence = i + 1
        if fence >= len(lines) or not lines[fence].startswith("```"):
            raise ValueError(f"{page}:{i + 1}: a docs-test mark must stand on the line before a code fence")
        options = mark.group("options") or ""
        small = SMALL.search(options)
        if options and not small:
            raise ValueError(f"{page}:{i + 1}: unknown docs-test options {options!r} (known: small=\"ARGS\")")
        block = Block(page, fence + 1)
        j, pending, start = fence + 1, "", 0
        while j < len(lines) and not lines[j].startswith("```"):
            raw = lines[j]
            if not pending:
                start = j + 1
            text = raw.strip() if pending else raw.rstrip()
            if text.endswith("\\"):
                pending += text[:-1].rstrip() + " "
            else:
                command = _strip_comment(pending + text).strip()
                pending = ""
                if command:
                    if small and RAFT.search(command):
                        command = f"{command} {small.group('args')}"
                    block.commands.append(Command(page, start, command))
            j += 1
        if j >= len(lines):
            raise ValueError(f"{page}:{fence + 1}: the marked block has no closing fence")
        out.append(block)
        i = j + 1
    return out


def _strip_comment(command: str) -> str:
    """The command less a trailing `# comment` (a `#` after a space, outside quotes)."""
    quote = None
    for k, ch in enumerate(command):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or command[k - 1].isspace()):
            return command[:k]
    return command


def workdir(root: Path, repo: Path) -> Path:
    """A fresh directory to run a page's commands in, with the repository's folders and the venv linked."""
    root.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        if (repo / name).exists():
            (root / name).symlink_to(repo / name)
    (root / ".venv").symlink_to(Path(sys.prefix))
    return root


def run(command: Command, cwd: Path, timeout: float = 600) -> str | None:
    """Run one command; None when it succeeded, else what to report."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command.text], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode == 0:
        return None
    tail = (result.stdout + result.stderr)[-1500:]
    return f"{command.page}:{command.line}: `{command.text}` exited {result.returncode}:\n{tail}"


def run_page(page: Path, cwd: Path) -> list[str]:
    """Run every marked command of a page in order; stop at the first failure and return it (empty: all ran)."""
    for block in blocks(page):
        for command in block.commands:
            failure = run(command, cwd)
            if failure is not None:
                return [failure]
    return []
