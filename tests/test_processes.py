"""Past one process: shares, per-process randomness, sharded scoring, and 2-process CPU runs
(torchrun and `accelerate launch --multi_gpu` on a machine without CUDA, gloo) that are reproducible and resume exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from raft_diffusion.cli import main
from raft_diffusion.distributed import pad_to, share, training_generator
from raft_diffusion.seeds import rank_seed
from raft_diffusion.objectives import Targets
from raft_diffusion.protocols import Samples

from .conftest import REPO, TINY_CONFIG, deep_update, write_yaml
from .test_resume import _metrics


class FakeAccelerator:
    """What the sharding helpers read of an Accelerator."""

    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes = rank, world
        self.is_main_process = rank == 0


# --- the pieces, one process ------------------------------------------------------------------


@pytest.mark.parametrize("n,world", [(12, 2), (7, 2), (5, 3), (2, 2)])
def test_shares_cover_every_sample_once_in_order(n, world):
    shares = [share(n, world, r) for r in range(world)]
    assert [i for s in shares for i in s] == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_pad_to_repeats_at_weight_zero():
    assert pad_to([4, 7], 5) == ([4, 7, 4, 7, 4], [1.0, 1.0, 0.0, 0.0, 0.0])
    assert pad_to([3], 1) == ([3], [1.0])


def test_training_randomness_differs_by_process_and_process_0_keeps_the_run_seed():
    streams = [torch.randn(4, generator=training_generator(7, FakeAccelerator(r, 2))) for r in range(3)]
    assert torch.equal(streams[0], torch.randn(4, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(streams[0], streams[1]) and not torch.equal(streams[1], streams[2])
    assert rank_seed(7, 1, 3) != rank_seed(7, 1, 4)  # the training generator and the global RNGs differ too


def _samples(n: int, offset: int) -> Samples:
    return Samples(prompts=[f"p{offset + i}" for i in range(n)], seeds=list(range(offset, offset + n)),
                   outputs=torch.arange(offset, offset + n, dtype=torch.float32),
                   payload={"latents": torch.arange(offset, offset + n, dtype=torch.float32)})


@pytest.mark.parametrize("weights", [None, [0.5, 2.0, 1.5]])
def test_each_process_trains_on_what_it_holds_padded_at_weight_zero(weights):
    from raft_diffusion.distributed import training_samples

    n, chosen = 8, Targets([1, 2, 6], None if weights is None else np.array(weights), None)
    parts = []
    for rank in range(2):
        mine = share(n, 2, rank)
        local = _samples(len(mine), mine.start)
        parts.append(training_samples(local, chosen, n, FakeAccelerator(rank, 2)))
    assert len(parts[0]) == len(parts[1]) == 2  # lockstep: the larger share, 2 of the 3
    assert parts[0].seeds == [1, 2] and parts[1].seeds[0] == 6  # nothing moved between processes
    real = {s: float(w) for p in parts for s, w in zip(p.seeds, p.payload["weight"]) if w > 0}
    assert real == {1: 1.0, 2: 1.0, 6: 1.0} if weights is None else {1: 0.5, 2: 2.0, 6: 1.5}
    assert float(parts[1].payload["weight"][1]) == 0.0  # the repeat adds nothing


def test_a_process_holding_no_target_trains_on_zero_weight_repeats():
    from raft_diffusion.distributed import training_samples

    chosen = Targets([0, 1], None, np.array([1.0, 0.25]))
    second = training_samples(_samples(3, 3), chosen, 6, FakeAccelerator(1, 2))
    assert len(second) == 2 and second.payload["weight"].tolist() == [0.0, 0.0]
    first = training_samples(_samples(3, 0), chosen, 6, FakeAccelerator(0, 2))
    assert first.payload["optimality"].tolist() == [1.0, 0.25]


# --- two processes ---------------------------------------------------------------------------

CONFIG = deep_update(TINY_CONFIG, {
    "lora": {"dropout": 0.1},  # per-process dropout is part of what must come back on resume
    "rewards": [{"name": "python:tests.rewards_for_tests:spy_jpeg"}],
    "selection": {"strategy": "global", "fraction": 0.5},  # uneven shares of the selected samples
    "training": {"learning_rate": 5e-3, "batch_size": 1, "gradient_accumulation_steps": 2,
                 "caption_dropout": 0.2},
    "raft": {"iterations": 3, "prompts_per_iteration": 3, "seed": 5},
    "eval": {"every": 1, "samples_per_prompt": 1},
    "logging": {"report_to": ["tensorboard"]},  # process 0 alone writes the trackers
})
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# accelerate 1.15 has no --multi_cpu (its multi-CPU launch is mpirun's); --multi_gpu starts torchrun's processes,
# which run on the CPU here because there is no CUDA.
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _launch(launcher: list[str], config: Path, out: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, "-m", "raft_diffusion", "train", str(config), "--output-dir", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=_env(**env))


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (torchrun starts its workers in their own
    process groups, so killing its group would leave them running)."""
    import psutil

    parent = psutil.Process(pid)
    for p in [*parent.children(recursive=True), parent]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _lora(run: Path) -> bytes:
    return (run / "final/pytorch_lora_weights.safetensors").read_bytes()


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict[str, Path]:
    """The 3-iteration run of CONFIG on two processes, once by torchrun and once by `accelerate launch`,
    each with a spy on what every process scored (`spy-NAME/rank*.txt`)."""
    root = tmp_path_factory.mktemp("two-processes")
    config = write_yaml(root / "c.yaml", CONFIG)
    runs = {"config": config}
    for name, launcher in (("torchrun", TORCHRUN), ("accelerate", ACCELERATE)):
        spy = root / f"spy-{name}"
        spy.mkdir()
        done = _launch(launcher, config, root / name, RAFT_TEST_SPY=str(spy))
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("iter 1/3") == 1 and done.stdout.count("done:") == 1  # one process reports
        runs[name], runs[f"spy-{name}"] = root / name, spy
    return runs


