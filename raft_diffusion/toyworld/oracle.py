"""The program oracle: reads a toy-world image and says whether its shape, colour and style match a prompt.

Real alignment work never knows whether "a cat in monet style" came out right; the toy world can.
The oracle is a small CNN (about 140 k parameters, 0.3 MB of fp16 weights) with three heads:
shape over `SHAPES + (BLOB,)` (`blob`: no recognisable object, e.g. one dissolved by monet
brushwork), colour over `COLOURS`, style over `STYLES`. It is trained on renders of the judges'
world (`JUDGE_WORLD`: every style with every object, plus blobs) under degradations that mimic
imperfect generated images (blur, noise, JPEG, colour jitter, a 32 px round trip, small shifts),
so it reads pictures the toy SD makes, not only clean renders; a few pictures with no object at
all teach it that an empty picture is a `blob` too, not a square or a star.

Inference is deterministic: eval mode, float32, no sampling. Images are (N, 3, H, W) floats in
[0, 1] at any size; they are resized to 64 px inside (bilinear, antialiased).

Build the shipped weights (a few minutes on one CPU thread):

    python -m raft_diffusion.toyworld.oracle --out assets/toyworld/oracle.safetensors --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..paths import ASSETS
from .data import BLOB, COLOURS, JUDGE_WORLD, SHAPES, STYLES, Scene, dataset, render

INPUT_SIZE = 64
ORACLE_SHAPES = (*SHAPES, BLOB)
ATTRIBUTES = ("shape", "colour", "style")
CLASSES: dict[str, tuple[str, ...]] = {"shape": ORACLE_SHAPES, "colour": tuple(COLOURS), "style": STYLES}
DEFAULT_WEIGHTS = ASSETS / "toyworld" / "oracle.safetensors"
BUILD_COMMAND = "python -m raft_diffusion.toyworld.oracle --out assets/toyworld/oracle.safetensors --seed 0"
WIDTHS = (24, 32, 64, 128)
NOTHING = "nothing"  # a `Scene.drawn` the renderer does not know: it draws no object
IGNORE = -100  # a label the loss skips (the colour of an empty picture)


# --- prompts -------------------------------------------------------------------------------------

def _alternatives(words: Sequence[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


# Plurals are accepted ("two cats"): missing a shape word would make the judge silently lenient.
_SHAPE_RE = re.compile(rf"\b({_alternatives(ORACLE_SHAPES)})s?\b", re.IGNORECASE)
_COLOUR_RE = re.compile(rf"\b({_alternatives(tuple(COLOURS))})\b", re.IGNORECASE)
_STYLE_RE = re.compile(rf"\b({_alternatives(STYLES)})[\s-]+style\b", re.IGNORECASE)


def parse_prompt(prompt: str) -> dict[str, str]:
    """The attributes a prompt names, e.g. {"shape": "cat", "style": "monet"}; unnamed ones are absent.

    Shape words include "blob"; a style counts only as "<style> style" ("monet style",
    "monet-style"), so "plain" or "dotted" elsewhere in a prompt is not taken for a style. When a
    prompt names two values of one attribute, the first one counts.
    """
    named = {}
    for attribute, pattern in (("shape", _SHAPE_RE), ("colour", _COLOUR_RE), ("style", _STYLE_RE)):
        match = pattern.search(prompt)
        if match:
            named[attribute] = match.group(1).lower()
    return named


# --- the network ---------------------------------------------------------------------------------

def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class OracleNet(nn.Module):
    """Logits of shape, colour and style for (N, 3, 64, 64) images in [0, 1]."""

    def __init__(self, widths: Sequence[int] = WIDTHS, classes: dict[str, Sequence[str]] = CLASSES):
        super().__init__()
        a, b, c, d = widths
        self.widths = tuple(widths)
        self.trunk = nn.Sequential(
            *_conv(3, a, kernel=4, stride=2),  # 32 x 32: the pictures are smooth, full resolution buys little
            *_conv(a, b), nn.MaxPool2d(2),  # 16 x 16
            *_conv(b, c), *_conv(c, c), nn.MaxPool2d(2),  # 8 x 8
            *_conv(c, d),
        )
        # Average and max pooling: style is spread over the picture, the object is in one place.
        self.heads = nn.ModuleDict({k: nn.Linear(2 * d, len(v)) for k, v in classes.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.trunk((images - 0.5) * 4)
        x = torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)
        return {k: head(x) for k, head in self.heads.items()}


def to_input(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1], any size and float dtype -> float32 (N, 3, 64, 64), as the network reads it."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"the oracle reads images (N, 3, H, W), got shape {tuple(images.shape)}")
    images = images.float().clamp(0, 1)
    if images.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        images = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True,
                               align_corners=False)
    return images


# --- the oracle ----------------------------------------------------------------------------------

@dataclass
class Oracle:
    """A loaded oracle: `read`, `attribute_hits` and `judge` on (N, 3, H, W) images in [0, 1]."""

    net: OracleNet
    classes: dict[str, tuple[str, ...]]
    device: torch.device
    batch_size: int = 256

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-attribute logits (float32, on the CPU) of each image."""
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in self.classes}
        for start in range(0, len(images), self.batch_size):
            batch = to_input(images[start:start + self.batch_size].to(self.device))
            for k, v in self.net(batch).items():
                parts[k].append(v.float().cpu())
        return {k: torch.cat(v) if v else torch.zeros(0, len(self.classes[k])) for k, v in parts.items()}

    def read(self, images: torch.Tensor) -> list[dict[str, str]]:
        """What each image shows: [{"shape": ..., "colour": ..., "style": ...}, ...]."""
        logits = self.logits(images)
        indices = {k: v.argmax(1).tolist() for k, v in logits.items()}
        return [{k: self.classes[k][indices[k][i]] for k in self.classes} for i in range(len(images))]

    def attribute_hits(self, images: torch.Tensor, prompts: Sequence[str]) -> list[dict[str, bool]]:
        """For each image, whether each attribute its prompt names is right: [{"shape": True, ...}, ...].

        Only named attributes appear ("a cat in monet style" -> shape and style).
        """
        _check_lengths(images, prompts)
        return [{k: seen[k] == v for k, v in parse_prompt(p).items()}
                for seen, p in zip(self.read(images), prompts)]

    def judge(self, images: torch.Tensor, prompts: Sequence[str],
              attributes: Sequence[str] | None = None) -> list[float]:
        """1.0 for each image with every attribute its prompt names right, else 0.0.

        `attributes` restricts the check (e.g. ("shape", "style"): a cat in monet style, any colour).
        A prompt that names none of the checked attributes raises ValueError: there would be nothing
        to check, and a vacuous 1.0 would pass for a judgement.
        """
        hits = self.attribute_hits(images, prompts)
        if attributes is not None:
            hits = [{k: v for k, v in h.items() if k in attributes} for h in hits]
        for h, p in zip(hits, prompts):
            if not h:
                checked = ", ".join(attributes) if attributes is not None else "shape, colour or '<style> style'"
                raise ValueError(f"prompt {p!r} names no toy-world {checked}")
        return [float(all(h.values())) for h in hits]


