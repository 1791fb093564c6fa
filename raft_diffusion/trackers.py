"""Experiment trackers (TensorBoard, Weights & Biases, ...) through accelerate: `logging.report_to`.

What goes where, with `step` = the fine-tuning rounds the model behind the numbers has had:
- `train/*` at step `it`: the rewards of iteration `it`'s samples (drawn from the model after `it`
  rounds), how many were selected and dropped;
- `train/loss` and `seconds/*` at step `it + 1`: the round that iteration made;
- `eval/*` at step `it + 1` (the base model's at step 0): the mean reward, every judge and backend
  metric, plus the eval samples: a grid image (diffusion) or a table of texts (text).

metrics.jsonl stays the record; the trackers are a view of it. Only the main process logs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .config import RunConfig, config_to_yaml
from .errors import UserError
from .images import grid as image_grid
from .report import pictures as _pictures
from .report import rows as _rows

# accelerate's tracker name -> the package that provides it
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet-ml", "aim": "aim",
            "mlflow": "mlflow", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
            "trackio": "trackio"}
MAX_TEXT_ROWS = 64  # eval texts sent per evaluation
GRID_IMAGES = 32  # eval images in the tracker's grid (8 a row)


def check_installed(config: RunConfig) -> None:
    """Refuse, before anything is written, a tracker whose package is missing (accelerate would drop
    it with a warning and the run would log nowhere)."""
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for name in config.logging.report_to:
        if name not in available:
            raise UserError("config logging.report_to", f"tracker {name} is not installed",
                            f"pip install {PACKAGES.get(name, name)}, or remove it from logging.report_to")


def accelerator_options(config: RunConfig) -> dict[str, Any]:
    """Accelerator(...) keywords: the trackers and their directory, RUN_DIR/logs."""
    if not config.logging.report_to:
        return {}
    from accelerate.utils import ProjectConfiguration

    out = Path(config.output_dir)
    return {"log_with": list(config.logging.report_to),
            "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs"))}


def start(accelerator, config: RunConfig) -> None:
    """Open the trackers (main process): the project, the run's name and its config."""
    if not config.logging.report_to:
        return
    out = Path(config.output_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers(config.logging.project, init_kwargs={
        "wandb": {"name": out.resolve().name, "dir": str(out / "logs")}})
    if not accelerator.is_main_process:
        return
    flat = flatten(json.loads(config.model_dump_json()))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":  # its hparams would start a second run: the config as text instead
            tracker.writer.add_text("config", "```yaml\n" + config_to_yaml(config) + "```", 0)
        else:
            tracker.store_init_configuration(flat)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and None become text (what every tracker's config takes)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    if value is None or isinstance(value, (list, tuple)):
        return {key: json.dumps(value)}
    return {key: value}


def log_iteration(accelerator, run_dir: Path, record: dict[str, Any], warn: Callable[[str], None] = print) -> None:
    """Send one metrics.jsonl record (and its eval samples) to the trackers. A tracker that fails
    (a full disk, a lost connection) is reported and the run goes on: metrics.jsonl has it all."""
    if not accelerator.trackers or not accelerator.is_main_process:
        return
    try:
        _log_iteration(accelerator, run_dir, record)
    except Exception as e:  # noqa: BLE001
        warn(f"warning: trackers missed iteration {record['iteration']} ({type(e).__name__}: "
             f"{(str(e).splitlines() or [''])[0]})")


def _log_iteration(accelerator, run_dir: Path, record: dict[str, Any]) -> None:
    it = record["iteration"]
    if "eval_before" in record:
        _log_eval(accelerator, run_dir / "samples/base_eval", record["eval_before"], 0)
    train = {"reward_mean": record.get("reward_mean"), "reward_std": record.get("reward_std"),
             "reward_selected_mean": record.get("reward_selected_mean"),
             **{f"rewards/{k}": v for k, v in record.get("rewards", {}).items()},
             "n_selected": record.get("n_selected"), "n_dropped": record.get("n_dropped")}
    if len(record.get("sources") or {}) > 1:  # with experts: each source's selections
        train.update({f"selected/{k}": v["selected"] for k, v in record["sources"].items()})
    accelerator.log(_scalars("train/", train), step=it)
    done = {"train/loss": record.get("train_loss"), **{f"seconds/{k}": v for k, v in record["seconds"].items()}}
    accelerator.log(_scalars("", done), step=it + 1)
    if record.get("eval"):
        _log_eval(accelerator, run_dir / f"samples/iter_{it:04d}/eval", record["eval"], it + 1)


def _scalars(prefix: str, values: dict[str, Any]) -> dict[str, float]:
    return {prefix + k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and np.isfinite(v)}


def _log_eval(accelerator, directory: Path, evaluation: dict[str, Any], step: int) -> None:
    accelerator.log(_scalars("eval/", evaluation), step=step)
    rows = _rows(directory)
    if not rows:
        return
    if "file" in rows[0]:
        # decoded and checked as the report does: a file inside the folder, a picture PIL reads whole
        grid = image_grid(_pictures(directory, rows[:GRID_IMAGES]))
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("eval/samples", np.asarray(grid), step, dataformats="HWC")
                tracker.writer.flush()
            elif hasattr(tracker, "log_images"):
                tracker.log_images({"eval/samples": [grid]}, step=step)
    else:
        scores = list(rows[0].get("scores", {}))
        columns = ["prompt", "seed", "text", "reward", *scores]
        data = [[r["prompt"], r.get("seed"), r.get("text", ""), r.get("reward"), *(r["scores"].get(k) for k in scores)]
                for r in rows[:MAX_TEXT_ROWS]]
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_text("eval/samples", _markdown(columns, data), step)
                tracker.writer.flush()
            elif hasattr(tracker, "log_table"):
                tracker.log_table("eval/samples", columns=columns, data=data, step=step)


def _markdown(columns: list[str], data: list[list[Any]]) -> str:
    def cell(x: Any) -> str:
        text = f"{x:.4g}" if isinstance(x, float) else str(x)
        return " ".join(text.split()).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in data]
    return "\n".join(lines)


def end(accelerator) -> None:
    """Close the trackers (flush TensorBoard, finish the W&B run). Not accelerator.end_training(): that
    also destroys the process group, which a demo's `after` and the other processes may still need."""
    for tracker in accelerator.trackers:
        try:
            tracker.finish()
        except Exception as e:  # noqa: BLE001 - the run's own results are written; say what the tracker lost
            print(f"warning: tracker {tracker.name} did not close ({type(e).__name__}: "
                  f"{(str(e).splitlines() or [''])[0]})", file=sys.stderr)
    accelerator.trackers = []
