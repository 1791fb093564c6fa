"""`raft-diffusion export` (issue 24): the run's LoRA as its own file, and the base model with the
LoRA fused in, each loading in the library that reads it and giving what base + LoRA give."""

from __future__ import annotations

import pytest
import torch

from raft_diffusion.cli import main

from .conftest import TEXT_CONFIG, copy_run, deep_update, run_in_process, write_yaml
from .conftest import one_error_line as _one_error_line


def _images(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    images = pipe("a cat in monet style", num_inference_steps=4, guidance_scale=3.0, height=64, width=64,
                  generator=generator, output_type="np").images
    return torch.from_numpy(images)


def test_merged_pipeline_gives_the_lora_pipelines_images(finished_run, tmp_path, capfd):
    from diffusers import StableDiffusionPipeline

    from raft_diffusion.backends.diffusion import load_lora, load_pipeline

    out = tmp_path / "merged"
    result = run_in_process(capfd, "export", str(finished_run), "--format", "merged", "--out", str(out))
    assert result.returncode == 0, result.stderr
    merged = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    merged.set_progress_bar_config(disable=True)
    assert not any("lora" in name for name, _ in merged.unet.named_parameters())  # fused, no LoRA layers
    with_lora = load_pipeline("builtin:tiny-sd")
    load_lora(with_lora, finished_run / "final")
    with_lora.set_progress_bar_config(disable=True)
    base = load_pipeline("builtin:tiny-sd")
    base.set_progress_bar_config(disable=True)
    fused, expected, plain = _images(merged), _images(with_lora), _images(base)
    torch.testing.assert_close(fused, expected, atol=2e-3, rtol=0)
    assert (fused - plain).abs().max() > 10 * (fused - expected).abs().max()  # the LoRA is in it


def test_merged_at_scale_0_is_the_base_model(finished_run, tmp_path, capfd):
    from diffusers import StableDiffusionPipeline

    from raft_diffusion.backends.diffusion import load_pipeline

    out = tmp_path / "merged0"
    assert run_in_process(capfd, "export", str(finished_run), "--format", "merged", "--scale", "0",
                          "--out", str(out)).returncode == 0
    merged = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    base = load_pipeline("builtin:tiny-sd")
    for (name, a), (_, b) in zip(merged.unet.state_dict().items(), base.unet.state_dict().items()):
        assert torch.equal(a, b), name


def test_merged_single_file_loads_with_from_single_file_and_gives_the_lora_pipelines_images(
        finished_run, tmp_path, capfd):
    """The file A1111, Forge and ComfyUI load as a model: LDM names only, read back by diffusers'
    own LDM reader into the fused pipeline, tensor for tensor, and sampling what base + LoRA sample."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from raft_diffusion.backends.diffusion import load_lora, load_pipeline

    out = tmp_path / "merged.safetensors"
    result = run_in_process(capfd, "export", str(finished_run), "--format", "merged", "--out", str(out))
    assert result.returncode == 0, result.stderr
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-v1"
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in keys)
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys and "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    base = load_pipeline("builtin:tiny-sd")
    base.set_progress_bar_config(disable=True)
    base.save_pretrained(str(tmp_path / "config"))  # the configs from_single_file reads offline
    single = StableDiffusionPipeline.from_single_file(str(out), config=str(tmp_path / "config"),
                                                      local_files_only=True, safety_checker=None,
                                                      requires_safety_checker=False)
    single.set_progress_bar_config(disable=True)
    directory = tmp_path / "merged-dir"
    assert run_in_process(capfd, "export", str(finished_run), "--format", "merged", "--out",
                          str(directory)).returncode == 0
    fused = StableDiffusionPipeline.from_pretrained(str(directory), safety_checker=None)
    count = 0
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(single, part).state_dict(), getattr(fused, part).state_dict()
        assert a.keys() == b.keys(), part
        for name in a:
            assert torch.equal(a[name], b[name]), f"{part}.{name}"
        count += len(a)
    assert count == len(keys)  # every tensor in the file has a place, and every place a tensor
    with_lora = load_pipeline("builtin:tiny-sd")
    load_lora(with_lora, finished_run / "final")
    with_lora.set_progress_bar_config(disable=True)
    image, expected, plain = _images(single), _images(with_lora), _images(base)
    torch.testing.assert_close(image, expected, atol=2e-3, rtol=0)
    assert (image - plain).abs().max() > 10 * (image - expected).abs().max()


def test_the_diffusers_file_is_the_runs_own(finished_run, tmp_path, capfd):
    out = tmp_path / "lora"
    assert run_in_process(capfd, "export", str(finished_run / "final"), "--format", "diffusers",
                          "--out", str(out)).returncode == 0
    name = "pytorch_lora_weights.safetensors"
    assert sorted(p.name for p in out.iterdir()) == [name]
    assert (out / name).read_bytes() == (finished_run / "final" / name).read_bytes()


def test_the_kohya_file_is_the_runs_and_loads_in_diffusers(finished_run, tmp_path, capfd):
    from safetensors import safe_open

    out = tmp_path / "my_lora.safetensors"
    assert run_in_process(capfd, "export", str(finished_run), "--format", "kohya", "--out", str(out)).returncode == 0
    assert out.read_bytes() == (finished_run / "final/lora_kohya.safetensors").read_bytes()
    with safe_open(str(out), "pt") as f:
        assert float(f.metadata()["ss_network_alpha"]) == 8 and all(k.startswith("lora_unet_") for k in f.keys())
    wrong = run_in_process(capfd, "export", str(finished_run), "--format", "kohya", "--out", str(tmp_path / "x.pt"))
    assert wrong.returncode == 2 and not (tmp_path / "x.pt").exists()


def _greedy(model, tokenizer) -> list[int]:
    inputs = tokenizer("I watched this film on a rainy Sunday.", return_tensors="pt")
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=12, do_sample=False)[0].tolist()


def test_merged_text_model_generates_what_base_and_adapter_generate(text_run, tiny_llama, tmp_path, capfd):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    result = run_in_process(capfd, "export", str(text_run), "--format", "merged", "--out", str(out))
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(text_run / "final"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    inputs = tokenizer("I watched this film on a rainy Sunday.", return_tensors="pt")
    with torch.no_grad():
        logits = [m(**inputs).logits for m in (merged, tuned, base)]
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)
    assert (logits[0] - logits[2]).abs().max() > 1e-3  # the adapter changed the model
    assert _greedy(merged, tokenizer) == _greedy(tuned, tokenizer)


def test_the_peft_adapter_is_the_runs_own(text_run, tmp_path, capfd):
    out = tmp_path / "adapter"
    assert run_in_process(capfd, "export", str(text_run), "--format", "peft", "--out", str(out)).returncode == 0
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (text_run / "final" / name).read_bytes()


@pytest.mark.parametrize("args, field", [
    (["--format", "peft"], "--format"),  # a diffusion run's LoRA is no PEFT adapter
    (["--format", "kohya", "--text-run"], "--format"),
    (["--format", "gguf"], "--format"),
    (["--format", "merged", "--scale", "nan"], "--scale"),
    (["--format", "diffusers", "--scale", "0.5"], "--scale"),
    (["--format", "merged", "--out-exists"], "--out"),
    (["--format", "merged", "--text-run", "--out-file"], "--out"),  # a merged text model is a directory
])
def test_a_refused_export_is_one_line_and_writes_nothing(finished_run, text_run, tmp_path, capfd, args, field):
    run = copy_run(text_run if "--text-run" in args else finished_run, tmp_path / "run")
    args = [a for a in args if a != "--text-run"]
    out = tmp_path / ("out.safetensors" if "--out-file" in args else "out")
    args = [a for a in args if a != "--out-file"]
    if "--out-exists" in args:
        args = [a for a in args if a != "--out-exists"]
        out.write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_in_process(capfd, "export", str(run), *args, "--out", str(out))
    assert result.returncode == 2
    assert _one_error_line(result.stderr).startswith(f"error: {field}")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not out.exists() or out.read_text() == "mine"


def test_merged_from_a_lora_directory_needs_the_base_model(finished_run, tmp_path, capfd):
    result = run_in_process(capfd, "export", str(finished_run / "final"), "--format", "merged",
                            "--out", str(tmp_path / "m"))
    assert result.returncode == 2 and "--model" in _one_error_line(result.stderr)
    assert not (tmp_path / "m").exists()
