"""`raft-diffusion export`: a run's LoRA in the form another program loads.

- `diffusers` (diffusion runs): `pytorch_lora_weights.safetensors`, as `final/` holds it, for
  `pipe.load_lora_weights(OUT)`.
- `kohya` (SD 1.x/2.x runs): one `.safetensors` file under kohya's names with its alpha and `ss_*`
  metadata (`final/lora_kohya.safetensors`), for ComfyUI, Forge, AUTOMATIC1111 and kohya sd-scripts.
- `peft` (text runs): the PEFT adapter (`adapter_model.safetensors`, `adapter_config.json`), for
  `PeftModel.from_pretrained` and vLLM's LoRA loading.
- `merged`: the base model with the LoRA fused in at `--scale`. `--out NAME.safetensors` (SD 1.x/2.x):
  one checkpoint in the original LDM layout, the file AUTOMATIC1111, Forge and ComfyUI load as a
  model (`StableDiffusionPipeline.from_single_file`; ldm_layout.py). Any other `--out`: a directory,
  a diffusers pipeline (`save_pretrained`; `DiffusionPipeline.from_pretrained(OUT)`), or a
  transformers model and its tokenizer (what vLLM, llama.cpp's converter and transformers load).

The output is written under a temporary name and renamed into place, and an existing `--out` is
refused: an export never replaces a file.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import write_dir_atomically, write_file_atomically
from .errors import UserError

FORMATS = ("kohya", "diffusers", "peft", "merged")
DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"
PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")


@dataclass
class Source:
    backend: str  # "diffusion" or "text"
    final: Path  # the directory holding the LoRA
    model: str | None  # the base model's path (the run's model.path, or --model)
    gguf_file: str | None = None


def read_source(source: Path, model: str | None) -> Source:
    """A run directory (its config says the backend and base model), or a LoRA directory such as
    a run's final/ (the files say the backend; the base model comes from `model`)."""
    from .config import read_saved_config

    source = Path(source)
    if not source.is_dir():
        raise UserError("SOURCE", f"{source} is not a directory", "pass a run directory or its final/")
    if (source / "config.yaml").is_file() and (source / "run.json").is_file():
        saved = read_saved_config(source / "config.yaml")
        saved_model = saved.get("model") if isinstance(saved, dict) else None
        if not isinstance(saved_model, dict) or not isinstance(saved.get("backend", "diffusion"), str):
            raise UserError("SOURCE", f"{source / 'config.yaml'} names no model", "pass --model")
        final = source / "final"
        backend = saved.get("backend", "diffusion")
        gguf = saved_model.get("gguf_file")
        model = model if model is not None else saved_model.get("path")
    else:
        final, gguf = source, None
        backend = "text" if (source / "adapter_config.json").is_file() else "diffusion"
    wanted = DIFFUSERS_LORA if backend == "diffusion" else PEFT_FILES[0]
    if not (final / wanted).is_file():
        raise UserError("SOURCE", f"no {wanted} in {final}", "pass a finished run's directory or its final/")
    return Source(backend, final, model, gguf)


