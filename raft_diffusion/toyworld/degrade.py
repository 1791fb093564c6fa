"""Graded damage to toy-world renders: what the toy aesthetic head learns to score low.

Each degradation takes a strength in [0, 1] (0: untouched, 1: the worst this module makes):
- `blur`: Gaussian blur, radius 0.4-2 px at 64 px;
- `noise`: additive Gaussian pixel noise, std 0.03-0.25 of the range;
- `lowres`: the picture at 48, 32 or 16 px, as a generator run at that resolution hands it over
  (the judge's preprocess upsamples it to 64; the resolution experiment generates at 32 px);
- `broken`: the object torn in two and eaten away in patches, the background showing through;
- `jpeg`: JPEG blockiness, quality 40 down to 4.

Damages compose (`apply`): the severity of several is 1 - prod(1 - strength), so a 32-px picture
with a broken object scores below a clean 32-px one, which lets ranking work at 32 px too.
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
from PIL import Image, ImageFilter

from .data import BLOB, Scene, render

KINDS = ("broken", "blur", "lowres", "jpeg", "noise")  # also the order `apply` runs them in
# lowres strength is set by the size the picture ends at: the fewer pixels, the worse.
LOWRES_STRENGTH = {48: 0.15, 32: 0.4, 16: 0.8}


def blur(image: np.ndarray, strength: float) -> np.ndarray:
    """Gaussian blur of an (H, W, 3) uint8 picture; radius in pixels of a 64-px picture, scaled."""
    radius = (0.4 + 1.6 * strength) * image.shape[0] / 64
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def noise(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise, independent per pixel and channel."""
    std = (0.03 + 0.22 * strength) * 255
    return np.clip(image + rng.normal(0, std, image.shape), 0, 255).astype(np.uint8)


def lowres(image: np.ndarray, size: int) -> np.ndarray:
    """The picture at `size` px (area-averaged), left small: whoever scores it upsamples it."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BOX))


def jpeg(image: np.ndarray, strength: float) -> np.ndarray:
    """A JPEG round trip at low quality: 8x8 blocks and chroma smear."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(round(40 - 36 * strength)))
    return np.asarray(Image.open(buffer).convert("RGB"))


def broken(scene: Scene, strength: float, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """The scene rendered with its object torn and dissolved in patches, background showing through.

    The background is the same scene rendered with nothing drawn (`drawn=""` draws no polygon and
    leaves the texture and brush-stroke randomness untouched, so the two renders line up pixel for
    pixel); the object is then shown only where a blocky random mask keeps it, and the part beyond
    a random line through its centre is shifted away: a shape cut in two.
    """
    if scene.drawn == BLOB:
        raise ValueError("a blob has no shape to break; break scenes of the other shapes")
    whole = render(scene, size).astype(np.float32)
    empty = render(replace(scene, drawn=""), size).astype(np.float32)
    cells = 8
    field = rng.random((cells, cells))
    keep = np.kron(field >= 0.7 * strength, np.ones((size // cells, size // cells))).astype(bool)
    # Tear: pixels beyond a line through the object's centre take the object shifted along it.
    yy, xx = np.mgrid[0:size, 0:size]
    angle = rng.uniform(0, np.pi)
    side = (xx - scene.cx * size) * np.cos(angle) + (yy - scene.cy * size) * np.sin(angle) > 0
    shift = int(round((2 + 8 * strength) * size / 64))
    dx, dy = int(round(shift * np.cos(angle))), int(round(shift * np.sin(angle)))
    torn = np.where(side[..., None], np.roll(whole, (dy, dx), axis=(0, 1)), whole)
    torn_empty = np.where(side[..., None], np.roll(empty, (dy, dx), axis=(0, 1)), empty)
    object_mask = np.abs(torn - torn_empty).sum(-1) > 12  # where the (torn) object covers the background
    out = np.where((object_mask & keep)[..., None], torn, empty)
    return out.astype(np.uint8)


def severity(damage: dict[str, float]) -> float:
    """How bad a combination is, in [0, 1]: 1 - prod(1 - strength)."""
    return float(1 - np.prod([1 - s for s in damage.values()])) if damage else 0.0


def apply(image: np.ndarray, scene: Scene, damage: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    """`image` (the render of `scene`) with every damage in `damage` ({kind: strength}) applied.

    For `lowres` the strength must be one of LOWRES_STRENGTH's values; the result is then smaller.
    """
    unknown = set(damage) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown damage {sorted(unknown)}; kinds: {KINDS}")
    out = image
    for kind in KINDS:
        if kind not in damage:
            continue
        s = damage[kind]
        if kind == "broken":
            out = broken(scene, s, rng, size=image.shape[0])
        elif kind == "blur":
            out = blur(out, s)
        elif kind == "lowres":
            sizes = [n for n, v in LOWRES_STRENGTH.items() if v == s]
            if not sizes:
                raise ValueError(f"lowres strength {s} is none of {sorted(LOWRES_STRENGTH.values())}")
            out = lowres(out, sizes[0])
        elif kind == "jpeg":
            out = jpeg(out, s)
        else:
            out = noise(out, s, rng)
    return out


def to_tensor(images: list[np.ndarray] | np.ndarray):
    """uint8 (N, H, W, 3) pictures -> the (N, 3, H, W) float tensor in [0, 1] a reward takes."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.stack(list(images)))).permute(0, 3, 1, 2).float() / 255