def _check_lengths(images: torch.Tensor, prompts: Sequence[str]) -> None:
    if isinstance(prompts, str) or len(prompts) != len(images):
        raise ValueError(f"one prompt per image: got {len(images)} images and "
                         f"{1 if isinstance(prompts, str) else len(prompts)} prompts")


_LOADED: dict[tuple[str, str], Oracle] = {}


def load(weights: str | Path | None = None, device: torch.device | str = "cpu", field: str = "oracle") -> Oracle:
    """The oracle of a weights file (default: the shipped asset), loaded once per process and device.

    A missing or unreadable file is a `UserError` naming `field` and how to build the weights.
    """
    path = Path(weights).expanduser().resolve() if weights is not None else DEFAULT_WEIGHTS
    device = torch.device(device)
    key = (str(path), str(device))
    if key not in _LOADED:
        _LOADED[key] = _load(path, device, field)
    return _LOADED[key]


def _load(path: Path, device: torch.device, field: str) -> Oracle:
    if not path.is_file():
        raise UserError(field, f"oracle weights not found: {path}",
                        f"build them with `{BUILD_COMMAND}` (a few minutes on one CPU), or point "
                        "`weights` at an existing file")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except (SafetensorError, OSError) as e:
        raise UserError(field, f"{path} is not a readable safetensors file: {e}", f"rebuild it: {BUILD_COMMAND}") from None
    try:
        classes = {k: tuple(v) for k, v in json.loads(meta["classes"]).items()}
        widths = tuple(json.loads(meta["widths"]))
    except (KeyError, ValueError, TypeError):
        raise UserError(field, f"{path} has no oracle metadata (classes, widths)",
                        f"it is not an oracle file; rebuild it: {BUILD_COMMAND}") from None
    if classes != CLASSES:
        # parse_prompt reads today's vocabulary; heads trained on another would misjudge silently.
        raise UserError(field, f"{path} was trained for classes {classes}, not this toy world's {CLASSES}",
                        f"rebuild it: {BUILD_COMMAND}")
    net = OracleNet(widths, classes)
    missing, unexpected = net.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    # BatchNorm's step counters are not saved: eval mode never reads them.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise UserError(field, f"{path} does not fit the oracle network (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})", f"rebuild it: {BUILD_COMMAND}")
    net.eval().to(device=device, dtype=torch.float32)
    return Oracle(net=net, classes=classes, device=device)


