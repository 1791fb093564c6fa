"""Damaged state in a checkpoint is caught before it is used (issue 23, item 6).

Every file of a checkpoint (adapter, EMA, optimizer state, RNG state, state.json) is checked for
finiteness, shape and type when a run resumes: a damaged one is skipped with one warning line naming
it, and the run continues from the previous intact checkpoint exactly as an undamaged run would;
with no intact checkpoint left, one line and exit 2. A run's folder replaced by a file is one line,
exit 2, and nothing is removed.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from raft_diffusion.cli import main

from .conftest import FINISHED_RUN, TINY_CONFIG, copy_run, deep_update, write_yaml
from .conftest import metrics_without_seconds as _metrics

# EMA on, so that a checkpoint holds all five files; eval off to keep it quick.
EMA_RUN = deep_update(TINY_CONFIG, {"training": {"ema_decay": 0.9}, "eval": {"every": 0},
                                    "checkpoint": {"keep_last": 3}})


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> Path:
    """A finished 2-iteration EMA run (checkpoints iter_0000 and iter_0001) and its config.yaml beside it."""
    root = tmp_path_factory.mktemp("damaged")
    config = write_yaml(root / "config.yaml", EMA_RUN)
    assert main(["train", str(config), "--output-dir", str(root / "run")]) == 0
    return root / "run"


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _edit_state(checkpoint: Path, edit) -> None:
    state = json.loads((checkpoint / "state.json").read_text())
    edit(state)
    (checkpoint / "state.json").write_text(json.dumps(state))


def _edit_tensors(file: Path, edit) -> None:
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


def _edit_optimizer(checkpoint: Path, edit) -> None:
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    edit(state["optimizer"])
    torch.save(state, checkpoint / "training_state.pt")


def _first(tensors: dict) -> str:
    return sorted(tensors)[0]


# case -> (the file it damages, how)
DAMAGE = {
    "ema_nan": ("ema.safetensors", lambda c: _edit_tensors(
        c / "ema.safetensors", lambda t: t[_first(t)].fill_(float("nan")))),
    "ema_wrong_shape": ("ema.safetensors", lambda c: _edit_tensors(  # broadcastable: copy_ took it silently
        c / "ema.safetensors", lambda t: t.__setitem__(_first(t), torch.zeros(1)))),
    "ema_tensor_missing": ("ema.safetensors", lambda c: _edit_tensors(
        c / "ema.safetensors", lambda t: t.pop(_first(t)))),
    "adapter_tensor_missing": ("adapter.safetensors", lambda c: _edit_tensors(
        c / "adapter.safetensors", lambda t: t.pop(_first(t)))),
    "adapter_wrong_shape": ("adapter.safetensors", lambda c: _edit_tensors(
        c / "adapter.safetensors", lambda t: t.__setitem__(_first(t), t[_first(t)].flatten()))),
    "optimizer_nan": ("training_state.pt", lambda c: _edit_optimizer(
        c, lambda o: o["state"][0]["exp_avg"].fill_(float("nan")))),
    "optimizer_wrong_shape": ("training_state.pt", lambda c: _edit_optimizer(
        c, lambda o: o["state"][0].__setitem__("exp_avg", o["state"][0]["exp_avg"].flatten()))),
    "optimizer_lr_nan": ("training_state.pt", lambda c: _edit_optimizer(
        c, lambda o: o["param_groups"][0].__setitem__("lr", float("nan")))),
    "rng_python_garbled": ("state.json", lambda c: _edit_state(
        c, lambda s: s["rng"].__setitem__("python", "garbled"))),
    "rng_python_key_short": ("state.json", lambda c: _edit_state(
        c, lambda s: s["rng"]["python"].__setitem__(1, s["rng"]["python"][1][:10]))),
    "rng_numpy_garbled": ("state.json", lambda c: _edit_state(
        c, lambda s: s["rng"]["numpy"].__setitem__(1, [-1] * 624))),
    "rng_torch_wrong_size": ("rng.safetensors", lambda c: _edit_tensors(
        c / "rng.safetensors", lambda t: t.__setitem__("torch", t["torch"][:100].clone()))),
    "rng_generator_wrong_size": ("rng.safetensors", lambda c: _edit_tensors(
        c / "rng.safetensors", lambda t: t.__setitem__("train_generator", t["train_generator"][:16].clone()))),
    "rng_tensor_missing": ("rng.safetensors", lambda c: _edit_tensors(
        c / "rng.safetensors", lambda t: t.pop("train_generator"))),
    "data_position_string": ("state.json", lambda c: _edit_state(c, lambda s: s.__setitem__("data_position", "4"))),
    "data_position_negative": ("state.json", lambda c: _edit_state(c, lambda s: s.__setitem__("data_position", -2))),
    "data_position_float": ("state.json", lambda c: _edit_state(c, lambda s: s.__setitem__("data_position", 4.5))),
    "data_position_missing": ("state.json", lambda c: _edit_state(c, lambda s: s.pop("data_position"))),
    "iteration_not_its_own": ("state.json", lambda c: _edit_state(c, lambda s: s.__setitem__("iteration", 7))),
    "processes_zero": ("state.json", lambda c: _edit_state(c, lambda s: s.__setitem__("processes", 0))),
    "state_not_an_object": ("state.json", lambda c: (c / "state.json").write_text("[1, 2]")),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_is_skipped_for_the_previous_intact_one(ema_run, tmp_path, capfd, case):
    run = copy_run(ema_run, tmp_path / "run")
    file, damage = DAMAGE[case]
    damage(run / "checkpoints/iter_0001")
    capfd.readouterr()
    assert main(["train", str(ema_run.parent / "config.yaml"), "--output-dir", str(run), "--resume",
                 "--set", "raft.iterations=3"]) == 0
    out, err = capfd.readouterr()
    assert "Traceback" not in err, err
    warnings = [line for line in (out + err).splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, out + err
    assert f"iter_0001/{file}" in warnings[0] and "resuming from the older iter_0000" in warnings[0], warnings[0]
    assert "resumed from" in out and "iter_0000 at iteration 1" in out
    # It redid iteration 1 from iter_0000, exactly as the undamaged run did it, then went on.
    assert _metrics(run)[:2] == _metrics(ema_run) and [r["iteration"] for r in _metrics(run)] == [0, 1, 2]
    for name in ("adapter.safetensors", "ema.safetensors", "training_state.pt", "rng.safetensors", "state.json"):
        assert (run / "checkpoints/iter_0001" / name).read_bytes() == \
            (ema_run / "checkpoints/iter_0001" / name).read_bytes(), name
    assert (run / "final/pytorch_lora_weights.safetensors").is_file()


def test_unknown_fields_in_state_json_are_kept_and_tolerated(ema_run, tmp_path, capfd):
    run = copy_run(ema_run, tmp_path / "run")
    _edit_state(run / "checkpoints/iter_0001", lambda s: s.__setitem__("a_later_field", {"x": [1, "y"]}))
    capfd.readouterr()
    assert main(["train", str(ema_run.parent / "config.yaml"), "--output-dir", str(run), "--resume",
                 "--set", "raft.iterations=3"]) == 0
    out, err = capfd.readouterr()
    assert not [line for line in (out + err).splitlines() if line.startswith("warning: ")], out + err
    assert "iter_0001 at iteration 2" in out
    assert json.loads((run / "checkpoints/iter_0002/state.json").read_text())["a_later_field"] == {"x": [1, "y"]}


@pytest.mark.parametrize("case", ["ema_nan", "data_position_string", "rng_torch_wrong_size", "optimizer_wrong_shape"])
def test_with_no_intact_checkpoint_left_resume_is_one_line_exit_2(ema_run, tmp_path, capfd, case):
    run = copy_run(ema_run, tmp_path / "run")
    file, damage = DAMAGE[case]
    for checkpoint in (run / "checkpoints").glob("iter_*"):
        damage(checkpoint)
    before = _tree(run)
    capfd.readouterr()
    assert main(["train", str(ema_run.parent / "config.yaml"), "--output-dir", str(run), "--resume",
                 "--set", "raft.iterations=3"]) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "no intact checkpoint" in lines[0] and file in lines[0], lines[0]
    # Only config.yaml is rewritten (a resume records where the run now lives): every checkpoint stays.
    before.pop("config.yaml")
    assert {k: v for k, v in _tree(run).items() if k != "config.yaml"} == before


@pytest.mark.parametrize("mode", ["--resume", "--overwrite"])
@pytest.mark.parametrize("folder", ["samples", "checkpoints", "final", "logs"])
def test_a_run_folder_replaced_by_a_file_is_one_line_exit_2_and_nothing_is_removed(finished_run, tmp_path, capfd,
                                                                                     folder, mode):
    run = copy_run(finished_run, tmp_path / "run")
    assert (run / folder).is_dir()
    shutil.rmtree(run / folder)
    (run / folder).write_text("someone's notes\n")
    before = _tree(run)
    config = write_yaml(tmp_path / "config.yaml", FINISHED_RUN)
    capfd.readouterr()
    assert main(["train", str(config), "--output-dir", str(run), mode]) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(run / folder) in lines[0] and "is a file" in lines[0], lines[0]
    assert _tree(run) == before

