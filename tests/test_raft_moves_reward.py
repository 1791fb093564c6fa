"""RAFT moves the reward on a tiny pipeline, and ranking (not fine-tuning alone) is what moves it.

The tiny pipeline is random, so fine-tuning it on its own samples drifts for reasons unrelated to
the reward (DESIGN, "Measured on this machine"). We use the v-prediction variant, whose samples
have unit-scale latents a LoRA can fit, a LoRA over attention and convolutions, and enough epochs
to fit the selected samples; then the JPEG reward rises in every seed, and beats a control that
selects at random (by pixel hash) with everything else equal.
"""

import numpy as np
import pytest

from raft_diffusion.train import run_training

SETTINGS = dict(
    model={"path": "builtin:tiny-sd-v"},
    lora={"rank": 8, "alpha": 8,
          "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"]},
    prompts={"train": ["a cat", "a dog", "a red square", "a blue star"]},
    generation={"resolution": 64, "steps": 10, "guidance_scale": 1.0, "samples_per_prompt": 8, "batch_size": 32},
    training={"learning_rate": 1.0e-2, "epochs": 16, "batch_size": 4},
    eval={"every": 0},
)


def _jpeg_curve(tiny_config, tmp_path, seed, control):
    rewards = [{"name": "jpeg_compressibility", "weight": 1.0}]
    if control:
        rewards = [{"name": "jpeg_compressibility", "weight": 0.0},
                   {"name": "python:tests.rewards_for_tests:content_hash_scores", "weight": 1.0}]
    config = tiny_config(**SETTINGS, rewards=rewards, raft={"iterations": 10, "prompts_per_iteration": 4, "seed": seed},
                         output_dir=str(tmp_path / f"{'control' if control else 'raft'}-{seed}"))
    metrics = run_training(config, log=lambda s: None)
    return np.array([m["rewards"]["jpeg_compressibility"] for m in metrics])


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    from .conftest import TINY_CONFIG, deep_update
    from raft_diffusion.config import RunConfig

    tmp = tmp_path_factory.mktemp("raft")

    def make(**overrides):
        return RunConfig.model_validate(deep_update(TINY_CONFIG, overrides))

    return {(seed, control): _jpeg_curve(make, tmp, seed, control) for seed in (0, 1, 2) for control in (False, True)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_last_iteration_reward_beats_iteration_zero(curves, seed):
    curve = curves[(seed, False)]
    assert curve[-1] > curve[0], curve


def test_ranking_beats_random_selection_control(curves):
    gains = [curves[(s, False)][-1] - curves[(s, False)][0] for s in (0, 1, 2)]
    control = [curves[(s, True)][-1] - curves[(s, True)][0] for s in (0, 1, 2)]
    assert np.mean(gains) > np.mean(control), (gains, control)
