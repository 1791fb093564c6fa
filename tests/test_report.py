"""The before/after table and grid of a run directory."""

import json

from PIL import Image

from raft_diffusion import report

from .conftest import copy_run


def test_table_and_grid_compare_base_and_last_evaluation(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")  # the grid is written into the run directory
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    before, after = report.before_after(run)
    assert before == metrics[0]["eval_before"] and after == metrics[-1]["eval"]
    text = report.table(run)
    assert text.splitlines()[0].split() == ["metric", "before", "after", "change"]
    assert f"{before['reward']:9.4f}".strip() in text and f"{after['reward'] - before['reward']:+9.4f}".strip() in text
    path = report.grid(run, per_row=4)
    image = Image.open(path)
    n = 4 * 2  # eval prompts x samples per prompt
    assert path == run / "before_after.png"
    assert image.size[0] == 4 * (64 + 4) * 2 and image.size[1] > 2 * (n // 4) * 64 * 2


def test_table_adds_the_reference_column_when_the_run_has_one(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    (run / "reference.json").write_text(json.dumps({"resolution": 64, "eval": {"reward": -1.5}}))
    lines = report.table(run).splitlines()
    assert lines[0].split()[-1] == "base@64px"
    assert lines[1].split()[0] == "reward" and lines[1].split()[-1] == "-1.5000"


def test_iteration_line_shows_raw_reward_means_when_the_sum_hides_them():
    from raft_diffusion.loop import summary

    record = {"iteration": 0, "reward_mean": 0.0, "reward_selected_mean": 2.8, "n_dropped": 0, "train_loss": 0.2,
              "eval": {}, "seconds": {"generate": 1.0}, "rewards": {"aesthetic": 3.2, "clip": 31.0}}
    assert "reward 0.0000 (aesthetic 3.2000, clip 31.0000)" in summary(record, 10)
    record["rewards"] = {"jpeg_compressibility": 0.0}  # one unnormalised reward: the sum says it all
    assert "reward 0.0000  selected" in summary(record, 10)
