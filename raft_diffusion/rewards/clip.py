"""CLIP text-image similarity and the LAION aesthetic predictor, on any open_clip model.

Options shared by both rewards (`rewards[i].options`):
- `model`: an open_clip model name (`ViT-L-14`), or `hf-hub:ORG/REPO` / `local-dir:DIR`, or
  `builtin:toy-clip`, the toy shapes world's CLIP shipped in `assets/toyworld/toy-clip`;
- `pretrained`: an open_clip tag of that model (`openai`), a local checkpoint (`.safetensors`, or
  `.pt`/`.pth`/`.bin` read with `torch.load(weights_only=True)`), or `none` for random weights;
  a built-in model brings its own weights (the `openai` default means them);
- `model_config`: an open_clip model config JSON (`embed_dim`, `vision_cfg`, `text_cfg`), which
  replaces `model`: how tiny and toy CLIPs are made.
The `aesthetic` head may be `builtin:toy-aesthetic`, the head trained on toy-clip's embeddings.

One CLIP is loaded per (model, weights, device, dtype) in the process and shared, so `clip` and
`aesthetic` in the same run (as rewards or judges) load it once.

Preprocessing is open_clip's own eval transform, the `preprocess` that
`open_clip.create_model_and_transforms` returns, applied directly to the batch the pipeline already
holds (a float tensor (N, 3, H, W) in [0, 1]; no PIL round trip): resize the shortest side to the
model's image_size (bicubic, antialiased), centre crop to image_size, normalise with the model's
mean and std (OpenAI's unless the weights say otherwise). On tensors torchvision resizes in float,
where open_clip on a PIL file resizes in uint8: images already at image_size are not resized and
score exactly as open_clip scores their PNG; resized ones differ slightly (tests bound it).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..paths import ASSETS
from ..weights import read_tensors

log = logging.getLogger(__name__)

PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SCHEMAS = ("hf-hub:", "local-dir:")

# Built-in judges of the toy shapes world, shipped in the repository (not in the package: they are
# trained artefacts that `python -m raft_diffusion.toyworld.train_clip` rebuilds from a seed).
BUILTIN_CLIPS = {"toy-clip": "toyworld/toy-clip"}  # an open_clip local-dir: config + fp16 weights
BUILTIN_HEADS = {"toy-aesthetic": "toyworld/toy-aesthetic.safetensors"}
BUILD_HINT = "build them with: python -m raft_diffusion.toyworld.train_clip --out assets/toyworld --seed 0"


@dataclass
class LoadedClip:
    """An open_clip model in eval mode, with its own eval preprocess and tokenizer."""

    name: str
    model: Any  # open_clip.CLIP or CustomTextCLIP
    preprocess: Any  # open_clip's eval transform; takes PIL images or (N, 3, H, W) tensors
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    _last: tuple[torch.Tensor, torch.Tensor] | None = None  # (images, embeddings) of the last batch

    @property
    def embed_dim(self) -> int:
        """Width of the image embedding (what an aesthetic head takes)."""
        width = getattr(self.model.visual, "output_dim", None)
        if isinstance(width, int):
            return width
        import open_clip

        size = open_clip.get_model_preprocess_cfg(self.model)["size"]
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        with torch.inference_mode():
            return int(self.encode_images(torch.zeros(1, 3, *size, device=self.device)).shape[1])

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, D) L2-normalised image embeddings (float32).

        The last batch's embeddings are kept: `clip` and `aesthetic` scoring the same images (as
        reward and judge, or summed) run the image tower once. Reuse needs exactly equal pixels.
        """
        images = images.to(self.device, torch.float32)
        if self._last is not None and self._last[0].shape == images.shape and torch.equal(self._last[0], images):
            return self._last[1]
        pixels = self.preprocess(images)
        embeddings = F.normalize(self.model.encode_image(pixels.to(self.dtype)).float(), dim=-1)
        self._last = (images.clone(), embeddings)
        return embeddings

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """N texts -> (N, D) L2-normalised text embeddings (float32)."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


_LOADED: dict[tuple, LoadedClip] = {}


def load_clip(model: str = "ViT-L-14", pretrained: str | None = "openai", model_config: str | None = None,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              field: str = "options") -> LoadedClip:
    """The open_clip model these options name, loaded once per process (cached by what defines it)."""
    import open_clip

    device = torch.device(device)
    if dtype not in PRECISION:
        raise UserError(field, f"dtype {dtype} is not supported by open_clip", "use float32, float16 or bfloat16")
    builtin = model_config is None and str(model).startswith("builtin:")
    if model_config is not None:
        config_path = Path(model_config).expanduser().resolve()
        name = _register_config(config_path, f"{field}.model_config")
        source: tuple = ("config", str(config_path), config_path.stat().st_mtime_ns)
    elif builtin:
        folder = _builtin_clip_folder(str(model), f"{field}.model")
        # open_clip builds the architecture (and its preprocess) from the folder; the weights are
        # read below through read_tensors, like every other checkpoint.
        name = f"local-dir:{folder}"
        source = ("builtin", str(folder), (folder / "open_clip_config.json").stat().st_mtime_ns)
    else:
        name = str(model)
        source = ("name", name)
        if not name.startswith(SCHEMAS) and open_clip.get_model_config(name.replace("/", "-")) is None:
            raise UserError(f"{field}.model", f"unknown open_clip model {name!r}",
                            "use a name from open_clip.list_models() (e.g. ViT-L-14), or set model_config "
                            "to a model config JSON")
    if builtin:
        tag, weights = None, _builtin_clip_weights(folder, str(model), pretrained, field)
    else:
        tag, weights = _resolve_pretrained(open_clip, name, pretrained, model_config is not None,
                                           f"{field}.pretrained")
    key = (source, tag, str(weights) if weights else None,
           weights.stat().st_mtime_ns if weights else None, str(device), dtype)
    if key in _LOADED:
        return _LOADED[key]

    try:
        with _root_logger_quiet():  # open_clip logs its failures on the root logger; we raise one line
            clip, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=tag, device=device, precision=PRECISION[dtype], load_weights=not builtin)
    except Exception as e:  # noqa: BLE001 - offline downloads and bad configs become one clear line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        if tag is not None or name.startswith("hf-hub:"):
            raise UserError(f"{field}.pretrained", f"cannot fetch the {tag or 'hub'} weights of {name}: {reason}",
                            "with no hub access, download the checkpoint elsewhere and set pretrained to "
                            "its local path") from None
        raise UserError(f"{field}.model_config" if model_config else f"{field}.model",
                        f"open_clip cannot build {name}: {type(e).__name__}: {reason}",
                        "check the model config") from None
    if weights is not None:
        state = read_tensors(weights, f"{field}.pretrained")
        try:
            clip.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise UserError(f"{field}.pretrained", f"{weights} does not fit {name}: "
                            f"{' '.join(first[:2])[:300]}",
                            "pass an open_clip state dict saved from this model config") from None
    elif tag is None and (builtin or not name.startswith(SCHEMAS)):
        log.warning("CLIP %s has random weights (pretrained: none): fine for tests, meaningless as a reward",
                    model if builtin else name)
    clip.eval().requires_grad_(False)
    try:
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:  # noqa: BLE001 - e.g. an HF tokenizer that cannot be downloaded
        raise UserError(f"{field}.model", f"cannot load the tokenizer of {name}: {type(e).__name__}: {e}",
                        "use a model whose tokenizer is available offline") from None
    loaded = LoadedClip(name=str(model) if builtin else name, model=clip, preprocess=preprocess,
                        tokenizer=tokenizer, device=device, dtype=dtype)
    _LOADED[key] = loaded
    return loaded


@contextlib.contextmanager
def _root_logger_quiet():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)


def _register_config(path: Path, field: str) -> str:
    """Register a model config JSON with open_clip; returns the name it is known by (its file stem)."""
    import open_clip

    if not path.is_file():
        raise UserError(field, f"file not found: {path}", "pass an open_clip model config JSON")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(field, f"{path} is not valid JSON: {e}", "fix the JSON") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise UserError(field, f"{path} lacks {', '.join(missing)}",
                        "an open_clip model config has embed_dim, vision_cfg and text_cfg")
    # open_clip names configs by file stem; registering the file last makes it win over a namesake.
    open_clip.add_model_config(path)
    return path.stem


def _builtin_asset(name: str, table: dict[str, str], kind: str, field: str) -> Path:
    """Where the asset of `builtin:KEY` lives; an unknown KEY is a UserError listing the known ones."""
    key = name[len("builtin:"):]
    if key not in table:
        raise UserError(field, f"unknown built-in {kind} {name!r}",
                        f"available: {', '.join('builtin:' + k for k in table)}")
    return ASSETS / table[key]


def _builtin_clip_folder(model: str, field: str) -> Path:
    """The asset folder of `builtin:NAME`; a missing or unbuilt one is a UserError naming `field`."""
    folder = _builtin_asset(model, BUILTIN_CLIPS, "CLIP", field)
    if not (folder / "open_clip_config.json").is_file():
        raise UserError(field, f"built-in CLIP {model} is not built: {folder / 'open_clip_config.json'} is missing",
                        BUILD_HINT)
    return folder


def _builtin_clip_weights(folder: Path, model: str, pretrained: str | None, field: str) -> Path | None:
    """The weights a built-in CLIP loads: its own unless `pretrained` is a local file or `none`.

    `openai` is the option's default, so here it means "the model's own weights", not OpenAI's.
    """
    value = "" if pretrained is None else str(pretrained).strip()
    if value.lower() == "none":
        return None
    if value in ("", "openai"):
        weights = folder / "open_clip_model.safetensors"
        if not weights.is_file():
            raise UserError(f"{field}.model", f"built-in CLIP {model} is not built: {weights} is missing", BUILD_HINT)
        return weights
    path = Path(value).expanduser()
    if path.is_file():
        return path.resolve()
    raise UserError(f"{field}.pretrained", f"{value!r} is not an existing file, and {model} brings its own weights",
                    "leave pretrained unset for the shipped weights, or pass a local .safetensors of this model")


def builtin_head(head: str, field: str) -> Path:
    """The file of `builtin:NAME` for an aesthetic head; a missing or unbuilt one is a UserError."""
    path = _builtin_asset(head, BUILTIN_HEADS, "aesthetic head", field)
    if not path.is_file():
        raise UserError(field, f"built-in aesthetic head {head} is not built: {path} is missing", BUILD_HINT)
    return path


def _resolve_pretrained(open_clip, name: str, pretrained: str | None, custom: bool,
                        field: str) -> tuple[str | None, Path | None]:
    """(open_clip tag, local weights file): at most one of them is set."""
    if pretrained is None or str(pretrained).strip().lower() in ("", "none"):
        return None, None
    pretrained = str(pretrained)
    if name.startswith(SCHEMAS):
        raise UserError(field, f"{name} brings its own weights", "leave pretrained unset (or none)")
    tags = [] if custom else open_clip.list_pretrained_tags_by_model(name)
    if pretrained in tags:
        return pretrained, None
    path = Path(pretrained).expanduser()
    if path.is_file():
        return None, path.resolve()
    hint = f"tags of {name}: {', '.join(tags)}; " if tags else ""
    raise UserError(field, f"{pretrained!r} is neither an existing file nor a pretrained tag of {name}",
                    f"{hint}or pass a local .safetensors/.pth checkpoint, or none for random weights")


# --- rewards -----------------------------------------------------------------------------------


def cached_text_embeddings(clip: LoadedClip, cache: dict[str, torch.Tensor], prompts: Sequence[str]) -> torch.Tensor:
    """(N, D) text embeddings of `prompts`, each distinct prompt encoded once and kept in `cache`
    (prompts recur across iterations; the cache is emptied past 4,096 prompts)."""
    new = [p for p in dict.fromkeys(prompts) if p not in cache]
    if new:
        if len(cache) + len(new) > 4096:
            cache.clear()
        cache.update(zip(new, clip.encode_texts(new)))
    return torch.stack([cache[p] for p in prompts])


def clip_score(model: str = "ViT-L-14", pretrained: str | None = "openai", model_config: str | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, field: str = "options"):
    """Reward = 100 x cosine(CLIP image embedding, CLIP text embedding of the prompt).

    Batched: one image forward per call and one text forward for the call's distinct prompts
    (whose embeddings are kept, as prompts recur across iterations).
    """
    clip = load_clip(model, pretrained, model_config, device, dtype, field)
    prompt_cache: dict[str, torch.Tensor] = {}

    def reward(images: torch.Tensor, prompts: Sequence[str]) -> list[float]:
        with torch.inference_mode():
            text = cached_text_embeddings(clip, prompt_cache, prompts)
            image = clip.encode_images(images)
            return (100 * (image * text).sum(-1)).cpu().tolist()

    return reward


# The LAION aesthetic predictor's MLP (improved-aesthetic-predictor, `sac+logos+ava1-l14-linearMSE.pth`):
# Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear -> state-dict indices 0, 2, 4, 6, 7.
HEAD_LINEAR_INDICES = (0, 2, 4, 6, 7)
HEAD_KEYS = {f"layers.{i}.{p}" for i in HEAD_LINEAR_INDICES for p in ("weight", "bias")}


class AestheticHead(torch.nn.Module):
    """The LAION MLP 768-1024-128-64-16-1 (input width and hidden widths taken from the weights)."""

    def __init__(self, widths: Sequence[int]):
        super().__init__()
        w = list(widths)  # e.g. [768, 1024, 128, 64, 16, 1]
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(w[0], w[1]), torch.nn.Dropout(0.2),
            torch.nn.Linear(w[1], w[2]), torch.nn.Dropout(0.2),
            torch.nn.Linear(w[2], w[3]), torch.nn.Dropout(0.1),
            torch.nn.Linear(w[3], w[4]),
            torch.nn.Linear(w[4], w[5]),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def load_aesthetic_head(path: str | Path, field: str) -> AestheticHead:
    """The head in LAION's state-dict layout (layers.0/2/4/6/7.weight|bias), from .pth or .safetensors."""
    state = read_tensors(path, field)
    if set(state) != HEAD_KEYS:
        missing, extra = sorted(HEAD_KEYS - set(state)), sorted(set(state) - HEAD_KEYS)
        raise UserError(field, f"{path} is not a LAION aesthetic head (missing {missing[:3]}, unexpected {extra[:3]})",
                        "pass sac+logos+ava1-l14-linearMSE.pth or a head with keys layers.0/2/4/6/7.weight|bias")
    shapes = [tuple(state[f"layers.{i}.weight"].shape) for i in HEAD_LINEAR_INDICES]
    if any(len(s) != 2 for s in shapes) or shapes[-1][0] != 1 \
            or any(shapes[j][1] != shapes[j - 1][0] for j in range(1, len(shapes))):
        raise UserError(field, f"{path}: layer shapes {shapes} do not chain into one score",
                        "pass a LAION-layout aesthetic MLP")
    head = AestheticHead([shapes[0][1]] + [s[0] for s in shapes])
    head.load_state_dict(state)
    return head.eval().requires_grad_(False)


