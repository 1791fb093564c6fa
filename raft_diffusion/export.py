"""`raft-diffusion export`: a run's LoRA in the form another program loads.

- `diffusers` (diffusion runs): `pytorch_lora_weights.safetensors`, as `final/` holds it, for
  `pipe.load_lora_weights(OUT)`.
- `kohya` (diffusion runs): one `.safetensors` file under kohya's names with its alpha and `ss_*`
  metadata (`final/lora_kohya.safetensors`; SDXL on its SGM UNet layout, SD 3 on the MMDiT
  layout), for ComfyUI, Forge, AUTOMATIC1111 and kohya sd-scripts.
  A run made before final/ held that file, or a lone diffusers-named LoRA file, is converted: its
  rank and alpha come from the LoRA config diffusers keeps in the header (`lora_adapter_metadata`).
- `peft` (text runs): the PEFT adapter (`adapter_model.safetensors`, `adapter_config.json`), for
  `PeftModel.from_pretrained` and vLLM's LoRA loading.
- `merged`: the base model with the LoRA fused in at `--scale`. `--out NAME.safetensors` (SD 1.x/2.x):
  one checkpoint in the original LDM layout, the file AUTOMATIC1111, Forge and ComfyUI load as a
  model (`StableDiffusionPipeline.from_single_file`; ldm_layout.py). Any other `--out`: a directory,
  a diffusers pipeline (`save_pretrained`; `DiffusionPipeline.from_pretrained(OUT)`), or a
  transformers model and its tokenizer (what vLLM, llama.cpp's converter and transformers load).

SOURCE is a run directory, a LoRA directory (a run's final/), or, for diffusion, one LoRA
`.safetensors` file (diffusers' names or kohya's). The output is written under a temporary name and
renamed into place, and an existing `--out` is refused: an export never replaces a file.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import write_dir_atomically, write_file_atomically
from .errors import UserError
from .kinds import KINDS, BackendKind, kind_of, lora_dir_kind
from .backends.families import FAMILIES, Flux, family_of
from .backends.loading import load_pipeline
from .backends.lora_io import load_lora, lora_metadata
from .backends.text import attach_adapter, load_causal_lm
from .config import read_saved_config
from .ldm_layout import pipeline_to_ldm
from .lora_formats import KOHYA_FILE, is_kohya, write_kohya, write_sd3_kohya, write_sdxl_kohya
from .lora_formats_flux import write_flux_kohya
from .weights import read_tensors

FORMATS = ("kohya", "diffusers", "peft", "merged")
LORA_FORMATS = tuple(kind.lora_format for kind in KINDS.values())  # a run's own LoRA file(s), as final/ holds them
DIFFUSERS_LORA = KINDS["diffusion"].lora_file
PEFT_FILES = tuple(sorted(KINDS["text"].final_files, reverse=True))  # adapter_model.safetensors, adapter_config.json


@dataclass
class Source:
    kind: BackendKind  # what the run generates (kinds.py)
    final: Path  # the directory holding the LoRA
    model: str | None  # the base model's path (the run's model.path, or --model)
    gguf_file: str | None = None
    lora_file: Path | None = None  # the LoRA file (final/'s own, or the one given)
    kohya: bool = False  # whether lora_file is kohya-named
    vae: str | None = None  # the run's model.vae (diffusion), which a merged pipeline carries


def read_source(source: Path, model: str | None) -> Source:
    """A run directory (its config says the backend and base model), or a LoRA directory such as
    a run's final/ (the files say the backend; the base model comes from `model`)."""
    source = Path(source)
    if source.is_file():
        return _lora_file_source(source, model)
    if not source.is_dir():
        raise UserError("SOURCE", f"{source} not found", "pass a run directory, its final/ or a LoRA .safetensors file")
    if (source / "config.yaml").is_file() and (source / "run.json").is_file():
        saved = read_saved_config(source / "config.yaml")
        saved_model = saved.get("model") if isinstance(saved, dict) else None
        if not isinstance(saved_model, dict) or not isinstance(saved.get("backend", "diffusion"), str):
            raise UserError("SOURCE", f"{source / 'config.yaml'} names no model", "pass --model")
        final = source / "final"
        kind = _kind_named(saved.get("backend", "diffusion"), source / "config.yaml")
        gguf = saved_model.get("gguf_file")
        vae = saved_model.get("vae") if model is None else None  # the run's VAE goes with the run's model
        model = model if model is not None else saved_model.get("path")
    else:
        final, gguf, vae = source, None, None
        kind = lora_dir_kind(source)
    if not (final / kind.lora_file).is_file():
        raise UserError("SOURCE", f"no {kind.lora_file} in {final}", "pass a finished run's directory or its final/")
    return Source(kind, final, model, gguf, final / kind.lora_file, vae=vae if isinstance(vae, str) else None)


