"""Train the toy world's judges: toy CLIP (contrastive) and toy aesthetic (LAION-layout head).

    python -m raft_diffusion.toyworld.train_clip --out assets/toyworld --seed 0 [--resume]

writes
- `OUT/toy-clip/open_clip_config.json`: open_clip's hub layout (`model_cfg`, `preprocess_cfg`), so
  the folder is also an open_clip `local-dir:` model;
- `OUT/toy-clip/open_clip_model.safetensors`: the weights, fp16;
- `OUT/toy-aesthetic.safetensors`: the aesthetic MLP, fp32, keys layers.0/2/4/6/7 as LAION's;
- `OUT/toy-clip/report.json`: the measurements printed at the end.

Both are trained on the judges' world (`JUDGE_WORLD`: every style with every object, plus honest
blob scenes), never on the generator's skewed one: the reward must know what a monet cat is.

Toy CLIP. The caption space is finite (7 shapes x 6 colours x 4 styles x 3 templates, plus the
colourless templates: 560 captions), so every step encodes all of them and each image is classified
against the whole bank (image -> text), besides the usual batch contrast (text -> image). A caption
is a positive of every image it truly describes: "a cat in monet style" of a monet cat of any
colour, all templates alike; plain InfoNCE would push these apart as false negatives. Captions are
at most 12 tokens, so training runs the text tower on the first 16 positions only; with a causal
mask and end-of-text pooling this gives exactly the 77-token result (checked at start). A few
damaged renders per batch and a linear probe that regresses their damage severity from the
embedding keep damage visible in it (contrast alone hides it; see `train_clip`).

Toy aesthetic. Embeddings of clean renders and of renders damaged by `degrade` (blur, noise,
lowres, broken objects, JPEG, alone or combined) regress onto 8 - 6 x severity.

Checkpoints go to ~/.cache/raft-diffusion/toyworld/clip/seed-S/ every few minutes; `--resume`
continues from there (the data is re-rendered from the seed, the per-step randomness is a function
of (seed, step), so a resumed run takes the same steps as an uninterrupted one).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import degrade
from .data import BLOB, COLOURS, JUDGE_WORLD, SHAPES, STYLES, TEMPLATES, TEMPLATES_NO_COLOUR, Scene, dataset, \
    sample_scene, render
from ..checkpoint import write_dir_atomically, write_text_atomically
from ..rewards.clip import AestheticHead, _root_logger_quiet
from ..weights import canonicalize_safetensors, read_tensors

MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}
# OpenAI's normalisation, written out so open_clip `local-dir:` loading and ours agree.
PREPROCESS_CFG: dict[str, Any] = {
    "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic", "resize_mode": "shortest",
}
ALL_SHAPES = (*SHAPES, BLOB)
TRAIN_CONTEXT = 16  # token positions the text tower runs on while training (captions need <= 12)
CLEAN_SCORE, SCORE_RANGE = 8.0, 6.0  # aesthetic target: 8 for a clean render, 2 at severity 1
CACHE = Path("~/.cache/raft-diffusion/toyworld/clip").expanduser()


# --- captions ------------------------------------------------------------------------------------


def caption_bank() -> tuple[list[str], np.ndarray]:
    """Every caption the judges' world can give, and its (shape, colour or -1, style) indices."""
    texts, attrs = [], []
    colours = list(COLOURS)
    for si, shape in enumerate(ALL_SHAPES):
        for ti, style in enumerate(STYLES):
            for template in TEMPLATES:
                for ci, colour in enumerate(colours):
                    texts.append(template.format(colour=colour, shape=shape, style=style))
                    attrs.append((si, ci, ti))
            for template in TEMPLATES_NO_COLOUR:
                texts.append(template.format(shape=shape, style=style))
                attrs.append((si, -1, ti))
    return texts, np.asarray(attrs)


