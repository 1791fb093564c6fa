"""Where a checkout keeps what is not Python: shipped assets, configs and prompts.

They are found relative to the repository (the Makefile installs the package editable); a wheel
install would carry none of them, and the built-ins then report themselves as not built.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets"