def aesthetic(head: str | None = None, model: str = "ViT-L-14", pretrained: str | None = "openai",
              model_config: str | None = None, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, field: str = "options"):
    """Reward = the LAION aesthetic score: the MLP `head` on the L2-normalised CLIP image embedding.

    The prompt is not used. `head` is the LAION `sac+logos+ava1-l14-linearMSE.pth` (with ViT-L-14
    openai) or any head in its layout, as .pth (read with weights_only=True) or .safetensors, or
    `builtin:toy-aesthetic` (with `model: builtin:toy-clip`). The CLIP runs in the run's dtype; the
    head (1 M parameters) stays float32.
    """
    if head is None:
        raise UserError(f"{field}.head", "the aesthetic reward needs its MLP head",
                        "set head to sac+logos+ava1-l14-linearMSE.pth (LAION improved-aesthetic-predictor) "
                        "or a head in its layout")
    if str(head).startswith("builtin:"):
        path = builtin_head(str(head), f"{field}.head")
        if model_config is None and not str(model).startswith("builtin:"):
            # Without this, the ViT-L-14 default would be fetched (or fail offline) before the
            # width check could say that the toy head needs the toy CLIP.
            raise UserError(f"{field}.model", f"{head} scores embeddings of builtin:toy-clip, not of {model}",
                            "set model: builtin:toy-clip")
        head = str(path)
    mlp = load_aesthetic_head(head, f"{field}.head")  # the small file first: its errors come cheap
    clip = load_clip(model, pretrained, model_config, device, dtype, field)
    width = mlp.layers[0].in_features
    if width != clip.embed_dim:
        raise UserError(f"{field}.head", f"{head} takes {width}-wide embeddings but {clip.name} gives "
                        f"{clip.embed_dim}", "pair the head with its CLIP (sac+logos+ava1-l14 needs ViT-L-14, "
                        "builtin:toy-aesthetic needs builtin:toy-clip)")
    mlp.to(clip.device)

    def reward(images: torch.Tensor, prompts: Sequence[str]) -> list[float]:
        with torch.inference_mode():
            return mlp(clip.encode_images(images)).squeeze(-1).cpu().tolist()

    return reward
