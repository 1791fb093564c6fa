"""SDXL pipelines built from configs: the tiny one the tests and CPU runs use, and SDXL base 1.0's
full architecture with random weights for benchmarks.

Every part is the real class, configured as diffusers' own SDXL pipeline tests build their tiny
one: UNet2DConditionModel with `addition_embed_type` "text_time" (six size ids of
`addition_time_embed_dim` each, plus the pooled embedding: `projection_class_embeddings_input_dim`),
per-block transformer depth and linear projections, a CLIPTextModel and a
CLIPTextModelWithProjection whose hidden states are concatenated for cross-attention, SDXL's Euler
scheduler, an AutoencoderKL with SDXL's scaling factor and `force_upcast`. The tokenizers are CLIP's
BPE from open_clip's bundled vocabulary (no download). The tiny VAE halves three times, as SDXL's
does, so a 64 px image is 8x8 latents.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tiny import tiny_text_encoder, tiny_vae
from .tokenizer import clip_tokenizer

SDXL_SCALING_FACTOR = 0.13025  # SDXL's VAE (SD 1.x: 0.18215)


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL base 1.0's scheduler config (scheduler/scheduler_config.json)."""
    return EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                                  prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False)


def tiny_sdxl_unet(text_dims: tuple[int, int] = (32, 32), pooled_dim: int = 32, sample_size: int = 8,
                   time_embed_dim: int = 8) -> UNet2DConditionModel:
    """SDXL's UNet, small (diffusers' tiny SDXL test UNet, wider): a first block without attention,
    transformer depth per block, `text_time` added conditioning."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
        cross_attention_dim=sum(text_dims), norm_num_groups=16,
    )


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A random tiny SDXL pipeline, identical for the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = tiny_text_encoder()
        text_encoder_2 = tiny_text_encoder(projection=True)
        dims = (text_encoder.config.hidden_size, text_encoder_2.config.hidden_size)
        unet = tiny_sdxl_unet(dims, text_encoder_2.config.projection_dim)
        vae = tiny_vae(8)
    vae.register_to_config(scaling_factor=SDXL_SCALING_FACTOR, force_upcast=True)
    tokenizer = clip_tokenizer()
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=clip_tokenizer(), unet=unet,
                                     scheduler=sdxl_scheduler(), force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.unet):
        part.eval()
    return pipe


def sdxl_unet_config() -> dict:
    """SDXL base 1.0's unet/config.json (the architecture's arguments): 2.57 B parameters."""
    return dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
        cross_attention_dim=2048, addition_embed_type="text_time", addition_embed_type_num_heads=64,
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
        norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, upcast_attention=None,
    )


def sdxl_text_configs() -> tuple[CLIPTextConfig, CLIPTextConfig]:
    """SDXL base 1.0's text encoders: CLIP ViT-L/14 (123 M) and OpenCLIP ViT-bigG/14 with its projection (695 M)."""
    ids = {"vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407,
           "pad_token_id": 49407}
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            hidden_act="quick_gelu", projection_dim=768, **ids)
    big_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                           hidden_act="gelu", projection_dim=1280, **ids)
    return clip_l, big_g


def sdxl_random_pipeline(seed: int = 0, dtype: torch.dtype = torch.float16) -> StableDiffusionXLPipeline:
    """SDXL base 1.0's architecture with random weights, from its configs (no download): UNet 2.57 B
    parameters, CLIP-L 123 M, OpenCLIP bigG 695 M, VAE 84 M. For benchmarks: it costs what SDXL
    costs and its images mean nothing. Built directly in `dtype` (no float32 copy: 7 GB in float16)."""
    previous = torch.get_default_dtype()
    clip_l, big_g = sdxl_text_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            unet = UNet2DConditionModel(**sdxl_unet_config())
            text_encoder = CLIPTextModel(clip_l)
            text_encoder_2 = CLIPTextModelWithProjection(big_g)
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                                sample_size=1024, block_out_channels=(128, 256, 512, 512),
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                scaling_factor=SDXL_SCALING_FACTOR, force_upcast=True)
        finally:
            torch.set_default_dtype(previous)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
                                     scheduler=sdxl_scheduler(), force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.unet):
        part.eval()
    return pipe


# builtin:NAME (model_registry.DIFFUSION_BUILTINS)


def builtin_tiny_sdxl(dtype: torch.dtype, field: str) -> StableDiffusionXLPipeline:
    pipe = tiny_sdxl_pipeline()
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def builtin_sdxl_random(dtype: torch.dtype, field: str) -> StableDiffusionXLPipeline:
    return sdxl_random_pipeline(dtype=torch.float16 if dtype == torch.float32 else dtype)