# The launches are shared by the tests below: one worker makes them.
SHARED_LAUNCHES = pytest.mark.xdist_group("two-processes")


@SHARED_LAUNCHES
def test_two_processes_generate_the_same_samples_as_one(launched, tmp_path):
    config = write_yaml(tmp_path / "c.yaml", deep_update(CONFIG, {"raft": {"iterations": 1}}))
    assert main(["train", str(config), "--output-dir", str(tmp_path / "one")]) == 0
    two = launched["torchrun"]
    # Trackers: process 0 alone writes them, and the processes still finish together.
    (events,) = (two / "logs/raft-diffusion").glob("events.out.tfevents.*")
    assert b"train/reward_mean" in events.read_bytes() and b"eval/samples" in events.read_bytes()

    def rows(run, name):
        return [json.loads(x) for x in (run / f"samples/{name}/samples.jsonl").read_text().splitlines()]

    # Iteration 1 comes from the same base model: the same prompts, seeds, scores and selection, in order,
    # and every image file, whichever process wrote it.
    for name in ("iter_0000", "base_eval"):
        a, b = rows(tmp_path / "one", name), rows(two, name)
        assert [(r["prompt"], r["seed"], r["selected"], r["file"]) for r in a] == \
            [(r["prompt"], r["seed"], r["selected"], r["file"]) for r in b]
        # Batches of other sizes round float sums differently: a grey level here and there moves a JPEG's size.
        np.testing.assert_allclose([r["reward"] for r in a], [r["reward"] for r in b], rtol=1e-2)
        assert all((two / "samples" / name / r["file"]).is_file() for r in b)


@SHARED_LAUNCHES
def test_two_processes_score_only_their_share_and_run_reproducibly(launched):
    runs = {name: launched[name] for name in ("torchrun", "accelerate")}
    for run in runs.values():
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 3  # each line once

    # The spy: every call scored one process's share only, and together they scored everything once.
    # Per iteration: 9 samples (3 prompts x 3) -> 5 + 4; per evaluation: 4 prompts x 1 -> 2 + 2.
    calls = {r: [line.split("\t") for line in (launched["spy-torchrun"] / f"rank{r}.txt").read_text().splitlines()]
             for r in (0, 1)}
    assert [int(c[1]) for c in calls[0]] == [2] + [5, 2] * 3
    assert [int(c[1]) for c in calls[1]] == [2] + [4, 2] * 3
    assert all(c[0] == str(r) for r in (0, 1) for c in calls[r])

    # torchrun and accelerate launch: the same run, to the byte.
    assert _metrics(runs["torchrun"]) == _metrics(runs["accelerate"])
    assert _lora(runs["torchrun"]) == _lora(runs["accelerate"])

    # Each process's random streams are in the checkpoint, and they differ.
    from safetensors.torch import load_file

    ckpt = runs["torchrun"] / "checkpoints/iter_0002"
    rng = load_file(str(ckpt / "rng.safetensors"))
    assert not torch.equal(rng["train_generator"], rng["rank1/train_generator"])
    assert not torch.equal(rng["torch"], rng["rank1/torch"])
    state = json.loads((ckpt / "state.json").read_text())
    assert state["processes"] == 2 and set(state["rng_ranks"]) == {"1"}


