"""Screenshot a page of the built documentation site in headless Debian chromium.

    make docs && .venv/bin/python bench/screenshot_docs.py site quickstart/ docs-quickstart.png

The site is served from SITE_DIR on a free local port (the search and navigation scripts run as on a
web server); the page's top, --height pixels, is kept.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_browser import CHROMIUM, FLAGS  # noqa: E402  one set of browser flags for tests and this


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path)
    parser.add_argument("page", help="a page's path in the site, e.g. quickstart/")
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # no line per request
            pass

    handler = functools.partial(Quiet, directory=str(args.site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    errors: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{server.server_port}/{args.page}", wait_until="networkidle")
            page.screenshot(path=str(args.out))
            browser.close()
    finally:
        server.shutdown()
    print(args.out, f"({len(errors)} script errors{': ' + errors[0] if errors else ''})")


if __name__ == "__main__":
    main()
