"""kill -9 during iteration 2 of 3, then --resume: the same metrics and adapter as an uninterrupted run, for every objective.

The killed run is a process of its own (it is what kill -9 hits); the uninterrupted and the resumed
runs are `raft-diffusion train` called in this process, which saves a process start (the imports
alone take 12 s here) and computes on the same number of threads.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raft_diffusion.cli import main

from .conftest import REPO, TINY_CONFIG, deep_update, write_yaml
from .conftest import metrics_without_seconds as _metrics

CONFIG = deep_update(TINY_CONFIG, {
    "rewards": [{"name": "python:tests.rewards_for_tests:slow_jpeg"}],
    "raft": {"iterations": 3, "prompts_per_iteration": 2, "seed": 3},
    "training": {"learning_rate": 5e-3, "epochs": 2, "batch_size": 1, "gradient_accumulation_steps": 2},
    "eval": {"every": 1, "samples_per_prompt": 1},
})


# Every objective, with the EMA sampler where it has one: the EMA, the optimizer and the RNGs all
# come back from the checkpoint, so the resumed run is the uninterrupted one, byte for byte.
OBJECTIVES = {
    "raft-ema-anchor": {"ema_decay": 0.5, "anchor_weight": 1.0},
    "reward_weighted-ema-anchor": {"objective": "reward_weighted", "reward_weighted": {"beta": 0.5},
                                   "ema_decay": 0.5, "anchor_weight": 1.0,
                                   "epochs": 1},  # every sample: one pass is enough
    "negative_aware-ema": {"objective": "negative_aware", "ema_decay": 0.5},
    "raft-fp16": {"mixed_precision": "fp16"},  # the loss scaler's state comes back too
    "raft-replay": {"replay": 2, "replay_decay": 0.5},  # the replayed latents and encodings come back too
}
# The same on a flow-matching model (SD 3's architecture, LoRA on the transformer): its logit-normal
# sigmas come from the same training generator.
SD3 = {"model": {"path": "builtin:tiny-sd3"},
       "lora": {"target_modules": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out"]}}
FLUX = {"model": {"path": "builtin:tiny-flux"},
        "lora": {"target_modules": ["to_q", "to_k", "to_v", "add_q_proj", "to_add_out", "proj_mlp", "proj_out"]}}
RUNS = {**{name: {"training": training} for name, training in OBJECTIVES.items()},
        "sd3-reward_weighted-ema-anchor": {**SD3, "training": OBJECTIVES["reward_weighted-ema-anchor"]},
        "sd3-negative_aware-ema": {**SD3, "training": OBJECTIVES["negative_aware-ema"]},
        # FLUX.1-dev's: packed latents, the token-count shift and the guidance embedding
        "flux-reward_weighted-ema-anchor": {**FLUX, "training": OBJECTIVES["reward_weighted-ema-anchor"]},
        # SDXL (two text encoders, pooled embedding and size conditioning beside the latents)
        "sdxl-reward_weighted-ema-anchor": {"model": {"path": "builtin:tiny-sdxl"},
                                            "training": OBJECTIVES["reward_weighted-ema-anchor"]},
        # candidates of another model and of a samples folder beside the policy's (their seeds and
        # draws are functions of the run seed and the iteration)
        "experts": {"generation": {"experts": [{"model": "builtin:tiny-sd", "per_prompt": 1, "steps": 2},
                                               {"samples": "builtin:toy-monet-cats", "per_prompt": 2}]},
                    "training": {}}}


@pytest.mark.parametrize("objective", list(RUNS))
def test_resume_after_kill_matches_uninterrupted(tmp_path, objective):
    config = write_yaml(tmp_path / "config.yaml", deep_update(CONFIG, RUNS[objective]))
    straight = tmp_path / "straight"
    assert main(["train", str(config), "--output-dir", str(straight)]) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAFT_TEST_SLOW_REWARD": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "raft_diffusion", "train", str(config), "--output-dir", str(killed)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.is_file() and latest.read_text().strip() == "iter_0000"):
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(1.0)  # iteration 2 is now generating or in its 2-second reward call
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest.read_text().strip() == "iter_0000"
    assert not (killed / "final").exists()

    assert main(["train", str(config), "--output-dir", str(killed), "--resume"]) == 0
    assert _metrics(killed) == _metrics(straight)
    assert all(math.isfinite(r["train_loss"]) for r in _metrics(straight))
    a = load_file(str(killed / "final/pytorch_lora_weights.safetensors"))
    b = load_file(str(straight / "final/pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert (killed / "final/pytorch_lora_weights.safetensors").read_bytes() == \
        (straight / "final/pytorch_lora_weights.safetensors").read_bytes()
    if RUNS[objective]["training"].get("ema_decay"):
        assert (killed / "checkpoints/iter_0002/ema.safetensors").is_file()
        assert "EMA" in json.loads((killed / "run.json").read_text())["final"]
        # The saved adapter is the average, not the last trained weights.
        raw = load_file(str(straight / "checkpoints/iter_0002/adapter.safetensors"))
        prefix = "transformer." if objective.startswith(("sd3", "flux")) else "unet."
        assert len(a) == len(raw) and not all(
            torch.equal(a[k], raw[k.removeprefix(prefix)]) for k in a if k.removeprefix(prefix) in raw)
        assert any(k.removeprefix(prefix) in raw for k in a)
    # The final adapter loads whole in plain diffusers (PEFT underneath), whatever trained it.
    from raft_diffusion.config import load_config

    from .test_lora_roundtrip import _load_capturing_warnings
    from .test_run_directory import _fresh_pipeline

    from raft_diffusion.backends.families import family_of

    pipe = _fresh_pipeline(load_config(config))
    messages = _load_capturing_warnings(pipe, killed / "final")
    assert not [m for m in messages if "missing keys" in m or "unexpected keys" in m], messages
    assert getattr(pipe, family_of(pipe).denoiser).peft_config


def test_resume_refuses_a_changed_config(tmp_path, capfd):
    config = write_yaml(tmp_path / "config.yaml", deep_update(CONFIG, {"raft": {"iterations": 1}}))
    run = tmp_path / "run"
    assert main(["train", str(config), "--output-dir", str(run)]) == 0
    capfd.readouterr()
    assert main(["train", str(config), "--output-dir", str(run), "--resume", "--set", "raft.seed=9"]) == 2
    err = capfd.readouterr().err
    assert "raft.seed" in err and "Traceback" not in err
    assert main(["train", str(config), "--output-dir", str(run), "--resume", "--set", "raft.iterations=2"]) == 0
    assert [r["iteration"] for r in _metrics(run)] == [0, 1]