@SHARED_LAUNCHES
def test_two_processes_resume_after_kill_like_an_uninterrupted_run(launched, tmp_path):
    config, straight = launched["config"], launched["torchrun"]  # the uninterrupted run
    killed = tmp_path / "killed"
    spy = tmp_path / "spy"
    spy.mkdir()
    proc = subprocess.Popen([*TORCHRUN, "-m", "raft_diffusion", "train", str(config), "--output-dir", str(killed)],
                            cwd=REPO, env=_env(RAFT_TEST_SLOW_REWARD="1", RAFT_TEST_SPY=str(spy)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.is_file() and latest.read_text().strip() == "iter_0000"):
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(1.5)  # iteration 2 is generating or in its 1-second reward call
    _kill_tree(proc.pid)  # the launcher and both processes, at once
    proc.wait()
    time.sleep(2)  # nothing of the run is left to write
    assert latest.read_text().strip() == "iter_0000" and not (killed / "final").exists()

    resumed = _launch(TORCHRUN, config, killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.count("resumed from") == 1 and "iteration 1" in resumed.stdout
    assert _metrics(killed) == _metrics(straight)
    assert _lora(killed) == _lora(straight)


@pytest.mark.parametrize("accumulate", [1, 7])
def test_a_two_process_step_equals_one_step_on_all_samples_weighted_as_one_batch(tmp_path, accumulate):
    """Uneven shares (4 + 3, the 3 padded at weight 0), per-sample weights, DDP's gradient average:
    the step is the one-process step on all 7 samples, whether in one micro-batch or accumulated."""
    results = {}
    for name, launcher in (("one", [sys.executable]), ("two", TORCHRUN)):
        out = tmp_path / f"{name}.pt"
        done = subprocess.run([*launcher, str(REPO / "tests/fine_tune_worker.py"), str(out), str(accumulate)],
                              cwd=REPO, capture_output=True, text=True, timeout=300, env=_env())
        assert done.returncode == 0, done.stderr[-2000:]
        results[name] = torch.load(out, weights_only=True)
    for key in ("weight", "bias"):
        torch.testing.assert_close(results["two"][key], results["one"][key], rtol=1e-5, atol=1e-6)
        assert not torch.equal(results["one"][key], results["one"]["start_" + key])  # the step moved them


@SHARED_LAUNCHES
def test_when_one_process_dies_the_survivor_says_how_to_resume(launched, tmp_path):
    """kill -9 of rank 1 alone: torchrun stops rank 0 with SIGTERM, and rank 0 prints our one line
    (not only the launcher's 40-line block); the run then resumes."""
    import psutil

    config = launched["config"]
    run = tmp_path / "run"
    proc = subprocess.Popen([*TORCHRUN, "-m", "raft_diffusion", "train", str(config), "--output-dir", str(run)],
                            cwd=REPO, env=_env(RAFT_TEST_SLOW_REWARD="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "checkpoints/latest").is_file():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert len(workers) == 1
    workers[0].send_signal(signal.SIGKILL)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("terminated")]
    assert len(ours) == 1 and "another process of this run stopped" in ours[0] and "--resume" in ours[0], err
    resumed = _launch(TORCHRUN, config, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_a_collective_that_finds_its_peer_gone_ends_in_the_same_one_line(tmp_path, capfd, monkeypatch):
    """The race of the test above: rank 0's gather sees rank 1's socket close before torchrun's SIGTERM
    arrives (gloo: 'Connection reset by peer'). It ends in our one line too, not a 40-line traceback."""
    import raft_diffusion.train as train_module

    from raft_diffusion.cli import main

    def lost(*args, **kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:49805: "
                           "Connection reset by peer")

    monkeypatch.setattr(train_module, "run_training", lost)
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = tmp_path / "c.yaml"
    config.write_text("backend: diffusion\nmodel: {path: builtin:tiny-sd}\nprompts: {train: [a cat]}\n"
                      "rewards: [{name: jpeg_compressibility}]\n")
    capfd.readouterr()
    assert main(["train", str(config)]) == 143
    err = capfd.readouterr().err
    assert err.startswith("terminated: another process of this run stopped") and "--resume" in err
    assert len(err.splitlines()) == 1
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: a RuntimeError is no lost peer, and not hidden
    with pytest.raises(RuntimeError, match="Connection reset"):
        main(["train", str(config)])
