"""FLUX.1 (dev and schnell): FluxTransformer2DModel on 2x2-packed latents, rectified flow.

- **prompt encoding**: CLIP-L's pooled embedding (`pooled_prompt_embeds`) and T5's sequence
  (`prompt_embeds`), as `FluxPipeline.encode_prompt` gives them; no negative prompt (FLUX.1 is
  guidance-distilled: `generation.guidance_scale` goes into dev's guidance embedding, schnell has none);
- **latents**: kept and trained unpacked, (N, C, h, w) like the other families; packed into 2x2
  patches (`FluxPipeline._pack_latents`) with their position ids only for the transformer;
- **training target**: the velocity `noise - x0` at `(1 - sigma) x0 + sigma noise`, sigma from
  logit-normal u shifted by the image's token count as FLUX.1-dev samples it: mu =
  `calculate_shift(tokens, ...)` from the scheduler's config, sigma = e^mu / (e^mu + 1/u - 1)
  (the scheduler's `time_shift`; BFL's and kohya's `flux_shift`). A scheduler without dynamic shifting
  (schnell's) applies its static `shift`. diffusers' `train_dreambooth_lora_flux.py` instead draws from
  the training scheduler's unshifted sigmas; on FLUX.1-dev at 512 px that puts less weight on the noisy
  end than the sampler spends there. Dev trains with the guidance value it sampled with;
- **LoRA save**: `FluxPipeline.save_lora_weights(transformer_lora_layers=...)`, and for ComfyUI, Forge and
  kohya the BFL layout under kohya's names (`lora_formats_flux`).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling

from ...config import GenerationConfig
from ...errors import UserError
from ...lora_formats import KOHYA_FILE
from ...lora_formats_flux import check_flux_kohya, flux_kohya_to_peft, write_flux_kohya
from .sd import Cond
from .sd3 import StableDiffusion3


def _shift_config(sched) -> dict[str, Any]:
    c = sched.config
    return {"base_seq_len": c.get("base_image_seq_len", 256), "max_seq_len": c.get("max_image_seq_len", 4096),
            "base_shift": c.get("base_shift", 0.5), "max_shift": c.get("max_shift", 1.15)}


def flux_sigmas(sched, u: torch.Tensor, tokens: int) -> torch.Tensor:
    """u in (0, 1) -> the sigmas FLUX's sampler spends its steps at for an image of `tokens` packed tokens."""
    if sched.config.get("use_dynamic_shifting", False):
        mu = calculate_shift(tokens, **_shift_config(sched))
        return sched.time_shift(mu, 1.0, u)
    shift = float(sched.config.get("shift", 1.0))
    return shift * u / (1 + (shift - 1) * u)


