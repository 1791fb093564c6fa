"""training.mixed_precision: autocast with float32 LoRA weights, and fp16's loss scaler in every checkpoint."""

import json

import pytest
import torch
from accelerate import Accelerator

from raft_diffusion.backends.diffusion import DiffusionBackend
from raft_diffusion.cli import main
from raft_diffusion.precision import Precision

from .conftest import TINY_CONFIG, deep_update, run_in_process, write_yaml


@pytest.mark.parametrize("mode,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_training_forward_runs_in_the_autocast_dtype_and_the_lora_stays_float32(tiny_config, mode, dtype):
    backend = DiffusionBackend(tiny_config(training={"mixed_precision": mode}), Accelerator(cpu=True))
    seen = []
    hook = backend.pipe.unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    samples = backend.generate(["a cat", "a dog"], [1, 2])
    seen.clear()  # generation is not autocast: only fine-tuning is
    before = [p.detach().clone() for p in backend.lora_params]
    loss = backend.train(samples, torch.Generator().manual_seed(0))
    hook.remove()
    assert seen and set(seen) == {dtype}
    assert all(p.dtype == torch.float32 for p in backend.lora_params)
    assert torch.isfinite(torch.tensor(loss))
    assert any(not torch.equal(a, b) for a, b in zip(before, backend.lora_params))
    state = backend.training_state()
    assert ("grad_scaler" in state) == (mode == "fp16")


def test_fp16_scaler_skips_an_overflowing_step_and_backs_off():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    precision = Precision("fp16", torch.device("cpu"))
    scale = precision.scaler.get_scale()
    precision.scale((weight * float("inf")).sum()).backward()
    precision.unscale(optimizer)
    precision.step(optimizer)
    assert torch.equal(weight.detach(), torch.ones(3))  # the step was skipped
    assert precision.scaler.get_scale() == scale / 2
    restored = Precision("fp16", torch.device("cpu"))
    restored.load_state_dict(precision.state_dict())
    assert restored.scaler.get_scale() == scale / 2


def test_a_float16_model_trains_with_fp16_on_the_cpu_and_the_checkpoint_keeps_the_scaler(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", deep_update(TINY_CONFIG, {
        "model": {"dtype": "float16"}, "training": {"mixed_precision": "fp16"}, "raft": {"iterations": 2}}))
    assert main(["train", str(config), "--output-dir", str(tmp_path / "run")]) == 0
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert all(r["train_loss"] is not None for r in records)
    state = torch.load(tmp_path / "run/checkpoints/iter_0001/training_state.pt", weights_only=True)
    assert state["grad_scaler"]["scale"] > 0 and state["grad_scaler"]["_growth_tracker"] > 0


def test_a_launcher_asking_for_other_precision_is_refused(tmp_path, capfd, monkeypatch):
    config = write_yaml(tmp_path / "c.yaml", TINY_CONFIG)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `accelerate launch --mixed_precision fp16` sets
    done = run_in_process(capfd, "train", str(config), "--output-dir", str(tmp_path / "run"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: config training.mixed_precision: is 'no' but the launcher asked for 'fp16' (set "
        "training.mixed_precision: fp16 (or --set training.mixed_precision=fp16), or launch without --mixed_precision)"]
    assert not (tmp_path / "run").exists()
