"""Summed rewards with weights and normalisation, user rewards by module, and held-out judges."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from raft_diffusion.config import RewardSpec
from raft_diffusion.errors import UserError
from raft_diffusion.rewards.compose import RewardSet
from raft_diffusion.rewards.jpeg import jpeg_kb
from raft_diffusion.train import run_training

from . import rewards_for_tests

USER = "python:tests.rewards_for_tests:"


def _images(n=6, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _z(x):
    return (x - x.mean()) / (x.std() + 1e-6)


def test_weighted_sum_normalises_each_reward_as_asked():
    images, groups = _images(), [0, 0, 0, 1, 1, 1]
    rewards = RewardSet([
        RewardSpec(name=USER + "brightness", weight=2.0, normalize="batch"),
        RewardSpec(name=USER + "redness", weight=-0.5, normalize="per_prompt"),
        RewardSpec(name="jpeg_compressibility", weight=0.1),
    ], torch.device("cpu"))
    scored = rewards(images, ["a"] * 3 + ["b"] * 3, groups)

    bright = np.asarray(rewards_for_tests.brightness(images, None))
    red = np.asarray(rewards_for_tests.redness(images, None))
    jpeg = -np.asarray(jpeg_kb(images))
    red_per_prompt = np.concatenate([_z(red[:3]), _z(red[3:])])
    np.testing.assert_allclose(scored.total, 2.0 * _z(bright) - 0.5 * red_per_prompt + 0.1 * jpeg, rtol=1e-9)
    np.testing.assert_allclose(scored.parts["python:tests.rewards_for_tests:redness"], red)  # raw, unnormalised
    assert list(scored.parts) == [USER + "brightness", USER + "redness", "jpeg_compressibility"]


def test_the_same_reward_twice_gets_two_labels():
    rewards = RewardSet([RewardSpec(name="jpeg_compressibility"),
                         RewardSpec(name="jpeg_compressibility", options={"quality": 50})], torch.device("cpu"))
    scored = rewards(_images(2), ["a", "b"], [0, 1])
    assert list(scored.parts) == ["jpeg_compressibility", "jpeg_compressibility#2"]
    assert not np.allclose(scored.parts["jpeg_compressibility"], scored.parts["jpeg_compressibility#2"])


def test_a_label_names_a_reward_in_the_scores():
    rewards = RewardSet([RewardSpec(name="jpeg_compressibility", label="small_files"),
                         RewardSpec(name="jpeg_compressibility", options={"quality": 50})], torch.device("cpu"))
    assert list(rewards(_images(2), ["a", "b"], [0, 1]).parts) == ["small_files", "jpeg_compressibility"]


def test_a_user_reward_from_a_module_scores_like_the_function_itself():
    images = _images(4)
    rewards = RewardSet([RewardSpec(name=USER + "content_hash_scores")], torch.device("cpu"))
    scored = rewards(images, ["p"] * 4, [0, 0, 1, 1])
    np.testing.assert_allclose(scored.total, rewards_for_tests.content_hash_scores(images, None))


@pytest.mark.parametrize("name, problem", [
    ("python:tests.rewards_for_tests:no_such_function", "has no function"),
    ("python:no_such_package.rewards:score", "cannot import"),
    ("python:tests.rewards_for_tests", "is not python:module:function"),
])
def test_a_user_reward_that_cannot_be_found_is_a_user_error(name, problem):
    with pytest.raises(UserError, match=problem):
        RewardSet([RewardSpec(name=name)], torch.device("cpu"), field="config rewards")


def _selected_and_eval(config):
    metrics = run_training(config, log=lambda s: None)
    run = Path(config.output_dir)
    picks = [[(r["seed"], r["selected"]) for r in map(json.loads, (run / f"samples/iter_{it:04d}/samples.jsonl")
                                                       .read_text().splitlines())] for it in range(len(metrics))]
    # Tensors, not file bytes: safetensors writes its metadata keys in hash-map order.
    return picks, metrics, load_file(str(run / "final/pytorch_lora_weights.safetensors"))


def test_judges_are_recorded_under_eval_and_do_not_change_selection(tiny_config, tiny_clip, tmp_path):
    config_json, weights = tiny_clip
    judges = [{"name": "clip", "options": {"model_config": str(config_json), "pretrained": str(weights)}},
              {"name": "jpeg_incompressibility"}]
    plain = tiny_config(output_dir=str(tmp_path / "plain"))
    judged = tiny_config(output_dir=str(tmp_path / "judged"), eval={"every": 1, "samples_per_prompt": 1,
                                                                   "judges": judges})
    picks_plain, metrics_plain, lora_plain = _selected_and_eval(plain)
    picks_judged, metrics_judged, lora_judged = _selected_and_eval(judged)

    assert picks_judged == picks_plain and any(s for it in picks_plain for _, s in it)
    assert lora_judged.keys() == lora_plain.keys() and all(lora_judged[k].equal(lora_plain[k]) for k in lora_plain)
    for before, after in zip(metrics_plain, metrics_judged):
        assert set(after["eval"]) == set(before["eval"]) | {"clip", "jpeg_incompressibility"}
        assert after["eval"]["reward"] == before["eval"]["reward"]
        assert after["reward_selected_mean"] == before["reward_selected_mean"]
    # The recorded mean is the mean of the judge's scores on that iteration's evaluation samples.
    last = len(metrics_judged) - 1
    rows = [json.loads(x) for x in (tmp_path / f"judged/samples/iter_{last:04d}/eval/samples.jsonl")
            .read_text().splitlines()]
    assert rows and all(not r["selected"] for r in rows)
    assert metrics_judged[-1]["eval"]["clip"] == pytest.approx(np.mean([r["scores"]["clip"] for r in rows]))


def test_a_judge_named_like_a_training_reward_does_not_hide_it_in_eval():
    from raft_diffusion.loop import eval_parts

    images, prompts, groups = _images(2), ["a", "b"], [0, 1]
    scored = RewardSet([RewardSpec(name="jpeg_compressibility")], torch.device("cpu"))(images, prompts, groups)
    judged = RewardSet([RewardSpec(name="jpeg_compressibility", options={"quality": 30})],
                       torch.device("cpu"))(images, prompts, groups)
    parts = eval_parts(scored, judged)
    assert set(parts) == {"reward:jpeg_compressibility", "jpeg_compressibility"}
    np.testing.assert_allclose(parts["jpeg_compressibility"], [-s for s in jpeg_kb(images, 30)])
    np.testing.assert_allclose(parts["reward:jpeg_compressibility"], [-s for s in jpeg_kb(images, 95)])
