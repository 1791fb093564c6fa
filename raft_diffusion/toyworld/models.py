"""The toy world's models as the loaders see them (`model_registry`): the shipped pipelines
`builtin:toy-shapes` and `builtin:toy-shapes-flow`, and the directory format of a toy flow model
(`raft_diffusion.json`, written by train_flow.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection

from ..backends.loading import DTYPES, load_pipeline
from ..errors import UserError
from ..paths import ASSETS
from ..tokenizer import clip_tokenizer

TOY_SHAPES = ASSETS / "toyworld" / "toy-shapes"
TOY_SHAPES_FLOW = ASSETS / "toyworld" / "toy-shapes-flow"


def toy_shapes(dtype: torch.dtype, field: str):
    return _asset(TOY_SHAPES, "toy-shapes", dtype, field)


def toy_shapes_flow(dtype: torch.dtype, field: str):
    return _asset(TOY_SHAPES_FLOW, "toy-shapes-flow", dtype, field)


def _asset(directory: Path, name: str, dtype: torch.dtype, field: str):
    if not (directory / "raft_diffusion.json").is_file() and not (directory / "model_index.json").is_file():
        raise UserError(field, f"the {name} weights are missing from {directory}",
                        "rebuild them with: python -m raft_diffusion.toyworld.build")
    return load_pipeline(str(directory), _dtype_name(dtype), field=field)


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def text_encoder_with_projection(text_encoder):
    """The toy CLIPTextModel as SD 3's CLIPTextModelWithProjection: the same weights, an identity
    projection (its pooled output is the EOS token's hidden state)."""
    config = text_encoder.config.to_dict()
    config["projection_dim"] = config["hidden_size"]
    config.pop("architectures", None)
    projected = CLIPTextModelWithProjection(type(text_encoder.config).from_dict(config))
    projected.text_model.load_state_dict(text_encoder.state_dict())  # strict: every weight, the same names
    with torch.no_grad():
        projected.text_projection.weight.copy_(torch.eye(config["hidden_size"]))
    return projected.to(text_encoder.dtype).eval()


def flow_directory(directory: Path, dtype: str, field: str) -> StableDiffusion3Pipeline:
    """A toy flow model's directory: its transformer and scheduler, with toy-shapes' VAE and its text
    encoder as both of SD 3's CLIP encoders (train_flow.py trained it so); no T5, and a prompt
    sequence without the zero tokens SD 3 appends in place of T5 (`t5_tokens` 0), registered in the
    pipeline's config as `_t5_tokens`, where `families.StableDiffusion3.encode` reads it."""
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
    pipe.register_to_config(_t5_tokens=int(meta["t5_tokens"]))  # "_": not a component
    pipe.transformer.float().eval()
    return pipe if dtype == "float32" else pipe.to(dtype=DTYPES[dtype])
