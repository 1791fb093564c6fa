"""Tiny Stable Diffusion pipelines built from configs: same classes as SD 1.x and SD 3, a few MB of weights.

They are what tests and the CPU demo run on when real weights cannot be downloaded. Every part is
the real diffusers / transformers class (UNet2DConditionModel or SD3Transformer2DModel,
AutoencoderKL, CLIPTextModel(WithProjection), DDIM or FlowMatchEulerDiscrete scheduler) and the
tokenizer is the real CLIP BPE, so the code paths are the ones SD 1.5 and SD 3.5 use. The tiny SD3
has no T5 encoder (no T5 tokenizer ships in a package here); SD 3 supports that configuration, and
the pipeline feeds zeros in the T5 embedding's place.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tokenizer import clip_tokenizer


def tiny_unet(cross_attention_dim: int = 32, sample_size: int = 32) -> UNet2DConditionModel:
    # About 1.4 M parameters: two resolutions, cross-attention at the lower one.
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def tiny_vae(latent_scale: int = 8) -> AutoencoderKL:
    # log2(latent_scale) + 1 blocks: each block after the first halves the resolution.
    n_blocks = {4: 3, 8: 4}[latent_scale]
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        block_out_channels=(8, 16, 16, 16)[:n_blocks],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def tiny_text_encoder(hidden_size: int = 32, layers: int = 2, projection: bool = False) -> CLIPTextModel:
    """A small CLIP text tower; with `projection`, the CLIPTextModelWithProjection that SD 3 pools."""
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **({"projection_dim": hidden_size} if projection else {}),
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def sd_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """The DDIM scheduler with SD 1.x's noise schedule."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_pipeline(
    seed: int = 0, latent_scale: int = 8, prediction_type: str = "epsilon"
) -> StableDiffusionPipeline:
    """A random tiny SD pipeline, identical for the same arguments (weights drawn from `seed`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = tiny_text_encoder()
        unet = tiny_unet(cross_attention_dim=text_encoder.config.hidden_size)
        vae = tiny_vae(latent_scale)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=sd_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for part in (pipe.vae, pipe.text_encoder, pipe.unet):
        part.eval()  # as from_pretrained leaves them (train mode decodes differently, by ~1e-6)
    return pipe


def sd15_random_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Stable Diffusion 1.5's architecture with random weights, built from its configs (no download):
    UNet 860 M parameters, VAE 84 M, CLIP ViT-L/14 text encoder 123 M. For benchmarks: it costs
    what SD 1.5 costs, and its images mean nothing. Built in float32 on the CPU, then cast."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=768))
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    for part in (pipe.vae, pipe.text_encoder, pipe.unet):
        part.eval()
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def tiny_sd3_transformer(text_dims: tuple[int, int] = (32, 32), sample_size: int = 32, in_channels: int = 4,
                         layers: int = 2, heads: int = 4, head_dim: int = 8) -> SD3Transformer2DModel:
    """SD 3's MMDiT, small: joint attention over the image patches and the prompt's tokens, the
    pooled CLIP embeddings of both encoders as `pooled_projections`."""
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=in_channels,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=sum(text_dims),  # the two CLIP encoders' hidden states, side by side
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=sum(text_dims),
        out_channels=in_channels,
        pos_embed_max_size=sample_size,
    )


def flow_scheduler(shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    """SD 3's sampler: Euler steps of the flow, timesteps shifted towards noise by `shift`."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def tiny_sd3_pipeline(seed: int = 0, latent_scale: int = 8) -> StableDiffusion3Pipeline:
    """A random tiny SD3-architecture pipeline, identical for the same arguments; no T5."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = tiny_text_encoder(projection=True)
        text_encoder_2 = tiny_text_encoder(hidden_size=32, layers=2, projection=True)
        dims = (text_encoder.config.hidden_size, text_encoder_2.config.hidden_size)
        transformer = tiny_sd3_transformer(dims)
        vae = tiny_vae(latent_scale)
    vae.register_to_config(shift_factor=0.0)  # SD 3's decode adds it back after unscaling
    tokenizer = clip_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=flow_scheduler(), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer):
        part.eval()
    return pipe


# builtin:NAME (model_registry.DIFFUSION_BUILTINS): random, built on the fly, cast after building


def builtin_tiny_sd(dtype: torch.dtype, field: str) -> StableDiffusionPipeline:
    return _cast(tiny_pipeline(prediction_type="epsilon"), dtype)


def builtin_tiny_sd_v(dtype: torch.dtype, field: str) -> StableDiffusionPipeline:
    return _cast(tiny_pipeline(prediction_type="v_prediction"), dtype)


def builtin_tiny_sd3(dtype: torch.dtype, field: str) -> StableDiffusion3Pipeline:
    return _cast(tiny_sd3_pipeline(), dtype)


def builtin_sd15_random(dtype: torch.dtype, field: str) -> StableDiffusionPipeline:
    return sd15_random_pipeline(dtype=dtype)


def _cast(pipe, dtype: torch.dtype):
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
