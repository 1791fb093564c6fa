"""What a run bought: the before/after table, and the before/after samples of a run directory
(an image grid, or a page of texts).

Everything drawn from a run directory is read here, and checked first (`read_run`): a run
directory may be damaged, or shared by someone else, so its records are material, not orders.
Every file a record names must resolve inside the run directory (`files.inside`), pictures are
decoded by `files.read_image` and re-encoded (no byte of the file itself reaches a report), and
numbers must be numbers. A damage is a `UserError` naming the file, the line and the field.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .errors import UserError
from .files import inside, read_image
from .run_dir import RunDirectory
from .checkpoint import write_text_atomically
from .config import RunConfig, _submodel, read_saved_config
from .images import paste_grid

RECORD_FIX = "restore the run's file, or delete the damaged line"
MAX_SIDE = 4096  # generation.resolution's own limit: a bigger picture is not one the run wrote
TILE = 256  # the largest side a picture is drawn at in a grid or as a thumbnail
# Numbers of a metrics.jsonl record (loop.iteration_record): a number or null; counts; name -> number maps
RECORD_NUMBERS = ("reward_mean", "reward_std", "reward_selected_mean", "train_loss")
RECORD_COUNTS = ("n_generated", "n_selected", "n_dropped")
RECORD_MAPS = ("eval", "eval_before", "rewards", "seconds")
# The config sections the report reads, each checked with the model the run writes it with (config.py).
CONFIG_SECTIONS = ("backend", "model", "rewards", "report", "generation")


# --- checked values --------------------------------------------------------------------------


def _short(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 100:
        return f"an integer of {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__)


def number(value: Any, where: str, fix: str = RECORD_FIX) -> float | None:
    """`value` as a finite float (None stays None: a dropped sample, a metric not measured)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(where, f"{_short(value)} is {_kind(value)}, not a number", fix)
    try:
        x = float(value)
    except OverflowError:
        raise UserError(where, f"{_short(value)} is too large for a number", fix) from None
    if not math.isfinite(x):
        raise UserError(where, f"{value!r} is not a finite number (the run writes null there)", fix)
    return x


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
        raise UserError(where, f"{_short(value)} is not a count (an integer from 0)", RECORD_FIX)
    return value


def _metrics(value: Any, where: str) -> dict[str, float | None]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(where, f"is {_kind(value)}, not an object of metric names and numbers", RECORD_FIX)
    return {k: number(v, f"{where}.{_name(k)}") for k, v in value.items()}


def _name(key: str) -> str:
    return key if len(key) <= 60 else key[:57] + "..."


def check_record(record: dict[str, Any], where: str) -> dict[str, Any]:
    """A metrics.jsonl record (loop.iteration_record's fields) with every number checked."""
    out = dict(record)
    if not 0 <= record["iteration"] < 10**8:
        raise UserError(f"{where} iteration", f"{_short(record['iteration'])} is not an iteration number", RECORD_FIX)
    for key in RECORD_NUMBERS:
        if key in record:
            out[key] = number(record[key], f"{where} {key}")
    for key in RECORD_COUNTS:
        if key in record:
            out[key] = _count(record[key], f"{where} {key}")
    for key in RECORD_MAPS:
        if key in record:
            out[key] = _metrics(record[key], f"{where} {key}")
    return out


