"""Human-preference rewards the field measures with: PickScore and HPS v2.1.

- `pickscore` (Kirstain et al. 2023): a CLIP-H fine-tuned on Pick-a-Pic preferences, scored as its model
  card computes it: `logit_scale.exp() * cosine(image, prompt)` (about 100 x cosine, PickScore_v1's
  scale), with the transformers `CLIPModel` and the card's processor (CLIP-ViT-H-14-laion2B's) on the
  PNG-rounded image. Options: `model` (hub id or local directory of a transformers CLIPModel, default
  `yuvalkirstain/PickScore_v1`), `processor` (hub id or local directory of its CLIPProcessor, default
  `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`), `batch_size`.
- `hpsv2` (Wu et al. 2023, v2.1): an open_clip ViT-H-14 fine-tuned on HPD v2, scored as the `hpsv2`
  package scores: the diagonal of `image_features @ text_features.T` of its normalised features (a
  cosine, about 0.2 to 0.35; no scale). Options: `checkpoint` (a local `.pt`/`.safetensors`, read as
  weights only, or `hf-hub:REPO/FILE`, default `hf-hub:xswu/HPSv2/HPS_v2.1_compressed.pt`), `model`
  (default ViT-H-14) or `model_config`, as `clip`'s; preprocessing is `clip`'s (open_clip's eval
  transform on the tensors).

Weights are never executed as code: transformers reads safetensors (or `.bin` with weights_only), the HPS
checkpoint goes through `read_tensors`. Offline, a hub id that is not cached is one line, exit 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import UserError
from .clip import cached_text_embeddings, load_clip

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPS_CHECKPOINT = "hf-hub:xswu/HPSv2/HPS_v2.1_compressed.pt"


def error_reason(error: Exception) -> str:
    """An exception's first line, at most 160 characters (a loader's reason in a one-line error)."""
    text = str(error).strip().splitlines()
    reason = text[0] if text else type(error).__name__
    return reason if len(reason) <= 160 else reason[:157] + "..."


def _positive(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(field, f"{value!r} is not a positive whole number", "use e.g. 16")
    return value


def pickscore(model: str = PICKSCORE_MODEL, processor: str = PICKSCORE_PROCESSOR, batch_size: int = 16,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, field: str = "options"):
    """Reward = PickScore: `logit_scale.exp() * cosine` of the CLIP image and prompt embeddings."""
    from transformers import CLIPModel, CLIPProcessor

    batch_size = _positive(batch_size, f"{field}.batch_size")
    for name, value in (("model", model), ("processor", processor)):
        if str(value).startswith(("/", "./", "../", "~")) and not Path(value).expanduser().is_dir():
            raise UserError(f"{field}.{name}", f"directory not found: {value}",
                            "pass a local directory saved by save_pretrained, or a hub id")
    try:
        clip = CLIPModel.from_pretrained(model, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - offline machines and wrong directories end here
        raise UserError(f"{field}.model", f"cannot load the PickScore model {model!r}: {error_reason(e)}",
                        "with no hub access, download yuvalkirstain/PickScore_v1 elsewhere and set model to "
                        "its local directory") from None
    try:
        proc = CLIPProcessor.from_pretrained(processor)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{field}.processor", f"cannot load the CLIP processor {processor!r}: {error_reason(e)}",
                        "with no hub access, download laion/CLIP-ViT-H-14-laion2B-s32B-b79K's processor files "
                        "(preprocessor_config.json, tokenizer) and set processor to that directory") from None
    clip.to(device).eval().requires_grad_(False)
    scale = clip.logit_scale.exp().float()
    return _batched(lambda images, prompts: _pick(clip, proc, scale, images, prompts, device), batch_size)


def _pick(clip, proc, scale, images: torch.Tensor, prompts: Sequence[str], device) -> torch.Tensor:
    from PIL import Image

    from .jpeg import to_uint8

    pil = [Image.fromarray(a) for a in to_uint8(images)]
    pixels = proc(images=pil, return_tensors="pt")["pixel_values"].to(device, clip.dtype)
    text = proc(text=list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
    image = torch.nn.functional.normalize(_features(clip.get_image_features(pixel_values=pixels)).float(), dim=-1)
    words = torch.nn.functional.normalize(_features(clip.get_text_features(**text)).float(), dim=-1)
    return scale * (image * words).sum(-1)


def _features(out) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; 4.x returned the tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _batched(score, batch_size: int):
    def reward(images: torch.Tensor, prompts: Sequence[str]) -> list[float]:
        out: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                out += score(images[start:start + batch_size], prompts[start:start + batch_size]).cpu().tolist()
        return out

    return reward


def hps_checkpoint(checkpoint: str, field: str) -> Path:
    """The local file of an HPS checkpoint: a path, or `hf-hub:REPO/FILE` fetched (or found in the cache)."""
    if str(checkpoint).startswith("hf-hub:"):
        repo, _, filename = str(checkpoint)[len("hf-hub:"):].rpartition("/")
        if not repo or not filename:
            raise UserError(field, f"{checkpoint!r} is not hf-hub:ORG/REPO/FILE", f"e.g. {HPS_CHECKPOINT}")
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(repo_id=repo, filename=filename))
        except Exception as e:  # noqa: BLE001 - offline
            raise UserError(field, f"cannot fetch {checkpoint}: {type(e).__name__}",
                            "with no hub access, download HPS_v2.1_compressed.pt elsewhere and set checkpoint to "
                            "its local path") from None
    path = Path(str(checkpoint)).expanduser()
    if not path.is_file():
        raise UserError(field, f"file not found: {path}", f"pass the HPS v2.1 checkpoint's path, or {HPS_CHECKPOINT}")
    return path


def hpsv2(checkpoint: str = HPS_CHECKPOINT, model: str = "ViT-H-14", model_config: str | None = None,
          batch_size: int = 16, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
          field: str = "options"):
    """Reward = HPS v2.1: cosine(open_clip image features, text features) with HPS's fine-tuned weights."""
    batch_size = _positive(batch_size, f"{field}.batch_size")
    weights = hps_checkpoint(checkpoint, f"{field}.checkpoint")
    clip = load_clip(model, str(weights), model_config, device, dtype, field)
    prompt_cache: dict[str, torch.Tensor] = {}

    def score(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return (clip.encode_images(images) * cached_text_embeddings(clip, prompt_cache, prompts)).sum(-1)

    return _batched(score, batch_size)
