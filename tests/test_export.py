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

    from raft_diffusion.backends.loading import load_pipeline
    from raft_diffusion.backends.lora_io import load_lora

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

    from raft_diffusion.backends.loading import load_pipeline

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

    from raft_diffusion.backends.loading import load_pipeline
    from raft_diffusion.backends.lora_io import load_lora

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


# -- kohya from a diffusers file: runs made before final/ held lora_kohya.safetensors, lone files ------

def test_a_run_without_its_kohya_file_gets_the_same_file_converted(finished_run, tmp_path, capfd):
    run = copy_run(finished_run, tmp_path / "old-run")
    (run / "final/lora_kohya.safetensors").unlink()  # as a run of an earlier version left final/
    out = tmp_path / "lora_kohya.safetensors"
    result = run_in_process(capfd, "export", str(run), "--format", "kohya", "--out", str(out))
    assert result.returncode == 0, result.stderr
    # rank, alpha, names and metadata rebuilt from the diffusers file's header: the run's own bytes
    assert out.read_bytes() == (finished_run / "final/lora_kohya.safetensors").read_bytes()


def test_a_lone_diffusers_file_converts_and_a_lone_kohya_file_merges(finished_run, tmp_path, capfd):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file

    lone = tmp_path / "downloaded.safetensors"
    lone.write_bytes((finished_run / "final/pytorch_lora_weights.safetensors").read_bytes())
    out = tmp_path / "converted.safetensors"
    result = run_in_process(capfd, "export", str(lone), "--format", "kohya", "--out", str(out))
    assert result.returncode == 0, result.stderr
    converted, own = load_file(str(out)), load_file(str(finished_run / "final/lora_kohya.safetensors"))
    assert converted.keys() == own.keys() and all(torch.equal(converted[k], own[k]) for k in own)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_network_alpha"] == "8.0" and f.metadata()["ss_network_dim"] == "4"
    kohya = tmp_path / "civitai.safetensors"
    kohya.write_bytes((finished_run / "final/lora_kohya.safetensors").read_bytes())
    for name, source in (("from-kohya", kohya), ("from-run", finished_run)):
        args = ["export", str(source), "--format", "merged", "--out", str(tmp_path / name)]
        result = run_in_process(capfd, *args, *(["--model", "builtin:tiny-sd"] if source == kohya else []))
        assert result.returncode == 0, result.stderr
    a, b = (StableDiffusionPipeline.from_pretrained(str(tmp_path / n), safety_checker=None).unet.state_dict()
            for n in ("from-kohya", "from-run"))
    # diffusers' kohya loader and its own file attach the same LoRA: the same fused weights
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in b)


def _fake_lora(path, keys, metadata=None):
    from safetensors.torch import save_file

    save_file({k: torch.zeros(4, 8) for k in keys}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("case, field", [
    ("kohya file to diffusers", "--format"),
    ("sd3 file to kohya without the model", "--model"),
    ("no header config", "SOURCE"),
    ("no lora keys", "SOURCE"),
    ("not safetensors", "SOURCE"),
])
def test_a_lora_file_that_cannot_take_the_format_is_one_line_and_writes_nothing(finished_run, tmp_path, capfd,
                                                                                 case, field):
    if case == "kohya file to diffusers":
        source, fmt = tmp_path / "k.safetensors", "diffusers"
        source.write_bytes((finished_run / "final/lora_kohya.safetensors").read_bytes())
    elif case == "sd3 file to kohya without the model":
        header = {"lora_adapter_metadata": '{"transformer.r": 4, "transformer.lora_alpha": 4}'}
        source = _fake_lora(tmp_path / "sd3.safetensors", ["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"],
                            header)
        fmt = "kohya"
    elif case == "no header config":
        module = "unet.mid_block.attentions.0.proj_in"
        source = _fake_lora(tmp_path / "bare.safetensors", [f"{module}.lora_A.weight", f"{module}.lora_B.weight"])
        fmt = "kohya"
    elif case == "no lora keys":
        source, fmt = _fake_lora(tmp_path / "model.safetensors", ["model.diffusion_model.out.2.weight"]), "kohya"
    else:
        source, fmt = tmp_path / "lora.ckpt", "kohya"
        source.write_bytes(b"not a safetensors file")
    out = tmp_path / ("out" if fmt == "diffusers" else "out.safetensors")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_in_process(capfd, "export", str(source), "--format", fmt, "--out", str(out))
    assert result.returncode == 2
    line = _one_error_line(result.stderr)
    assert line.startswith(f"error: {field}: "), line
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_exported_files_are_readable_by_other_users(finished_run, tmp_path, capfd):
    """ComfyUI or A1111 running as another user read them: the mode a plain open gives, not 0600."""
    import os
    import stat

    mask = os.umask(0o022)
    try:
        single = tmp_path / "merged.safetensors"
        assert run_in_process(capfd, "export", str(finished_run), "--format", "merged", "--out",
                              str(single)).returncode == 0
        directory = tmp_path / "merged"
        assert run_in_process(capfd, "export", str(finished_run), "--format", "merged", "--out",
                              str(directory)).returncode == 0
        converted = tmp_path / "lora.safetensors"
        assert run_in_process(capfd, "export", str(finished_run / "final/pytorch_lora_weights.safetensors"),
                              "--format", "kohya", "--out", str(converted)).returncode == 0
    finally:
        os.umask(mask)
    files = [single, converted, *[p for p in directory.rglob("*") if p.is_file()]]
    assert any(p.suffix == ".safetensors" for p in directory.rglob("*"))
    assert {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {str(p): "0o644" for p in files}