class Flux(StableDiffusion3):
    """FLUX.1-dev / schnell: FluxTransformer2DModel, packed latents, guidance embedding (dev)."""

    name = "FLUX.1"
    pipeline_class = FluxPipeline
    denoiser = "transformer"
    clip_tokenizers = ("tokenizer",)
    optional_components = ("image_encoder", "feature_extractor")
    load_options: dict[str, Any] = {}
    single_file_marker = "double_blocks."
    lora_examples = "to_q, to_k, to_v, to_out.0, add_q_proj, to_add_out, proj_mlp, proj_out"
    foreign_layers = ("proj_in", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out")

    def encode(self, pipe, prompts: list[str], guided: bool, negative: str) -> tuple[Cond, Cond | None]:
        # T5 tokens: FLUX.1-dev's 512; a model trained with fewer says so in its pipeline config (`_t5_tokens`)
        tokens = pipe.config.get("_t5_tokens", 512 if pipe.transformer.config.guidance_embeds else 256)
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=pipe.device,
                                               num_images_per_prompt=1, max_sequence_length=tokens)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}, None

    def call_options(self, gen: GenerationConfig) -> dict[str, Any]:
        tokens = {}  # the pipeline's own default (512) is checked against the embeddings passed; none needed
        return tokens

    def check_generation(self, gen: GenerationConfig, scheduler_field: str, eta_field: str) -> None:
        super().check_generation(gen, scheduler_field, eta_field)
        if gen.negative_prompt:
            field = eta_field.rsplit(".", 1)[0] + ".negative_prompt"
            raise UserError(field, "FLUX.1 is guidance-distilled and takes no negative prompt",
                            f"leave {field.split()[-1]} out (FLUX.1-dev's guidance is generation.guidance_scale, "
                            "e.g. 3.5)")

    def pipeline_latents(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The pipeline's `output_type="latent"` output (packed tokens) as (N, C, h, w) latents."""
        return FluxPipeline._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    def noised(self, sched, x0: torch.Tensor, generator: torch.Generator, device) -> tuple[torch.Tensor, ...]:
        n, _, h, w = x0.shape
        noise = torch.randn(x0.shape, generator=generator)
        u = compute_density_for_timestep_sampling("logit_normal", n, self.logit_mean, self.logit_std,
                                                  generator=generator)
        sigma = flux_sigmas(sched, u, (h // 2) * (w // 2)).to(torch.float32)
        s = sigma.view(n, 1, 1, 1).to(x0.dtype)
        noisy = (1 - s) * x0 + s * noise
        return noisy.to(device), (sigma * sched.config.num_train_timesteps).to(device), (noise - x0).to(device)

    def predict(self, model, noisy: torch.Tensor, t: torch.Tensor, cond: Cond, guidance: float | None = None
                ) -> torch.Tensor:
        n, c, h, w = noisy.shape
        config = getattr(model, "module", model).config  # unwrapped from DDP
        embeds = cond["prompt_embeds"]
        g = None
        if config.guidance_embeds:
            g = torch.full((n,), 1.0 if guidance is None else float(guidance), device=noisy.device, dtype=torch.float32)
        out = model(hidden_states=FluxPipeline._pack_latents(noisy, n, c, h, w),
                    timestep=(t / 1000).to(noisy.dtype), guidance=g, pooled_projections=cond["pooled_prompt_embeds"],
                    encoder_hidden_states=embeds,
                    txt_ids=torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
                    img_ids=FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, noisy.device, noisy.dtype)).sample
        return FluxPipeline._unpack_latents(out, h, w, 1)

    def sampler(self, pipe, name: str):
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def sample_size(self, pipe) -> int:
        return pipe.default_sample_size  # FLUX.1: 128 latents, 1024 px

    def latent_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * 2

    def save_lora(self, directory: str, layers: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
        FluxPipeline.save_lora_weights(directory, transformer_lora_layers=layers, safe_serialization=True,
                                       transformer_lora_adapter_metadata=metadata)

    def save_client_lora(self, directory: str, layers: dict[str, torch.Tensor], config: dict[str, Any],
                         denoiser_config: dict[str, Any], model_path: str) -> None:
        """The same LoRA in the BFL layout under kohya's names (`lora_formats_flux`): ComfyUI, Forge and
        kohya's sd-scripts load it."""
        write_flux_kohya(f"{directory}/{KOHYA_FILE}", layers, config, denoiser_config, model_path)

    def check_client_lora(self, config: dict[str, Any]) -> None:
        check_flux_kohya(config)

    def kohya_to_peft(self, transformer, state: dict[str, torch.Tensor], field: str
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A kohya-named FLUX file (BFL layout) as PEFT layers and their LoRA config; diffusers' own
        kohya FLUX reader assumes FLUX.1's widths (3072) and 19 + 38 blocks, this one reads any size."""
        names = [name for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
        return flux_kohya_to_peft(state, names, dict(transformer.config), field)

    def load_transformer_lora(self, pipe, layers: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        FluxPipeline.load_lora_into_transformer(
            {f"transformer.{k}": v for k, v in layers.items()}, None, pipe.transformer, _pipeline=pipe,
            metadata={f"transformer.{k}": v for k, v in config.items()})
