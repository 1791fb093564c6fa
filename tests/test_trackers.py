"""`logging.report_to`: TensorBoard event files written by a real run and read back offline."""

import io
import json

import numpy as np

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from raft_diffusion.config import RunConfig
from raft_diffusion.errors import UserError
from raft_diffusion.train import run_training
from raft_diffusion.trackers import check_installed

from .conftest import TINY_CONFIG, deep_update


def _events(run_dir):
    found = sorted((run_dir / "logs/raft-diffusion").glob("events.out.tfevents.*"))
    assert found, f"no event file under {run_dir / 'logs'}"
    acc = EventAccumulator(str(found[0].parent), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def _scalar(acc, tag):
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_tensorboard_gets_every_iteration_the_eval_grid_and_the_config(finished_run):
    run = finished_run  # FINISHED_RUN: 2 iterations, logging.report_to [tensorboard]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    acc = _events(run)
    # train/* at step it (the samples of the model after it rounds); eval/* at it + 1, the base at 0
    assert _scalar(acc, "train/reward_mean") == pytest.approx({r["iteration"]: r["reward_mean"] for r in records})
    assert _scalar(acc, "train/loss") == pytest.approx({r["iteration"] + 1: r["train_loss"] for r in records})
    evals = {0: records[0]["eval_before"]["reward"], **{r["iteration"] + 1: r["eval"]["reward"]
                                                           for r in records}}
    assert _scalar(acc, "eval/reward") == pytest.approx(evals)
    images = acc.Images("eval/samples")
    assert [e.step for e in images] == [0, 1, 2]
    last = run / "samples/iter_0001/eval"
    n = len((last / "samples.jsonl").read_text().splitlines())  # 4 prompts x 2 samples
    assert n == 8 and (images[-1].width, images[-1].height) == (n * 64 + (n - 1) * 2, 64)  # one row, 2 px apart
    grid = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    for i, row in enumerate(json.loads(x) for x in (last / "samples.jsonl").read_text().splitlines()):
        assert (grid[:, i * 66:i * 66 + 64] == np.asarray(Image.open(last / row["file"]).convert("RGB"))).all()
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "jpeg_compressibility" in config_text and "report_to" in config_text


def test_a_text_run_sends_its_eval_texts_as_a_table(text_config, tmp_path):
    config = text_config(raft={"iterations": 1}, logging={"report_to": ["tensorboard"]})
    run_training(config, log=lambda _: None)
    acc = _events(tmp_path / "run")
    tables = acc.Tensors("eval/samples/text_summary")
    assert [e.step for e in tables] == [0, 1]
    table = tables[-1].tensor_proto.string_val[0].decode()
    rows = [json.loads(x) for x in (tmp_path / "run/samples/iter_0000/eval/samples.jsonl").read_text().splitlines()]
    assert table.splitlines()[0].startswith("| prompt | seed | text | reward |")
    assert len(table.splitlines()) == 2 + len(rows)
    assert " ".join(rows[0]["text"].split()).replace("|", "\\|") in table


def test_an_unknown_tracker_is_a_config_error():
    with pytest.raises(ValueError, match="unknown tracker 'tensorbored'"):
        RunConfig.model_validate(deep_update(TINY_CONFIG, {"logging": {"report_to": ["tensorbored"]}}))


def test_a_tracker_that_is_not_installed_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [])
    config = RunConfig.model_validate(deep_update(TINY_CONFIG, {"logging": {"report_to": ["wandb"]},
                                                               "output_dir": str(tmp_path / "run")}))
    with pytest.raises(UserError, match="pip install wandb"):
        check_installed(config)
    with pytest.raises(UserError):
        run_training(config, log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_wandb_offline_keeps_the_eval_grids_beside_the_run(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # what the README tells users without an account
    monkeypatch.setenv("WANDB_SILENT", "true")
    warnings = []
    run_training(tiny_config(raft={"iterations": 2}, logging={"report_to": ["wandb"]}), log=warnings.append)
    assert not [w for w in warnings if "trackers missed" in w]
    (offline,) = (tmp_path / "run/logs/wandb").glob("offline-run-*")
    grids = {int(p.name.split("_")[1]): p for p in (offline / "files/media/images/eval").glob("samples_*.png")}
    assert sorted(grids) == [0, 1, 2]  # the base model's evaluation, then one per iteration
    base = tmp_path / "run/samples/base_eval"
    first = json.loads((base / "samples.jsonl").read_text().splitlines()[0])
    assert (np.asarray(Image.open(grids[0]).convert("RGB"))[:, :64]
            == np.asarray(Image.open(base / first["file"]).convert("RGB"))).all()
    assert b"train/reward_mean" in next(offline.glob("run-*.wandb")).read_bytes()
