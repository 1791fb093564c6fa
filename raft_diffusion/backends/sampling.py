"""Sampling a diffusers pipeline as RAFT does: prompts encoded once each (and kept, `PromptEncoder`), one CPU generator per
sample (its noise depends on its seed alone), final latents kept beside the decoded images; and
images encoded back to latents (expert candidates)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from ..config import GenerationConfig, RunConfig
from .families import Cond, family_of
from .loading import check_resolution, load_pipeline, make_scheduler
from .lora_io import load_lora

@contextlib.contextmanager
def vae_precision(pipe):
    """The VAE in the dtype it computes in: float32 for the while where the family's pipeline upcasts it
    (SDXL: a float16 VAE whose config says `force_upcast`, as SDXL's own VAE does: it overflows in
    float16), otherwise as loaded."""
    vae = pipe.vae
    upcast = family_of(pipe).vae_upcast and vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
    if not upcast:
        yield vae
        return
    vae.to(dtype=torch.float32)
    try:
        yield vae
    finally:
        vae.to(dtype=torch.float16)


@torch.inference_mode()
def decode_latents(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
    """Final latents -> images (N, 3, H, W) in [0, 1], float32."""
    with vae_precision(pipe) as vae:
        scaled = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):
            scaled = scaled + vae.config.shift_factor
        images = vae.decode(scaled).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class PromptEncoder:
    """A pipeline's prompt encodings, each distinct prompt encoded alone: its encoding is then the same
    whichever prompts share the call (batched CLIP/T5 passes can differ in the last bits), so a resumed
    run encodes exactly as the uninterrupted one did, and keeping them changes no result.

    - `keep` (`model.cache_prompt_embeddings`): every encoding is kept on the CPU for the rest of the
      run, and a prompt seen before is never encoded again (FLUX.1's T5-XXL: about 4 MB a prompt);
    - `offload` (`model.offload_text_encoders`): the text encoders live on the CPU and visit the
      denoiser's device only to encode prompts not kept yet (FLUX.1's T5-XXL is 9.5 GB in bf16).
    """

    def __init__(self, pipe, keep: bool = False, offload: bool = False):
        self.pipe, self.keep, self.offload = pipe, keep, offload
        self.kept: dict[tuple[str, bool, str], tuple[Cond, Cond | None]] = {}
        self.encoded = 0  # prompts run through the text encoders (what `keep` saves)
        if offload:
            self._encoders_to("cpu")

    def _encoders(self) -> list[torch.nn.Module]:
        return [m for name in TEXT_ENCODERS if isinstance(m := getattr(self.pipe, name, None), torch.nn.Module)]

    def _encoders_to(self, device) -> None:
        for module in self._encoders():
            module.to(device)

    def _device(self):
        return getattr(self.pipe, family_of(self.pipe).denoiser).device

    @torch.inference_mode()
    def __call__(self, prompts: list[str], gen: GenerationConfig) -> tuple[Cond, Cond | None]:
        """The encodings of `prompts` and of the negative prompt (None without guidance), on the
        denoiser's device: {"prompt_embeds": (N, L, D)}, plus "pooled_prompt_embeds" (N, P) for SD 3
        and FLUX."""
        guided = gen.guidance_scale > 1
        unique = list(dict.fromkeys(prompts))
        family = family_of(self.pipe)
        fresh = [p for p in unique if (p, guided, gen.negative_prompt) not in self.kept]
        found = {p: self.kept[(p, guided, gen.negative_prompt)] for p in unique if p not in fresh}
        if fresh:
            if self.offload:
                self._encoders_to(self._device())
            try:
                for p in fresh:
                    cond, uncond = family.encode(self.pipe, [p], guided, gen.negative_prompt)
                    found[p] = (_to(cond, "cpu"), _to(uncond, "cpu") if uncond is not None else None)
                    self.encoded += 1
                    if self.keep:
                        self.kept[(p, guided, gen.negative_prompt)] = found[p]
            finally:
                if self.offload:
                    self._encoders_to("cpu")
        device = self._device()
        where = [unique.index(p) for p in prompts]
        cond = _to(_stack([found[p][0] for p in unique], where), device)
        uncond = _to(_stack([found[p][1] for p in unique], where), device) if found[unique[0]][1] is not None else None
        return cond, uncond


def memory_options(pipe, model) -> None:
    """`model.vae_slicing` / `model.vae_tiling` (a `DiffusionModelConfig`) set on the pipeline's VAE."""
    if model.vae_slicing:
        pipe.vae.enable_slicing()
    if model.vae_tiling:
        pipe.vae.enable_tiling()


