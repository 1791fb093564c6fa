"""The objective seam (issue 11, first part): what the backend trains on, and the base-model anchor."""

import json
import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from raft_diffusion.cli import main
from raft_diffusion.config import DiffusionTrainingConfig, TrainingConfig
from raft_diffusion.objectives import group_advantages, raft, reward_weighted
from raft_diffusion.protocols import Samples

def _demo_tiny(out):
    """`raft-diffusion demo tiny --set raft.iterations=2` in this process on one torch thread:
    per iteration (reward_mean, reward_selected_mean, train_loss), and the LoRA's bytes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["demo", "tiny", "--output-dir", str(out), "--set", "raft.iterations=2",
                     "--set", "training.objective=raft"]) == 0
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ([[r["reward_mean"], r["reward_selected_mean"], r["train_loss"]] for r in records],
            (out / "final/pytorch_lora_weights.safetensors").read_bytes())


def _demo_tiny_before_the_seam(out, monkeypatch, order=list):
    """`_demo_tiny` with the loop's step 4 as it was at commit 83d0e44: `backend.train(samples.select(chosen))`,
    the selection (put in `order`) and no weights."""
    import raft_diffusion.distributed as distributed
    import raft_diffusion.loop as loop

    with monkeypatch.context() as m:
        m.setattr(loop, "targets", lambda scores, groups, chosen, cfg: list(chosen))
        m.setattr(distributed, "training_samples",
                  lambda samples, chosen, n, accelerator: samples.select(order(chosen)))
        return _demo_tiny(out)


def test_raft_objective_reproduces_the_loop_from_before_the_seam(tmp_path, monkeypatch):
    """The `raft` objective trains exactly as the loop did before objectives existed (commit 83d0e44):
    that step is put back and run beside the seam, in the same process."""
    seam = _demo_tiny(tmp_path / "seam")
    before = _demo_tiny_before_the_seam(tmp_path / "before-seam", monkeypatch)
    assert seam[0] == before[0]
    assert seam[1] == before[1]
    # The comparison can fail: trained on the same samples in another order, the LoRA differs.
    reordered = _demo_tiny_before_the_seam(tmp_path / "reordered", monkeypatch,
                                           order=lambda chosen: sorted(chosen, reverse=True))
    assert reordered[1] != seam[1]


def test_raft_trains_on_the_selection_unweighted():
    chosen = raft(np.array([1.0, 3.0, 2.0, 0.5]), [0, 0, 1, 1], [2, 1], TrainingConfig())
    assert chosen.indices == [1, 2] and chosen.weights is None


def test_reward_weighted_weights_by_hand():
    scores = np.array([1.0, 2.0, 3.0, 5.0, 5.0, math.nan])
    groups = [0, 0, 0, 1, 1, 1]
    chosen = reward_weighted(scores, groups, [2, 3], TrainingConfig(objective="reward_weighted", reward_weighted={"beta": 0.5}))
    # Group 0: mean 2, population std sqrt(2/3): A = -/+1.2247; exp(A / 0.5) normalised to mean 1.
    a = 1 / math.sqrt(2 / 3)
    raw = [math.exp(-a / 0.5), 1.0, math.exp(a / 0.5)]
    expected = [3 * w / sum(raw) for w in raw] + [1.0, 1.0]  # group 1: equal scores, equal weights
    assert chosen.indices == [0, 1, 2, 3, 4]  # the dropped sample is never trained on
    np.testing.assert_allclose(chosen.weights, expected, rtol=1e-12)
    np.testing.assert_allclose(group_advantages(scores, groups)[:3], [-a, 0.0, a], rtol=1e-12)
    # Lower beta puts more of the group's weight on its best sample.
    sharper = reward_weighted(scores, groups, [], TrainingConfig(objective="reward_weighted", reward_weighted={"beta": 0.1}))
    assert sharper.weights[2] > chosen.weights[2] and sharper.weights[:3].sum() == pytest.approx(3.0)


def _diffusion_backend(tiny_config, **training):
    from raft_diffusion.backends.diffusion import DiffusionBackend

    torch.manual_seed(0)
    return DiffusionBackend(tiny_config(training={"learning_rate": 1e-2, "epochs": 2, "batch_size": 2, **training}),
                            Accelerator(cpu=True))


def _anchor_gap(backend) -> float:
    """The squared difference between the LoRA's and the base model's prediction on a fixed input."""
    g = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 4, 8, 8, generator=g)
    text = {k: v.repeat(2, *([1] * (v.ndim - 1))) for k, v in backend.empty_embeds.items()}
    t = torch.tensor([100, 500])
    with torch.no_grad():
        pred = backend.family.predict(backend._denoiser(), noisy, t, text)
    return float(((pred - backend._base_prediction(noisy, t, text)) ** 2).mean())


def test_diffusion_anchor_is_zero_at_start_and_positive_after_a_step(tiny_config):
    backend = _diffusion_backend(tiny_config, anchor_weight=1.0)
    assert _anchor_gap(backend) == 0.0
    samples = backend.generate(["a red square", "a blue star"], [1, 2])
    backend.train(samples, torch.Generator().manual_seed(0))
    assert _anchor_gap(backend) > 0.0
    # The anchor is part of the loss: with it, the same step costs more than without.
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    x0, text = samples.payload["latents"], {"prompt_embeds": samples.payload["prompt_embeds"]}
    with torch.no_grad():
        anchored = backend._loss(x0, text, g(), per_sample=True)
        backend.config.training.anchor_weight = 0.0
        plain = backend._loss(x0, text, g(), per_sample=True)
    assert (anchored > plain).all()


def test_weighted_diffusion_loss_is_the_weighted_mean_of_per_sample_losses(tiny_config):
    backend = _diffusion_backend(tiny_config)
    samples = backend.generate(["a red square", "a blue star", "a green heart"], [1, 2, 3])
    x0, text = samples.payload["latents"], {"prompt_embeds": samples.payload["prompt_embeds"]}
    with torch.no_grad():
        per = backend._loss(x0, text, torch.Generator().manual_seed(3), per_sample=True)
        whole = backend._loss(x0, text, torch.Generator().manual_seed(3))
    assert per.shape == (3,) and float(per.mean()) == pytest.approx(float(whole), rel=1e-5)
    # Weights are relative: the same weight on every sample is the unweighted step; a zero weight is not.
    def trained(weights):
        payload = dict(samples.payload)
        if weights is not None:
            payload["weight"] = torch.tensor(weights, dtype=torch.float64)
        backend = _diffusion_backend(tiny_config, batch_size=3, epochs=1)
        backend.train(Samples(samples.prompts, samples.seeds, samples.outputs, payload), torch.Generator().manual_seed(0))
        return backend.adapter_state()

    plain, uniform, skewed = trained(None), trained([3.0, 3.0, 3.0]), trained([1.0, 0.0, 1.0])
    for k in plain:
        torch.testing.assert_close(uniform[k], plain[k], rtol=1e-4, atol=1e-6)
    assert max(float((skewed[k] - plain[k]).abs().max()) for k in plain) > 1e-4


def test_text_anchor_is_zero_at_start_and_positive_after_a_step(text_config):
    from raft_diffusion.backends.text import TextBackend

    torch.manual_seed(0)
    backend = TextBackend(text_config(training={"learning_rate": 5e-2, "epochs": 2, "batch_size": 2,
                                                "anchor_weight": 1.0}), Accelerator(cpu=True))
    samples = backend.generate(["The movie was", "I think that"], [1, 2])
    p, r = samples.payload["prompt_ids"], samples.payload["response_ids"]

    def kl() -> float:
        with torch.no_grad():
            with_anchor = backend._per_sample_loss(p, r)
            backend.config.training.anchor_weight = 0.0
            without = backend._per_sample_loss(p, r)
            backend.config.training.anchor_weight = 1.0
        return float((with_anchor - without).sum())

    assert kl() == pytest.approx(0.0, abs=1e-6)
    backend.train(samples, torch.Generator().manual_seed(0))
    assert kl() > 1e-4


@pytest.mark.parametrize("backend_name", ["diffusion", "text"])
def test_reward_weighted_runs_end_to_end_with_the_anchor(tiny_config, text_config, backend_name, monkeypatch):
    import raft_diffusion.distributed as distributed
    from raft_diffusion.train import run_training

    trained = []
    make = distributed.training_samples
    monkeypatch.setattr(distributed, "training_samples", lambda *args: trained.append(make(*args)) or trained[-1])
    config = (tiny_config if backend_name == "diffusion" else text_config)(
        training={"objective": "reward_weighted", "reward_weighted": {"beta": 0.5}, "anchor_weight": 0.1,
                  "batch_size": 2},
        raft={"iterations": 1, "prompts_per_iteration": 2, "seed": 0})
    (record,) = run_training(config, log=lambda s: None)
    assert math.isfinite(record["train_loss"]) and record["n_selected"] == 2
    # Every valid candidate is trained on, not only the 2 selected, each group's weights averaging 1.
    (batch,) = trained
    assert len(batch) == record["n_generated"] - record["n_dropped"] == 6
    weights = batch.payload["weight"].numpy()
    assert np.mean(weights) == pytest.approx(1.0)
    if backend_name == "diffusion":  # (the random tiny LLaMA's texts all score 0 with VADER: equal weights)
        assert weights.std() > 0


@pytest.mark.parametrize("setting,field", [("training.objective=dpo", "training.objective"),
                                           ("training.reward_weighted.beta=0", "training.reward_weighted.beta"),
                                           ("training.anchor_weight=-1", "training.anchor_weight")])
def test_bad_objective_settings_exit_2(tmp_path, capfd, setting, field):
    from .conftest import TINY_CONFIG, write_yaml

    config = write_yaml(tmp_path / "config.yaml", TINY_CONFIG)
    assert main(["train", str(config), "--output-dir", str(tmp_path / "run"), "--set", setting]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0]
    assert not (tmp_path / "run").exists()


# --- EMA sampling ------------------------------------------------------------------------------


def test_ema_update_and_swap_by_hand():
    from raft_diffusion.ema import LoraEMA

    p = torch.nn.Parameter(torch.tensor([0.0, 2.0]))
    ema = LoraEMA([p], decay=0.75)
    with torch.no_grad():
        p.copy_(torch.tensor([4.0, 6.0]))
    ema.update()  # 0.75 * [0, 2] + 0.25 * [4, 6]
    assert ema.average[0].tolist() == [1.0, 3.0]
    with ema.applied():
        assert p.tolist() == [1.0, 3.0]
    assert p.tolist() == [4.0, 6.0]
    restored = LoraEMA([p], decay=0.75)
    restored.load_state(ema.state())
    assert restored.average[0].tolist() == [1.0, 3.0]


# --- negative_aware (DiffusionNFT) -----------------------------------------------------------------


def test_negative_aware_optimality_by_hand():
    from raft_diffusion.objectives import negative_aware

    scores = np.array([1.0, 2.0, 3.0, math.nan])
    chosen = negative_aware(scores, [0, 0, 0, 0], [], DiffusionTrainingConfig(
        objective="negative_aware", ema_decay=0.5, negative_aware={"advantage_clip": 1.0}))
    a = 1 / math.sqrt(2 / 3)  # |A| of the outer two, clipped at 1
    assert chosen.indices == [0, 1, 2]
    np.testing.assert_allclose(chosen.optimality, [0.5 - 0.5 * min(a, 1), 0.5, 0.5 + 0.5 * min(a, 1)])


def test_negative_aware_with_r_1_is_a_positive_loss_on_the_mixed_policy(tiny_config):
    backend = _diffusion_backend(tiny_config, objective="negative_aware", ema_decay=0.5,
                                 negative_aware={"beta": 0.3})
    from raft_diffusion.ema import LoraEMA

    ema = LoraEMA(backend.lora_params, 0.5)
    samples = backend.generate(["a red square", "a blue star"], [1, 2])
    backend.train(samples, torch.Generator().manual_seed(0))  # the LoRA moves away from its EMA (the start)
    pred, old, target = torch.randn(3, 2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(2)
    expected = (((0.7 * old + 0.3 * pred) - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(backend._negative_aware(pred, old, target, ones), expected)
    # r = 0 pushes the other way: the negative policy is fitted instead.
    negative = (((1.3 * old - 0.3 * pred) - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(backend._negative_aware(pred, old, target, 0 * ones), negative)
    # In the backend, the old policy is the EMA: its prediction differs from the trained LoRA's.
    x0, text = samples.payload["latents"], {"prompt_embeds": samples.payload["prompt_embeds"]}
    t = torch.tensor([300, 600])
    noisy = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert not torch.allclose(backend._old_prediction(ema, noisy, t, text),
                                  backend.family.predict(backend._denoiser(), noisy, t, text))


@pytest.mark.parametrize("overrides,field", [
    ({"training": {"objective": "negative_aware"}}, "training.ema_decay"),
    ({"training": {"objective": "negative_aware", "ema_decay": 1.0}}, "training.ema_decay"),
])
def test_negative_aware_needs_an_ema(tmp_path, capfd, overrides, field):
    from .conftest import TINY_CONFIG, deep_update, write_yaml

    config = write_yaml(tmp_path / "config.yaml", deep_update(TINY_CONFIG, overrides))
    assert main(["train", str(config), "--output-dir", str(tmp_path / "run")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0]


def test_negative_aware_is_refused_for_text(text_config):
    from raft_diffusion.errors import UserError

    with pytest.raises(UserError, match="training.objective"):
        text_config(training={"objective": "negative_aware", "ema_decay": 0.5})
