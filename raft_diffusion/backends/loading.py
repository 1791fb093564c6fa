"""Loading a diffusers pipeline: `builtin:NAME` (the model registry), a local diffusers directory, a
single-file checkpoint (A1111 / ComfyUI layout) or a hub id; and what a loaded model allows
(its native resolution, the image sides its latents can have, its sampler)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from safetensors import safe_open

from .. import model_registry
from ..errors import UserError
from ..tokenizer import clip_tokenizer
from .families import FAMILIES, family_of

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
OWN_CONFIG = ("_t5_tokens",)  # pipeline config keys of raft-diffusion's, kept through save_pretrained
BUILTINS = tuple(model_registry.DIFFUSION_BUILTINS)


def _looks_local(path: str) -> bool:
    return (
        path.startswith(("/", "./", "../", "~"))
        or path.endswith(SINGLE_FILE_SUFFIXES)
        or path.count("/") != 1
    )


def load_pipeline(path: str, dtype: str = "float32", revision: str | None = None,
                  variant: str | None = None, field: str = "model.path", vae: str | None = None
                  ) -> StableDiffusionPipeline:
    """An SD 1.x/2.x, SDXL, SD 3 or FLUX.1 pipeline from `builtin:NAME`, a local diffusers dir, a single file,
    or a hub id; `vae`: an AutoencoderKL (hub id or local dir) that replaces the pipeline's (`model.vae`)."""
    pipe = _load_pipeline(path, dtype, revision, variant, field)
    if vae is not None:
        pipe.vae = load_vae(vae, dtype, field.rpartition(".")[0] + ".vae" if "." in field else "model.vae")
    return pipe


def load_vae(path: str, dtype: str, field: str):
    """An AutoencoderKL from a local diffusers directory (its config.json and weights) or a hub id."""
    from diffusers import AutoencoderKL

    local = Path(path).expanduser()
    if not local.exists() and _looks_local(path):
        raise UserError(field, f"VAE not found: {path}", "pass an existing directory or a hub id")
    try:
        return AutoencoderKL.from_pretrained(str(local) if local.exists() else path, torch_dtype=DTYPES[dtype])
    except Exception as e:  # noqa: BLE001 - offline machines end here for a hub id
        where = "" if local.exists() else " from the hub"
        raise UserError(field, f"cannot load the VAE {path!r}{where}: {type(e).__name__}",
                        "pass a local AutoencoderKL directory (config.json and weights), or check the id and "
                        "your network") from e