def _stack(parts: list[Cond], where: list[int]) -> Cond:
    return {k: torch.cat([c[k] for c in parts])[where] for k in parts[0]}


def _to(cond: Cond, device) -> Cond:
    return {k: v.to(device) for k, v in cond.items()}


def encode_prompts(pipe: StableDiffusionPipeline, prompts: list[str], gen: GenerationConfig
                   ) -> tuple[Cond, Cond | None]:
    """The encodings of prompts and of the negative prompt (None without guidance), each distinct
    text encoded once (`PromptEncoder`, nothing kept)."""
    return PromptEncoder(pipe)(prompts, gen)


def take_cond(cond: Cond, index) -> Cond:
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
    family = family_of(pipe)
    options = family.call_options(gen)
    bar = tqdm(total=len(seeds), desc=desc, unit="img", leave=False, disable=None if show else True)
    for idx in _chunks(len(seeds), gen.batch_size):
        negative = {f"negative_{k}": v for k, v in take_cond(uncond, idx).items()} if uncond is not None else {}
        out = pipe(
            **take_cond(cond, idx), **negative,
            height=gen.resolution, width=gen.resolution,
            num_inference_steps=gen.steps, guidance_scale=gen.guidance_scale, **options,
            generator=[torch.Generator("cpu").manual_seed(seeds[i]) for i in idx],
            output_type="latent",
        )
        final = family.pipeline_latents(pipe, out.images, gen.resolution, gen.resolution)
        latents.append(final.float().cpu())
        images.append(decode_latents(pipe, final).cpu())
        bar.update(len(idx))
    bar.close()
    return torch.cat(latents), torch.cat(images)


@torch.inference_mode()
def encode_images(pipe: StableDiffusionPipeline, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] -> scaled latents (N, C, h, w) on the CPU: the VAE posterior's
    mean (deterministic), shifted and scaled as the denoiser sees latents (`decode_latents` undone)."""
    out = []
    with vae_precision(pipe) as vae:
        for idx in _chunks(len(images), batch_size):
            mean = vae.encode(images[idx].to(vae.device, vae.dtype) * 2 - 1).latent_dist.mean
            if getattr(vae.config, "shift_factor", None):
                mean = mean - vae.config.shift_factor
            out.append((mean * vae.config.scaling_factor).float().cpu())
    return torch.cat(out)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield list(range(start, min(n, start + size)))


class DiffusionExpert:
    """Another diffusers pipeline that adds candidates (`generation.experts: [{model: ...}]`): sampled
    at the run's resolution with the run's generation settings (its `steps` and `guidance_scale` if
    given; an SD 3 expert with its own Euler sampler), with its `lora` attached if given (every layer,
    as `generate --lora` attaches it), frozen, never trained."""

    def __init__(self, spec, config: RunConfig, device, field: str):
        pipe = load_pipeline(spec.model, config.model.dtype, field=field)
        family_of(pipe).bind(pipe)
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
        memory_options(pipe, config.model)
        self.encode = PromptEncoder(pipe, config.model.cache_prompt_embeddings, config.model.offload_text_encoders)

    def generate(self, prompts: list[str], seeds: list[int], desc: str) -> torch.Tensor:
        cond, uncond = self.encode(prompts, self.gen)
        return generate_latents(self.pipe, cond, uncond, seeds, self.gen, desc)[1]
