"""SDXL: UNet2DConditionModel with two CLIP encoders and size conditioning; see `families/__init__.py`.

- **prompt encoding**: `StableDiffusionXLPipeline.encode_prompt`: CLIP-L's and OpenCLIP bigG's
  penultimate hidden states side by side (`prompt_embeds`, 2048 wide) and bigG's projected pooled
  embedding (`pooled_prompt_embeds`). With `force_zeros_for_empty_prompt` (SDXL base's config), the
  empty negative prompt is zeros, as the pipeline makes it when given no negative prompt;
- **size conditioning**: the UNet's `added_cond_kwargs` `text_embeds` (the pooled embedding) and
  `time_ids` = original size, crop's top left, target size = (H, W, 0, 0, H, W) in pixels, the
  image's own size: what the pipeline passes by default and what diffusers' SDXL training scripts
  compute for an uncropped image. The refiner's aesthetic-score ids (5 of them) are not supported;
- **training target**: as SD 1.x (epsilon or v at uniform timesteps, DDPM noising);
- **VAE**: SDXL's VAE overflows in float16 (`force_upcast` in its config): its decoding and encoding
  run in float32, as the pipeline upcasts (`config model.vae` can replace it, e.g. by
  madebyollin/sdxl-vae-fp16-fix, which needs no upcast);
- **LoRA save**: `StableDiffusionXLPipeline.save_lora_weights(unet_lora_layers=...)`, and kohya's names on
  Stability's SGM UNet layout (`lora_formats.write_sdxl_kohya`), which sdxl_train_network writes and
  ComfyUI, Forge and diffusers' own loader read.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline

from ...errors import UserError
from ...lora_formats import KOHYA_FILE, check_kohya, sdxl_kohya_name, write_sdxl_kohya
from .sd import Cond, StableDiffusion

TIME_IDS = 6  # original (H, W), crop top left (y, x), target (H, W)
_SCALE = "_raft_vae_scale_factor"  # set on the UNet by `bind`: what `predict` turns latent sizes into pixels by


class StableDiffusionXL(StableDiffusion):
    """SDXL (base 1.0 and its fine-tunes): UNet2DConditionModel with `addition_embed_type` text_time."""

    name = "Stable Diffusion XL"
    pipeline_class = StableDiffusionXLPipeline
    denoiser = "unet"
    clip_tokenizers = ("tokenizer", "tokenizer_2")
    optional_components = ("image_encoder", "feature_extractor")
    load_options: dict[str, Any] = {}
    single_file_marker = "conditioner.embedders.1"  # the second text encoder (OpenCLIP bigG); a refiner has one
    vae_upcast = True  # the pipeline's: a float16 VAE with `force_upcast` decodes in float32

    def encode(self, pipe, prompts: list[str], guided: bool, negative: str) -> tuple[Cond, Cond | None]:
        # the pipeline's own rule: no negative prompt and force_zeros_for_empty_prompt -> zero embeddings
        zeros = not negative and pipe.config.get("force_zeros_for_empty_prompt", False)
        embeds, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=pipe.device, num_images_per_prompt=1,
            do_classifier_free_guidance=guided,
            negative_prompt=None if zeros or not guided else [negative] * len(prompts))
        return ({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled},
                {"prompt_embeds": uncond, "pooled_prompt_embeds": uncond_pooled} if guided else None)

    def bind(self, pipe) -> None:
        """Keep the VAE's scale on the UNet (`predict` sees latents only), and refuse a UNet whose
        added conditioning is not base SDXL's six size ids plus the pooled embedding (the refiner's)."""
        unet = pipe.unet
        config = unet.config
        if config.get("addition_embed_type") != "text_time":
            raise UserError("config model.path", "this SDXL UNet has no text_time conditioning",
                            "use an SDXL base model (stabilityai/stable-diffusion-xl-base-1.0 or a fine-tune)")
        pooled = (pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None
                  else config.projection_class_embeddings_input_dim - TIME_IDS * config.addition_time_embed_dim)
        expected = TIME_IDS * config.addition_time_embed_dim + pooled
        if config.projection_class_embeddings_input_dim != expected:
            raise UserError("config model.path", f"this SDXL UNet takes {config.projection_class_embeddings_input_dim} "
                            f"added-conditioning values, not the {expected} of six size ids and the pooled embedding "
                            "(an SDXL refiner's aesthetic score?)", "use an SDXL base model")
        setattr(unet, _SCALE, int(pipe.vae_scale_factor))

    def time_ids(self, unet, latents: torch.Tensor) -> torch.Tensor:
        """(N, 6): (H, W, 0, 0, H, W), the image's pixel size from its latents' (diffusers'
        `compute_time_ids` for an uncropped image whose original and target size are the training size)."""
        scale = getattr(unet, _SCALE, None)
        if scale is None:
            raise RuntimeError("StableDiffusionXL.bind(pipe) must run before predict")
        n, _, h, w = latents.shape
        ids = torch.tensor([h * scale, w * scale, 0, 0, h * scale, w * scale], device=latents.device,
                           dtype=latents.dtype)
        return ids.repeat(n, 1)

    def predict(self, model, noisy: torch.Tensor, t: torch.Tensor, cond: Cond, guidance: float | None = None
                ) -> torch.Tensor:
        unet = getattr(model, "module", model)  # unwrapped from DDP
        added = {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": self.time_ids(unet, noisy)}
        return model(noisy, t, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=added).sample

    def save_lora(self, directory: str, layers: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
        StableDiffusionXLPipeline.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True,
                                                    unet_lora_adapter_metadata=metadata)

    def save_client_lora(self, directory: str, layers: dict[str, torch.Tensor], config: dict[str, Any],
                         denoiser_config: dict[str, Any], model_path: str) -> None:
        """The same LoRA under kohya's SDXL names (SGM UNet layout, `lora_formats.write_sdxl_kohya`)."""
        write_sdxl_kohya(f"{directory}/{KOHYA_FILE}", layers, config, denoiser_config, model_path)

    def check_client_lora(self, config: dict[str, Any]) -> None:
        check_kohya(config)

    def client_lora_name(self, module: str, denoiser_config: dict[str, Any]) -> str:
        return sdxl_kohya_name(module, denoiser_config)