def read(images: torch.Tensor, weights: str | Path | None = None) -> list[dict[str, str]]:
    """What each image shows, by the shipped oracle (or `weights`): see `Oracle.read`."""
    return load(weights).read(images)


def attribute_hits(images: torch.Tensor, prompts: Sequence[str],
                   weights: str | Path | None = None) -> list[dict[str, bool]]:
    """Per image, whether each attribute its prompt names is right: see `Oracle.attribute_hits`."""
    return load(weights).attribute_hits(images, prompts)


def judge(images: torch.Tensor, prompts: Sequence[str], weights: str | Path | None = None) -> list[float]:
    """1.0 per image with every prompted attribute right, else 0.0: see `Oracle.judge`."""
    return load(weights).judge(images, prompts)


# --- training ------------------------------------------------------------------------------------

def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) renders -> float (N, 3, H, W) in [0, 1], as the pipeline holds images."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def empty(scene: Scene) -> Scene:
    """The scene with no object at all: its background and style alone.

    `render` draws nothing for a shape it does not know (tests pin this). A generator may draw no
    object, and the oracle must read that as "no recognisable object" (`blob`), not as a shape:
    trained without empty pictures, it read plain ones as squares and striped ones as stars.
    """
    return dataclasses.replace(scene, drawn=NOTHING)


def labels(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Class indices of what each scene draws (its `truth()`), per attribute.

    An empty scene is a `blob`, and has no colour to learn (`IGNORE`, skipped by the loss).
    """
    truths = [{**s.truth(), "shape": BLOB, "colour": None} if s.drawn == NOTHING else s.truth() for s in scenes]
    return {k: torch.tensor([IGNORE if t[k] is None else CLASSES[k].index(t[k]) for t in truths]) for k in ATTRIBUTES}


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with one sigma (pixels) per image, as a separable grouped convolution."""
    n, c, h, w = x.shape
    radius = 3
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t[None] / sigma[:, None].clamp_min(1e-3)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, k)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def _jpeg(x: torch.Tensor, quality: Sequence[int]) -> torch.Tensor:
    from torchvision.io import decode_jpeg, encode_jpeg

    data = (x * 255).round().clamp(0, 255).to(torch.uint8)
    out = [decode_jpeg(encode_jpeg(img, quality=int(q))) for img, q in zip(data, quality)]
    return torch.stack(out).float() / 255


def degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A batch as an imperfect generator might draw it: each degradation applied to a random share.

    Small shifts/zoom/rotation, a round trip through 24-48 px, gaussian blur, slight colour
    jitter (small enough that orange stays orange), JPEG artefacts and pixel noise.
    """
    n = len(x)

    def pick(p: float) -> torch.Tensor:
        return torch.rand(n, generator=g) < p

    def uniform(lo: float, hi: float, size: int = n) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(size, generator=g)

    # Geometry: affine_grid works in [-1, 1], so 4 px of 64 is 0.125.
    geo = pick(0.7)
    if geo.any():
        m = int(geo.sum())
        angle, scale = uniform(-0.15, 0.15, m), uniform(0.9, 1.1, m)
        theta = torch.zeros(m, 2, 3)
        theta[:, 0, 0] = torch.cos(angle) / scale
        theta[:, 0, 1] = -torch.sin(angle) / scale
        theta[:, 1, 0] = torch.sin(angle) / scale
        theta[:, 1, 1] = torch.cos(angle) / scale
        theta[:, :, 2] = uniform(-0.125, 0.125, 2 * m).reshape(m, 2)
        grid = F.affine_grid(theta, list(x[geo].shape), align_corners=False)
        x[geo] = F.grid_sample(x[geo], grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    small = pick(0.35)
    if small.any():
        side = int(torch.randint(24, 49, (1,), generator=g))
        down = F.interpolate(x[small], size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        x[small] = F.interpolate(down, size=x.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
    blur = pick(0.35)
    if blur.any():
        x[blur] = _blur(x[blur], uniform(0.3, 1.3, int(blur.sum())))
    jitter = pick(0.6)
    if jitter.any():
        m = int(jitter.sum())
        y = x[jitter]
        gray = y.mean(1, keepdim=True)
        y = gray + (y - gray) * uniform(0.85, 1.15, m)[:, None, None, None]  # saturation
        mean = y.mean((1, 2, 3), keepdim=True)
        y = mean + (y - mean) * uniform(0.85, 1.15, m)[:, None, None, None]  # contrast
        y = y * uniform(0.92, 1.08, m)[:, None, None, None] * uniform(0.95, 1.05, 3 * m).reshape(m, 3, 1, 1)
        x[jitter] = y.clamp(0, 1)
    jpeg = pick(0.3)
    if jpeg.any():
        x[jpeg] = _jpeg(x[jpeg], torch.randint(15, 80, (int(jpeg.sum()),), generator=g).tolist())
    noise = pick(0.4)
    if noise.any():
        m = int(noise.sum())
        x[noise] = x[noise] + torch.randn(x[noise].shape, generator=g) * uniform(0.01, 0.05, m)[:, None, None, None]
    return x.clamp(0, 1)


def downscale_round_trip(images: torch.Tensor, side: int = 32) -> torch.Tensor:
    """Images shrunk to `side` px and scaled back (antialiased bilinear): the informative hard case."""
    down = F.interpolate(images, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(down, size=images.shape[-2:], mode="bilinear", antialias=True, align_corners=False)


def accuracy(oracle: Oracle, images: torch.Tensor, scenes: Sequence) -> dict[str, float]:
    """Share of images read right, per attribute and for all three at once ("all")."""
    read_ = oracle.read(images)
    hits = [{k: r[k] == s.truth()[k] for k in ATTRIBUTES} for r, s in zip(read_, scenes)]
    out = {k: float(np.mean([h[k] for h in hits])) for k in ATTRIBUTES}
    out["all"] = float(np.mean([all(h.values()) for h in hits]))
    return out


def train(seed: int = 0, train_size: int = 24000, epochs: int = 6, batch_size: int = 128,
          lr: float = 3e-3, empty_share: float = 0.06, log_every: int = 50) -> OracleNet:
    """An oracle network trained on degraded renders of the judges' world (float32, eval mode).

    `empty_share` of the pictures lose their object (`empty`) and are labelled `blob`.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    # Rendered once into memory (about 1 ms an image); degradations are drawn fresh every epoch.
    pictures, scenes = dataset(train_size, JUDGE_WORLD, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for i in np.flatnonzero(rng.random(train_size) < empty_share):
        scenes[i] = empty(scenes[i])
        pictures[i] = render(scenes[i], pictures.shape[1])
    images, targets = to_tensor(pictures), labels(scenes)
    del pictures
    print(f"rendered {train_size} training images in {time.time() - t0:.0f} s", flush=True)
    net = OracleNet().to(memory_format=torch.channels_last)  # channels_last: ~1.5x faster convs on CPU
    steps = epochs * (train_size // batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    step = 0
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(train_size, generator=g)
        for start in range(0, train_size - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            x = degrade(images[idx].clone(), g).contiguous(memory_format=torch.channels_last)
            out = net(x)
            loss = sum(F.cross_entropy(out[k], targets[k][idx], label_smoothing=0.05, ignore_index=IGNORE)
                       for k in ATTRIBUTES)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % log_every == 0 or step == steps:
                print(f"epoch {epoch + 1}/{epochs} step {step}/{steps} loss {loss.item():.4f} "
                      f"({time.time() - t0:.0f} s)", flush=True)
    return net.eval().to(memory_format=torch.contiguous_format)


def save(net: OracleNet, path: Path, seed: int, extra: dict[str, str] | None = None) -> None:
    """The network as fp16 safetensors, with its class lists and widths in the metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in net.state_dict().items()
               if not k.endswith("num_batches_tracked")}
    meta = {"classes": json.dumps({k: list(v) for k, v in CLASSES.items()}), "widths": json.dumps(list(net.widths)),
            "input_size": str(INPUT_SIZE), "trained_on": "JUDGE_WORLD renders, degraded", "seed": str(seed),
            "build": BUILD_COMMAND, **(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def main(argv: Sequence[str] | None = None) -> int:
    """Train the oracle, save it, and print its held-out accuracy on clean and 32 px round-trip renders."""
    parser = argparse.ArgumentParser(prog="python -m raft_diffusion.toyworld.oracle", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=24000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--held-out", type=int, default=3000)
    parser.add_argument("--empty-share", type=float, default=0.06, help="training pictures with no object")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the build machine is shared)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    net = train(seed=args.seed, train_size=args.train_size, epochs=args.epochs, empty_share=args.empty_share)
    train_seconds = time.time() - t0
    save(net, args.out, args.seed, {"train_seconds": f"{train_seconds:.0f}"})
    # Measure the file as shipped (fp16 weights read back), on scenes the training never drew.
    oracle = _load(args.out.resolve(), torch.device("cpu"), "--out")
    pictures, scenes = dataset(args.held_out, JUDGE_WORLD, seed=10_000 + args.seed)
    images = to_tensor(pictures)
    clean, small = accuracy(oracle, images, scenes), accuracy(oracle, downscale_round_trip(images), scenes)
    blank = to_tensor(np.stack([render(empty(s)) for s in scenes[:500]]))
    blank_blob = float(np.mean([r["shape"] == BLOB for r in oracle.read(blank)]))
    print(f"wall time: {time.time() - t0:.0f} s (training {train_seconds:.0f} s, {args.threads} thread)")
    print(f"saved {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    for name, acc in (("clean held-out", clean), ("32 px round trip", small)):
        print(f"{name} ({args.held_out} renders): all {acc['all']:.2%}  shape {acc['shape']:.2%}  "
              f"colour {acc['colour']:.2%}  style {acc['style']:.2%}")
    print(f"empty pictures (no object, {len(blank)} renders) read as blob: {blank_blob:.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