def _kind_named(name: str, where: Path):
    try:
        return kind_of(name)
    except UserError:
        raise UserError("SOURCE", f"{where} names backend {name!r}, which this version does not know",
                        "pass --model with the run's final/") from None


def _lora_file_source(path: Path, model: str | None) -> Source:
    """One diffusion LoRA file: diffusers-named (`unet.`, `transformer.` keys) or kohya-named."""
    from safetensors import SafetensorError, safe_open

    fix = "pass a run directory, its final/, or a diffusion LoRA .safetensors file"
    if path.suffix != ".safetensors":
        raise UserError("SOURCE", f"{path} is not a .safetensors file", fix)
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise UserError("SOURCE", f"{path} is not a readable safetensors file: {e}", fix) from None
    kohya = is_kohya(keys)
    if not kohya and not any(k.startswith(("unet.", "transformer.")) for k in keys):
        raise UserError("SOURCE", f"{path} holds no diffusion LoRA (no lora_unet_, unet. or transformer. keys)",
                        fix + " (a text run's adapter is its final/ directory)")
    return Source(KINDS["diffusion"], path.parent, model, None, path, kohya)


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
    own = src.kind.lora_format
    if fmt == "kohya" and fmt not in src.kind.client_formats:
        having = " or ".join(k.name for k in KINDS.values() if fmt in k.client_formats)
        raise UserError("--format", f"kohya is a format of a {having} run's LoRA", f"use {own} or merged")
    if fmt in LORA_FORMATS and fmt != own:
        raise UserError("--format", f"{fmt} is not a format of a {src.kind.name} run's LoRA",
                        f"use {own} or merged")
    if fmt != "merged" and scale != 1.0:
        raise UserError("--scale", f"{scale} applies only to --format merged",
                        "leave it out: a LoRA file is scaled where it is loaded")
    if fmt == "merged" and out.suffix == ".safetensors" and not src.kind.single_file_merge:
        raise UserError("--out", "a merged text model is a directory", "name a directory, e.g. --out merged-model")
    if fmt == "merged" and src.model is None:
        raise UserError("--model", "the base model is not known from a LoRA directory alone",
                        "pass --model (hub id, local directory or single file), or the run directory")
    if fmt == "kohya":
        _kohya_file(src, out)
    elif fmt == "diffusers":
        if src.kohya:
            raise UserError("--format", f"{src.lora_file} is kohya-named, and diffusers loads it as it is "
                            "(pipe.load_lora_weights(FILE))", "use --format merged, or load the file itself")
        write_dir_atomically(out, lambda tmp: shutil.copy2(src.lora_file, tmp / DIFFUSERS_LORA))
    elif fmt == "peft":
        write_dir_atomically(out, lambda tmp: [shutil.copy2(src.final / name, tmp / name) for name in PEFT_FILES])
    elif src.kind.output == "image":
        _merged_pipeline(src, out, scale)
    else:
        _merged_causal_lm(src, out, scale)
    return out


def _kohya_file(src: Source, out: Path) -> None:
    if out.suffix != ".safetensors":
        raise UserError("--out", f"{out} does not end in .safetensors", "name the file, e.g. --out my_lora.safetensors")
    kohya = src.lora_file if src.kohya else None
    if kohya is None and src.lora_file == src.final / DIFFUSERS_LORA and (src.final / KOHYA_FILE).is_file():
        kohya = src.final / KOHYA_FILE  # the run's own, written with it
    if kohya is not None:
        write_file_atomically(out, lambda tmp: shutil.copyfile(kohya, tmp))
        return
    _convert_to_kohya(src.lora_file, out, src.model)


