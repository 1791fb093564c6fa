"""A run that the machine stops (issue 23): a full disk, SIGTERM, a reward that hangs, a stop after
the last checkpoint. Each ends with one line that says what to do, and --resume continues exactly."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from raft_diffusion.cli import main

from .conftest import FINISHED_RUN, REPO, TINY_CONFIG, copy_run, deep_update, write_yaml
from .conftest import metrics_without_seconds as _records
from .conftest import one_error_line as _one_error_line

RUN = deep_update(TINY_CONFIG, {"raft": {"iterations": 3}})


def _result(run: Path) -> tuple[list[dict], bytes]:
    return _records(run), (run / "final/pytorch_lora_weights.safetensors").read_bytes()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """(config path, the uninterrupted run's records and LoRA bytes)."""
    folder = tmp_path_factory.mktemp("straight")
    config = write_yaml(folder / "config.yaml", RUN)
    assert main(["train", str(config), "--output-dir", str(folder / "run")]) == 0
    return config, _result(folder / "run")


# --- a full disk -------------------------------------------------------------------------------


def test_a_full_disk_is_one_line_and_resume_is_exact(straight, tmp_path, capfd, monkeypatch):
    """The disk fills while the second checkpoint is written (injected ENOSPC, as safetensors raises it)."""
    import raft_diffusion.checkpoint as checkpoint

    config, expected = straight
    real, calls = checkpoint.save_file, []

    def save_file(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:  # iteration 1's adapter (each checkpoint saves adapter, then rng)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    run = tmp_path / "run"
    capfd.readouterr()
    assert main(["train", str(config), "--output-dir", str(run)]) == 1
    line = _one_error_line(capfd.readouterr().err)
    assert "checkpoints/iter_0001" in line and "the disk is full" in line and "--resume" in line, line
    assert not [p for p in run.rglob("*") if p.name.startswith(".tmp-")]  # nothing half-written stays
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert main(["train", str(config), "--output-dir", str(run), "--resume"]) == 0
    assert _result(run) == expected


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.parametrize("size", ["150k", "400k", "1500k"])  # samples, torch.save's state, an eval folder
def test_a_really_full_disk_on_a_small_tmpfs(straight, tmp_path, capfd, size):
    config, expected = straight
    disk = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    if not _mount_tmpfs(disk, size):
        pytest.skip("this machine does not let the tests mount a tmpfs (the injected case above still runs)")
    try:
        run = disk / "run"
        capfd.readouterr()
        assert main(["train", str(config), "--output-dir", str(run)]) == 1
        line = _one_error_line(capfd.readouterr().err)
        assert str(run) in line and "the disk is full" in line and "--resume" in line, line
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True, timeout=30)
        assert main(["train", str(config), "--output-dir", str(run), "--resume"]) == 0
        assert _result(run) == expected
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


# --- SIGTERM -----------------------------------------------------------------------------------


def test_sigterm_ends_a_run_as_ctrl_c_does(straight, tmp_path):
    config = write_yaml(tmp_path / "config.yaml",
                        deep_update(RUN, {"rewards": [{"name": "python:tests.rewards_for_tests:slow_jpeg"}]}))
    run = tmp_path / "run"
    # faulthandler: should the process die of a native abort (once, under load: -6), its stderr says where
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAFT_TEST_SLOW_REWARD": "2", "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "raft_diffusion", "train", str(config), "--output-dir", str(run)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "checkpoints/latest").is_file():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    err = proc.stderr.read()
    assert code == 143, err[-3000:]
    assert "terminated (SIGTERM); continue with --resume" in err and "Traceback" not in err, err
    assert main(["train", str(config), "--output-dir", str(run), "--resume"]) == 0
    # The same numbers as the run never stopped (slow_jpeg scores as jpeg_compressibility does).
    resumed, expected = _records(run), straight[1][0]
    assert [(r["iteration"], r["reward_mean"], r["train_loss"]) for r in resumed] == \
        [(r["iteration"], r["reward_mean"], r["train_loss"]) for r in expected]


# --- a reward that hangs -----------------------------------------------------------------------


def test_a_reward_that_hangs_is_dropped_after_its_timeout(tmp_path, caplog, monkeypatch):
    import json

    monkeypatch.setenv("RAFT_TEST_HANG", "4")
    config = write_yaml(tmp_path / "config.yaml", deep_update(RUN, {
        "prompts": {"train": ["a blue star", "a red square"]},
        "rewards": [{"name": "python:tests.rewards_for_tests:hangs_on_stars", "timeout": 0.3}],
        "raft": {"iterations": 1}, "eval": {"every": 0}}))
    run = tmp_path / "run"
    started = time.monotonic()
    assert main(["train", str(config), "--output-dir", str(run)]) == 0
    took = time.monotonic() - started
    record = _records(run)[0]
    assert record["n_dropped"] == 3  # the star's three candidates; the square's were scored
    rows = [json.loads(x) for x in (run / "samples/iter_0000/samples.jsonl").read_text().splitlines()]
    scored = {r["prompt"]: [] for r in rows}
    for r in rows:
        scored[r["prompt"]].append(r["reward"])
    assert all(v is None for v in scored["a blue star"]) and all(v is not None for v in scored["a red square"])
    assert "took longer than its timeout of 0.3 s" in caplog.text
    assert took < 60


def test_a_reward_timeout_must_be_positive(tmp_path, capfd):
    config = write_yaml(tmp_path / "config.yaml", deep_update(RUN, {
        "rewards": [{"name": "jpeg_compressibility", "timeout": -1}]}))
    assert main(["train", str(config), "--output-dir", str(tmp_path / "run")]) == 2
    assert "rewards.0.timeout" in _one_error_line(capfd.readouterr().err)
    assert not (tmp_path / "run").exists()


# --- a stop after the last checkpoint ----------------------------------------------------------


def test_resume_rewrites_a_report_older_than_the_metrics(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    report = run / "report.html"
    report.write_text("<html>the report of an earlier iteration</html>")
    old = (run / "metrics.jsonl").stat().st_mtime_ns - 10**9
    os.utime(report, ns=(old, old))
    config = write_yaml(tmp_path / "config.yaml", FINISHED_RUN)
    assert main(["train", str(config), "--output-dir", str(run), "--resume"]) == 0
    assert "earlier iteration" not in report.read_text() and "iteration 2" in report.read_text().lower()
