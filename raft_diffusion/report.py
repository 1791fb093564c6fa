"""What a run bought: the before/after table and image grid of a run directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .run_dir import RunDirectory


def before_after(run_dir: str | Path) -> tuple[dict[str, float], dict[str, float]]:
    """Eval means of the base model and of the last evaluated iteration."""
    records = RunDirectory(run_dir).read_metrics()
    if not records:
        raise ValueError(f"{run_dir} has no metrics yet")
    before = records[0].get("eval_before", {})
    after = next((r["eval"] for r in reversed(records) if r.get("eval")), {})
    return before, after


def table(run_dir: str | Path) -> str:
    """A plain-text before/after table of every eval metric."""
    before, after = before_after(run_dir)
    names = list(dict.fromkeys([*before, *after]))
    width = max([len(n) for n in names] + [6])
    lines = [f"{'metric':{width}}  {'before':>9}  {'after':>9}  {'change':>9}"]
    for name in names:
        b, a = before.get(name), after.get(name)
        change = f"{a - b:+9.4f}" if a is not None and b is not None else f"{'':>9}"
        lines.append(f"{name:{width}}  {_fmt(b)}  {_fmt(a)}  {change}")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return f"{'n/a':>9}" if x is None else f"{x:9.4f}"


def _eval_dirs(run_dir: Path) -> tuple[Path, Path]:
    last = sorted(p.parent for p in (run_dir / "samples").glob("iter_*/eval/samples.jsonl"))
    if not (run_dir / "samples/base_eval/samples.jsonl").is_file() or not last:
        raise ValueError(f"{run_dir} has no base and final evaluation samples")
    return run_dir / "samples/base_eval", last[-1]


def grid(run_dir: str | Path, per_row: int = 8, max_rows: int = 4, scale: int = 2) -> Path:
    """`before_after.png`: base-model eval images above the tuned model's, same prompts and seeds."""
    run_dir = Path(run_dir)
    base, tuned = _eval_dirs(run_dir)
    rows = [json.loads(x) for x in (base / "samples.jsonl").read_text().splitlines()][: per_row * max_rows]
    names = [r["file"] for r in rows]
    before = [np.asarray(Image.open(base / n).convert("RGB")) for n in names]
    after = [np.asarray(Image.open(tuned / n).convert("RGB")) for n in names]
    h, w, _ = before[0].shape
    gap, label = 4, 14
    n_rows = -(-len(names) // per_row)
    canvas = Image.new("RGB", (per_row * (w + gap) * scale, 2 * (n_rows * (h + gap) * scale + label)), "white")
    draw = ImageDraw.Draw(canvas)
    for block, (title, images) in enumerate((("before", before), ("after", after))):
        top = block * (n_rows * (h + gap) * scale + label)
        draw.text((2, top), title, fill="black")
        for i, image in enumerate(images):
            x, y = (i % per_row) * (w + gap) * scale, top + label + (i // per_row) * (h + gap) * scale
            canvas.paste(Image.fromarray(image).resize((w * scale, h * scale), Image.NEAREST), (x, y))
    out = run_dir / "before_after.png"
    canvas.save(out)
    return out
