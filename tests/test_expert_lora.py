"""A model expert with a LoRA (`generation.experts[].lora`, issue 24): an earlier run's LoRA, in
diffusers' or kohya's names, samples the expert's candidates, and its bytes go into every checkpoint."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from .conftest import TEXT_CONFIG, TINY_CONFIG, deep_update, one_error_line, run_in_process, write_yaml

EXPERT = {"model": "builtin:tiny-sd", "per_prompt": 1, "label": "tuned"}


def _config(tmp_path, lora, **expert):
    return write_yaml(tmp_path / "config.yaml", deep_update(TINY_CONFIG, {
        "generation": {"batch_size": 1, "experts": [{**EXPERT, "lora": str(lora), **expert}]},
        "raft": {"iterations": 1}, "eval": {"every": 0}}))


def _expert_rows(run):
    rows = [json.loads(x) for x in (run / "samples/iter_0000/samples.jsonl").read_text().splitlines()]
    return [r for r in rows if r["source"] == "tuned"]


def _generated(capfd, tmp_path, row, lora=None):
    """What `generate` makes of the expert row's prompt and seed, with the run's sampling settings."""
    out = tmp_path / f"gen-{row['seed']}-{'lora' if lora else 'base'}"
    gen = TINY_CONFIG["generation"]
    args = ["generate", "--model", "builtin:tiny-sd", "--prompt", row["prompt"], "--seed", str(row["seed"]),
            "-n", "1", "--resolution", str(gen["resolution"]), "--steps", str(gen["steps"]),
            "--guidance-scale", str(gen["guidance_scale"]), "--out", str(out)]
    result = run_in_process(capfd, *args, *(["--lora", str(lora)] if lora else []))
    assert result.returncode == 0, result.stderr
    return np.asarray(Image.open(next(out.glob("*.png"))))


@pytest.mark.parametrize("form", ["kohya file", "run directory"])
def test_a_model_expert_samples_with_its_lora_as_generate_does(finished_run, tmp_path, capfd, form):
    lora = finished_run / "final/lora_kohya.safetensors" if form == "kohya file" else finished_run
    config = _config(tmp_path, lora)
    result = run_in_process(capfd, "train", str(config), "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    rows = _expert_rows(run)
    assert len(rows) == 2 and all(r["seed"] is not None for r in rows)
    row = rows[0]
    written = np.asarray(Image.open(run / "samples/iter_0000" / row["file"]))
    # the expert's picture is the LoRA's (generate --lora, same seed), and not the bare model's
    assert np.array_equal(written, _generated(capfd, tmp_path, row, finished_run / "final"))
    assert not np.array_equal(written, _generated(capfd, tmp_path, row))
    recorded = json.loads((run / "checkpoints/iter_0000/state.json").read_text())["experts"]
    assert recorded["0"]["lora"] == str(lora) and recorded["0"]["model"] == "builtin:tiny-sd"
    assert len(recorded["0"]["sha256"]) == 64


def test_an_expert_lora_changed_before_resume_is_refused_and_nothing_written(finished_run, tmp_path, capfd):
    lora = tmp_path / "expert.safetensors"
    shutil.copyfile(finished_run / "final/lora_kohya.safetensors", lora)
    config = _config(tmp_path, lora)
    assert run_in_process(capfd, "train", str(config), "--output-dir", str(tmp_path / "run")).returncode == 0
    run = tmp_path / "run"
    shutil.copyfile(finished_run / "final/pytorch_lora_weights.safetensors", lora)  # the same LoRA, other bytes
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    result = run_in_process(capfd, "train", str(config), "--output-dir", str(run), "--resume",
                            "--set", "raft.iterations=2")
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert line.startswith("error: config generation.experts.0.lora: ") and str(lora) in line and "restore" in line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before
    shutil.copyfile(finished_run / "final/lora_kohya.safetensors", lora)  # restored: the resume goes on
    result = run_in_process(capfd, "train", str(config), "--output-dir", str(run), "--resume",
                            "--set", "raft.iterations=2")
    assert result.returncode == 0, result.stderr
    assert (run / "checkpoints/iter_0001/state.json").is_file()


def _foreign_lora(tmp_path):
    """A kohya-named file of layers the tiny UNet does not have."""
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"lora_unet_mid_block_attentions_7_to_q.lora_down.weight": torch.ones(4, 32),
               "lora_unet_mid_block_attentions_7_to_q.lora_up.weight": torch.ones(32, 4),
               "lora_unet_mid_block_attentions_7_to_q.alpha": torch.tensor(4.0)}, str(path))
    return path


@pytest.mark.parametrize("case", ["missing", "empty directory", "foreign layers", "with samples"])
def test_a_bad_expert_lora_is_one_line_naming_its_field_and_no_run_is_written(tmp_path, capfd, case):
    lora = {"missing": tmp_path / "nowhere.safetensors", "empty directory": tmp_path / "empty",
            "foreign layers": None, "with samples": tmp_path}[case]
    if case == "empty directory":
        lora.mkdir()
    if case == "foreign layers":
        lora = _foreign_lora(tmp_path)
    if case == "with samples":
        config = write_yaml(tmp_path / "config.yaml", deep_update(TINY_CONFIG, {"generation": {"experts": [
            {"samples": "builtin:toy-monet-cats", "per_prompt": 1, "lora": str(lora)}]}}))
    else:
        config = _config(tmp_path, lora)
    result = run_in_process(capfd, "train", str(config), "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "generation.experts.0" in line and "lora" in line, line
    if case == "foreign layers":
        assert "pass a LoRA trained on the expert's model builtin:tiny-sd" in line
    assert not (tmp_path / "run").exists()


def test_a_text_expert_samples_with_its_adapter_what_the_merged_model_samples(text_run, tiny_llama, tmp_path,
                                                                               capfd):
    from raft_diffusion.backends.text import TextExpert
    from raft_diffusion.config import ExpertConfig, RunConfig

    merged = tmp_path / "merged"
    assert run_in_process(capfd, "export", str(text_run), "--format", "merged", "--out", str(merged)).returncode == 0
    config = RunConfig.model_validate(deep_update(TEXT_CONFIG, {"model": {"path": str(tiny_llama)}}))
    prompts, seeds = TEXT_CONFIG["prompts"]["train"][:2] * 2, [11, 12, 13, 14]

    def texts(**spec):
        expert = TextExpert(ExpertConfig(per_prompt=1, **spec), config, "cpu", "config generation.experts.0.model")
        return expert.generate(prompts, seeds, "expert")

    with_adapter = texts(model=str(tiny_llama), lora=str(text_run / "final"))
    assert with_adapter == texts(model=str(merged))
    assert with_adapter != texts(model=str(tiny_llama))


@pytest.mark.parametrize("case", ["a file", "another model's adapter"])
def test_a_text_expert_lora_that_is_no_adapter_of_its_model_is_refused(text_run, tiny_llama, tmp_path, capfd, case):
    if case == "a file":
        lora = text_run / "final/adapter_model.safetensors"
        model = str(tiny_llama)
    else:  # the adapter's layers are not SmolLM2's shapes
        lora, model = text_run / "final", "builtin:smollm2-135m"
    config = write_yaml(tmp_path / "config.yaml", deep_update(TEXT_CONFIG, {
        "model": {"path": str(tiny_llama)}, "raft": {"iterations": 1}, "eval": {"every": 0},
        "generation": {"experts": [{"model": model, "per_prompt": 1, "lora": str(lora)}]}}))
    result = run_in_process(capfd, "train", str(config), "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert one_error_line(result.stderr).startswith("error: config generation.experts.0.lora: ")
    assert not (tmp_path / "run").exists()
