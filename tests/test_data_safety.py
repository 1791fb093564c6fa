"""A run never loses a user's data and never reports success when it is broken (issue 10).

Each test is the repro of a defect found by probing the CLI: output directories holding other
files, two runs in one directory, non-finite training, corrupt checkpoints, failing rewards.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from raft_diffusion.cli import main

from .conftest import REPO, TINY_CONFIG, deep_update, write_yaml
from .conftest import metrics_without_seconds as _metrics
from .conftest import one_error_line as _one_error_line

QUICK = deep_update(TINY_CONFIG, {"raft": {"iterations": 1}, "eval": {"every": 0}})


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _config(tmp_path, **overrides) -> Path:
    return write_yaml(tmp_path / "config.yaml", deep_update(QUICK, overrides))


# --- 1. output directories: only a run's own files are ever removed ------------------------------


def test_demo_refuses_a_directory_holding_user_files_and_leaves_them(tmp_path, capfd):
    target = tmp_path / "x"
    target.mkdir()
    (target / "thesis.txt").write_text("precious")
    assert main(["demo", "tiny", "--output-dir", str(target), "--set", "raft.iterations=1"]) == 2
    assert "thesis.txt" in _one_error_line(capfd.readouterr().err)
    assert _tree(target) == ["thesis.txt"] and (target / "thesis.txt").read_text() == "precious"
    # --overwrite does not make foreign files fair game either.
    assert main(["demo", "tiny", "--output-dir", str(target), "--overwrite", "--set", "raft.iterations=1"]) == 2
    assert _tree(target) == ["thesis.txt"]


def test_demo_replaces_its_own_earlier_run_but_not_another_run(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fast = ["--set", "raft.iterations=1", "--set", "raft.prompts_per_iteration=1", "--set", "training.epochs=1"]
    # --set output_dir is honoured (it used to be ignored for runs/demo-NAME).
    assert main(["demo", "tiny", *fast, "--set", f"output_dir={tmp_path / 'mine'}"]) == 0
    assert json.loads((tmp_path / "mine/run.json").read_text())["command"] == "demo tiny"
    assert not (tmp_path / "runs").exists()
    assert main(["demo", "tiny", *fast, "--output-dir", str(tmp_path / "mine")]) == 0  # its own run: replaced
    assert len(_metrics(tmp_path / "mine")) == 1

    trained = tmp_path / "trained"
    assert main(["train", str(_config(tmp_path)), "--output-dir", str(trained)]) == 0
    capfd.readouterr()
    before = {p: p.stat().st_mtime_ns for p in trained.rglob("*")}
    assert main(["demo", "tiny", *fast, "--output-dir", str(trained)]) == 2
    assert "already holds a run" in _one_error_line(capfd.readouterr().err)
    assert {p: p.stat().st_mtime_ns for p in trained.rglob("*")} == before


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under root: a file's bytes, a link's target, a folder's name."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        out[key] = ("-> " + os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
    return out


@pytest.mark.parametrize("flag", ["--overwrite", "--resume", None])
def test_another_projects_layout_is_not_taken_for_a_run(tmp_path, capfd, flag):
    # Any training project's layout: names a run also writes, but no run.json of ours.
    other = tmp_path / "project"
    (other / "checkpoints").mkdir(parents=True)
    (other / "logs").mkdir()
    (other / "config.yaml").write_text("model: resnet50\n")
    (other / "checkpoints/epoch_89.ckpt").write_bytes(b"weights")
    (other / "logs/events.out").write_bytes(b"events")
    before = _snapshot(other)
    assert main(["train", str(_config(tmp_path)), "--output-dir", str(other), *([flag] if flag else [])]) == 2
    assert "output_dir" in _one_error_line(capfd.readouterr().err) or flag == "--resume"
    assert _snapshot(other) == before


def test_a_run_without_its_run_json_is_not_overwritten(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fast = ["--set", "raft.iterations=1", "--set", "raft.prompts_per_iteration=1", "--set", "training.epochs=1"]
    assert main(["demo", "tiny", *fast]) == 0
    run = tmp_path / "runs/demo-tiny"
    (run / "run.json").write_text(json.dumps({"command": "demo tiny"}))  # not our record: no raft_diffusion key
    before = _snapshot(run)
    capfd.readouterr()
    for args in (["demo", "tiny", *fast], ["demo", "tiny", *fast, "--overwrite"]):
        assert main(args) == 2
        assert "run.json" in _one_error_line(capfd.readouterr().err)
        assert _snapshot(run) == before


def test_overwrite_keeps_what_a_user_put_inside_a_run_and_follows_no_link(tmp_path, capfd):
    config = _config(tmp_path, eval={"every": 1, "samples_per_prompt": 1})
    run = tmp_path / "run"
    assert main(["train", str(config), "--output-dir", str(run)]) == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "0000.png").write_bytes(b"not the run's")
    mine = {"samples/my_picks.txt": b"0003 0007", "final/README.md": b"# my notes",
            "checkpoints/iter_0000/notes.txt": b"lr was fine", "samples/iter_0000/eval/why.txt": b"look"}
    for name, data in mine.items():
        (run / name).write_bytes(data)
    (run / "samples/iter_0000/link.png").symlink_to(outside / "0000.png")
    (run / "samples/linked").symlink_to(outside, target_is_directory=True)
    capfd.readouterr()
    assert main(["train", str(config), "--output-dir", str(run), "--overwrite"]) == 0
    err = capfd.readouterr().err
    assert "kept 6 file(s)" in err and "no run writes" in err, err
    for name, data in mine.items():
        assert (run / name).read_bytes() == data, name
    assert (run / "samples/iter_0000/link.png").is_symlink() and (run / "samples/linked").is_symlink()
    assert (outside / "0000.png").read_bytes() == b"not the run's"
    # What the run writes was replaced: the new run's samples and adapter are there, the old ones gone.
    assert [r["iteration"] for r in _metrics(run)] == [0]
    assert (run / "final/pytorch_lora_weights.safetensors").is_file()
    assert (run / "samples/iter_0000/samples.jsonl").is_file() and (run / "samples/iter_0000/0000.png").is_file()


def test_resume_refuses_a_foreign_file_at_the_top_and_keeps_one_in_final(tmp_path, capfd):
    config = _config(tmp_path)
    run = tmp_path / "run"
    assert main(["train", str(config), "--output-dir", str(run)]) == 0
    (run / "notes.txt").write_text("mine")
    capfd.readouterr()
    assert main(["train", str(config), "--output-dir", str(run), "--resume", "--set", "raft.iterations=2"]) == 2
    assert "notes.txt" in _one_error_line(capfd.readouterr().err)
    assert [r["iteration"] for r in _metrics(run)] == [0]
    (run / "notes.txt").unlink()
    (run / "final/README.md").write_text("# my notes")
    old = (run / "final/pytorch_lora_weights.safetensors").read_bytes()
    assert main(["train", str(config), "--output-dir", str(run), "--resume", "--set", "raft.iterations=2"]) == 0
    assert [r["iteration"] for r in _metrics(run)] == [0, 1]
    assert (run / "final/README.md").read_text() == "# my notes"  # carried over when final/ was replaced
    assert (run / "final/pytorch_lora_weights.safetensors").read_bytes() != old


def test_overwrite_removes_only_what_a_run_writes(tmp_path, capfd):
    config = _config(tmp_path)
    run = tmp_path / "run"
    assert main(["train", str(config), "--output-dir", str(run)]) == 0
    (run / "notes.txt").write_text("mine")
    capfd.readouterr()
    assert main(["train", str(config), "--output-dir", str(run), "--overwrite"]) == 2
    assert "notes.txt" in _one_error_line(capfd.readouterr().err)
    assert (run / "notes.txt").read_text() == "mine" and (run / "final").is_dir()
    (run / "notes.txt").unlink()
    (run / "before_after.png").write_bytes(b"an old grid")  # a run's own file: replaced
    assert main(["train", str(config), "--output-dir", str(run), "--overwrite"]) == 0
    assert not (run / "before_after.png").exists() and [r["iteration"] for r in _metrics(run)] == [0]


@pytest.mark.parametrize("flag", ["--resume", "--overwrite", None])
def test_a_directory_that_holds_no_run_is_never_used(tmp_path, capfd, flag):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "cat.jpg").write_bytes(b"\xff\xd8")
    assert main(["train", str(_config(tmp_path)), "--output-dir", str(target), *([flag] if flag else [])]) == 2
    assert "cat.jpg" in _one_error_line(capfd.readouterr().err)
    assert _tree(target) == ["cat.jpg"]


# --- 2. one run per directory: an atomic lock taken before anything is read or written ---------


def test_two_runs_started_together_in_one_directory(tmp_path):
    config = _config(tmp_path, raft={"iterations": 2})
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "raft_diffusion", "train", str(config), "--output-dir", str(run)]
    procs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "in use by running process" in refused or "already holds a run" in refused
    assert [r["iteration"] for r in _metrics(run)] == [0, 1]


def test_a_held_lock_refuses_and_a_dead_runs_lock_file_does_not(tmp_path, capfd):
    import fcntl

    config = _config(tmp_path)
    run = tmp_path / "run"
    assert main(["train", str(config), "--output-dir", str(run)]) == 0
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live run holds it
    capfd.readouterr()
    try:
        assert main(["train", str(config), "--output-dir", str(run), "--resume", "--set", "raft.iterations=2"]) == 2
        assert "in use" in _one_error_line(capfd.readouterr().err)
    finally:
        os.close(fd)
    # A lock file left by a killed run, naming a pid that now belongs to someone else, is no lock.
    (run / ".lock").write_text(str(os.getppid()))
    assert main(["train", str(config), "--output-dir", str(run), "--resume", "--set", "raft.iterations=2"]) == 0
    assert [r["iteration"] for r in _metrics(run)] == [0, 1]


# --- 3. non-finite values stop the run before a checkpoint or final/ is written ---------------


@pytest.mark.parametrize("setting", ["training.learning_rate=inf", "generation.guidance_scale=inf",
                                     "generation.guidance_scale=.nan", "rewards.0.weight=.nan"])
def test_non_finite_settings_are_refused(tmp_path, capfd, setting):
    assert main(["train", str(_config(tmp_path)), "--output-dir", str(tmp_path / "run"), "--set", setting]) == 2
    assert setting.split("=")[0].split(".")[-1] in _one_error_line(capfd.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_diverging_training_stops_before_saving_it(tmp_path, capfd):
    config = _config(tmp_path, raft={"iterations": 3}, training={"learning_rate": 1.0e30, "epochs": 2})
    run = tmp_path / "run"
    assert main(["train", str(config), "--output-dir", str(run)]) == 1
    line = _one_error_line(capfd.readouterr().err)
    assert "training.learning_rate" in line and ("diverged" in line or "non-finite" in line)
    assert not (run / "final").exists()
    for checkpoint in (run / "checkpoints").glob("iter_*"):
        assert all(t.isfinite().all() for t in load_file(str(checkpoint / "adapter.safetensors")).values())


# --- 5. resume falls back to the newest intact checkpoint --------------------------------------


@pytest.fixture(scope="module")
def two_iterations(tmp_path_factory):
    """A finished 2-iteration run (3 checkpoints kept) and a straight 3-iteration run to compare with."""
    root = tmp_path_factory.mktemp("resume")
    config = write_yaml(root / "config.yaml", deep_update(QUICK, {"raft": {"iterations": 2},
                                                                  "checkpoint": {"keep_last": 3}}))
    assert main(["train", str(config), "--output-dir", str(root / "two")]) == 0
    assert main(["train", str(config), "--output-dir", str(root / "three"), "--set", "raft.iterations=3"]) == 0
    return root


def _corrupt(run: Path, case: str) -> None:
    checkpoints = run / "checkpoints"
    if case == "latest_missing":
        (checkpoints / "latest").unlink()
    elif case == "state_missing":
        (checkpoints / "iter_0001/state.json").unlink()
    elif case == "adapter_truncated":
        data = (checkpoints / "iter_0001/adapter.safetensors").read_bytes()
        (checkpoints / "iter_0001/adapter.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "optimizer_truncated":
        data = (checkpoints / "iter_0001/training_state.pt").read_bytes()
        (checkpoints / "iter_0001/training_state.pt").write_bytes(data[:100])
    elif case == "rng_garbage":
        (checkpoints / "iter_0001/rng.safetensors").write_bytes(b"not safetensors")
    elif case == "metrics_line_garbled":
        lines = (run / "metrics.jsonl").read_text().splitlines()
        (run / "metrics.jsonl").write_text("\n".join([lines[0][:20], *lines[1:]]) + "\n")
    elif case == "stale_temporaries":
        (checkpoints / ".tmp-iter_0002-4242").mkdir()
        (checkpoints / ".tmp-iter_0002-4242/adapter.safetensors").write_bytes(b"half")
        (run / ".tmp-final-4242").mkdir()


@pytest.mark.parametrize("case", ["latest_missing", "state_missing", "adapter_truncated", "optimizer_truncated",
                                  "rng_garbage", "stale_temporaries"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(two_iterations, tmp_path, capfd, case):
    run = tmp_path / "run"
    shutil.copytree(two_iterations / "two", run)
    _corrupt(run, case)
    capfd.readouterr()
    config = two_iterations / "config.yaml"
    assert main(["train", str(config), "--output-dir", str(run), "--resume", "--set", "raft.iterations=3"]) == 0
    out, err = capfd.readouterr()
    warnings = [line for line in (out + err).splitlines() if line.startswith("warning: ")]
    if case == "stale_temporaries":
        assert not warnings and "resumed from" in out and "iter_0001" in out
        assert not list(run.glob(".tmp-*")) and not list((run / "checkpoints").glob(".tmp-*"))
    else:
        assert len(warnings) == 1 and ("iter_0000" in warnings[0] or "iter_0001" in warnings[0]), out + err
    # Whichever checkpoint it resumed from, the result is the uninterrupted run's, and every
    # checkpoint it did not replace is still there.
    assert _metrics(run) == _metrics(two_iterations / "three")
    assert (run / "final/pytorch_lora_weights.safetensors").read_bytes() == \
        (two_iterations / "three/final/pytorch_lora_weights.safetensors").read_bytes()
    assert (run / "checkpoints/iter_0002").is_dir() and (run / "checkpoints/iter_0000").is_dir()


def test_resume_with_no_intact_checkpoint_exits_2_naming_the_file(two_iterations, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(two_iterations / "two", run)
    for checkpoint in (run / "checkpoints").glob("iter_*"):
        (checkpoint / "adapter.safetensors").write_bytes(b"\0" * 10)
    before = _tree(run)
    capfd.readouterr()
    config = two_iterations / "config.yaml"
    assert main(["train", str(config), "--output-dir", str(run), "--resume", "--set", "raft.iterations=3"]) == 2
    assert "adapter.safetensors" in _one_error_line(capfd.readouterr().err)
    assert _tree(run) == before


def test_a_garbled_metrics_line_drops_only_itself(two_iterations, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(two_iterations / "two", run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(["{garbled", *lines]) + "\n")
    from raft_diffusion.run_dir import RunDirectory

    assert [r["iteration"] for r in RunDirectory(run).read_metrics()] == [0, 1]


# --- 6. failing rewards stop the run; metrics are strict JSON -----------------------------------


@pytest.mark.parametrize("reward,says", [("wrong_length", "returned 7 scores for 6"), ("strings", "str"),
                                         ("always_raises", "reward server is down"), ("always_nan", "not finite"),
                                         ("exits", "sys.exit(3)"), ("mostly_nan", "max_drop_fraction")])
def test_a_reward_that_fails_stops_the_run(tmp_path, capfd, reward, says):
    run = tmp_path / "run"
    config = _config(tmp_path, rewards=[{"name": f"python:tests.rewards_for_tests:{reward}"}])
    assert main(["train", str(config), "--output-dir", str(run)]) == 1
    line = _one_error_line(capfd.readouterr().err)
    assert says in line or (reward == "always_nan" and "non-finite" in line), line
    assert not (run / "final").exists() and not (run / "checkpoints").exists()


def test_a_column_of_scores_is_accepted(tmp_path):
    config = _config(tmp_path, rewards=[{"name": "python:tests.rewards_for_tests:column"}])
    assert main(["train", str(config), "--output-dir", str(tmp_path / "run")]) == 0
    assert _metrics(tmp_path / "run")[0]["n_dropped"] == 0


def test_the_oracle_refuses_a_prompt_it_cannot_judge_before_the_run(tmp_path, capfd):
    config = _config(tmp_path, rewards=[{"name": "oracle"}], prompts={"train": ["a photo of a dog"]})
    assert main(["train", str(config), "--output-dir", str(tmp_path / "run")]) == 2
    line = _one_error_line(capfd.readouterr().err)
    assert "prompts.train" in line and "a photo of a dog" in line
    assert not (tmp_path / "run").exists()


def test_metrics_are_strict_json_when_values_are_missing(tmp_path):
    # Every eval judge value is NaN (all dropped at evaluation) and the loss of an empty selection too.
    config = _config(tmp_path, eval={"every": 1, "samples_per_prompt": 1,
                                     "judges": [{"name": "python:tests.rewards_for_tests:always_nan",
                                                 "label": "always_nan"}]})
    assert main(["train", str(config), "--output-dir", str(tmp_path / "run")]) == 0

    def refuse(token):
        raise AssertionError(f"bare {token} in metrics.jsonl")

    text = (tmp_path / "run/metrics.jsonl").read_text()
    records = [json.loads(line, parse_constant=refuse) for line in text.splitlines()]
    assert records[0]["eval"]["always_nan"] is None
    for row in (tmp_path / "run/samples/iter_0000/eval/samples.jsonl").read_text().splitlines():
        json.loads(row, parse_constant=refuse)


# --- 7. nothing is written for a run that cannot start ------------------------------------------


@pytest.mark.parametrize("args,field", [
    (["--output-dir", ""], "--output-dir"),
    (["--set", "generation.resolution=100000"], "generation.resolution"),
    (["--set", "generation.resolution=4096", "--set", "raft.prompts_per_iteration=64",
      "--set", "generation.samples_per_prompt=16"], "generation.resolution"),
    (["--set", "raft.prompts_per_iteration=100000000"], "raft.prompts_per_iteration"),
])
def test_a_run_that_cannot_fit_or_has_no_directory_writes_nothing(tmp_path, capfd, monkeypatch, args, field):
    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path)
    before = _tree(tmp_path)
    argv = ["train", str(config), *args]
    if "--output-dir" not in args:
        argv += ["--output-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    assert field in _one_error_line(capfd.readouterr().err)
    assert _tree(tmp_path) == before


def test_interrupted_run_says_how_to_resume(tmp_path):
    config = _config(tmp_path, rewards=[{"name": "python:tests.rewards_for_tests:slow_jpeg"}],
                     raft={"iterations": 3})
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAFT_TEST_SLOW_REWARD": "2"}
    # A shell starts a background job with SIGINT ignored, and the child would inherit that (a suite
    # run as `make test &`): the run gets Ctrl-C's default, as in a terminal.
    proc = subprocess.Popen([sys.executable, "-m", "raft_diffusion", "train", str(config), "--output-dir", str(run)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.is_file():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert proc.wait(timeout=120) == 130
    assert "--resume" in proc.stderr.read()
    assert main(["train", str(config), "--output-dir", str(run), "--resume"]) == 0  # in this process
