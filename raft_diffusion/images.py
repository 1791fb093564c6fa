"""The one image grid of the package: pictures of one size in rows (the trackers' eval grid, the
report's before/after blocks, the toy world's evaluation sheets)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image


def paste_grid(canvas: Image.Image, images: Sequence[Image.Image], per_row: int, pitch: tuple[int, int],
               origin: tuple[int, int] = (0, 0), size: tuple[int, int] | None = None) -> Image.Image:
    """Paste `images` onto `canvas` in rows of `per_row`, `pitch` (x, y) apart, from `origin`;
    each resized to `size` (nearest neighbour: pixels stay pixels) when given."""
    for i, image in enumerate(images):
        if size is not None:
            image = image.resize(size, Image.NEAREST)
        canvas.paste(image, (origin[0] + (i % per_row) * pitch[0], origin[1] + (i // per_row) * pitch[1]))
    return canvas


def grid(images: Sequence[Image.Image], per_row: int = 8, gap: int = 2, background: str = "white") -> Image.Image:
    """Images of one size in rows of `per_row`, `gap` pixels apart, on a canvas just large enough."""
    w, h = images[0].size
    n_rows = -(-len(images) // per_row)
    canvas = Image.new("RGB", (min(per_row, len(images)) * (w + gap) - gap, n_rows * (h + gap) - gap), background)
    return paste_grid(canvas, images, per_row, (w + gap, h + gap))
