"""Screenshot a run's report.html in headless Debian chromium (the README's picture).

    .venv/bin/python bench/screenshot_report.py runs/demo-resolution docs/img/report.png

Needs chromium (`make chromium`) and playwright (in the dev extra). Takes the top of the page:
the flags, the curves and the before/after grid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_browser import CHROMIUM, FLAGS  # noqa: E402  one set of browser flags for tests and this


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--height", type=int, default=1250, help="pixels of the page's top to keep")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from raft_diffusion.html_report import write

    report = write(args.run_dir)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1100, "height": args.height})
        page.goto(report.resolve().as_uri(), wait_until="load")
        page.screenshot(path=str(args.out))
        browser.close()
    print(args.out)


if __name__ == "__main__":
    main()
