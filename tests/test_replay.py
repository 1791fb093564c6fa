"""A replay of past winners (`training.replay`): each iteration trains also on what the last N trained on,
weighted decay ** age; it is kept in every checkpoint (tests/test_resume.py kills and resumes such a run);
with the option off a run is what it was."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from raft_diffusion.protocols import Samples
from raft_diffusion.replay import Replay

from .conftest import TINY_CONFIG, deep_update, metrics_without_seconds, run_in_process, write_yaml


def _samples(tag: float, n: int = 2, weight: bool = False) -> Samples:
    payload = {"latents": torch.full((n, 4, 2, 2), tag), "prompt_embeds": torch.full((n, 3, 8), -tag)}
    if weight:
        payload["weight"] = torch.full((n,), 2.0, dtype=torch.float64)
    return Samples([f"p{tag}"] * n, [int(tag) * 10 + i for i in range(n)], torch.zeros(n, 3, 8, 8), payload)


def test_mix_puts_the_new_first_then_the_kept_newest_first_and_forgets_after_n():
    replay = Replay(2)
    assert replay.mix(_samples(0), 0).payload["latents"].equal(_samples(0).payload["latents"])  # nothing kept yet
    replay.push(_samples(0), 0)
    replay.push(_samples(1), 1)
    mixed = replay.mix(_samples(2), 2)
    assert mixed.payload["latents"][:, 0, 0, 0].tolist() == [2, 2, 1, 1, 0, 0]
    assert mixed.seeds == [20, 21, 10, 11, 0, 1] and "weight" not in mixed.payload  # decay 1: plain RAFT's loss
    assert mixed.outputs is None  # images are never kept
    replay.push(_samples(2), 2)
    assert [at for at, _ in replay.entries] == [1, 2] and len(replay) == 4


def test_decay_weights_by_age_on_top_of_the_objectives_weights():
    replay = Replay(3, decay=0.5)
    replay.push(_samples(0, weight=True), 0)
    replay.push(_samples(1, weight=True), 1)
    mixed = replay.mix(_samples(2, weight=True), 2)
    assert mixed.payload["weight"].tolist() == [2.0, 2.0, 1.0, 1.0, 0.5, 0.5]
    plain = Replay(3, decay=0.5)
    plain.push(_samples(0), 0)
    assert plain.mix(_samples(1), 1).payload["weight"].tolist() == [1.0, 1.0, 0.5, 0.5]


def test_state_and_load_give_back_the_same_buffer_and_refuse_a_mismatch():
    replay = Replay(2, decay=0.5)
    replay.push(_samples(0), 0)
    text = Samples(["q"], [7], ["an answer"], {"prompt_ids": [[1, 2]], "response_ids": [[3]]})
    replay.push(text, 1)
    meta, tensors = replay.state()
    meta = json.loads(json.dumps(meta))  # as state.json holds it
    back = Replay(2, decay=0.5)
    back.load(meta, tensors)
    assert [at for at, _ in back.entries] == [0, 1]
    assert back.entries[0][1].payload["latents"].equal(replay.entries[0][1].payload["latents"])
    assert back.entries[1][1].payload == {"prompt_ids": [[1, 2]], "response_ids": [[3]]}
    with pytest.raises(ValueError, match="payloads of other lengths"):
        Replay(2).load(meta, {**tensors, "0/latents": torch.zeros(5, 4, 2, 2)})
    with pytest.raises(ValueError, match="of no entry"):
        Replay(2).load(meta, {**tensors, "7/latents": torch.zeros(1)})


def _run(tmp_path, capfd, name: str, training: dict):
    run = tmp_path / name
    config = write_yaml(tmp_path / f"{name}.yaml", deep_update(TINY_CONFIG, {
        "output_dir": str(run), "training": training, "raft": {"iterations": 3, "prompts_per_iteration": 2}}))
    result = run_in_process(capfd, "train", str(config))
    assert result.returncode == 0, result.stderr
    return run


def test_a_replay_run_trains_on_more_from_its_second_iteration_and_zero_is_no_replay(tmp_path, capfd):
    plain = _run(tmp_path, capfd, "plain", {})
    zero = _run(tmp_path, capfd, "zero", {"replay": 0})
    replayed = _run(tmp_path, capfd, "replay", {"replay": 2})
    lora = "final/pytorch_lora_weights.safetensors"
    assert metrics_without_seconds(zero) == metrics_without_seconds(plain)
    assert (zero / lora).read_bytes() == (plain / lora).read_bytes()
    assert not (plain / "checkpoints/iter_0002/replay.safetensors").exists()
    first_plain, first_replay = metrics_without_seconds(plain)[0], metrics_without_seconds(replayed)[0]
    assert first_replay == first_plain  # iteration 1 has nothing to replay
    assert (replayed / lora).read_bytes() != (plain / lora).read_bytes()
    kept = load_file(str(replayed / "checkpoints/iter_0002/replay.safetensors"))
    state = json.loads((replayed / "checkpoints/iter_0002/state.json").read_text())
    assert [e["iteration"] for e in state["replay"]["entries"]] == [1, 2]  # the last two iterations' winners
    assert kept["0/latents"].shape[0] == len(state["replay"]["entries"][0]["prompts"]) == 2


def test_replay_with_a_bad_decay_is_one_line(tmp_path, capfd):
    config = write_yaml(tmp_path / "c.yaml", deep_update(TINY_CONFIG, {"output_dir": str(tmp_path / "run"),
                                                                     "training": {"replay": 2, "replay_decay": 0}}))
    result = run_in_process(capfd, "train", str(config))
    assert result.returncode == 2 and "training.replay_decay" in result.stderr


def test_a_checkpoint_without_its_replay_is_not_used_and_the_older_one_is(tmp_path, capfd):
    run = _run(tmp_path, capfd, "replay", {"replay": 2})
    (run / "checkpoints/iter_0002/replay.safetensors").unlink()
    config = write_yaml(tmp_path / "more.yaml", deep_update(TINY_CONFIG, {
        "output_dir": str(run), "training": {"replay": 2}, "raft": {"iterations": 4, "prompts_per_iteration": 2}}))
    result = run_in_process(capfd, "train", str(config), "--resume")
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert "replay.safetensors" in out and "missing (training.replay is set)" in out and "older iter_0001" in out
    assert len(metrics_without_seconds(run)) == 4
