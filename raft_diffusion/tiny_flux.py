"""FLUX.1 pipelines built from configs: the tiny ones the tests and CPU runs use, and FLUX.1-dev's
full architecture with random weights for benchmarks.

Every part is the real class (FluxTransformer2DModel, AutoencoderKL with FLUX's 2x2 packing,
CLIPTextModel for the pooled embedding, T5EncoderModel for the sequence,
FlowMatchEulerDiscreteScheduler with FLUX.1-dev's resolution-dependent shift or schnell's none).
No T5 tokenizer ships in a package here, so the tiny T5 reads a small SentencePiece-style Unigram
model trained once on this project's prompts (`build_t5_tokenizer`, shipped as
assets/toyworld/tiny-t5-tokenizer/tokenizer.json: the trainer is not deterministic, so it is made
once and kept, not rebuilt per run). It has T5's special ids (pad 0, eos 1, unk 2) and appends
</s> as T5's tokenizer does.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

from .paths import ASSETS
from .tiny import tiny_text_encoder
from .tokenizer import clip_tokenizer

T5_TOKENIZER = ASSETS / "toyworld" / "tiny-t5-tokenizer"
TINY_T5_TOKENS = 32  # the tiny models' T5 sequence length (FLUX.1-dev: 512, schnell: 256)


def build_t5_tokenizer(out: Path = T5_TOKENIZER, vocab_size: int = 512) -> Path:
    """Train the tiny T5's Unigram tokenizer on prompts/ and save it where `t5_tokenizer` reads it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from .paths import PROMPTS

    texts = [line.strip() for p in sorted(Path(PROMPTS).rglob("*.txt")) for line in p.read_text().splitlines()
             if line.strip()]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=vocab_size, unk_token="<unk>",
                                                           special_tokens=["<pad>", "</s>", "<unk>"],
                                                           show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    _wrap(tok).save_pretrained(str(out))
    return out


def _wrap(tok) -> T5TokenizerFast:
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


@functools.cache
def _t5_tokenizer_file() -> str:
    return (T5_TOKENIZER / "tokenizer.json").read_text()


def t5_tokenizer() -> T5TokenizerFast:
    """The tiny T5's tokenizer (a fresh object each call, from the shipped file)."""
    from tokenizers import Tokenizer

    return _wrap(Tokenizer.from_str(_t5_tokenizer_file()))


def tiny_flux_transformer(guidance: bool, text_dim: int = 32, pooled_dim: int = 32,
                          in_channels: int = 16) -> FluxTransformer2DModel:
    """FLUX's transformer, small: one double-stream and one single-stream block, rotary axes 4+4+8."""
    return FluxTransformer2DModel(patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=text_dim,
                                  pooled_projection_dim=pooled_dim, guidance_embeds=guidance,
                                  axes_dims_rope=(4, 4, 8))


def tiny_t5(vocab_size: int, d_model: int = 32) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def flux_scheduler(dev: bool) -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's sampler (shift by the image's token count, mu from 0.5 at 256 tokens to 1.15 at
    4096) or schnell's (no shift), as their hub configs set them."""
    if dev:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                               base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                               max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def tiny_flux_pipeline(seed: int = 0, dev: bool = True) -> FluxPipeline:
    """A random tiny FLUX pipeline, identical for the same arguments: `dev` has FLUX.1-dev's guidance
    embedding and shifted sampler, otherwise schnell's configuration."""
    t5_tok = t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = tiny_text_encoder()
        text_encoder_2 = tiny_t5(len(t5_tok))
        transformer = tiny_flux_transformer(dev, text_encoder_2.config.d_model, text_encoder.config.hidden_size)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                            layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
                            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                            scaling_factor=0.3611)  # FLUX's VAE: no quant convs, shifted and scaled latents
    pipe = FluxPipeline(scheduler=flux_scheduler(dev), vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                        text_encoder_2=text_encoder_2, tokenizer_2=t5_tok, transformer=transformer)
    pipe.register_to_config(_t5_tokens=TINY_T5_TOKENS)  # "_": not a component (families/flux.py reads it)
    for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer):
        part.eval()
    return pipe


def flux_random_pipeline(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> FluxPipeline:
    """FLUX.1-dev's architecture with random weights, built from its configs (no download): transformer
    about 11.9 B parameters (19 double, 38 single blocks, 3072 wide, guidance embedding), T5-XXL's
    encoder 4.8 B, CLIP-L 123 M, the 16-channel VAE 84 M. For benchmarks: it costs what FLUX.1-dev
    costs and its images mean nothing. Built directly in `dtype` (float32 would need 67 GB of RAM);
    the T5 reads the tiny Unigram tokenizer (its ids are a subset of T5's 32,128)."""
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        # built where it will run: random init of 17 B parameters is minutes on a CPU, seconds on a GPU
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            torch.set_default_device(device)
            transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                                 attention_head_dim=128, num_attention_heads=24,
                                                 joint_attention_dim=4096, pooled_projection_dim=768,
                                                 guidance_embeds=True, axes_dims_rope=(16, 56, 56))
            text_encoder_2 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
                                                     num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                                                     dense_act_fn="gelu_new", is_gated_act=True,
                                                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
            text_encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=768))
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                                sample_size=1024, block_out_channels=(128, 256, 512, 512),
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                                scaling_factor=0.3611)
        finally:
            torch.set_default_dtype(previous)
            torch.set_default_device(None)
    pipe = FluxPipeline(scheduler=flux_scheduler(True), vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer(), transformer=transformer)
    for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer):
        part.eval()
    return pipe


# builtin:NAME (model_registry.DIFFUSION_BUILTINS)


def builtin_tiny_flux(dtype: torch.dtype, field: str) -> FluxPipeline:
    pipe = tiny_flux_pipeline(dev=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def builtin_tiny_flux_schnell(dtype: torch.dtype, field: str) -> FluxPipeline:
    pipe = tiny_flux_pipeline(dev=False)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def builtin_flux_random(dtype: torch.dtype, field: str) -> FluxPipeline:
    return flux_random_pipeline(dtype=torch.bfloat16 if dtype == torch.float32 else dtype)
