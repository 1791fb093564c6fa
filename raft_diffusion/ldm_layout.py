"""An SD 1.x/2.x diffusers pipeline as one single-file checkpoint in the original (LDM) layout.

AUTOMATIC1111, Forge and ComfyUI load a model as one `.safetensors` file with the key names of
CompVis' latent-diffusion code: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and
`cond_stage_model.*` (the text encoder: `transformer.text_model.*` for SD 1.x's CLIP ViT-L,
`model.*` in OpenCLIP's layout for SD 2.x). diffusers reads that layout
(`from_single_file`, `loaders/single_file_utils.py`) but writes only its own, so this module is the
reverse of its reading: every tensor of the pipeline gets exactly one LDM name, and a tensor with
no place in the layout (an SDXL add-embedding, a class embedding) is refused, never dropped.

SDXL's original UNet (Stability's SGM code) has the same `input_blocks` / `middle_block` /
`output_blocks` layout; `sgm_unet_module` names its modules so (kohya's SDXL LoRA names, `lora_formats`).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .errors import UserError

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPEN_CLIP = "cond_stage_model.transformer.", "cond_stage_model.model."

_UNET_DIRECT = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}
_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _resnet(rest: str) -> str:
    for ours, theirs in _RESNET:
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    return rest


def _block(prefix: str, index: int, kind: str, rest: str) -> str:
    """`input_blocks.N` / `output_blocks.N`: its resnet at `.0`, its attention at `.1`."""
    return f"{prefix}.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"{prefix}.{index}.1.{rest}"


def _layers_per_block(config: dict[str, Any], field: str = "--format") -> int:
    per = config.get("layers_per_block")
    if not isinstance(per, int):
        raise UserError(field, f"a UNet with layers_per_block {per!r} has no single-file layout",
                        "export --format merged to a directory instead")
    return per


def ldm_unet_key(key: str, per: int, attention_up: set[int]) -> str | None:
    """The LDM name (less `model.diffusion_model.`) of one UNet2DConditionModel tensor, or None.

    `per`: the UNet's `layers_per_block` (input block N counts `per` resnets and a downsampler per
    resolution); `attention_up`: the up blocks that attend (their upsampler sits at `.2`, else `.1`)."""
    module, _, leaf = key.rpartition(".")
    if module in _UNET_DIRECT:
        return f"{_UNET_DIRECT[module]}.{leaf}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        return _block("input_blocks", 1 + block * (per + 1) + j, kind, rest)
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m.group(1)) * (per + 1) + per}.0.op.{m.group(2)}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m.group(1))}.{_resnet(m.group(2))}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m.group(1)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        return _block("output_blocks", block * (per + 1) + j, kind, rest)
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m.group(1))
        return f"output_blocks.{block * (per + 1) + per}.{2 if block in attention_up else 1}.conv.{m.group(2)}"
    return None


# SDXL's added conditioning (pooled text and size embeddings): `label_emb.0` in SGM's UNet
_SGM_DIRECT = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def sgm_unet_module(module: str, config: dict[str, Any], field: str = "config lora") -> str | None:
    """The module of Stability's SGM UNet (SDXL's original layout: `input_blocks.4.1.transformer_blocks.0.attn1.to_q`,
    `label_emb.0.0`, ...) that the UNet2DConditionModel module `module` is, or None; `config`: the UNet's config."""
    if module in _SGM_DIRECT:
        return _SGM_DIRECT[module]
    attention_up = {i for i, kind in enumerate(config.get("up_block_types") or ()) if "CrossAttn" in kind}
    name = ldm_unet_key(module + ".weight", _layers_per_block(config, field), attention_up)
    return None if name is None else name[:-len(".weight")]


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A UNet2DConditionModel's state dict under LDM's `input_blocks` / `middle_block` / `output_blocks`."""
    per = _layers_per_block(config)
    attention_up = {int(m.group(1)) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = ldm_unet_key(key, per, attention_up)
        if name is None:
            raise UserError("--format", f"the UNet's {key} has no place in the SD 1.x/2.x single-file layout",
                            "export --format merged to a directory instead")
        out[UNET + name] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """An AutoencoderKL's state dict under LDM's `encoder.down.N.block` / `decoder.up.N` / `mid.attn_1` names."""
    blocks = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = None
        if key.split(".")[0] in ("quant_conv", "post_quant_conv") or re.fullmatch(r"(en|de)coder\.conv_(in|out)\.\w+", key):
            name = key
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(\w+)", key):
            name = f"{m.group(1)}.norm_out.{m.group(2)}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            name = f"encoder.down.{m.group(1)}.block.{m.group(2)}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            name = f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            up = blocks - 1 - int(m.group(1))  # LDM counts the decoder's blocks from the latent side's end
            name = f"decoder.up.{up}.block.{m.group(2)}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            name = f"decoder.up.{blocks - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            name = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(\w+)", key):
            part = dict(_VAE_ATTENTION).get(m.group(2))
            if part is not None:
                name = f"{m.group(1)}.mid.attn_1.{part}.{m.group(3)}"
                if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                    value = value[:, :, None, None]
        if name is None:
            raise UserError("--format", f"the VAE's {key} has no place in the SD 1.x/2.x single-file layout",
                            "export --format merged to a directory instead")
        out[VAE + name] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x: the transformers CLIPTextModel under `cond_stage_model.transformer.text_model.`."""
    return {CLIP + (k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state.items()
            if not k.endswith("position_ids")}


def open_clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 2.x: the CLIPTextModel in OpenCLIP's layout under `cond_stage_model.model.` (q, k and v fused
    into `in_proj`). diffusers' SD 2 text encoder holds 23 of OpenCLIP's 24 layers, the ones SD 2 reads;
    the 24th is written as a pass-through block (`_identity_last_block`)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name = None
        if key == "embeddings.token_embedding.weight":
            name = "token_embedding.weight"
        elif key == "embeddings.position_embedding.weight":
            name = "positional_embedding"
        elif m := re.fullmatch(r"final_layer_norm\.(\w+)", key):
            name = f"ln_final.{m.group(1)}"
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(\w+)", key):
            fused.setdefault(f"transformer.resblocks.{m.group(1)}.attn.in_proj_{m.group(3)}", {})[m.group(2)] = value
            continue
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key):
            rest = (m.group(2).replace("self_attn.out_proj", "attn.out_proj").replace("layer_norm1", "ln_1")
                    .replace("layer_norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
            name = f"transformer.resblocks.{m.group(1)}.{rest}"
        if name is None:
            raise UserError("--format", f"the text encoder's {key} has no place in SD 2.x's single-file layout",
                            "export --format merged to a directory instead")
        out[OPEN_CLIP + name] = value
    for name, parts in fused.items():
        out[OPEN_CLIP + name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")}
    if layers == set(range(23)):  # SD 2's text tower less the 24th block diffusers drops on reading
        out.update(_identity_last_block(out))
    return out


def _identity_last_block(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP ViT-H's 24th text block and `text_projection`, which SD 2 checkpoints carry and SD 2
    never reads (it takes the penultimate layer; diffusers' reader skips both): a block whose attention
    and MLP outputs are zero, so it passes its input through unchanged, and the identity projection.
    AUTOMATIC1111, Forge and ComfyUI build the 24-block tower and would otherwise report them missing."""
    last = OPEN_CLIP + "transformer.resblocks.22."
    block = {}
    for key in [k for k in out if k.startswith(last)]:
        value = out[key]
        rest = key[len(last):]
        fill = torch.ones_like(value) if rest in ("ln_1.weight", "ln_2.weight") else torch.zeros_like(value)
        block[OPEN_CLIP + "transformer.resblocks.23." + rest] = fill
    width = out[OPEN_CLIP + "ln_final.weight"].shape[0]
    block[OPEN_CLIP + "text_projection"] = torch.eye(width, dtype=out[OPEN_CLIP + "ln_final.weight"].dtype)
    return block


def pipeline_to_ldm(pipe, open_clip: bool | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of an SD 1.x/2.x pipeline's UNet, VAE and text encoder under its LDM name.

    `open_clip`: the text encoder's layout; by default SD 2.x's (OpenCLIP) when the UNet attends to
    1024-wide text, as SD 2's does, else SD 1.x's."""
    if open_clip is None:
        open_clip = int(pipe.unet.config.cross_attention_dim) == 1024
    text = pipe.text_encoder.state_dict()
    out = {**unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)),
           **vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)),
           **(open_clip_to_ldm(text) if open_clip else clip_to_ldm(text))}
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}
