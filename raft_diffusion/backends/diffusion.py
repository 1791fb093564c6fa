"""Stable Diffusion 1.x/2.x and 3.x with a PEFT LoRA on the denoiser (UNet or MMDiT transformer):
generation and RAFT fine-tuning.

Every object is the diffusers one (`StableDiffusionPipeline` / `StableDiffusion3Pipeline`, their
schedulers, `add_adapter`, `save_lora_weights`), so a diffusers user recognises all of it. What
differs between the two families (prompt encoding, sampling call, training target, LoRA save) is
in families.py. Generation keeps each sample's final latents; fine-tuning trains on them directly,
so the VAE never encodes during training.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm

from ..config import GenerationConfig, RunConfig
from . import check_lora_targets, fine_tune, load_training_state, training_state
from ..precision import Precision
from ..errors import UserError
from ..paths import ASSETS
from ..protocols import Samples
from ..weights import canonicalize_safetensors, read_tensors
from .families import FAMILIES, Cond, family_of

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
ASSET_BUILTINS = {"toy-shapes": "toyworld/toy-shapes",  # trained, shipped pipelines
                  "toy-shapes-flow": "toyworld/toy-shapes-flow"}  # SD 3's architecture; toy-shapes' VAE and text
# tiny-*: random, built on the fly; sd15-random: SD 1.5's architecture with random weights (benchmarks)
BUILTINS = ("tiny-sd", "tiny-sd-v", "tiny-sd3", "sd15-random", *ASSET_BUILTINS)
SCHEDULERS = {"ddim": DDIMScheduler, "dpm_solver": DPMSolverMultistepScheduler}
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # what save_adapter writes and load_lora_weights reads


def _looks_local(path: str) -> bool:
    return (
        path.startswith(("/", "./", "../", "~"))
        or path.endswith(SINGLE_FILE_SUFFIXES)
        or path.count("/") != 1
    )


def load_pipeline(path: str, dtype: str = "float32", revision: str | None = None,
                  variant: str | None = None, field: str = "model.path") -> StableDiffusionPipeline:
    """An SD 1.x/2.x or SD 3 pipeline from `builtin:NAME`, a local diffusers dir, a single file, or a hub id."""
    torch_dtype = DTYPES[dtype]
    if path.startswith("builtin:"):
        name = path[len("builtin:"):]
        if name not in BUILTINS:
            raise UserError(field, f"unknown built-in model {name!r}", f"available: {', '.join(BUILTINS)}")
        if name in ASSET_BUILTINS:
            directory = ASSETS / ASSET_BUILTINS[name]
            if (directory / "raft_diffusion.json").is_file():
                return _toy_flow_pipeline(directory, dtype, field)
            if not (directory / "model_index.json").is_file():
                raise UserError(field, f"the {name} weights are missing from {directory}",
                                "rebuild them with: python -m raft_diffusion.toyworld.build")
            return load_pipeline(str(directory), dtype, field=field)
        from ..tiny import sd15_random_pipeline, tiny_pipeline, tiny_sd3_pipeline

        if name == "sd15-random":
            return sd15_random_pipeline(dtype=torch_dtype)
        pipe = tiny_sd3_pipeline() if name == "tiny-sd3" else \
            tiny_pipeline(prediction_type="v_prediction" if name == "tiny-sd-v" else "epsilon")
        return pipe if torch_dtype == torch.float32 else pipe.to(dtype=torch_dtype)
    local = Path(path).expanduser()
    if local.exists():
        try:
            if local.is_file():
                if not local.name.endswith(SINGLE_FILE_SUFFIXES):
                    raise UserError(field, f"{path} is not a .safetensors or .ckpt checkpoint",
                                    "pass a diffusers directory or a single-file SD checkpoint")
                return _single_file_class(local).from_single_file(str(local), torch_dtype=torch_dtype)
            if (local / "raft_diffusion.json").is_file():  # a toy flow model's directory (train_flow.py)
                return _toy_flow_pipeline(local, dtype, field)
            if not (local / "model_index.json").is_file():
                raise UserError(field, f"{path} has no model_index.json",
                                "pass a directory saved by DiffusionPipeline.save_pretrained")
            index = json.loads((local / "model_index.json").read_text())
            family = _family_named(index.get("_class_name"), path, field)
            extra = {}
            if family.pipeline_class is StableDiffusionPipeline:
                extra = {"safety_checker": None, "requires_safety_checker": False}
            else:  # components a pipeline saved as none (SD 3 without T5: text_encoder_3) are passed as None
                extra = {name: None for name in family.optional_components
                         if not (isinstance(index.get(name), list) and index[name][0] is not None)}
            from ..tokenizer import clip_tokenizer

            # CLIP's BPE, from open_clip's bundled vocabulary, where the directory has no tokenizer
            # of its own (the toy assets omit them)
            for name in family.clip_tokenizers:
                if not (local / name).is_dir():
                    extra[name] = clip_tokenizer()
            return family.pipeline_class.from_pretrained(str(local), torch_dtype=torch_dtype, **extra)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - report the loader's reason in one line
            raise UserError(field, f"cannot load {path}: {type(e).__name__}: {str(e).splitlines()[0]}",
                            "check that it is a Stable Diffusion 1.x/2.x or 3.x checkpoint") from e
    if _looks_local(path):
        raise UserError(field, f"model not found: {path}", "pass an existing directory, file or hub id")
    try:
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(path, revision=revision)  # model_index.json alone
    except Exception as e:  # noqa: BLE001 - offline machines end here
        raise UserError(field, f"cannot load {path!r} from the hub: {type(e).__name__}",
                        "check the id and your network, or pass a local directory") from e
    family = _family_named(index.get("_class_name"), path, field)
    extra = {"safety_checker": None, "requires_safety_checker": False} \
        if family.pipeline_class is StableDiffusionPipeline else {}
    try:
        return family.pipeline_class.from_pretrained(path, torch_dtype=torch_dtype, revision=revision,
                                                     variant=variant, **extra)
    except Exception as e:  # noqa: BLE001
        raise UserError(field, f"cannot load {path!r} from the hub: {type(e).__name__}",
                        "check the id and your network, or pass a local directory") from e


def _toy_flow_pipeline(directory: Path, dtype: str, field: str) -> StableDiffusion3Pipeline:
    """builtin:toy-shapes-flow: its transformer and scheduler, with toy-shapes' VAE and its text encoder
    as both of SD 3's CLIP encoders (toyworld/train_flow.py trained it so); no T5, and a prompt
    sequence of the 77 CLIP tokens alone (`t5_tokens` 0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from ..tokenizer import clip_tokenizer
    from ..toyworld.train_flow import text_encoder_with_projection

    meta = json.loads((directory / "raft_diffusion.json").read_text())
    sd = load_pipeline(meta["vae_and_text_encoder"], "float32", field=field)
    text = text_encoder_with_projection(sd.text_encoder)
    vae = sd.vae
    vae.register_to_config(shift_factor=0.0)
    tokenizer = clip_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(str(directory / "transformer")),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(directory / "scheduler")),
        vae=vae, text_encoder=text, tokenizer=tokenizer, text_encoder_2=text, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    pipe.t5_tokens = int(meta["t5_tokens"])  # what families.StableDiffusion3.encode gives the T5 part
    pipe.transformer.float().eval()
    return pipe if dtype == "float32" else pipe.to(dtype=DTYPES[dtype])


