"""`report.html`: one self-contained page of what a run did (images embedded as data URIs).

At the top, the flags (flags.py) in plain words; then the curves per iteration (the trained
reward, the selected samples' reward, every eval metric with the base model at iteration 0), the
before/after grid (or texts), a per-prompt table of the base and last evaluations, the last
iteration's candidates with the selected ones marked, and the config.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ReportConfig
from .errors import UserError
from .flags import evaluations, find
from .report import Run, grid_image, inside, last_eval_dir, picture, read_run, rows, run_file, sample_dir, thumbnail
from .checkpoint import write_text_atomically

MAX_CANDIDATES = 64  # of the last iteration, shown as thumbnails or texts
# Bidirectional controls (embeddings, overrides, isolates, marks): a prompt's right-to-left override
# would reverse the text after it. Dropped, and each prompt set in its own <bdi>.
BIDI_CONTROLS = dict.fromkeys(map(ord, "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"))


def write(run_dir: str | Path, warn: Callable[[str], None] | None = None) -> Path:
    """Write `RUN_DIR/report.html` (atomically) and return its path. The run directory's records are
    read and checked first (report.read_run); a damaged one is a UserError and nothing is written."""
    run_dir = Path(run_dir)
    metrics = run_file(run_dir, "metrics.jsonl")
    if metrics is None or not metrics.is_file():
        raise UserError("RUN_DIR", f"{run_dir} holds no metrics.jsonl", "pass a run directory that has run an iteration")
    out = run_dir / "report.html"
    if os.path.lexists(out) and not out.is_symlink() and not out.is_file():
        raise UserError("RUN_DIR report.html", f"{out} is a directory or another non-file, so the report cannot "
                        "replace it", "move it away, then run the report again")
    run = read_run(run_dir, warn)
    records, config, config_text = run.records, run.config, run.config_text
    if not records:
        raise UserError("RUN_DIR", f"{run_dir} has no iteration yet", "report a run once an iteration has ended")
    flags = find(records, ReportConfig.model_validate(config.get("report") or {}))
    # Rewards normalised per prompt or batch sum to a mean of 0 by construction: a flat line of rounding
    # noise (1e-17) that says nothing. Their parts, raw, are drawn instead.
    normalised = any(isinstance(r, dict) and r.get("normalize", "none") != "none" for r in config.get("rewards") or [])
    skip = {"reward"} if normalised else set()
    parts = [
        f"<h1>{_esc(run_dir.resolve().name)}</h1>",
        f"<p>{len(records)} iterations; backend {_esc(str(config.get('backend', '?')))}, model "
        f"{_esc(str((config.get('model') or {}).get('path', '?')))}</p>",
        _flags(flags),
        "<h2>Curves</h2>", _curves(records, skip),
        "<p>The combined reward of the held-out samples is not drawn: its rewards are normalised, so its "
        "mean is 0 by construction; each reward is drawn raw.</p>" if skip else "",
        _before_after(run),
        _per_prompt(run_dir, skip),
        _candidates(run_dir, records, warn),
        "<h2>Config</h2>", f"<pre>{_esc(config_text)}</pre>",
    ]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>raft-diffusion report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
            ".flag{background:#fff3cd;border-left:4px solid #d39e00;padding:.4em .8em;margin:.4em 0}"
            ".ok{background:#e8f5e9;border-left:4px solid #43a047;padding:.4em .8em}"
            ".sel{outline:3px solid #2e7d32}figure{display:inline-block;margin:2px;font-size:11px}"
            "</style></head><body>" + "\n".join(parts) + "</body></html>\n")
    write_text_atomically(out, page)
    return out


def _esc(text: str) -> str:
    """`text` for HTML: escaped, with bidirectional controls dropped."""
    return html.escape(str(text).translate(BIDI_CONTROLS))


def _prompt(text: str) -> str:
    """A prompt (or a text) isolated from its neighbours' direction (<bdi>), its bidi controls dropped."""
    return f"<bdi>{_esc(text)}</bdi>"


def _flags(flags) -> str:
    if not flags:
        return "<div class='ok' id='flags'>No flag: no held-out judge fell while the reward rose, no collapse " \
               "after a peak, no loss of diversity.</div>"
    items = "".join(f"<div class='flag'><b>{_esc(f.kind)}</b>: {_esc(f.message)}</div>" for f in flags)
    return f"<div id='flags'><h2>Flags</h2>{items}</div>"


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _curves(records: list[dict[str, Any]], skip: set[str] = frozenset()) -> str:
    # A Figure of its own, not pyplot: no backend is switched and no global figure is left behind,
    # so a notebook that runs training keeps its inline plots.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    evals = evaluations(records)
    names = list(dict.fromkeys(k for _, e in evals for k, v in e.items()  # only metrics with a value to draw
                               if isinstance(v, (int, float)) and math.isfinite(v) and k not in skip))
    panels = [("trained reward", None)] + [(n, n) for n in names]
    cols = 3
    n_rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4 * cols, 2.6 * n_rows))
    axes = fig.subplots(n_rows, cols, squeeze=False)
    for ax, (title, name) in zip(axes.flat, panels):
        if name is None:
            its = [r["iteration"] + 1 for r in records]
            for key, label in (("reward_mean", "all samples"), ("reward_selected_mean", "selected")):
                ys = [r.get(key) for r in records]
                ax.plot(its, [float("nan") if y is None else y for y in ys], marker=".", label=label)
            ax.legend(fontsize=7)
        else:
            pts = [(it, e[name]) for it, e in evals if isinstance(e.get(name), (int, float))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="C2")
        ax.set_title(title, fontsize=9, parse_math=False)  # a label is text: `$` is no mathtext
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    uri = _png(fig)
    return f"<img id='curves' alt='curves' src='{uri}'>"