def read_records(run_dir: Path, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """metrics.jsonl as the run reads it (RunDirectory.read_metrics: a garbled line is skipped, with a
    warning), every record checked; a line no JSON reader can take (a number of thousands of digits,
    nesting thousands deep) is a UserError naming it."""
    path = run_file(run_dir, "metrics.jsonl")
    if path is None:
        return []
    try:
        records = RunDirectory(run_dir).read_metrics(warn)
    except (ValueError, RecursionError) as e:  # not JSONDecodeError: read_metrics skips those
        raise UserError(f"RUN_DIR metrics.jsonl line {_unreadable_line(path)}",
                        f"cannot be read ({_first_line(e)})", RECORD_FIX) from None
    return [check_record(r, f"metrics.jsonl iteration {r['iteration']}") for r in records]


def _unreadable_line(path: Path) -> int | str:
    for number_, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            continue
        except (ValueError, RecursionError):
            return number_
    return "?"


def _first_line(e: BaseException) -> str:
    text = (str(e).splitlines() or [type(e).__name__])[0]
    return text if len(text) <= 120 else text[:117] + "..."


# --- the run directory's files -------------------------------------------------------------------


def run_file(run_dir: Path, name: str) -> Path | None:
    """RUN_DIR/name when it exists, refused unless it resolves inside the run directory."""
    path = Path(run_dir) / name
    if not os.path.lexists(path):
        return None
    inside(run_dir, name, "RUN_DIR", name)
    return path


def sample_dir(run_dir: Path, name: str) -> Path | None:
    """RUN_DIR/samples/NAME if it holds a samples.jsonl, refused unless it lies inside the run directory."""
    folder = run_file(run_dir, f"samples/{name}")
    if folder is None or not folder.is_dir() or not os.path.lexists(folder / "samples.jsonl"):
        return None
    return folder


@dataclass
class Run:
    """A run directory's records, checked: what the report and the before/after pictures draw."""

    path: Path
    config_text: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    resolution: int | None = None


def read_config(run_dir: Path) -> tuple[str, dict[str, Any]]:
    """(text, fields) of RUN_DIR/config.yaml, read as the run reads it (config.read_saved_config: safe
    YAML, no Python objects) and the sections the report uses checked with the run's own models."""
    from pydantic import TypeAdapter, ValidationError

    path = run_file(run_dir, "config.yaml")
    if path is None:
        return "", {}
    field_ = "RUN_DIR config.yaml"
    if not path.is_file():
        raise UserError(field_, f"{path} is not a file", "restore the run's config.yaml")
    try:
        text = path.read_text(encoding="utf-8")
        data = read_saved_config(path)
    except UserError as e:
        raise UserError(field_, e.problem, "restore the run's config.yaml") from None
    except UnicodeDecodeError:
        raise UserError(field_, f"{path} is not UTF-8 text", "restore the run's config.yaml") from None
    except RecursionError:
        raise UserError(field_, f"{path} is nested too deep to read", "restore the run's config.yaml") from None
    if data is None:
        return text, {}
    if not isinstance(data, dict):
        raise UserError(field_, f"holds {_kind(data)}, not a mapping of config fields",
                        "restore the run's config.yaml")
    for section in CONFIG_SECTIONS:
        if section not in data:
            continue
        value = data[section]
        annotation = RunConfig.model_fields[section].annotation
        if section == "generation" and isinstance(value, dict):  # only its resolution is read here
            value = {"resolution": value["resolution"]} if "resolution" in value else {}
        try:
            TypeAdapter(annotation).validate_python(value)
        except ValidationError as e:
            raise _config_error(e, section, annotation) from None
        except UserError as e:
            raise UserError(f"{field_} {e.field}", e.problem, e.fix) from None
        except (ValueError, TypeError) as e:
            raise UserError(f"{field_} {section}", _first_line(e), "restore the run's config.yaml") from None
    return text, data


def _config_error(err, section: str, annotation: Any) -> UserError:
    """pydantic's many-line message as one line naming the field (as config.load_config does)."""
    first = err.errors()[0]
    loc = [section, *[str(p) for p in first["loc"]]]
    where = f"RUN_DIR config.yaml {'.'.join(loc)}"
    if first["type"] == "extra_forbidden":
        parent = _submodel(annotation)
        allowed = ", ".join(parent.model_fields) if parent is not None else "see raft-diffusion config-help"
        problem, fix = "unknown key", f"allowed keys here: {allowed}"
    elif first["type"] == "missing":
        problem, fix = "required field is missing", "restore the run's config.yaml"
    else:
        problem = " ".join(first["msg"].split()).rstrip(".") + f", got {_short(first.get('input'))}"
        fix = "restore the run's config.yaml, or fix the value; see raft-diffusion config-help"
    return UserError(where, problem, fix)


def read_run(run_dir: str | Path, warn: Callable[[str], None] | None = None) -> Run:
    """The run directory's config and metrics, checked (see the module's docstring)."""
    run_dir = Path(run_dir)
    text, config = read_config(run_dir)
    generation = config.get("generation")
    resolution = generation.get("resolution") if isinstance(generation, dict) else None
    return Run(run_dir, text, config, read_records(run_dir, warn), resolution if isinstance(resolution, int) else None)


# --- samples: rows and pictures ------------------------------------------------------------------


def rows(directory: Path) -> list[dict]:
    """The rows of `directory`/samples.jsonl, checked (none when it has no such file): each a JSON object
    with a prompt, and a file inside `directory` or a text; numbers are numbers; blank lines are skipped."""
    directory = Path(directory)
    path = directory / "samples.jsonl"
    label = _label(directory) + "/samples.jsonl"
    if not os.path.lexists(path):
        return []
    inside(directory, "samples.jsonl", "RUN_DIR", label)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(label, "is not UTF-8 text", RECORD_FIX) from None
    except IsADirectoryError:
        raise UserError(label, "is a directory, not a file", RECORD_FIX) from None
    out, kind = [], None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{label} line {n}"
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            raise UserError(where, "is not a JSON row", RECORD_FIX) from None
        out.append(check_row(row, directory, where))
        this = "file" if "file" in row else "text"
        if kind is not None and this != kind:
            raise UserError(where, f"has a {this} where the rows before it have a {kind}", RECORD_FIX)
        kind = this
    return out


def _label(directory: Path) -> str:
    """samples/NAME or samples/iter_NNNN/eval: how messages name a sample folder."""
    parts = Path(directory).parts
    if "samples" not in parts:
        return str(directory)
    return "/".join(parts[len(parts) - 1 - parts[::-1].index("samples"):])


class Row(dict):
    """A checked samples.jsonl row; `where` names it in messages (file and line)."""

    where: str = "samples.jsonl"


def check_row(row: Any, directory: Path, where: str) -> Row:
    """A samples.jsonl row (loop.sample_rows with the backend's file or text), checked."""
    if not isinstance(row, dict):
        raise UserError(where, f"is {_kind(row)}, not an object", RECORD_FIX)
    out = Row(row)
    out.where = where
    if not isinstance(row.get("prompt"), str):
        raise UserError(f"{where} prompt", "is missing" if "prompt" not in row else f"is {_kind(row['prompt'])}, "
                        "not a text", RECORD_FIX)
    if "file" in row:
        inside(directory, row["file"], where, "file")  # a name inside the folder, nothing else
    elif not isinstance(row.get("text"), str):
        raise UserError(where, "has neither a file nor a text" if "text" not in row else "text is not a text",
                        RECORD_FIX)
    # null: a sample no seed made (an expert's folder of pictures or texts)
    if row.get("seed") is not None and (isinstance(row["seed"], bool) or not isinstance(row["seed"], int)):
        raise UserError(f"{where} seed", f"{_short(row['seed'])} is not an integer", RECORD_FIX)
    if "reward" in row:
        out["reward"] = number(row["reward"], f"{where} reward")
    out["scores"] = _metrics(row.get("scores"), f"{where} scores")
    if not isinstance(row.get("selected", False), bool):
        raise UserError(f"{where} selected", f"{_short(row['selected'])} is not true or false", RECORD_FIX)
    out["selected"] = row.get("selected", False)
    return out


def picture(directory: Path, row: dict[str, Any], where: str | None = None, size: tuple[int, int] | None = None
            ) -> Image.Image:
    """The picture a row names, decoded by files.read_image (a bomb, a truncated file, a text-chunk bomb
    refused) and drawn again as 8-bit RGB: only pixels reach a page, never the file's own bytes. With
    `size`, another size is refused; a picture larger than MAX_SIDE always is."""
    where = where or getattr(row, "where", "samples.jsonl")
    path = inside(directory, row["file"], where, "file")
    shape = _header_size(path)
    if shape is not None and (max(shape) > MAX_SIDE or (size is not None and shape != tuple(size))):
        wanted = f"{size[0]}x{size[1]}" if size is not None else f"at most {MAX_SIDE}x{MAX_SIDE}"
        raise UserError(where, f"{row['file']} is {shape[0]}x{shape[1]}, not {wanted} as the run wrote it",
                        "restore the run's picture")
    array = read_image(path, where)
    pixels = (array.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _header_size(path: Path) -> tuple[int, int] | None:
    """The size a picture's header states (nothing decoded); None when PIL cannot tell (read_image says why)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                return image.size
    except Exception:  # noqa: BLE001 - read_image names what is wrong with it
        return None


def pictures(directory: Path, shown: list[dict[str, Any]], size: tuple[int, int] | None = None) -> list[Image.Image]:
    """The pictures of `shown` rows (report.rows), all of one size (the first one's, or `size`)."""
    out: list[Image.Image] = []
    for row in shown:
        out.append(picture(directory, row, size=size or (out[0].size if out else None)))
    return out


def thumbnail(image: Image.Image, side: int = TILE) -> Image.Image:
    if max(image.size) <= side:
        return image
    copy = image.copy()
    copy.thumbnail((side, side))
    return copy


# --- the before/after table and pictures ---------------------------------------------------------


def before_after(run_dir: str | Path) -> tuple[dict[str, float], dict[str, float]]:
    """Eval means of the base model and of the last evaluated iteration."""
    records = read_records(Path(run_dir))
    if not records:
        raise ValueError(f"{run_dir} has no metrics yet")
    before = records[0].get("eval_before", {})
    after = next((r["eval"] for r in reversed(records) if r.get("eval")), {})
    return before, after


def reference(run_dir: str | Path) -> tuple[int, dict[str, float]] | None:
    """(resolution, eval means) of the base model at a reference resolution, if the run has one."""
    path = run_file(Path(run_dir), "reference.json")
    if path is None or not path.is_file():
        return None
    where = "RUN_DIR reference.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):
        raise UserError(where, "is not JSON", RECORD_FIX) from None
    if not isinstance(data, dict) or isinstance(data.get("resolution"), bool) \
            or not isinstance(data.get("resolution"), int):
        raise UserError(where, "holds no resolution", RECORD_FIX)
    return data["resolution"], {k: v for k, v in _metrics(data.get("eval"), f"{where} eval").items()}


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
    found = sorted(p.parent.parent.name for p in (Path(run_dir) / "samples").glob("iter_*/eval/samples.jsonl"))
    for name in reversed(found):
        folder = sample_dir(Path(run_dir), f"{name}/eval")
        if folder is not None:
            return folder
    return None


def _eval_dirs(run_dir: Path) -> tuple[Path, Path]:
    base, last = sample_dir(run_dir, "base_eval"), last_eval_dir(run_dir)
    if base is None or last is None:
        raise ValueError(f"{run_dir} has no base and final evaluation samples")
    return base, last


def before_after_samples(run_dir: str | Path) -> Path:
    """The base model's eval samples beside the tuned model's: `before_after.png` for images,
    `before_after.md` for texts."""
    base, _ = _eval_dirs(Path(run_dir))
    first = rows(base)[:1]
    if not first:
        raise ValueError(f"{base} has no samples")
    return grid(run_dir) if "file" in first[0] else texts(run_dir)


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
        lines += [f"## {before['prompt']} (seed {before.get('seed', '?')})", ""]
        for title, row in (("before", before), ("after", after)):
            scores = ", ".join(f"{k} {v:.3f}" for k, v in row["scores"].items() if v is not None)
            lines += [f"**{title}** ({scores}): {_quote(before['prompt'] + row.get('text', ''))}", ""]
    out = run_dir / "before_after.md"
    write_text_atomically(out, "\n".join(lines))
    return out


def _quote(text: str) -> str:
    return " ".join(text.split())  # one paragraph: newlines would break the markdown


def grid(run_dir: str | Path, per_row: int = 8, max_rows: int = 4, scale: int = 2) -> Path:
    """`before_after.png`: base-model eval images above the tuned model's, same prompts and seeds."""
    out = Path(run_dir) / "before_after.png"
    image = grid_image(run_dir, per_row, max_rows, scale)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def grid_image(run_dir: str | Path, per_row: int = 8, max_rows: int = 4, scale: int = 2,
               resolution: int | None = None) -> Image.Image:
    """The before/after grid of `grid`, as an image: the base model's eval pictures and the tuned
    model's, row by row (same prompts and seeds), each checked (`picture`)."""
    run_dir = Path(run_dir)
    base, tuned = _eval_dirs(run_dir)
    base_rows, tuned_rows = rows(base), rows(tuned)
    shown = min(len(base_rows), len(tuned_rows), per_row * max_rows)
    if not shown:
        raise UserError(f"RUN_DIR {tuned.relative_to(run_dir)}", "holds no evaluation samples", RECORD_FIX)
    if "file" not in base_rows[0] or "file" not in tuned_rows[0]:
        raise UserError(f"RUN_DIR {tuned.relative_to(run_dir)}", "holds texts where the base model's "
                        "evaluation holds pictures", RECORD_FIX)
    size = (resolution, resolution) if resolution else None
    gap, label = 4, 14
    before = pictures(base, base_rows[:shown], size)
    after = pictures(tuned, tuned_rows[:shown], before[0].size)
    w, h = before[0].size
    if max(w, h) * scale > TILE:  # a large picture is drawn smaller, never the canvas many times its size
        scale = TILE / max(w, h)
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    pitch_x, pitch_y = round((w + gap) * scale), round((h + gap) * scale)
    n_rows = -(-shown // per_row)
    per_row = min(per_row, shown)  # no blank columns when there are fewer images than a row
    block_h = n_rows * pitch_y + label
    canvas = Image.new("RGB", (per_row * pitch_x, 2 * block_h), "white")
    draw = ImageDraw.Draw(canvas)
    for block, (title, images) in enumerate((("before", before), ("after", after))):
        top = block * block_h
        draw.text((2, top), title, fill="black")
        paste_grid(canvas, images, per_row, (pitch_x, pitch_y), origin=(0, top + label), size=(tw, th))
    return canvas