def _family_named(class_name: str | None, path: str, field: str):
    if class_name not in FAMILIES:
        raise UserError(field, f"{path} is a {class_name or 'pipeline of no known class'}",
                        "pass a Stable Diffusion 1.x/2.x or 3.x pipeline")
    return FAMILIES[class_name]


def _single_file_class(path: Path):
    """SD 3's single files hold MMDiT joint blocks; anything else loads as SD 1.x/2.x."""
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                if any(".joint_blocks." in k for k in f.keys()):
                    return StableDiffusion3Pipeline
        except Exception:  # noqa: BLE001 - from_single_file says what is wrong with the file
            pass
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


def load_lora(pipe: StableDiffusionPipeline, directory: Path, field: str = "--lora",
              model: str = "this --model") -> None:
    """The LoRA saved in `directory` (a run's final/, or one LoRA .safetensors file: diffusers' names
    or, for SD 1.x/2.x, kohya's) attached to `pipe`'s denoiser (UNet or transformer), every layer of
    it, or a `UserError`.

    `pipe.load_lora_weights` leaves the layers it cannot place unattached, with a log line at most;
    a user would then sample from part of the LoRA. Here every denoiser tensor of the file must end
    up in the loaded adapter, value for value.
    """
    from ..lora_formats import is_kohya

    family = family_of(pipe)
    denoiser = getattr(pipe, family.denoiser)
    path = Path(directory) if Path(directory).is_file() else Path(directory) / LORA_WEIGHTS
    try:  # a garbage or truncated file: one line, before diffusers sees it
        state = read_tensors(path, field)
    except UserError as e:
        raise UserError(field, e.problem, "pass a run's final/ directory, as training saved it") from None
    if is_kohya(state):
        if family.denoiser == "unet":
            return _load_kohya(pipe, path, state, field, model)
        return _load_sd3_kohya(pipe, path, state, field, model)
    expected = family.lora_tensors(state)

    def load() -> None:
        if family.denoiser == "unet" and _mixes_names(state):
            # Earlier raft-diffusion saved attention layers under diffusers' old names and the rest
            # under PEFT's; diffusers reads one scheme per file, so rename them all to PEFT's.
            StableDiffusionPipeline.load_lora_into_unet({f"unet.{k}": v for k, v in expected.items()}, None,
                                                        pipe.unet, _pipeline=pipe, metadata=lora_metadata(path))
        else:
            pipe.load_lora_weights(str(directory) if path.parent == Path(directory) else str(path))

    _, attached = _attach(denoiser, load, path, field, model)
    lost = [k for k, v in expected.items() if k not in attached or not torch.equal(attached[k].cpu(), v)]
    if not attached or lost:
        total = len(expected) or len(state)
        example = f" (e.g. {lost[0]})" if lost else ""
        raise UserError(field, f"{len(lost) or total} of {total} LoRA tensors in {path} match no layer of this "
                        f"model's {'UNet' if family.denoiser == 'unet' else family.denoiser}{example}",
                        f"pass a LoRA trained on {model}")