def _pil_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _before_after(run: Run) -> str:
    base, last = sample_dir(run.path, "base_eval"), last_eval_dir(run.path)
    before = rows(base) if base is not None else []
    if not before or last is None:
        return ""
    if "file" in before[0]:
        image = grid_image(run.path, resolution=run.resolution)
        return f"<h2>Before and after</h2><img id='grid' alt='before/after grid' src='{_pil_uri(image)}'>"
    pairs = list(zip(before, rows(last)))[:16]
    body = "".join(f"<tr><td style='text-align:left'>{_prompt(b['prompt'])}</td>"
                   f"<td style='text-align:left'>{_prompt(b.get('text', ''))}</td>"
                   f"<td style='text-align:left'>{_prompt(a.get('text', ''))}</td></tr>" for b, a in pairs)
    return ("<h2>Before and after</h2><table id='grid'><tr><th>prompt</th><th>base</th><th>tuned</th></tr>"
            + body + "</table>")


def _per_prompt(run_dir: Path, skip: set[str] = frozenset()) -> str:
    base_dir, last = sample_dir(run_dir, "base_eval"), last_eval_dir(run_dir)
    base = rows(base_dir) if base_dir is not None else []
    if not base or last is None:
        return ""
    tuned = rows(last)

    def means(table):
        sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in table:
            for k, v in {"reward": r.get("reward"), **r["scores"]}.items():
                if v is not None:  # numbers, checked by report.rows; None: a dropped sample
                    sums[r["prompt"]][k].append(v)
        return {p: {k: math.fsum(v) / len(v) for k, v in d.items()} for p, d in sums.items()}

    before, after = means(base), means(tuned)
    names = list(dict.fromkeys(k for d in before.values() for k in d if k not in skip))
    head = "".join(f"<th>{_esc(n)} base</th><th>{_esc(n)} tuned</th>" for n in names)
    body = ""
    for prompt in before:
        cells = "".join(f"<td>{before[prompt].get(n, float('nan')):.4g}</td>"
                        f"<td>{after.get(prompt, {}).get(n, float('nan')):.4g}</td>" for n in names)
        body += f"<tr><td style='text-align:left'>{_prompt(prompt)}</td>{cells}</tr>"
    return (f"<h2>Per prompt ({_esc(last.parent.name)} against the base model)</h2>"
            f"<table id='per-prompt'><tr><th>prompt</th>{head}</tr>{body}</table>")


def _candidates(run_dir: Path, records: list[dict[str, Any]], warn: Callable[[str], None] | None = None) -> str:
    name = f"iter_{records[-1]['iteration']:04d}"
    directory = sample_dir(run_dir, name)
    shown = rows(directory)[:MAX_CANDIDATES] if directory is not None else []
    if not shown:
        return ""
    title = (f"<h2>Candidates of iteration {records[-1]['iteration'] + 1}</h2>"
             "<p>Outlined or bold: selected for fine-tuning.</p>")
    if "file" in shown[0]:
        figures = []
        for r in shown:
            if not os.path.lexists(inside(directory, r["file"], r.where, "file")):  # pruned, or not written yet
                if warn is not None:
                    warn(f"warning: {r.where}: {r['file']} is missing; left out of the candidates")
                continue
            uri = _pil_uri(thumbnail(picture(directory, r)))
            figures.append(f"<figure><img width='96' {'class=sel ' if r['selected'] else ''}alt='{_esc(r['prompt'])}' "
                           f"src='{uri}'><figcaption>{_g(r.get('reward'))}</figcaption></figure>")
        return title + f"<div id='candidates'>{''.join(figures)}</div>"
    body = "".join(f"<tr><td>{_g(r.get('reward'))}</td><td style='text-align:left'>"
                   f"{'<b>' if r['selected'] else ''}{_prompt(r['prompt'] + r.get('text', ''))}"
                   f"{'</b>' if r['selected'] else ''}</td></tr>" for r in shown)
    return title + f"<table id='candidates'><tr><th>reward</th><th>text</th></tr>{body}</table>"


def _g(x: float | None) -> str:
    return "dropped" if x is None else f"{x:.3g}"
