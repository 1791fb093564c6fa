"""Groups without signal (`selection.min_spread`, `selection.min_reward`): a prompt whose candidates' rewards
barely differ, or none of which reaches the bar, is left out of the selection and of every objective's targets,
and counted per iteration; with the options off a run is what it was."""

from __future__ import annotations

import numpy as np

from raft_diffusion.config import load_config
from raft_diffusion.objectives import targets
from raft_diffusion.selection import select, without_signal

from .conftest import TINY_CONFIG, deep_update, metrics_without_seconds, run_in_process, write_yaml

NAN = float("nan")


def test_without_signal_blanks_flat_and_low_groups_only():
    scores = [1.0, 1.0, 1.0, 0.2, 0.9, NAN, 0.1, 0.15, NAN, NAN]
    groups = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    same, quiet = without_signal(scores, groups, None, None)
    assert quiet == [] and np.array_equal(same, scores, equal_nan=True)
    ranked, quiet = without_signal(scores, groups, 0.1, None)  # spreads: 0, 0.7, 0.05; group 3 all dropped
    assert quiet == [0, 2]
    assert np.isnan(ranked[[0, 1, 2, 6, 7]]).all() and ranked[3] == 0.2 and ranked[4] == 0.9
    assert select(ranked, groups, "per_prompt", 1) == [4]
    assert without_signal(scores, groups, 0.01, None)[1] == [0]
    assert without_signal(scores, groups, None, 0.5)[1] == [2]  # the best of group 2 is 0.15
    assert without_signal(scores, groups, None, 1.0)[1] == [1, 2]
    assert without_signal(scores, groups, 0.0, None)[1] == []  # a spread of 0 is not below 0


def test_objectives_leave_the_blanked_groups_out(tmp_path):
    scores = [1.0, 1.0, 0.2, 0.9]
    groups = [0, 0, 1, 1]
    ranked, _ = without_signal(scores, groups, 0.5, None)
    for objective in ("raft", "reward_weighted", "negative_aware"):
        cfg = load_config(write_yaml(tmp_path / f"{objective}.yaml", deep_update(TINY_CONFIG, {
            "training": {"objective": objective, **({"ema_decay": 0.9} if objective == "negative_aware" else {})}})))
        chosen = select(ranked, groups, "per_prompt", 1)
        assert targets(ranked, groups, chosen, cfg.training).indices in ([3], [2, 3]), objective


def _run(tmp_path, capfd, name: str, selection: dict, reward: str = "python:tests.rewards_for_tests:flat_for_squares"):
    run = tmp_path / name
    config = write_yaml(tmp_path / f"{name}.yaml", deep_update(TINY_CONFIG, {
        "output_dir": str(run), "rewards": [{"name": reward}], "selection": selection,
        "prompts": {"train": ["a red square", "a blue star"]}, "raft": {"iterations": 2, "prompts_per_iteration": 2}}))
    result = run_in_process(capfd, "train", str(config))
    assert result.returncode == 0, result.stderr
    return run, result


def test_a_run_counts_and_skips_the_flat_prompt_and_is_unchanged_with_the_options_off(tmp_path, capfd):
    plain, _ = _run(tmp_path, capfd, "plain", {"strategy": "per_prompt", "top": 1})
    off, _ = _run(tmp_path, capfd, "zero", {"strategy": "per_prompt", "top": 1, "min_spread": 0.0})
    gated, out = _run(tmp_path, capfd, "gated", {"strategy": "per_prompt", "top": 1, "min_spread": 1e-6})
    plain_metrics, off_metrics = metrics_without_seconds(plain), metrics_without_seconds(off)
    assert all("groups_without_signal" not in r for r in plain_metrics)
    assert [r.pop("groups_without_signal") for r in off_metrics] == [{"dropped": 0, "of": 2, "share": 0.0}] * 2
    assert off_metrics == plain_metrics
    lora = "final/pytorch_lora_weights.safetensors"
    assert (off / lora).read_bytes() == (plain / lora).read_bytes()
    assert (gated / lora).read_bytes() != (plain / lora).read_bytes()
    gated_metrics = metrics_without_seconds(gated)
    assert [r["groups_without_signal"] for r in gated_metrics] == [{"dropped": 1, "of": 2, "share": 0.5}] * 2
    assert [r["n_selected"] for r in gated_metrics] == [1, 1] and [r["n_selected"] for r in plain_metrics] == [2, 2]
    assert "no signal 1/2" in out.stdout + out.stderr


def test_when_every_group_is_flat_nothing_is_trained_and_the_run_says_so(tmp_path, capfd):
    run, out = _run(tmp_path, capfd, "flat", {"strategy": "per_prompt", "top": 1, "min_reward": 10.0})
    metrics = metrics_without_seconds(run)
    assert [r["n_selected"] for r in metrics] == [0, 0] and [r["train_loss"] for r in metrics] == [None, None]
    assert "every prompt's candidates were without signal" in out.stdout + out.stderr