def _load_kohya(pipe: StableDiffusionPipeline, path: Path, state: dict[str, torch.Tensor], field: str,
                model: str) -> None:
    """A kohya-named SD 1.x/2.x LoRA file through diffusers' own kohya loader, checked as load_lora
    checks a diffusers file: every `lora_unet_` layer attached, its up and down weights value for value
    and its strength (alpha / rank) the file's."""
    from ..lora_formats import kohya_name

    denoiser = pipe.unet
    adapter, attached = _attach(denoiser, lambda: pipe.load_lora_weights(str(path)), path, field, model)
    found: dict[str, torch.Tensor] = {}
    for key, value in attached.items():
        module, _, part = key.rpartition(".lora_")
        name = kohya_name(module) + (".lora_down.weight" if part == "A.weight" else ".lora_up.weight")
        found[name] = value
        down = state.get(kohya_name(module) + ".lora_down.weight")
        alpha = state.get(kohya_name(module) + ".alpha")
        if part == "A.weight" and down is not None and alpha is not None:
            scaling = denoiser.get_submodule(module).scaling[adapter]
            if not math.isclose(scaling, float(alpha) / down.shape[0], rel_tol=1e-6):
                found[name] = None  # attached at the wrong strength
    expected = {k: v for k, v in state.items() if k.startswith("lora_unet_") and not k.endswith(".alpha")}
    lost = [k for k, v in expected.items() if found.get(k) is None or not torch.equal(found[k].cpu(), v)]
    if not attached or lost:
        example = f" (e.g. {lost[0]})" if lost else ""
        raise UserError(field, f"{len(lost) or len(expected)} of {len(expected)} LoRA tensors in {path} match no "
                        f"layer of this model's UNet{example}", f"pass a LoRA trained on {model}")