def _convert_to_kohya(path: Path, out: Path, model: str | None) -> None:
    """A diffusers-named SD 1.x/2.x, SDXL or SD 3 LoRA file under kohya's names: its layers renamed, `.alpha` and
    the `ss_*` fields from the LoRA config in its header, refused whole where kohya's format cannot
    carry it."""
    state = read_tensors(path, "SOURCE")
    sd3 = any(k.startswith("transformer.") for k in state)
    if sd3 and model is None:
        raise UserError("--model", f"{path} is a transformer's LoRA (SD 3 or FLUX), whose kohya names depend on the model",
                        "pass --model (the base it was trained on), or the run directory")
    prefix = "transformer." if sd3 else "unet."
    header = lora_metadata(path) or {}
    config = {k[len(prefix):]: v for k, v in header.items() if k.startswith(prefix)} or header
    if "r" not in config or "lora_alpha" not in config:
        raise UserError("SOURCE", f"{path} does not say its LoRA's rank and alpha (no lora_adapter_metadata "
                        "in its header), so kohya's .alpha cannot be written right",
                        "save it with diffusers' save_lora_weights(..., unet_lora_adapter_metadata=config), "
                        "or retrain")
    if sd3:
        pipe = load_pipeline(model, field="--model")
        family = family_of(pipe)
        if family.denoiser != "transformer":
            raise UserError("--model", f"{path} is a transformer's LoRA and {model} has a UNet",
                            "pass the SD 3 or FLUX model the LoRA was trained on")
        layers = family.lora_tensors(state)
        writer = write_flux_kohya if isinstance(family, Flux) else write_sd3_kohya
        writer(out, layers, config, dict(pipe.transformer.config), model, field="SOURCE")
        return
    layers = FAMILIES["StableDiffusionPipeline"].lora_tensors(state)
    # SD 2.x (OpenCLIP ViT-H), 1.x (CLIP ViT-L) or SDXL (CLIP-L and bigG, 2048), from what the
    # cross-attention keys and values read
    widths = {int(t.shape[1]) for k, t in layers.items() if ".attn2.to_k.lora_A" in k or ".attn2.to_v.lora_A" in k}
    model_path = model or str(header.get("unet.base_model_name_or_path") or "")
    sdxl_config = _sdxl_unet_config(model, layers, widths)
    if sdxl_config is not None:
        write_sdxl_kohya(out, layers, config, sdxl_config, model_path, field="SOURCE")
        return
    unet_config = {"cross_attention_dim": widths.pop()} if len(widths) == 1 else {}
    write_kohya(out, layers, config, unet_config, model_path, field="SOURCE")


def _sdxl_unet_config(model: str | None, layers: dict, widths: set[int]) -> dict | None:
    """The UNet config of an SDXL LoRA's base, or None for SD 1.x/2.x: SDXL by `--model` (or the run's
    model) when that is an SDXL pipeline, else by the LoRA's own layers (SDXL's add-embedding, its
    2048-wide cross-attention). An SDXL base that cannot be read (a hub id offline) is SDXL base 1.0's
    layout, which its fine-tunes share."""
    from .tiny_sdxl import sdxl_unet_config

    own = _unet_config_of(model) if model else None
    if own is not None:
        return own if own.get("addition_embed_type") == "text_time" else None
    if any(k.startswith("add_embedding.") for k in layers) or widths == {2048}:
        return sdxl_unet_config()
    return None


def _unet_config_of(model: str) -> dict | None:
    """The UNet config of `model` (builtin:NAME, a diffusers directory, a hub id), or None where it
    cannot be read without loading weights or a network (a single file, a hub id offline)."""
    import json

    if model.startswith("builtin:"):
        pipe = load_pipeline(model, field="--model")
        unet = getattr(pipe, "unet", None)
        return dict(unet.config) if unet is not None else {}
    local = Path(model).expanduser()
    if local.is_dir():
        config = local / "unet" / "config.json"
        return json.loads(config.read_text()) if config.is_file() else {}
    if local.exists():
        return None
    try:
        from diffusers import UNet2DConditionModel

        return dict(UNet2DConditionModel.load_config(model, subfolder="unet"))
    except Exception:  # noqa: BLE001 - offline, or not a UNet model
        return None


def _merged_pipeline(src: Source, out: Path, scale: float) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = load_pipeline(src.model, field="--model", vae=src.vae)  # with the run's model.vae, as it sampled
    single = out.suffix == ".safetensors"
    if single and not isinstance(pipe, StableDiffusionPipeline):
        raise UserError("--out", f"a merged {type(pipe).__name__} has no single-file layout here",
                        "name a directory (a diffusers pipeline), e.g. --out merged-model")
    load_lora(pipe, src.lora_file, "SOURCE")
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go
    if not single:
        write_dir_atomically(out, lambda tmp: pipe.save_pretrained(str(tmp), safe_serialization=True))
        return
    from safetensors.torch import save_file

    state = pipeline_to_ldm(pipe)  # every tensor named before a byte is written
    architecture = "stable-diffusion-v2" if "cond_stage_model.model.token_embedding.weight" in state \
        else "stable-diffusion-v1"
    write_file_atomically(out, lambda tmp: save_file(state, str(tmp), metadata={
        "format": "pt", "modelspec.architecture": architecture, "raft_diffusion.lora_scale": repr(scale)}))


def _merged_causal_lm(src: Source, out: Path, scale: float) -> None:
    from peft.tuners.lora import LoraLayer

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
