"""`image_reward`: ImageReward (Xu et al. 2023), BLIP's image-grounded text encoder plus an MLP head.

The `image-reward` package does not install beside this project (it pins timm 0.6.13, open_clip needs
timm 1.x, and its BLIP code imports transformers 4 internals), so its architecture is built here from
transformers' BLIP classes and its checkpoint's tensors are mapped onto them:

- the image, as a PNG-rounded PIL image, goes through the package's transform (bicubic resize of the
  short side to the ViT's size, centre crop, CLIP's mean and std);
- `BlipVisionModel` (BLIP's ViT: `blip.visual_encoder.*`, its size read from the tensors, one head per 64
  channels as in ViT-B and ViT-L) gives every token, final LayerNorm applied;
- `BlipTextModel` (BERT with cross-attention, `blip.text_encoder.*`, sized by the checkpoint's
  `med_config.json`) reads the prompt, tokenised by `bert-base-uncased` plus BLIP's `[DEC]`/`[ENC]`
  tokens, padded to 35 tokens, attending to the image tokens;
- the reward is `(mlp(h_cls) - 0.16717362830052426) / 1.0333394966054072`, the head's five linear layers
  (`mlp.layers.{0,2,4,6,7}`) and the package's published mean and std: about N(0, 1) over its test set.

Options: `model` (hub id, default `THUDM/ImageReward`, whose `ImageReward.pt` and `med_config.json` are
fetched; or a local directory holding them, the weights as `ImageReward.pt` or `ImageReward.safetensors`;
or the weights file itself, `med_config.json` beside it), `med_config` (a path, overriding the one found),
`tokenizer` (hub id or local directory of a BERT tokenizer, default `bert-base-uncased`), `batch_size`.
A `.pt` is read with `torch.load(weights_only=True)`; a checkpoint with code in it is refused, not run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .preference import _batched, _positive, error_reason

MODEL = "THUDM/ImageReward"
WEIGHTS = ("ImageReward.safetensors", "ImageReward.pt")
MED_CONFIG = "med_config.json"
MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _head(width: int) -> nn.Sequential:
    """ImageReward's MLP: linear layers 768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropouts between (no activations)."""
    return nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


def _vision_key(key: str) -> str:
    """A BLIP ViT tensor's name (timm's layout) as transformers' BlipVisionModel names it."""
    fixed = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
             "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    if key in fixed:
        return fixed[key]
    if key.startswith("patch_embed.proj."):
        return "embeddings.patch_embedding." + key[len("patch_embed.proj."):]
    if key.startswith("blocks."):
        _, index, rest = key.split(".", 2)
        for old, new in (("norm1.", "layer_norm1."), ("norm2.", "layer_norm2."), ("attn.qkv.", "self_attn.qkv."),
                         ("attn.proj.", "self_attn.projection."), ("mlp.", "mlp.")):
            if rest.startswith(old):
                return f"encoder.layers.{index}.{new}{rest[len(old):]}"
    return "?" + key  # no such tensor in BlipVisionModel: reported as unexpected


def _resolve(model: str, med_config: str | None, field: str) -> tuple[Path, Path]:
    """(weights file, med_config.json) of the `model` option."""
    looks_local = str(model).startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()
    if looks_local:
        path = Path(model).expanduser()
        if path.is_dir():
            found = [path / name for name in WEIGHTS if (path / name).is_file()]
            if not found:
                raise UserError(f"{field}.model", f"{path} holds neither {' nor '.join(WEIGHTS)}",
                                "pass the folder of THUDM/ImageReward's files, or the weights file itself")
            weights, folder = found[0], path
        elif path.is_file():
            weights, folder = path, path.parent
        else:
            raise UserError(f"{field}.model", f"not found: {path}",
                            f"pass a local directory or file of ImageReward's weights, or a hub id ({MODEL})")
        config = Path(med_config).expanduser() if med_config else folder / MED_CONFIG
    else:
        from huggingface_hub import hf_hub_download

        try:
            weights = Path(hf_hub_download(repo_id=model, filename="ImageReward.pt"))
            config = Path(med_config).expanduser() if med_config else Path(hf_hub_download(repo_id=model,
                                                                                            filename=MED_CONFIG))
        except Exception as e:  # noqa: BLE001 - offline, or no such repository
            raise UserError(f"{field}.model", f"cannot fetch {model}'s ImageReward.pt and {MED_CONFIG}: "
                            f"{error_reason(e)}", f"with no hub access, download {MODEL}'s files elsewhere and set "
                            "model to their local directory") from None
    if not config.is_file():
        where = f"{field}.med_config" if med_config else f"{field}.model"
        raise UserError(where, f"{MED_CONFIG} not found: {config}",
                        f"put {MODEL}'s {MED_CONFIG} beside the weights, or set med_config to its path")
    return weights, config


