"""report.html in a real browser: headless Chromium (Debian's `chromium`, which `make test` installs
when missing) opens the report of a short image run and of a short text run, takes a screenshot,
and the test checks that the curves and the before/after grid rendered where the page puts them,
that every image decoded, and that the page logged no error."""

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raft_diffusion.train import run_training

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium on a machine with no network and no screen, run as root: no sandbox, no GPU, and none of
# its background connections (refused here, many at a time).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        message = f"no chromium at {CHROMIUM}: `make test` installs Debian's package (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        browser.close()


def _open(browser, report: Path, shot: Path) -> tuple[object, Image.Image, list[str]]:
    """Load `report` in a fresh page; (the page, its full-page screenshot, what it logged as errors)."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url[:80]}"))
    page.goto(report.as_uri(), wait_until="load")
    page.screenshot(path=str(shot), full_page=True)
    return page, Image.open(io.BytesIO(shot.read_bytes())).convert("RGB"), problems


def _region(page, shot: Image.Image, selector: str) -> np.ndarray:
    """The screenshot's pixels where `selector` was laid out (full-page coordinates)."""
    box = page.locator(selector).bounding_box()
    assert box is not None and box["width"] > 50 and box["height"] > 50, f"{selector} laid out as {box}"
    scroll = page.evaluate("() => [window.scrollX, window.scrollY]")
    x, y = box["x"] + scroll[0], box["y"] + scroll[1]
    return np.asarray(shot.crop((int(x), int(y), int(x + box["width"]), int(y + box["height"]))), dtype=np.int16)


def _drawn(pixels: np.ndarray) -> float:
    """Share of the region that is not the page's white background."""
    return float((np.abs(pixels - 255).sum(axis=2) > 30).mean())


def _assert_images_decoded(page) -> int:
    broken = page.evaluate("() => [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length")
    assert broken == 0
    return page.evaluate("() => document.images.length")


def test_the_report_of_an_image_run_renders_in_chromium(browser, finished_run, tmp_path):
    page, shot, problems = _open(browser, finished_run / "report.html", tmp_path / "image_run.png")
    assert problems == []
    assert _assert_images_decoded(page) >= 2 + 6  # curves, grid, and the 6 candidates of the last iteration
    curves, grid = _region(page, shot, "#curves"), _region(page, shot, "#grid")
    assert 0.02 < _drawn(curves) < 0.9  # axes, lines and labels on white
    assert _drawn(grid) > 0.5 and grid.std() > 20  # images, not a blank box
    top = page.locator("#curves").bounding_box()["y"]
    assert page.locator("#flags").bounding_box()["y"] < top < page.locator("#grid").bounding_box()["y"]
    assert page.locator("figure.sel, .sel").count() >= 1  # the selected candidates are marked


def test_the_report_of_a_text_run_renders_in_chromium(browser, text_config, tmp_path):
    run_training(text_config(raft={"iterations": 2}), log=lambda _: None)
    page, shot, problems = _open(browser, tmp_path / "run/report.html", tmp_path / "text_run.png")
    assert problems == []
    _assert_images_decoded(page)
    assert 0.02 < _drawn(_region(page, shot, "#curves")) < 0.9
    texts = _region(page, shot, "#grid")  # the base model's texts beside the tuned model's
    assert 0.01 < _drawn(texts) < 0.6
    first = page.locator("#grid tr").nth(1).inner_text()
    assert first.strip() and page.locator("#grid tr").count() > 1
