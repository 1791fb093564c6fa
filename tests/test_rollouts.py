"""Cheap pools, full-quality winners (`generation.rollout_steps`): the candidates are made with fewer steps
and ranked; those trained on are re-rendered from their own seeds at `generation.steps`; experts' candidates
stay theirs; weighted objectives train on each prompt's extremes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from raft_diffusion.candidates import Batch, Candidates
from raft_diffusion.experts import POLICY, Slot
from raft_diffusion.objectives import Targets, extremes
from raft_diffusion.protocols import Samples

from .conftest import TINY_CONFIG, deep_update, metrics_without_seconds, one_error_line, run_in_process, write_yaml


class Renderer:
    """A backend whose 'latent' of a sample is seed * 100 + steps (100 standing for generation.steps)."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, seeds, desc="generate", steps=None):
        self.calls.append((list(seeds), steps))
        value = torch.tensor([s * 100.0 + (steps or 100) for s in seeds])
        return Samples(list(prompts), list(seeds), value[:, None].repeat(1, 3), {"latents": value[:, None]})


class OneProcess:
    def together(self, phase):
        return phase()

    def mine(self, n):
        return range(n)


def test_the_trained_candidates_are_re_rendered_from_their_seeds_and_the_rest_left_alone():
    backend = Renderer()
    config = SimpleNamespace(generation=SimpleNamespace(samples_per_prompt=3, rollout_steps=5), raft=SimpleNamespace(seed=0))
    candidates = Candidates(config, backend, OneProcess(), None)
    slots = [Slot(0, POLICY, 11), Slot(0, POLICY, 12), Slot(0, POLICY, 13), Slot(1, POLICY, 21), Slot(1, "folder", None)]
    cheap = backend.generate(["a", "a", "a", "b"], [11, 12, 13, 21], steps=5)
    expert = Samples(["b"], [None], torch.zeros(1, 3), {"latents": torch.tensor([[-1.0]])})
    from raft_diffusion.experts import concat

    batch = Batch(["a", "b"], slots, concat([cheap, expert]), range(5))
    trained, n = candidates.rerender(batch, [1, 3, 4], it=0)
    assert backend.calls[-1] == ([12, 21], None)  # generation.steps, the same seeds; the expert's not redone
    assert n == 2
    assert trained.payload["latents"][:, 0].tolist() == [1105, 1300, 1305, 2200, -1]
    assert trained.seeds == [11, 12, 13, 21, None] and trained.prompts == batch.samples.prompts
    assert batch.samples.payload["latents"][:, 0].tolist() == [1105, 1205, 1305, 2105, -1]  # records keep the cheap


def test_weighted_objectives_keep_each_prompts_best_and_worst():
    scores = np.array([0.9, 0.1, 0.5, 0.7, 0.2, 0.3, 0.8, np.nan])
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    valid = [0, 1, 2, 3, 4, 5, 6]
    chosen = Targets(indices=valid, optimality=np.linspace(0, 1, 7))
    kept = extremes(chosen, scores, groups, 1)
    assert kept.indices == [0, 1, 4, 6]
    assert np.allclose(kept.optimality, np.linspace(0, 1, 7)[[0, 1, 4, 6]])
    assert extremes(Targets(indices=[0, 6]), scores, groups, 1).indices == [0, 6]  # raft: as selected


def _run(tmp_path, capfd, name: str, generation: dict):
    run = tmp_path / name
    config = write_yaml(tmp_path / f"{name}.yaml", deep_update(TINY_CONFIG, {
        "output_dir": str(run), "generation": generation}))
    return run, run_in_process(capfd, "train", str(config))


def test_a_rollout_run_records_what_it_re_rendered_and_trains_on_other_latents(tmp_path, capfd):
    plain, result = _run(tmp_path, capfd, "plain", {})
    assert result.returncode == 0, result.stderr
    cheap, result = _run(tmp_path, capfd, "cheap", {"rollout_steps": 2})
    assert result.returncode == 0, result.stderr
    records = metrics_without_seconds(cheap)
    assert [r["rerendered"] for r in records] == [r["n_selected"] for r in records] == [2, 2]
    assert all("rerendered" not in r for r in metrics_without_seconds(plain))
    assert records[0]["reward_mean"] != metrics_without_seconds(plain)[0]["reward_mean"]  # 2-step candidates
    lora = "final/pytorch_lora_weights.safetensors"
    assert (cheap / lora).read_bytes() != (plain / lora).read_bytes()


def test_rollout_steps_not_fewer_than_steps_is_one_line(tmp_path, capfd):
    _, result = _run(tmp_path, capfd, "bad", {"rollout_steps": 4})
    assert result.returncode == 2
    assert one_error_line(result.stderr).startswith("error: config generation.rollout_steps: 4 is not fewer")
