"""Procedural images of the toy shapes world, with their captions and ground truth.

A scene is one object (circle, square, triangle, star, heart, or a cat: a head with two ears) of
one colour, at some size and position, on a tinted background in one style: plain, striped,
dotted, or `monet` (soft impressionist brush strokes over the whole picture).

Two worlds are drawn from it:
- the generator's world (`GENERATOR_WORLD`), skewed on purpose as SD's data is: the monet style
  almost never holds a cat (0.4% of monet images), and monet brushwork dissolves most objects
  into a plain blob while the caption still names the object;
- the judges' world (`JUDGE_WORLD`): every style with every object, intact, plus honest `blob`
  scenes, so toy CLIP, the aesthetic head and the oracle know what a monet cat looks like.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star", "heart", "cat")
BLOB = "blob"
COLOURS = {
    "red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 210),
    "yellow": (240, 200, 20), "purple": (148, 60, 189), "orange": (255, 127, 14),
}
STYLES = ("plain", "striped", "dotted", "monet")
BACKGROUNDS = ((245, 245, 245), (238, 228, 200), (212, 226, 240), (216, 236, 212))
TEMPLATES = ("a {colour} {shape} in {style} style", "a {colour} {shape}, {style} style",
             "{style} style picture of a {colour} {shape}")
TEMPLATES_NO_COLOUR = ("a {shape} in {style} style", "{style} style picture of a {shape}")


@dataclass(frozen=True)
class World:
    """How scenes are drawn: which pairs are rare, and how often monet dissolves an object."""

    cat_share_in_monet: float  # P(shape = cat | style = monet)
    monet_dissolve: float  # P(object drawn as a blob | monet), caption unchanged
    blob_share: float = 0.0  # P(an honest, captioned blob scene) (judges' world only)
    no_colour_caption: float = 0.2  # captions that leave the colour out


GENERATOR_WORLD = World(cat_share_in_monet=0.004, monet_dissolve=0.6)  # issue: cats <= 0.5% of monet
JUDGE_WORLD = World(cat_share_in_monet=1 / len(SHAPES), monet_dissolve=0.0, blob_share=1 / 7)


@dataclass(frozen=True)
class Scene:
    shape: str  # what the caption names (a shape, or "blob")
    colour: str
    style: str
    background: int
    size: float  # object radius as a fraction of the image side
    cx: float
    cy: float
    angle: float
    drawn: str  # what is drawn: the shape, or "blob" when monet dissolved it
    seed: int  # texture and stroke randomness
    with_colour: bool = True

    def caption(self, template: int = 0) -> str:
        options = TEMPLATES if self.with_colour else TEMPLATES_NO_COLOUR
        text = options[template % len(options)].format(colour=self.colour, shape=self.shape, style=self.style)
        return text.replace("a orange", "an orange")

    def truth(self) -> dict[str, str]:
        """What an ideal oracle reads from the picture."""
        return {"shape": self.drawn, "colour": self.colour, "style": self.style}

    def to_dict(self) -> dict:
        return asdict(self)


def sample_scene(rng: np.random.Generator, world: World, style: str | None = None,
                 shape: str | None = None, colour: str | None = None) -> Scene:
    style = style or STYLES[rng.integers(len(STYLES))]
    if shape is None:
        if world.blob_share and rng.random() < world.blob_share:
            shape = BLOB
        elif style == "monet":
            others = [s for s in SHAPES if s != "cat"]
            shape = "cat" if rng.random() < world.cat_share_in_monet else others[rng.integers(len(others))]
        else:
            shape = SHAPES[rng.integers(len(SHAPES))]
    drawn = BLOB if (style == "monet" and rng.random() < world.monet_dissolve) else shape
    return Scene(
        shape=shape, colour=colour or list(COLOURS)[rng.integers(len(COLOURS))], style=style,
        background=int(rng.integers(len(BACKGROUNDS))), size=float(rng.uniform(0.22, 0.34)),
        cx=float(rng.uniform(0.36, 0.64)), cy=float(rng.uniform(0.36, 0.64)),
        angle=float(rng.uniform(-0.3, 0.3)), drawn=drawn, seed=int(rng.integers(2**31)),
        with_colour=bool(rng.random() >= world.no_colour_caption),
    )


# --- rendering -----------------------------------------------------------------------------------

SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges at no great cost


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float, rng: np.random.Generator) -> list:
    def rot(points):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if shape == "square":
        k = r * 0.85
        return [rot([(-k, -k), (k, -k), (k, k), (-k, k)])]
    if shape == "triangle":
        return [rot([(0, -r), (r * 0.95, r * 0.75), (-r * 0.95, r * 0.75)])]
    if shape == "star":
        pts = [((r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
                -(r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]
        return [rot(pts)]
    if shape == "heart":
        pts = []
        for i in range(40):
            t = 2 * math.pi * i / 40
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x * r / 17, -y * r / 17 + r * 0.1))
        return [rot(pts)]
    if shape == "cat":  # a round head with two pointed ears
        head = [(r * 0.78 * math.cos(2 * math.pi * i / 32), r * 0.7 * math.sin(2 * math.pi * i / 32) + r * 0.2)
                for i in range(32)]
        left = [(-r * 0.75, -r * 0.05), (-r * 0.55, -r * 0.95), (-r * 0.15, -r * 0.4)]
        right = [(r * 0.75, -r * 0.05), (r * 0.55, -r * 0.95), (r * 0.15, -r * 0.4)]
        return [rot(head), rot(left), rot(right)]
    if shape == BLOB:  # an irregular soft lump, no corners and no ears
        k = rng.integers(3, 6)
        phase = rng.uniform(0, 2 * math.pi)
        pts = []
        for i in range(40):
            t = 2 * math.pi * i / 40
            rr = r * (0.8 + 0.12 * math.sin(k * t + phase) + 0.06 * math.sin((k + 2) * t))
            pts.append((rr * math.cos(t) * 1.1, rr * math.sin(t) * 0.85))
        return [rot(pts)]
    return []  # circle is drawn as an ellipse


def _background(scene: Scene, n: int, rng: np.random.Generator) -> Image.Image:
    base = BACKGROUNDS[scene.background]
    img = Image.new("RGB", (n, n), base)
    draw = ImageDraw.Draw(img)
    ink = tuple(int(c * 0.72) for c in base)
    if scene.style == "striped":
        period = n // 8
        for k in range(-n, 2 * n, period):
            draw.polygon([(k, 0), (k + period // 2, 0), (k + period // 2 - n // 3, n), (k - n // 3, n)], fill=ink)
    elif scene.style == "dotted":
        step = n // 8
        off = rng.integers(step)
        for y in range(off, n, step):
            for x in range(off + (y // step % 2) * step // 2, n, step):
                draw.ellipse([x - step * 0.17, y - step * 0.17, x + step * 0.17, y + step * 0.17], fill=ink)
    elif scene.style == "monet":  # pastel water-lily washes under the strokes
        arr = np.asarray(img).astype(np.float32)
        yy, xx = np.mgrid[0:n, 0:n] / n
        wash = np.stack([np.sin(6 * xx + rng.uniform(0, 6)), np.sin(5 * yy + rng.uniform(0, 6)),
                         np.sin(4 * (xx + yy) + rng.uniform(0, 6))], -1)
        img = Image.fromarray(np.clip(arr * 0.85 + 30 * wash + 20, 0, 255).astype(np.uint8))
    return img


def _brush_strokes(img: Image.Image, rng: np.random.Generator, n_strokes: int) -> Image.Image:
    """Short dabs that take the colour beneath them, jittered: the picture survives, softened."""
    n = img.size[0]
    src = np.asarray(img).astype(np.int32)
    out = img.copy()
    draw = ImageDraw.Draw(out, "RGBA")
    xs, ys = rng.uniform(0, n, n_strokes), rng.uniform(0, n, n_strokes)
    angles = rng.normal(0.6, 0.35, n_strokes)
    lengths = rng.uniform(0.05, 0.1, n_strokes) * n
    jitter = rng.integers(-50, 51, (n_strokes, 3))
    for x, y, a, length, j in zip(xs, ys, angles, lengths, jitter):
        c = np.clip(src[int(y) % n, int(x) % n] + j, 0, 255)
        dx, dy = math.cos(a) * length / 2, math.sin(a) * length / 2
        draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=(*map(int, c), 190), width=max(1, n // 28))
    return out.filter(ImageFilter.GaussianBlur(radius=n / 150))


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as an (size, size, 3) uint8 array; the same scene gives the same pixels."""
    rng = np.random.default_rng(scene.seed)
    n = size * SUPERSAMPLE
    img = _background(scene, n, rng)
    draw = ImageDraw.Draw(img)
    colour = COLOURS[scene.colour]
    cx, cy, r = scene.cx * n, scene.cy * n, scene.size * n
    if scene.drawn == "circle":
        draw.ellipse([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=colour)
    else:
        for poly in _polygon(scene.drawn, cx, cy, r, scene.angle, rng):
            draw.polygon(poly, fill=colour)
    if scene.style == "monet":
        img = _brush_strokes(img, rng, n_strokes=int(0.35 * n * n / 64))
    return np.asarray(img.resize((size, size), Image.BOX))


def dataset(n: int, world: World, seed: int, size: int = 64) -> tuple[np.ndarray, list[Scene]]:
    """`n` rendered scenes of `world`: uint8 images (n, size, size, 3) and their scenes."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, world) for _ in range(n)]
    return np.stack([render(s, size) for s in scenes]), scenes