def _load_pipeline(path: str, dtype: str, revision: str | None, variant: str | None,
                   field: str) -> StableDiffusionPipeline:
    torch_dtype = DTYPES[dtype]
    if path.startswith("builtin:"):
        name = path[len("builtin:"):]
        if name not in BUILTINS:
            raise UserError(field, f"unknown built-in model {name!r}", f"available: {', '.join(BUILTINS)}")
        return model_registry.resolve(model_registry.DIFFUSION_BUILTINS[name])(torch_dtype, field)
    local = Path(path).expanduser()
    if local.exists():
        try:
            if local.is_file():
                if not local.name.endswith(SINGLE_FILE_SUFFIXES):
                    raise UserError(field, f"{path} is not a .safetensors or .ckpt checkpoint",
                                    "pass a diffusers directory or a single-file SD checkpoint")
                return _single_file_class(local).from_single_file(str(local), torch_dtype=torch_dtype)
            for marker, loader in model_registry.DIRECTORY_FORMATS.items():  # e.g. a toy flow model's
                if (local / marker).is_file():
                    return model_registry.resolve(loader)(local, dtype, field)
            if not (local / "model_index.json").is_file():
                raise UserError(field, f"{path} has no model_index.json",
                                "pass a directory saved by DiffusionPipeline.save_pretrained")
            index = json.loads((local / "model_index.json").read_text())
            family = _family_named(index.get("_class_name"), path, field)
            # components a pipeline saved as none (SD 3 without T5: text_encoder_3) are passed as None
            extra = {**family.load_options, **{name: None for name in family.optional_components
                                                if not (isinstance(index.get(name), list) and index[name][0] is not None)}}
            # CLIP's BPE, from open_clip's bundled vocabulary, where the directory has no tokenizer
            # of its own (the toy assets omit them)
            for name in family.clip_tokenizers:
                if not (local / name).is_dir():
                    extra[name] = clip_tokenizer()
            pipe = family.pipeline_class.from_pretrained(str(local), torch_dtype=torch_dtype, **extra)
            # what a builtin registered of its own (tiny-flux's `_t5_tokens`), which from_pretrained drops
            ours = {k: v for k, v in index.items() if k in OWN_CONFIG}
            if ours:
                pipe.register_to_config(**ours)
            return pipe
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - report the loader's reason in one line
            raise UserError(field, f"cannot load {path}: {type(e).__name__}: {str(e).splitlines()[0]}",
                            "check that it is a Stable Diffusion 1.x/2.x, XL or 3.x or a FLUX.1 checkpoint") from e
    if _looks_local(path):
        raise UserError(field, f"model not found: {path}", "pass an existing directory, file or hub id")
    try:
        index = DiffusionPipeline.load_config(path, revision=revision)  # model_index.json alone
    except Exception as e:  # noqa: BLE001 - offline machines end here
        raise UserError(field, f"cannot load {path!r} from the hub: {type(e).__name__}",
                        "check the id and your network, or pass a local directory") from e
    family = _family_named(index.get("_class_name"), path, field)
    try:
        return family.pipeline_class.from_pretrained(path, torch_dtype=torch_dtype, revision=revision,
                                                     variant=variant, **family.load_options)
    except Exception as e:  # noqa: BLE001
        raise UserError(field, f"cannot load {path!r} from the hub: {type(e).__name__}",
                        "check the id and your network, or pass a local directory") from e


def _family_named(class_name: str | None, path: str, field: str):
    if class_name not in FAMILIES:
        raise UserError(field, f"{path} is a {class_name or 'pipeline of no known class'}",
                        "pass a Stable Diffusion 1.x/2.x, XL or 3.x or a FLUX.1 pipeline")
    return FAMILIES[class_name]


def _single_file_class(path: Path):
    """The pipeline class of the family whose `single_file_marker` the file's keys hold (SD 3's MMDiT
    joint blocks, ...); anything else loads as SD 1.x/2.x."""
    if path.name.endswith(".safetensors"):
        try:
            with safe_open(str(path), "pt") as f:
                keys = list(f.keys())
        except Exception:  # noqa: BLE001 - from_single_file says what is wrong with the file
            keys = []
        for family in FAMILIES.values():
            if family.single_file_marker and any(family.single_file_marker in k for k in keys):
                return family.pipeline_class
    return StableDiffusionPipeline


def make_scheduler(pipe: StableDiffusionPipeline, name: str):
    """The sampler `name` (SD 1.x); a flow-matching model's own Euler scheduler (SD 3)."""
    return family_of(pipe).sampler(pipe, name)


def native_resolution(pipe: StableDiffusionPipeline) -> int:
    """The image side the model was trained at: its denoiser's latent side times the VAE's scale."""
    return family_of(pipe).sample_size(pipe) * pipe.vae_scale_factor


def check_resolution(pipe: StableDiffusionPipeline, resolution: int, field: str) -> None:
    """Refuse an image side the model's latents cannot have: not a positive multiple of the VAE scale
    (times the transformer's patch size, for SD 3)."""
    scale = family_of(pipe).latent_multiple(pipe)
    if resolution <= 0 or resolution % scale:
        lower, upper = resolution // scale * scale, max(1, -(-resolution // scale)) * scale
        what = f"{resolution} is not a multiple" if resolution > 0 else f"{resolution} pixels is not a positive multiple"
        raise UserError(field, f"{what} of the model's latent scale {scale}",
                        f"use {lower} or {upper}" if 0 < lower < upper else f"use {upper} or a larger multiple")

