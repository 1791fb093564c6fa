"""What a run bought: the before/after table, and the before/after samples of a run directory
(an image grid, or a page of texts)."""

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


def reference(run_dir: str | Path) -> tuple[int, dict[str, float]] | None:
    """(resolution, eval means) of the base model at a reference resolution, if the run has one."""
    path = Path(run_dir) / "reference.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return int(data["resolution"]), data["eval"]


def table(run_dir: str | Path) -> str:
    """A plain-text before/after table of every eval metric (plus the base model at a reference
    resolution when the run has `reference.json`)."""
    before, after = before_after(run_dir)
    ref = reference(run_dir)
    names = list(dict.fromkeys([*before, *after]))
    width = max([len(n) for n in names] + [6])
    head = f"{'metric':{width}}  {'before':>9}  {'after':>9}  {'change':>9}"
    lines = [head + (f"  {f'base@{ref[0]}px':>10}" if ref else "")]
    for name in names:
        b, a = before.get(name), after.get(name)
        change = f"{a - b:+9.4f}" if a is not None and b is not None else f"{'':>9}"
        line = f"{name:{width}}  {_fmt(b)}  {_fmt(a)}  {change}"
        lines.append(line + (f"  {_fmt(ref[1].get(name)):>10}" if ref else ""))
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return f"{'n/a':>9}" if x is None else f"{x:9.4f}"


def last_eval_dir(run_dir: Path) -> Path | None:
    """samples/iter_NNNN/eval of the last evaluated iteration, if any."""
    found = sorted(p.parent for p in (Path(run_dir) / "samples").glob("iter_*/eval/samples.jsonl"))
    return found[-1] if found else None


def _eval_dirs(run_dir: Path) -> tuple[Path, Path]:
    last = last_eval_dir(run_dir)
    if not (run_dir / "samples/base_eval/samples.jsonl").is_file() or last is None:
        raise ValueError(f"{run_dir} has no base and final evaluation samples")
    return run_dir / "samples/base_eval", last


def rows(directory: Path) -> list[dict]:
    """The rows of `directory`/samples.jsonl; none when it has no such file."""
    path = directory / "samples.jsonl"
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


def before_after_samples(run_dir: str | Path) -> Path:
    """The base model's eval samples beside the tuned model's: `before_after.png` for images,
    `before_after.md` for texts."""
    base, _ = _eval_dirs(Path(run_dir))
    first = rows(base)[0]
    return grid(run_dir) if "file" in first else texts(run_dir)


def texts(run_dir: str | Path, limit: int | None = None) -> Path:
    """`before_after.md`: for each eval prompt and seed, the base model's text and the tuned
    model's, each with its scores."""
    run_dir = Path(run_dir)
    base, tuned = _eval_dirs(run_dir)
    pairs = list(zip(rows(base), rows(tuned)))[:limit]
    lines = [f"# Before and after: {run_dir.name}", "",
             f"Base model (`{base.relative_to(run_dir)}`) and tuned model (`{tuned.relative_to(run_dir)}`), "
             "same prompts and seeds.", ""]
    for before, after in pairs:
        lines += [f"## {before['prompt']} (seed {before['seed']})", ""]
        for title, row in (("before", before), ("after", after)):
            scores = ", ".join(f"{k} {v:.3f}" for k, v in row["scores"].items() if v is not None)
            lines += [f"**{title}** ({scores}): {_quote(before['prompt'] + row['text'])}", ""]
    out = run_dir / "before_after.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out


def _quote(text: str) -> str:
    return " ".join(text.split())  # one paragraph: newlines would break the markdown


def grid(run_dir: str | Path, per_row: int = 8, max_rows: int = 4, scale: int = 2) -> Path:
    """`before_after.png`: base-model eval images above the tuned model's, same prompts and seeds."""
    out = Path(run_dir) / "before_after.png"
    grid_image(run_dir, per_row, max_rows, scale).save(out)
    return out


def grid_image(run_dir: str | Path, per_row: int = 8, max_rows: int = 4, scale: int = 2) -> Image.Image:
    """The before/after grid of `grid`, as an image."""
    run_dir = Path(run_dir)
    base, tuned = _eval_dirs(run_dir)
    shown = rows(base)[: per_row * max_rows]
    names = [r["file"] for r in shown]
    before = [np.asarray(Image.open(base / n).convert("RGB")) for n in names]
    after = [np.asarray(Image.open(tuned / n).convert("RGB")) for n in names]
    h, w, _ = before[0].shape
    gap, label = 4, 14
    n_rows = -(-len(names) // per_row)
    per_row = min(per_row, len(names))  # no blank columns when there are fewer images than a row
    canvas = Image.new("RGB", (per_row * (w + gap) * scale, 2 * (n_rows * (h + gap) * scale + label)), "white")
    draw = ImageDraw.Draw(canvas)
    for block, (title, images) in enumerate((("before", before), ("after", after))):
        top = block * (n_rows * (h + gap) * scale + label)
        draw.text((2, top), title, fill="black")
        for i, image in enumerate(images):
            x, y = (i % per_row) * (w + gap) * scale, top + label + (i // per_row) * (h + gap) * scale
            canvas.paste(Image.fromarray(image).resize((w * scale, h * scale), Image.NEAREST), (x, y))
    return canvas
