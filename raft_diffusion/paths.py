"""Where the package keeps what is not Python: shipped assets, configs and prompts.

A source checkout (the Makefile's editable install) has them at the repository's top level; a
wheel carries them as package data under `raft_diffusion/_data/` (pyproject.toml maps the
top-level folders there). Either way, the rest of the code asks this module.
"""

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent


def _data(name: str) -> Path:
    installed = PACKAGE / "_data" / name
    return installed if installed.is_dir() else REPO / name


ASSETS = _data("assets")
CONFIGS = _data("configs")
PROMPTS = _data("prompts")
