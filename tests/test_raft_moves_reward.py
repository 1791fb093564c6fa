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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_reward_rises_and_ranking_beats_random_selection(tiny_config, tmp_path, seed):
    """In each seed: the last iteration's reward beats iteration zero's, and by more than the control's."""
    raft = _jpeg_curve(tiny_config, tmp_path, seed, control=False)
    control = _jpeg_curve(tiny_config, tmp_path, seed, control=True)
    assert raft[-1] > raft[0], raft
    assert raft[-1] - raft[0] > control[-1] - control[0], (raft, control)