def export(source: Path, fmt: str, out: Path, scale: float = 1.0, model: str | None = None) -> Path:
    """Write the LoRA of `source` in format `fmt` at `out`; returns `out`."""
    if fmt not in FORMATS:
        raise UserError("--format", f"unknown format {fmt!r}", f"use one of: {', '.join(FORMATS)}")
    if not math.isfinite(scale):
        raise UserError("--scale", f"{scale} is not a finite number", "use e.g. 1 (the LoRA as trained) or 0.5")
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise UserError("--out", f"{out} already exists", "choose a new path: export never replaces files")
    if not out.parent.is_dir():
        raise UserError("--out", f"{out.parent} is not a directory", "create it first, or choose another --out")
    src = read_source(source, model)
    kind = {"diffusion": "diffusers", "text": "peft"}[src.backend]
    if fmt == "kohya" and src.backend != "diffusion":
        raise UserError("--format", "kohya is a format of a diffusion run's LoRA", "use peft or merged")
    if fmt in ("diffusers", "peft") and fmt != kind:
        raise UserError("--format", f"{fmt} is not a format of a {src.backend} run's LoRA",
                        f"use {kind} or merged")
    if fmt != "merged" and scale != 1.0:
        raise UserError("--scale", f"{scale} applies only to --format merged",
                        "leave it out: a LoRA file is scaled where it is loaded")
    if fmt == "merged" and out.suffix == ".safetensors" and src.backend != "diffusion":
        raise UserError("--out", "a merged text model is a directory", "name a directory, e.g. --out merged-model")
    if fmt == "merged" and src.model is None:
        raise UserError("--model", "the base model is not known from a LoRA directory alone",
                        "pass --model (hub id, local directory or single file), or the run directory")
    if fmt == "kohya":
        _kohya_file(src, out)
    elif fmt == "diffusers":
        write_dir_atomically(out, lambda tmp: shutil.copy2(src.final / DIFFUSERS_LORA, tmp / DIFFUSERS_LORA))
    elif fmt == "peft":
        write_dir_atomically(out, lambda tmp: [shutil.copy2(src.final / name, tmp / name) for name in PEFT_FILES])
    elif src.backend == "diffusion":
        _merged_pipeline(src, out, scale)
    else:
        _merged_causal_lm(src, out, scale)
    return out


def _kohya_file(src: Source, out: Path) -> None:
    from .lora_formats import KOHYA_FILE

    if out.suffix != ".safetensors":
        raise UserError("--out", f"{out} does not end in .safetensors", "name the file, e.g. --out my_lora.safetensors")
    kohya = src.final / KOHYA_FILE
    if not kohya.is_file():
        raise UserError("SOURCE", f"no {KOHYA_FILE} in {src.final}",
                        "an SD 3 run's diffusers file loads in ComfyUI as it is; an SD 1.x/2.x run made before "
                        "final/ held this file can be re-made with --format merged, or retrained")
    write_file_atomically(out, lambda tmp: shutil.copyfile(kohya, tmp))


def _merged_pipeline(src: Source, out: Path, scale: float) -> None:
    from diffusers import StableDiffusionPipeline

    from .backends.diffusion import load_lora, load_pipeline

    pipe = load_pipeline(src.model, field="--model")
    single = out.suffix == ".safetensors"
    if single and not isinstance(pipe, StableDiffusionPipeline):
        raise UserError("--out", f"a merged {type(pipe).__name__} has no single-file layout here",
                        "name a directory (a diffusers pipeline), e.g. --out merged-model")
    load_lora(pipe, src.final, "SOURCE")
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go
    if not single:
        write_dir_atomically(out, lambda tmp: pipe.save_pretrained(str(tmp), safe_serialization=True))
        return
    from safetensors.torch import save_file

    from .ldm_layout import pipeline_to_ldm

    state = pipeline_to_ldm(pipe)  # every tensor named before a byte is written
    architecture = "stable-diffusion-v2" if "cond_stage_model.model.token_embedding.weight" in state \
        else "stable-diffusion-v1"
    write_file_atomically(out, lambda tmp: save_file(state, str(tmp), metadata={
        "format": "pt", "modelspec.architecture": architecture, "raft_diffusion.lora_scale": repr(scale)}))


def _merged_causal_lm(src: Source, out: Path, scale: float) -> None:
    from peft.tuners.lora import LoraLayer

    from .backends.text import attach_adapter, load_causal_lm

    base, tokenizer = load_causal_lm(src.model, src.gguf_file, field="--model")
    tuned = attach_adapter(base, str(src.final), src.model, "SOURCE",
                           "pass the base model it was trained on with --model")
    if scale != 1.0:
        for module in tuned.modules():
            if isinstance(module, LoraLayer):
                module.scaling = {name: value * scale for name, value in module.scaling.items()}
    merged = tuned.merge_and_unload()

    def write(tmp: Path) -> None:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    write_dir_atomically(out, write)