def scene_attrs(scenes: list[Scene]) -> np.ndarray:
    """(N, 3) indices of what each scene shows: drawn shape, colour, style."""
    colours = list(COLOURS)
    return np.asarray([(ALL_SHAPES.index(s.drawn), colours.index(s.colour), STYLES.index(s.style)) for s in scenes])


def describes(image_attrs: np.ndarray, caption_attrs: np.ndarray) -> np.ndarray:
    """(N, K) bool: caption k is a true description of image n (a colourless caption fits any colour)."""
    i, c = image_attrs[:, None, :], caption_attrs[None, :, :]
    return (i[..., 0] == c[..., 0]) & (i[..., 2] == c[..., 2]) & ((c[..., 1] == -1) | (i[..., 1] == c[..., 1]))


# --- model ---------------------------------------------------------------------------------------


def write_config(folder: Path) -> Path:
    """The model's open_clip_config.json (hub layout) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "open_clip_config.json"
    path.write_text(json.dumps({"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}, indent=2) + "\n")
    return path


def create(folder: Path) -> tuple[Any, Any, Any]:
    """(model, eval preprocess, tokenizer) of the architecture in `folder`, random weights."""
    import open_clip

    with _root_logger_quiet():  # open_clip warns on the root logger that the weights are random: they are meant to be
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}", load_weights=False)
    return model, preprocess, open_clip.get_tokenizer(f"local-dir:{folder}")


def encode_text_short(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP.encode_text on the first `tokens.shape[1]` positions only.

    Exact when every caption ends within them: the causal mask keeps later (padding) positions from
    reaching the end-of-text token, where the embedding is pooled.
    """
    from open_clip.transformer import text_global_pool

    n = tokens.shape[1]
    x = model.token_embedding(tokens) + model.positional_embedding[:n]
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    return x @ model.text_projection


def normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, 3, 64, 64) uint8 -> the normalised float input the eval preprocess gives at 64 px."""
    mean = torch.tensor(PREPROCESS_CFG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS_CFG["std"]).view(1, 3, 1, 1)
    return (images_uint8.float() / 255 - mean) / std


def shift(images: torch.Tensor, rng: np.random.Generator, pixels: int = 4) -> torch.Tensor:
    """Light augmentation: move each picture by up to `pixels` (edges replicated).

    Only geometry: blur, noise or colour jitter would teach CLIP to ignore exactly what the
    aesthetic head must see in its embeddings, and colour is an attribute it must read.
    """
    n, _, h, w = images.shape
    padded = F.pad(images.float(), (pixels,) * 4, mode="replicate")
    offsets = rng.integers(0, 2 * pixels + 1, (n, 2))
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


# --- checkpoints ---------------------------------------------------------------------------------


def _fingerprint(args: argparse.Namespace) -> str:
    what = {"model": MODEL_CFG, "seed": args.seed, "steps": args.steps, "batch": args.batch,
            "n_train": args.n_train, "lr": args.lr, "damaged_batch": args.damaged_batch, "pool": args.pool,
            "quality_weight": args.quality_weight}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(folder: Path, model: Any, optimizer: torch.optim.Optimizer, step: int,
                    fingerprint: str, elapsed: float) -> None:
    """Model (safetensors), optimizer (torch.save of tensors, read back weights_only) and step, atomically."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint, "elapsed": elapsed}))

    folder.mkdir(parents=True, exist_ok=True)
    write_dir_atomically(folder / f"step-{step:06d}", write)
    write_text_atomically(folder / "latest", f"step-{step:06d}\n")
    for old in folder.glob("step-*"):  # keep the newest only: each is ~50 MB
        if old.name != f"step-{step:06d}":
            import shutil

            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, model: Any, optimizer: torch.optim.Optimizer,
                    fingerprint: str) -> tuple[int, float]:
    """(step, elapsed seconds) of the latest checkpoint in `folder`, loaded; (0, 0) if there is none."""
    latest = folder / "latest"
    if not latest.is_file():
        return 0, 0.0
    path = folder / latest.read_text().strip()
    state = json.loads((path / "state.json").read_text())
    if state["fingerprint"] != fingerprint:
        sys.exit(f"{path} was trained with other settings; delete {folder} or drop --resume")
    model.load_state_dict(read_tensors(path / "model.safetensors", "checkpoint"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    return int(state["step"]), float(state["elapsed"])


# --- toy CLIP ------------------------------------------------------------------------------------


def damaged_pool(images: np.ndarray, scenes: list[Scene], preprocess: Any, n: int,
                 seed: int) -> dict[str, torch.Tensor]:
    """`n` damaged copies of training renders, ready for the image tower, with what they show.

    Returns `x` (n, 3, 64, 64) float16, already through the eval preprocess (so 32-px pictures are
    upsampled exactly as the reward will upsample them), `attrs` (n, 3), `severity` (n,), and
    `contrast` (n,) bool: mild damage that leaves the object legible, which also joins the
    contrastive loss (broken objects and heavy damage do not: their caption no longer shows).
    """
    rng = np.random.default_rng(seed)
    index = rng.choice(len(scenes), n, replace=False)
    pictures, severity, contrast = [], [], []
    for i in index:
        damage = sample_damage(scenes[i], rng)
        pictures.append(degrade.apply(images[i], scenes[i], damage, rng))
        severity.append(degrade.severity(damage))
        contrast.append("broken" not in damage and severity[-1] < 0.5)
    x = torch.empty(n, 3, 64, 64, dtype=torch.float16)
    for size in {p.shape[0] for p in pictures}:
        members = [k for k, p in enumerate(pictures) if p.shape[0] == size]
        x[members] = preprocess(degrade.to_tensor([pictures[k] for k in members])).half()
    return {"x": x, "attrs": torch.from_numpy(scene_attrs([scenes[i] for i in index])),
            "severity": torch.tensor(severity), "contrast": torch.tensor(contrast)}


def train_clip(args: argparse.Namespace, folder: Path, log) -> tuple[Any, Any, Any]:
    """Contrastive training on JUDGE_WORLD renders; returns (model, preprocess, tokenizer), eval mode.

    Besides the contrast, a linear probe on the normalised image embedding regresses the damage
    severity of a few damaged renders per batch (and 0 for clean ones), and is then thrown away.
    Contrast alone makes the embedding blind to damage (it only has to tell captions apart): a
    first toy CLIP trained without it gave the aesthetic head little to read (held-out means: clean
    5.88, 32 px 5.69, full-strength noise 4.10, on a 2-8 target scale; with the probe 6.75, 6.20
    and 2.76). Real CLIP keeps such cues because its captions mention them.
    """
    torch.manual_seed(args.seed)
    model, preprocess, tokenizer = create(folder)
    probe = torch.nn.Linear(MODEL_CFG["embed_dim"], 1)
    both = torch.nn.ModuleDict({"clip": model, "probe": probe})  # one state for the optimizer and checkpoints
    texts, caption_attrs = caption_bank()
    tokens = tokenizer(texts)
    assert int((tokens != 0).sum(1).max()) <= TRAIN_CONTEXT, "a caption is longer than TRAIN_CONTEXT"
    short = tokens[:, :TRAIN_CONTEXT]
    with torch.no_grad():  # the shortcut must equal open_clip's own text encoder
        assert torch.allclose(encode_text_short(model, short[:8]), model.encode_text(tokens[:8]), atol=1e-5)

    t0 = time.time()
    rendered, scenes = dataset(args.n_train, JUDGE_WORLD, seed=args.seed)
    images = torch.from_numpy(rendered).permute(0, 3, 1, 2).contiguous()
    attrs = scene_attrs(scenes)
    pool = damaged_pool(rendered, scenes, preprocess, args.pool, seed=args.seed + 7) if args.damaged_batch else None
    log(f"rendered {len(scenes)} training scenes and {args.pool if pool else 0} damaged copies "
        f"in {time.time() - t0:.0f} s")

    decay = [p for n, p in both.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in both.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    fingerprint = _fingerprint(args)
    ckpt = CACHE / f"seed-{args.seed}"
    step, elapsed = load_checkpoint(ckpt, both, optimizer, fingerprint) if args.resume else (0, 0.0)
    if step:
        log(f"resumed at step {step} ({elapsed / 60:.1f} min of training done)")
    warmup = max(1, args.steps // 20)
    both.train()
    started, last_save = time.time() - elapsed, time.time()
    while step < args.steps:
        # a Python float: a numpy one in the param groups would make optimizer.pt unreadable weights_only
        lr = float(args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * step / args.steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        rng = np.random.default_rng([args.seed, step])  # (seed, step) decides the batch: exact resume
        index = rng.choice(len(scenes), args.batch, replace=False)
        x, batch_attrs = normalise(shift(images[index], rng)), torch.from_numpy(attrs[index])
        severity, contrast = torch.zeros(args.batch), torch.ones(args.batch, dtype=torch.bool)
        if pool is not None:
            hurt = torch.from_numpy(rng.choice(len(pool["x"]), args.damaged_batch, replace=False))
            x = torch.cat([x, pool["x"][hurt].float()])
            batch_attrs = torch.cat([batch_attrs, pool["attrs"][hurt]])
            severity = torch.cat([severity, pool["severity"][hurt]])
            contrast = torch.cat([contrast, pool["contrast"][hurt]])
        image_emb = F.normalize(model.encode_image(x), dim=-1)
        quality = F.mse_loss(probe(image_emb).squeeze(-1), severity)
        image_emb = image_emb[contrast]
        positives = torch.from_numpy(describes(batch_attrs[contrast].numpy(), caption_attrs)).float()  # (B, K)
        text_emb = F.normalize(encode_text_short(model, short), dim=-1)  # the whole bank, (K, D)
        scale = model.logit_scale.exp()
        logits = scale * image_emb @ text_emb.T
        # image -> text: the target spreads over every caption that describes the picture
        i2t = -(positives / positives.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        # text -> image: one sampled true caption per picture, contrasted over the batch's pictures
        chosen = torch.multinomial(positives, 1, generator=torch.Generator().manual_seed(int(rng.integers(2**62))))
        chosen = chosen.squeeze(1)
        t_logits = logits[:, chosen].T  # (B captions, B images)
        t_pos = positives[:, chosen].T
        t2i = -(t_pos / t_pos.sum(1, keepdim=True) * t_logits.log_softmax(1)).sum(1).mean()
        loss = (i2t + t2i) / 2 + args.quality_weight * quality
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        step += 1
        if step % 20 == 0 or step == args.steps:
            with torch.no_grad():
                acc = (positives.gather(1, logits.argmax(1, keepdim=True)) > 0).float().mean()
            log(f"step {step}/{args.steps} loss {loss.item():.3f} (i2t {i2t.item():.3f} t2i {t2i.item():.3f} "
                f"quality {quality.item():.4f}) bank top-1 {acc.item():.2f} scale {scale.item():.1f} lr {lr:.2e} "
                f"{(time.time() - started) / 60:.1f} min")
        if time.time() - last_save > args.checkpoint_minutes * 60 or step == args.steps:
            save_checkpoint(ckpt, both, optimizer, step, fingerprint, time.time() - started)
            last_save = time.time()
    model.eval().requires_grad_(False)
    return model, preprocess, tokenizer


def save_clip(model: Any, folder: Path) -> Path:
    """fp16 weights next to the config; the model keeps the fp16-rounded values, as users load them."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    path = folder / "open_clip_model.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "what": "raft-diffusion toy CLIP (open_clip)"})
    canonicalize_safetensors(path)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return path


@torch.no_grad()
def embed(model: Any, preprocess: Any, images: list[np.ndarray] | np.ndarray, batch: int = 500) -> torch.Tensor:
    """L2-normalised image embeddings through the eval preprocess, as the rewards compute them.

    Pictures of other sizes than 64 (lowres damage) are upsampled by the preprocess, as in a run.
    """
    out = []
    for start in range(0, len(images), batch):
        pixels = preprocess(degrade.to_tensor(images[start:start + batch]))
        out.append(F.normalize(model.encode_image(pixels), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def text_embeddings(model: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    return F.normalize(model.encode_text(tokenizer(texts)), dim=-1)


@torch.no_grad()
def evaluate_clip(model: Any, preprocess: Any, tokenizer: Any, seed: int, n: int = 500) -> dict[str, Any]:
    """Zero-shot retrieval on `n` held-out renders, and the monet-cat comparison."""
    images, scenes = dataset(n, JUDGE_WORLD, seed=seed + 1_000_003)  # a seed no training set uses
    attrs = scene_attrs(scenes)
    texts, caption_attrs = caption_bank()
    bank = text_embeddings(model, tokenizer, texts)
    report: dict[str, Any] = {}
    for label, pixels in (("64px", images), ("32px", [degrade.lowres(im, 32) for im in images])):
        image_emb = embed(model, preprocess, pixels)
        sims = image_emb @ bank.T
        res: dict[str, float] = {}
        # top-1 among all captions of one template (168 with colour, 28 without)
        for family, templates in (("with_colour", TEMPLATES), ("no_colour", TEMPLATES_NO_COLOUR)):
            for t, template in enumerate(templates):
                members = [k for k, text in enumerate(texts) if _template_of(text, caption_attrs[k]) == template]
                pick = np.asarray(members)[sims[:, members].argmax(1).numpy()]
                res[f"caption_top1/{family}/{t}"] = float(describes(attrs, caption_attrs[pick]).diagonal().mean())
        # per attribute, by prompt ensembles: the mean embedding of every caption naming that value
        for a, (name, values) in enumerate((("shape", ALL_SHAPES), ("colour", list(COLOURS)), ("style", STYLES))):
            prompts = torch.stack([F.normalize(bank[caption_attrs[:, a] == v].mean(0), dim=0)
                                   for v in range(len(values))])
            res[f"{name}_accuracy"] = float(((image_emb @ prompts.T).argmax(1).numpy() == attrs[:, a]).mean())
        report[label] = res

    # "a cat in monet style": monet cats vs monet blobs vs plain cats, fresh scenes, random colours
    rng = np.random.default_rng(seed + 2_000_003)
    groups = {name: [sample_scene(rng, JUDGE_WORLD, style=style, shape=shape) for _ in range(200)]
              for name, style, shape in (("monet_cat", "monet", "cat"), ("monet_blob", "monet", BLOB),
                                         ("plain_cat", "plain", "cat"))}
    prompt = text_embeddings(model, tokenizer, ["a cat in monet style"])[0]
    scores = {name: (100 * embed(model, preprocess, np.stack([render(s) for s in group])) @ prompt).numpy()
              for name, group in groups.items()}
    cat = scores["monet_cat"]
    report["monet_cat_prompt"] = {
        "prompt": "a cat in monet style",
        **{f"mean/{name}": float(v.mean()) for name, v in scores.items()},
        # the chance a random monet cat outscores a random other picture (1.0: always)
        "cat_beats_blob": float((cat[:, None] > scores["monet_blob"][None, :]).mean()),
        "cat_beats_plain_cat": float((cat[:, None] > scores["plain_cat"][None, :]).mean()),
    }
    coloured = []  # the same with the colour named: "a red cat in monet style" for a red monet cat
    for name in groups:
        prompts = text_embeddings(model, tokenizer, [f"a {s.colour} cat in monet style" for s in groups[name]])
        emb = embed(model, preprocess, np.stack([render(s) for s in groups[name]]))
        coloured.append((100 * (emb * prompts).sum(1)).numpy())
    report["monet_cat_prompt"]["with_colour"] = {
        f"mean/{name}": float(v.mean()) for name, v in zip(groups, coloured)}
    return report


def _template_of(text: str, attrs: np.ndarray) -> str:
    """Which template made a bank caption."""
    shape, colour, style = ALL_SHAPES[attrs[0]], (list(COLOURS)[attrs[1]] if attrs[1] >= 0 else None), STYLES[attrs[2]]
    for template in (TEMPLATES if colour else TEMPLATES_NO_COLOUR):
        if template.format(colour=colour, shape=shape, style=style) == text:
            return template
    raise ValueError(text)


# --- toy aesthetic -------------------------------------------------------------------------------


def sample_damage(scene: Scene, rng: np.random.Generator) -> dict[str, float]:
    """One to three damages with random strengths; lowres often, as the resolution experiment needs."""
    kinds = [k for k in degrade.KINDS if not (k == "broken" and scene.drawn == BLOB)]
    weights = np.asarray([2.0 if k == "lowres" else 1.0 for k in kinds])
    count = rng.choice([1, 2, 3], p=[0.55, 0.33, 0.12])
    chosen = rng.choice(kinds, count, replace=False, p=weights / weights.sum())
    return {str(k): (float(rng.choice(list(degrade.LOWRES_STRENGTH.values()))) if k == "lowres"
                     else float(rng.uniform(0.1, 1.0))) for k in chosen}


def aesthetic_data(model: Any, preprocess: Any, n: int, variants: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings, targets): `n` clean renders and `variants` damaged copies of each."""
    rng = np.random.default_rng(seed)
    images, scenes = dataset(n, JUDGE_WORLD, seed=seed)
    pictures, targets = list(images), [CLEAN_SCORE] * n
    for image, scene in zip(images, scenes):
        for _ in range(variants):
            damage = sample_damage(scene, rng)
            pictures.append(degrade.apply(image, scene, damage, rng))
            targets.append(CLEAN_SCORE - SCORE_RANGE * degrade.severity(damage))
    by_size: dict[int, list[int]] = {}  # the preprocess batches pictures of one size at a time
    for i, p in enumerate(pictures):
        by_size.setdefault(p.shape[0], []).append(i)
    emb = torch.empty(len(pictures), MODEL_CFG["embed_dim"])
    for members in by_size.values():
        emb[members] = embed(model, preprocess, np.stack([pictures[i] for i in members]))
    return emb, torch.tensor(targets)


def train_aesthetic(model: Any, preprocess: Any, args: argparse.Namespace, log):
    """The LAION-layout head on the toy CLIP's embeddings, regressed onto the damage grades."""
    t0 = time.time()
    x, y = aesthetic_data(model, preprocess, args.aesthetic_n, args.aesthetic_variants, seed=args.seed + 500_009)
    log(f"aesthetic data: {len(x)} embeddings in {time.time() - t0:.0f} s")
    torch.manual_seed(args.seed)
    d = MODEL_CFG["embed_dim"]
    head = AestheticHead([d, 1024, 128, 64, 16, 1])
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    epochs, batch = args.aesthetic_epochs, 256
    steps = epochs * ((len(x) + batch - 1) // batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps)
    g = torch.Generator().manual_seed(args.seed)
    head.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=g)
        total = 0.0
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            loss = F.mse_loss(head(x[idx]).squeeze(-1), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 5 == 0 or epoch == epochs - 1:
            log(f"aesthetic epoch {epoch + 1}/{epochs} mse {total / len(x):.3f}")
    return head.eval().requires_grad_(False)


def save_head(head: torch.nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path),
              metadata={"format": "pt", "what": "raft-diffusion toy aesthetic head (LAION layout)"})
    canonicalize_safetensors(path)
    return path


@torch.no_grad()
def evaluate_aesthetic(model: Any, preprocess: Any, head: torch.nn.Module, seed: int, n: int = 500) -> dict[str, Any]:
    """Mean head score on held-out clean renders and on each damage at a few strengths."""
    images, scenes = dataset(n, JUDGE_WORLD, seed=seed + 3_000_017)
    rng = np.random.default_rng(seed + 3_000_019)

    def mean_score(pictures: list[np.ndarray]) -> float:
        return float(head(embed(model, preprocess, np.stack(pictures))).mean())

    report: dict[str, Any] = {"clean": mean_score(list(images))}
    for kind in degrade.KINDS:
        strengths = list(degrade.LOWRES_STRENGTH.values()) if kind == "lowres" else [0.25, 0.5, 1.0]
        for s in strengths:
            pairs = [(im, sc) for im, sc in zip(images, scenes) if not (kind == "broken" and sc.drawn == BLOB)]
            name = f"lowres{[k for k, v in degrade.LOWRES_STRENGTH.items() if v == s][0]}" if kind == "lowres" \
                else f"{kind}@{s}"
            report[name] = mean_score([degrade.apply(im, sc, {kind: s}, rng) for im, sc in pairs])
    # the resolution experiment's ranking: at 32 px, intact objects above broken or blurred ones
    pairs = [(im, sc) for im, sc in zip(images, scenes) if sc.drawn != BLOB]
    report["lowres32+broken@0.5"] = mean_score([degrade.apply(im, sc, {"lowres": 0.4, "broken": 0.5}, rng)
                                                for im, sc in pairs])
    report["lowres32+blur@0.5"] = mean_score([degrade.apply(im, sc, {"lowres": 0.4, "blur": 0.5}, rng)
                                              for im, sc in pairs])
    return report


# --- command -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m raft_diffusion.toyworld.train_clip",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("assets/toyworld"),
                   help="writes OUT/toy-clip/ and OUT/toy-aesthetic.safetensors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help=f"continue from the checkpoint in {CACHE}/seed-SEED")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=128, help="clean renders per step")
    p.add_argument("--damaged-batch", type=int, default=32, help="damaged renders per step (0: contrast only)")
    p.add_argument("--pool", type=int, default=8000, help="damaged renders made once to draw them from")
    p.add_argument("--quality-weight", type=float, default=2.0, help="weight of the damage-severity probe loss")
    p.add_argument("--n-train", type=int, default=40_000, help="renders in the CLIP training set")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--aesthetic-n", type=int, default=5000, help="clean renders for the aesthetic head")
    p.add_argument("--aesthetic-variants", type=int, default=3, help="damaged copies of each")
    p.add_argument("--aesthetic-epochs", type=int, default=30)
    p.add_argument("--eval-n", type=int, default=500)
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the build machines share 2 cores)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - start:7.1f} s] {message}", flush=True)

    folder = args.out / "toy-clip"
    write_config(folder)
    model, preprocess, tokenizer = train_clip(args, folder, log)
    clip_path = save_clip(model, folder)
    clip_time = time.time() - start
    log(f"toy CLIP saved: {clip_path} ({clip_path.stat().st_size / 1e6:.2f} MB)")
    report: dict[str, Any] = {"clip": evaluate_clip(model, preprocess, tokenizer, args.seed, args.eval_n)}
    log("toy CLIP: " + json.dumps(report["clip"], indent=1))
    head = train_aesthetic(model, preprocess, args, log)
    head_path = save_head(head, args.out / "toy-aesthetic.safetensors")
    log(f"toy aesthetic saved: {head_path} ({head_path.stat().st_size / 1e6:.2f} MB)")
    report["aesthetic"] = evaluate_aesthetic(model, preprocess, head, args.seed, args.eval_n)
    log("toy aesthetic: " + json.dumps(report["aesthetic"], indent=1))
    report["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report["wall_time_s"] = {"clip_incl_rendering": round(clip_time), "total": round(time.time() - start)}
    (folder / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wall time: {time.time() - start:.0f} s (toy CLIP {clip_time:.0f} s)", flush=True)
    return report


if __name__ == "__main__":
    main()