def _load_sd3_kohya(pipe, path: Path, state: dict[str, torch.Tensor], field: str, model: str) -> None:
    """A kohya-named SD 3 LoRA file (MMDiT layout: ours, or kohya sd-scripts') on diffusers' transformer:
    each fused q/k/v LoRA split by rows into its parts (`lora_formats.sd3_kohya_to_peft`), then checked
    as `load_lora` checks a diffusers file, value for value and strength for strength."""
    from diffusers import StableDiffusion3Pipeline

    from ..lora_formats import sd3_kohya_to_peft, sd3_targets

    transformer = pipe.transformer
    n = int(transformer.config.num_layers)
    names = [name for name, m in transformer.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    layers, config = sd3_kohya_to_peft(state, n, sd3_targets(names, n), field)
    adapter, attached = _attach(transformer, lambda: StableDiffusion3Pipeline.load_lora_into_transformer(
        {f"transformer.{k}": v for k, v in layers.items()}, transformer, _pipeline=pipe,
        metadata={f"transformer.{k}": v for k, v in config.items()}), path, field, model)  # prefixed, as diffusers'
    lost = [k for k, v in layers.items() if k not in attached or not torch.equal(attached[k].cpu(), v)]
    for module in config["target_modules"]:
        rank = config["rank_pattern"].get(module, config["r"])
        alpha = config["alpha_pattern"].get(module, config["lora_alpha"])
        scaling = transformer.get_submodule(module).scaling.get(adapter) if adapter else None
        if scaling is None or not math.isclose(scaling, alpha / rank, rel_tol=1e-6):
            lost.append(f"{module} (strength)")
    if not attached or lost:
        raise UserError(field, f"{len(lost)} of {len(layers)} LoRA tensors in {path} match no layer of this "
                        f"model's transformer (e.g. {lost[0]})", f"pass a LoRA trained on {model}")


def _attach(denoiser, load: Callable[[], None], path: Path, field: str, model: str
            ) -> tuple[str | None, dict[str, torch.Tensor]]:
    """`load()` (one of diffusers' LoRA loaders, quiet: their partial-load notes are replaced by the
    caller's verdict); the adapter it added to `denoiser` and that adapter's tensors, or (None, {})."""
    before = set(getattr(denoiser, "peft_config", {}))
    try:
        with _libraries_quiet():
            load()
    except Exception as e:  # noqa: BLE001 - a file that does not fit this model is the user's to fix
        raise UserError(field, f"{path} does not fit this model: {_load_reason(e)}",
                        f"pass a LoRA trained on {model}") from None
    added = [name for name in getattr(denoiser, "peft_config", {}) if name not in before]
    return (added[0], get_peft_model_state_dict(denoiser, adapter_name=added[0])) if added else (None, {})


def _mixes_names(state: dict[str, torch.Tensor]) -> bool:
    old = any(".lora.down." in k or ".lora.up." in k for k in state)
    return old and any(".lora_A." in k or ".lora_B." in k for k in state)


def lora_metadata(path: Path) -> dict[str, Any] | None:
    """The LoRA config that `save_lora_weights` keeps in the file's header (rank, alpha, targets)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        text = (f.metadata() or {}).get("lora_adapter_metadata")
    return json.loads(text) if text else None


@contextlib.contextmanager
def _libraries_quiet():
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity(dlog.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlog.set_verbosity(level)


def _load_reason(error: Exception) -> str:
    """The informative line of a failed load: the first size mismatch, else the first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    mismatch = [line for line in lines if line.startswith("size mismatch")]
    return (mismatch or lines or [type(error).__name__])[0]


@torch.inference_mode()
def decode_latents(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
    """Final latents -> images (N, 3, H, W) in [0, 1], float32."""
    vae = pipe.vae
    scaled = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        scaled = scaled + vae.config.shift_factor
    images = vae.decode(scaled).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.inference_mode()
def encode_prompts(pipe: StableDiffusionPipeline, prompts: list[str], gen: GenerationConfig
                   ) -> tuple[Cond, Cond | None]:
    """The encodings of prompts and of the negative prompt (None without guidance), each distinct
    text encoded once: {"prompt_embeds": (N, L, D)}, plus "pooled_prompt_embeds" (N, P) for SD 3."""
    unique = list(dict.fromkeys(prompts))
    guided = gen.guidance_scale > 1
    cond, uncond = family_of(pipe).encode(pipe, unique, guided, gen.negative_prompt)
    where = torch.tensor([unique.index(p) for p in prompts], device=cond["prompt_embeds"].device)
    return _take(cond, where), (_take(uncond, where) if uncond is not None else None)


def _take(cond: Cond, index) -> Cond:
    return {k: v[index] for k, v in cond.items()}


@torch.inference_mode()
def generate_latents(pipe: StableDiffusionPipeline, cond: Cond, uncond: Cond | None,
                     seeds: list[int], gen: GenerationConfig, desc: str = "generate", show: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Final latents (N, 4, h, w) and decoded images (N, 3, H, W) in [0, 1], both on the CPU.

    One CPU generator per sample, so a sample's initial noise depends on its seed alone (and is the
    same on CPU and CUDA); batches of `gen.batch_size` mix prompts.
    """
    latents, images = [], []
    options = family_of(pipe).call_options(gen)
    bar = tqdm(total=len(seeds), desc=desc, unit="img", leave=False, disable=None if show else True)
    for idx in _chunks(len(seeds), gen.batch_size):
        negative = {f"negative_{k}": v for k, v in _take(uncond, idx).items()} if uncond is not None else {}
        out = pipe(
            **_take(cond, idx), **negative,
            height=gen.resolution, width=gen.resolution,
            num_inference_steps=gen.steps, guidance_scale=gen.guidance_scale, **options,
            generator=[torch.Generator("cpu").manual_seed(seeds[i]) for i in idx],
            output_type="latent",
        )
        latents.append(out.images.float().cpu())
        images.append(decode_latents(pipe, out.images).cpu())
        bar.update(len(idx))
    bar.close()
    return torch.cat(latents), torch.cat(images)


@torch.inference_mode()
def encode_images(pipe: StableDiffusionPipeline, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] -> scaled latents (N, C, h, w) on the CPU: the VAE posterior's
    mean (deterministic), shifted and scaled as the denoiser sees latents (`decode_latents` undone)."""
    vae, out = pipe.vae, []
    for idx in _chunks(len(images), batch_size):
        mean = vae.encode(images[idx].to(vae.device, vae.dtype) * 2 - 1).latent_dist.mean
        if getattr(vae.config, "shift_factor", None):
            mean = mean - vae.config.shift_factor
        out.append((mean * vae.config.scaling_factor).float().cpu())
    return torch.cat(out)


class DiffusionExpert:
    """Another diffusers pipeline that adds candidates (`generation.experts: [{model: ...}]`): sampled
    at the run's resolution with the run's generation settings (its `steps` and `guidance_scale` if
    given; an SD 3 expert with its own Euler sampler), with its `lora` attached if given (every layer,
    as `generate --lora` attaches it), frozen, never trained."""

    def __init__(self, spec, config: RunConfig, device, field: str):
        pipe = load_pipeline(spec.model, config.model.dtype, field=field)
        check_resolution(pipe, config.generation.resolution, field)
        if spec.lora is not None:
            load_lora(pipe, Path(spec.lora), field.rpartition(".")[0] + ".lora", f"the expert's model {spec.model}")
        self.gen = config.generation.model_copy(update={k: getattr(spec, k) for k in ("steps", "guidance_scale")
                                                         if getattr(spec, k) is not None})
        pipe.scheduler = make_scheduler(pipe, self.gen.scheduler)  # SD 3: its own Euler, no eta
        for part in pipe.components.values():
            if isinstance(part, torch.nn.Module):
                part.requires_grad_(False).eval()
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device)

    def generate(self, prompts: list[str], seeds: list[int], desc: str) -> torch.Tensor:
        cond, uncond = encode_prompts(self.pipe, prompts, self.gen)
        return generate_latents(self.pipe, cond, uncond, seeds, self.gen, desc)[1]


def _present_targets(denoiser, targets: list[str], family, say: bool) -> list[str]:
    """`lora.target_modules` less the layers only the other family has (a UNet's convolutions on SD 3's
    transformer), said in one line; left whole when that would leave nothing, so the check names them."""
    names = [n for n, _ in denoiser.named_modules()]
    foreign = [t for t in targets if t in family.foreign_layers and not any(n == t or n.endswith("." + t) for n in names)]
    if not foreign or len(foreign) == len(targets):
        return targets
    if say:
        import sys

        print(f"note: lora.target_modules {', '.join(foreign)}: this {family.name} {family.denoiser} has no such "
              "layers; the LoRA goes on the others", file=sys.stderr)
    return [t for t in targets if t not in foreign]


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield list(range(start, min(n, start + size)))


class DiffusionBackend:
    """RAFT's generator: an SD pipeline whose denoiser (UNet, or SD 3's transformer) carries a trainable LoRA."""

    def __init__(self, config: RunConfig, accelerator: Accelerator):
        self.config = config
        self.accelerator = accelerator
        self.device = accelerator.device
        gen = config.generation
        pipe = load_pipeline(config.model.path, config.model.dtype, config.model.revision, config.model.variant,
                             field="config model.path")
        self.family = family = family_of(pipe)
        check_resolution(pipe, gen.resolution, "config generation.resolution")
        family.check_generation(gen, "config generation.scheduler", "config generation.eta")
        pipe.scheduler = make_scheduler(pipe, gen.scheduler)
        pipe.set_progress_bar_config(disable=True)
        frozen = [part for part in pipe.components.values() if isinstance(part, torch.nn.Module)]
        for part in frozen:
            part.requires_grad_(False)
        lora = config.lora
        unet = getattr(pipe, family.denoiser)  # the UNet, or SD 3's transformer
        what = "UNet module" if family.denoiser == "unet" else "transformer module"
        targets = _present_targets(unet, list(lora.target_modules), family, accelerator.is_main_process)
        check_lora_targets(unet, targets, what, family.lora_examples)
        unet.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                    target_modules=targets, init_lora_weights="gaussian"))
        family.check_client_lora(unet.peft_config["default"].to_dict())  # refused now, not at the run's end
        # A pipeline built from configs, and the LoRA layers just added, start in train mode: sampling
        # must not draw LoRA dropout (only fine-tuning switches it on, and off again).
        for part in frozen:
            part.eval()
        # The frozen model may be half precision; the trained LoRA weights stay float32.
        self.lora_params = [p for p in unet.parameters() if p.requires_grad]
        for p in self.lora_params:
            p.data = p.data.float()
        if config.training.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        pipe.to(self.device)
        self.pipe = pipe
        with torch.inference_mode():  # what caption dropout trains the unconditional branch on
            self.empty_embeds = {k: v.float().cpu() for k, v in family.encode(pipe, [""], False, "")[0].items()}
        train = config.training
        optimizer = torch.optim.AdamW(self.lora_params, lr=train.learning_rate, weight_decay=train.weight_decay)
        self.denoiser, self.optimizer = accelerator.prepare(unet, optimizer)
        self.precision = Precision(train.mixed_precision, self.device)
        self.noise_scheduler = family.training_scheduler(pipe)

    # -- generation -------------------------------------------------------------------------

    def generate(self, prompts: list[str], seeds: list[int], desc: str = "generate") -> Samples:
        cond, uncond = encode_prompts(self.pipe, prompts, self.config.generation)
        latents, images = generate_latents(self.pipe, cond, uncond, seeds, self.config.generation, desc,
                                           show=self.accelerator.is_local_main_process)
        return Samples(prompts=list(prompts), seeds=list(seeds), outputs=images,
                       payload={"latents": latents, **{k: v.float().cpu() for k, v in cond.items()}})

    # -- candidates of other experts (experts.py) ---------------------------------------------

    output_kind = "image"

    def load_expert(self, spec, field: str) -> DiffusionExpert:
        return DiffusionExpert(spec, self.config, self.device, field)

    def adopt(self, prompts: list[str], seeds: list, images: torch.Tensor) -> Samples:
        """Expert images as candidates the LoRA trains on: latents from this pipeline's VAE, prompt
        encodings from its text encoders (what `generate` keeps of its own samples)."""
        gen = self.config.generation
        cond, _ = encode_prompts(self.pipe, prompts, gen)
        latents = encode_images(self.pipe, images, gen.batch_size)
        return Samples(prompts=list(prompts), seeds=list(seeds), outputs=images.float().cpu(),
                       payload={"latents": latents, **{k: v.float().cpu() for k, v in cond.items()}})

    # -- fine-tuning ------------------------------------------------------------------------

    def _loss(self, x0: torch.Tensor, text: Cond, generator: torch.Generator,
              per_sample: bool = False, optimality: torch.Tensor | None = None) -> torch.Tensor:
        """The family's denoising MSE (SD 1.x: the scheduler's epsilon or v at uniformly random
        timesteps; SD 3: the flow velocity at logit-normal sigmas), plus `training.anchor_weight`
        times the MSE to the base model's prediction (adapter off) on the same noisy input. A
        scalar, or one value per sample (N,) with `per_sample`."""
        noisy, t, target = self.family.noised(self.noise_scheduler, x0, generator, self.device)
        dtype = self._denoiser().dtype
        text = {k: v.to(self.device, dtype) for k, v in text.items()}
        # The old policy first: it swaps the EMA into the LoRA's tensors, which must not happen
        # while autograd holds them for this step's backward.
        old = self._old_prediction(noisy.to(dtype), t, text) if optimality is not None else None
        with self.precision.autocast():
            pred = self.family.predict(self.denoiser, noisy.to(dtype), t, text)
        reduce = (lambda x: x.mean(dim=tuple(range(1, x.ndim)))) if per_sample else (lambda x: x.mean())
        if optimality is not None:
            loss = self._negative_aware(pred.float(), old, target.float(), optimality.to(pred.device, torch.float32))
        elif per_sample:
            loss = reduce((pred.float() - target.float()) ** 2)
        else:
            loss = F.mse_loss(pred.float(), target.float())
        anchor = self.config.training.anchor_weight
        if anchor:
            loss = loss + anchor * reduce((pred.float() - self._base_prediction(noisy.to(dtype), t, text)) ** 2)
        return loss

    def _negative_aware(self, pred: torch.Tensor, old: torch.Tensor, target: torch.Tensor,
                        r: torch.Tensor) -> torch.Tensor:
        """(N,) DiffusionNFT's loss (arXiv 2509.16117, eq. 5-6): r ||v+ - target||^2 + (1 - r) ||v- - target||^2
        with v+ = (1 - b) v_old + b v and v- = (1 + b) v_old - b v, b = training.negative_aware.beta."""
        b = self.config.training.negative_aware.beta
        positive = (1 - b) * old + b * pred
        negative = (1 + b) * old - b * pred
        per = lambda x: x.mean(dim=tuple(range(1, x.ndim)))  # noqa: E731
        return r * per((positive - target) ** 2) + (1 - r) * per((negative - target) ** 2)

    @torch.no_grad()
    def _old_prediction(self, noisy: torch.Tensor, t: torch.Tensor, text: Cond) -> torch.Tensor:
        """The old policy's prediction: the same denoiser with the EMA of the LoRA swapped in."""
        with self.old_policy.applied(), self.precision.autocast():
            return self.family.predict(self._denoiser(), noisy, t, text).float()

    @torch.no_grad()
    def _base_prediction(self, noisy: torch.Tensor, t: torch.Tensor, text: Cond) -> torch.Tensor:
        """The frozen base denoiser's prediction: the same forward with the LoRA switched off."""
        denoiser = self._denoiser()
        denoiser.disable_adapters()
        try:
            with self.precision.autocast():
                return self.family.predict(denoiser, noisy, t, text).float()
        finally:
            denoiser.enable_adapters()

    def _drop_captions(self, text: Cond, generator: torch.Generator) -> Cond:
        """Replace a `training.caption_dropout` share of the prompt encodings by the empty prompt's."""
        p = self.config.training.caption_dropout
        if not p:
            return text
        drop = torch.rand(len(text["prompt_embeds"]), generator=generator) < p
        return {k: torch.where(drop.view(-1, *([1] * (v.ndim - 1))), self.empty_embeds[k].to(v.dtype), v)
                for k, v in text.items()}

    def train(self, samples: Samples, generator: torch.Generator) -> float:
        """Fine-tune the LoRA on `samples`; returns the mean loss (NaN when there is nothing)."""
        cfg = self.config.training
        n = len(samples)
        if n == 0:
            return math.nan
        latents = samples.payload["latents"]
        text = {k: v for k, v in samples.payload.items() if k.endswith("prompt_embeds")}  # the family's encodings
        weights = samples.payload.get("weight")  # per-sample, from the objective; None: all equal
        optimality = samples.payload.get("optimality")  # negative_aware's r per sample
        losses = []

        def loss(batch: list[int], denominator: float) -> torch.Tensor:
            if weights is None and optimality is None:  # plain RAFT, one process: every sample counts once
                value = self._loss(latents[batch], self._drop_captions(_take(text, batch), generator), generator)
                losses.append(value.item())
                return value * len(batch) / denominator
            per = self._loss(latents[batch], self._drop_captions(_take(text, batch), generator), generator,
                             per_sample=True, optimality=None if optimality is None else optimality[batch])
            if weights is None:
                losses.append(per.mean().item())
                return per.sum() / denominator
            w = weights[batch].to(per.device, per.dtype)
            real = w > 0  # zero weight: padding that evens out the processes' shares
            if bool(real.any()):
                losses.append(per[real].mean().item())
            return (w * per).sum() / denominator

        def weight_of(items: list[int]) -> float:
            return len(items) if weights is None else float(sum(weights[i] for i in items))

        fine_tune(self.accelerator, self.denoiser, self.optimizer, self.lora_params, cfg, range(n), generator, loss,
                  weight_of, self.precision)
        if not losses:
            return math.nan
        return float(sum(losses) / len(losses))

    # -- samples, adapter and state ----------------------------------------------------------

    def write_samples(self, samples: Samples, directory: Path, start: int = 0) -> list[dict[str, Any]]:
        from PIL import Image

        from ..rewards.jpeg import to_uint8

        rows = []
        for i, array in enumerate(to_uint8(samples.outputs), start):
            name = f"{i:04d}.png"
            Image.fromarray(array).save(directory / name)
            rows.append({"file": name})
        return rows

    def eval_metrics(self, samples: Samples) -> dict[str, float]:
        return {}

    def _denoiser(self):
        return self.accelerator.unwrap_model(self.denoiser)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone().contiguous()
                for k, v in get_peft_model_state_dict(self._denoiser()).items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        result = set_peft_model_state_dict(self._denoiser(), state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"adapter checkpoint has unexpected keys: {unexpected[:3]}")

    def save_adapter(self, directory: Path) -> None:
        """`pytorch_lora_weights.safetensors` that `pipe.load_lora_weights(directory)` loads whole, with its alpha;
        also `lora_kohya.safetensors`, the same LoRA under kohya's names (lora_formats; for SD 3 on the MMDiT layout)."""
        denoiser = self._denoiser()
        # PEFT's own names (`unet.<module>.lora_A.weight`, `transformer.<module>...`), unconverted:
        # convert_state_dict_to_diffusers renames only attention layers (to `lora.down`), and diffusers
        # reads a file in the one naming scheme of its first key, so a mixed file silently lost one
        # kind of layer (the demos' attention).
        layers = get_peft_model_state_dict(denoiser)
        config = _sorted_sets(denoiser.peft_config["default"].to_dict())
        self.family.save_lora(str(directory), layers, config)
        canonicalize_safetensors(Path(directory) / "pytorch_lora_weights.safetensors")
        described = {**dict(denoiser.config), "prediction_type": self.pipe.scheduler.config.get("prediction_type")}
        self.family.save_client_lora(str(directory), layers, config, described, str(self.config.model.path))

    def training_state(self) -> dict[str, Any]:
        return training_state(self.optimizer, self.precision)

    def load_training_state(self, state: dict[str, Any]) -> None:
        load_training_state(state, self.optimizer, self.precision)


def _sorted_sets(config: dict[str, Any]) -> dict[str, Any]:
    # PEFT keeps target_modules as a set; its order follows string hashing, which changes from one
    # process to the next. Sorted, the saved file is byte-identical across runs.
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