def _read_weights(path: Path, field: str) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated files, pickles holding code
        raise UserError(f"{field}.model", f"cannot read {path} as weights: {error_reason(e)}",
                        "pass THUDM/ImageReward's ImageReward.pt (or a safetensors copy of it)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "mlp.layers.0.weight" not in state \
            or "blip.visual_encoder.cls_token" not in state:
        raise UserError(f"{field}.model", f"{path} is not an ImageReward checkpoint (no blip.visual_encoder.* "
                        "and mlp.layers.* tensors)", f"pass {MODEL}'s ImageReward.pt")
    return state


class ImageRewardModel(nn.Module):
    """BLIP's ViT and image-grounded text encoder with ImageReward's head, from the checkpoint's tensors."""

    def __init__(self, state: dict[str, torch.Tensor], med: dict, field: str):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        vis = {k[len("blip.visual_encoder."):]: v for k, v in state.items() if k.startswith("blip.visual_encoder.")}
        width = vis["cls_token"].shape[-1]
        patch = vis["patch_embed.proj.weight"].shape[-1]
        side = round((vis["pos_embed"].shape[1] - 1) ** 0.5)
        depth = 1 + max(int(k.split(".")[1]) for k in vis if k.startswith("blocks."))
        self.image_size = side * patch
        self.vision = BlipVisionModel(BlipVisionConfig(
            hidden_size=width, intermediate_size=vis["blocks.0.mlp.fc1.weight"].shape[0], num_hidden_layers=depth,
            num_attention_heads=max(1, width // 64), image_size=self.image_size, patch_size=patch,
            hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0))
        try:
            self.text = BlipTextModel(BlipTextConfig(
                vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=width,
                intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
                num_attention_heads=med["num_attention_heads"],
                max_position_embeddings=med.get("max_position_embeddings", 512),
                hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
                pad_token_id=med.get("pad_token_id", 0), bos_token_id=None, sep_token_id=None,
                is_decoder=True), add_pooling_layer=False)  # the ids name no tensor: unused by the encoder
        except KeyError as e:
            raise UserError(f"{field}.med_config", f"{MED_CONFIG} has no {e.args[0]!r}",
                            f"use {MODEL}'s {MED_CONFIG} (BERT-base sizes)") from None
        self.head = _head(med["hidden_size"])
        self._load(state, vis, field)

    def _load(self, state: dict[str, torch.Tensor], vis: dict[str, torch.Tensor], field: str) -> None:
        text = {k[len("blip.text_encoder."):]: v for k, v in state.items()
                if k.startswith("blip.text_encoder.") and not k.endswith("position_ids")}
        head = {k[len("mlp.layers."):]: v for k, v in state.items() if k.startswith("mlp.layers.")}
        for module, tensors, name in ((self.vision, {_vision_key(k): v for k, v in vis.items()}, "visual_encoder"),
                                      (self.text, text, "text_encoder"), (self.head, head, "mlp")):
            try:
                result = module.load_state_dict(tensors, strict=False)
            except RuntimeError as e:  # a shape that med_config.json does not describe
                raise UserError(f"{field}.model", f"the checkpoint's {name} does not fit {MED_CONFIG}: "
                                f"{error_reason(e)}", "use the med_config.json published with these weights") from None
            if result.missing_keys or result.unexpected_keys:
                names = [*result.missing_keys, *(k.lstrip("?") for k in result.unexpected_keys)]
                raise UserError(f"{field}.model", f"the checkpoint's {name} has {len(result.missing_keys)} missing "
                                f"and {len(result.unexpected_keys)} unexpected tensors, e.g. {names[0]}",
                                f"pass {MODEL}'s ImageReward.pt with its med_config.json")

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                           encoder_attention_mask=image_mask).last_hidden_state
        return ((self.head(hidden[:, 0].float()) - MEAN) / STD).squeeze(-1)


def _tokenizer(name: str, vocab_size: int, field: str):
    from transformers import BertTokenizer

    if str(name).startswith(("/", "./", "../", "~")) and not Path(name).expanduser().is_dir():
        raise UserError(f"{field}.tokenizer", f"directory not found: {name}",
                        "pass a local directory of bert-base-uncased's tokenizer files, or a hub id")
    try:
        tokenizer = BertTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - offline
        raise UserError(f"{field}.tokenizer", f"cannot load the BERT tokenizer {name!r}: {error_reason(e)}",
                        "with no hub access, download bert-base-uncased's vocab.txt and tokenizer_config.json "
                        "elsewhere and set tokenizer to their directory") from None
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # as BLIP's init_tokenizer: vocab 30522 -> 30524
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) > vocab_size:
        raise UserError(f"{field}.tokenizer", f"{name} has {len(tokenizer)} tokens with BLIP's two, more than the "
                        f"text encoder's {vocab_size}", "use bert-base-uncased, ImageReward's tokenizer")
    return tokenizer


def transform(size: int):
    """The `image-reward` package's preprocessing of a PIL image, at the ViT's input size."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def image_reward(model: str = MODEL, med_config: str | None = None, tokenizer: str = "bert-base-uncased",
                 batch_size: int = 16, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 field: str = "options"):
    """Reward = ImageReward's standardised score of how well the image fits its prompt, as humans prefer."""
    batch_size = _positive(batch_size, f"{field}.batch_size")
    weights, config = _resolve(model, med_config, field)
    try:
        med = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{field}.med_config", f"cannot read {config}: {error_reason(e)}",
                        f"pass {MODEL}'s {MED_CONFIG}") from None
    if not isinstance(med, dict):
        raise UserError(f"{field}.med_config", f"{config} is not a JSON object", f"pass {MODEL}'s {MED_CONFIG}")
    net = ImageRewardModel(_read_weights(weights, field), med, field)
    tok = _tokenizer(tokenizer, med.get("vocab_size", 0), field)
    net.to(device, dtype).eval().requires_grad_(False)
    net.head.float()
    prepare = transform(net.image_size)

    def score(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from PIL import Image

        from .jpeg import to_uint8

        pixels = torch.stack([prepare(Image.fromarray(a)) for a in to_uint8(images)]).to(device, dtype)
        text = tok(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        return net(pixels, text["input_ids"].to(device), text["attention_mask"].to(device))

    return _batched(score, batch_size)
