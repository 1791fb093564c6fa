"""Train the toy Stable Diffusion (`builtin:toy-shapes`) from scratch on the generator's world.

    python -m raft_diffusion.toyworld.train_sd --out assets/toyworld/toy-shapes [--seed 0] [--resume]

Three stages, each resumable from `--cache` (default ~/.cache/raft-diffusion/toyworld/sd):
1. render the skewed generator world once (images, scenes, tokenized captions);
2. an AutoencoderKL (latent scale 4: 64 px -> 16x16x4 latents), trained on reconstruction;
3. a UNet2DConditionModel and a 3-layer CLIPTextModel trained jointly on the VAE's latents with
   SD's epsilon objective and 10% caption dropout; checkpointed every few minutes.
The result is a diffusers pipeline directory in fp16 safetensors, loadable offline.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from ..checkpoint import write_dir_atomically
from ..tiny import sd_scheduler
from ..tokenizer import clip_tokenizer
from .data import GENERATOR_WORLD, TEMPLATES, dataset

RESOLUTION = 64
CHECKPOINT_SECONDS = 180


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), sample_size=RESOLUTION,  # thin at full resolution: CPU cost
    )


def make_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))


def make_unet() -> UNet2DConditionModel:
    # attention_head_dim is diffusers' legacy name for the number of heads: 32 channels per head.
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128, 192), attention_head_dim=(2, 4, 6), norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=96,
    )


# --- stage 1: data -------------------------------------------------------------------------------


def load_data(cache: Path, n: int, seed: int) -> dict[str, np.ndarray]:
    path = cache / f"data_n{n}_seed{seed}.npz"
    if path.is_file():
        return dict(np.load(path))
    t0 = time.time()
    images, scenes = dataset(n, GENERATOR_WORLD, seed=seed, size=RESOLUTION)
    tok = clip_tokenizer()
    ids = np.zeros((n, len(TEMPLATES), 77), dtype=np.int32)
    for t in range(len(TEMPLATES)):
        captions = [s.caption(t) for s in scenes]
        ids[:, t] = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    empty = tok([""], padding="max_length", max_length=77, return_tensors="np").input_ids[0]
    data = {"images": images, "ids": ids, "empty": empty,
            "scenes": np.array([json.dumps(s.to_dict()) for s in scenes])}
    tmp = cache / f".tmp-{path.name}"
    np.savez(tmp, **data)
    os.replace(tmp, path)
    print(f"rendered {n} scenes in {time.time() - t0:.0f}s", flush=True)
    return data


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# --- resumable stages -------------------------------------------------------------------------------


def save_stage(ckpt: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
               g: torch.Generator, step: int) -> None:
    """Checkpoint a training stage atomically: NAME.safetensors per module, optimizer, RNG, step."""
    def write(tmp: Path) -> None:
        for name, module in modules.items():
            save_file(module.state_dict(), str(tmp / f"{name}.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        save_file({"g": g.get_state()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step}))

    write_dir_atomically(ckpt, write)


def load_stage(ckpt: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
               g: torch.Generator) -> int:
    """Restore what `save_stage` wrote; the step to continue from (0 when there is no checkpoint)."""
    if not (ckpt / "state.json").is_file():
        return 0
    for name, module in modules.items():
        module.load_state_dict(load_file(str(ckpt / f"{name}.safetensors")))
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    g.set_state(load_file(str(ckpt / "rng.safetensors"))["g"])
    return json.loads((ckpt / "state.json").read_text())["step"]


# --- stage 2: VAE --------------------------------------------------------------------------------


def train_vae(data, cache: Path, steps: int, batch: int, seed: int) -> AutoencoderKL:
    """Train (or continue training) the VAE to `steps`; checkpointed every few minutes."""
    ckpt = cache / "vae"
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    start = load_stage(ckpt, {"vae": vae}, opt, g)
    if start >= steps:
        return vae.eval()

    def save(step: int) -> None:
        save_stage(ckpt, {"vae": vae}, opt, g, step)

    images = data["images"]
    t0 = last_save = time.time()
    for step in range(start, steps):
        idx = torch.randint(0, len(images), (batch,), generator=g).numpy()
        x = to_tensor(images[idx])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        # Reconstruction dominates; a small KL keeps the latent space smooth for diffusion.
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"vae step {step} mse {F.mse_loss(recon, x).item():.4f} ({time.time() - t0:.0f}s)", flush=True)
        if time.time() - last_save > CHECKPOINT_SECONDS:
            save(step + 1)
            last_save = time.time()
    save(steps)
    return vae.eval()


@torch.no_grad()
def encode_all(vae: AutoencoderKL, data, cache: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    path = cache / "latents.safetensors"
    if path.is_file():
        saved = load_file(str(path))
        return saved["mean"], saved["std"], float(saved["scale"])
    means, stds = [], []
    for i in range(0, len(data["images"]), 256):
        post = vae.encode(to_tensor(data["images"][i:i + 256])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    mean, std = torch.cat(means), torch.cat(stds)
    scale = 1.0 / mean.std().item()  # SD's convention: scaled latents have unit variance
    save_file({"mean": mean.contiguous(), "std": std.contiguous(), "scale": torch.tensor(scale)}, str(path))
    return mean, std, scale


# --- stage 3: UNet + text encoder ------------------------------------------------------------------


def train_stage(name: str, modules: dict[str, torch.nn.Module], loss_of, data, mean: torch.Tensor,
                std: torch.Tensor, scale: float, cache: Path, steps: int, batch: int, lr: float, seed: int,
                ema_decay: float = 0.0) -> None:
    """The denoiser training loop of both toy models, resumable from `cache`/`name`: AdamW, a short
    warm-up then cosine decay to 10%, batches of latents drawn from each image's posterior with one
    of its caption templates (10% dropped to the empty prompt: the unconditional model), clipped
    steps, a checkpoint every few minutes. `loss_of(x0, tokens, g)` is the model's own objective.
    With `ema_decay`, an exponential moving average of each module's weights is kept beside it
    (`ema_NAME` in the checkpoint; started from the weights of a checkpoint that has none)."""
    params = [p for module in modules.values() for p in module.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(seed)
    ckpt = cache / name
    start = load_stage(ckpt, modules, opt, g)
    if start:
        print(f"resumed {name} at step {start}", flush=True)
    averages = {f"ema_{k}": copy.deepcopy(m).requires_grad_(False) for k, m in modules.items()} if ema_decay else {}
    for key, average in averages.items():
        if (ckpt / f"{key}.safetensors").is_file():
            average.load_state_dict(load_file(str(ckpt / f"{key}.safetensors")))
        elif start:
            print(f"{key}: none in the checkpoint at step {start}; the average starts there", flush=True)
    ids, empty = torch.from_numpy(data["ids"]).long(), torch.from_numpy(data["empty"]).long()
    n, n_templates = ids.shape[0], ids.shape[1]
    for module in modules.values():
        module.train()
    t0, last_save, losses = time.time(), time.time(), []

    def save(step: int) -> None:
        save_stage(ckpt, {**modules, **averages}, opt, g, step)

    for step in range(start, steps):
        for group in opt.param_groups:  # short warm-up, then cosine decay to 10%
            warm = min(1.0, (step + 1) / 200)
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.randint(0, n, (batch,), generator=g)
        template = torch.randint(0, n_templates, (batch,), generator=g)
        tokens = ids[idx, template]
        drop = torch.rand(batch, generator=g) < 0.1  # caption dropout: learns the unconditional model
        tokens[drop] = empty
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        loss = loss_of(x0, tokens, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for key, module in modules.items() if averages else ():
                for a, p in zip(averages[f"ema_{key}"].parameters(), module.parameters()):
                    a.lerp_(p, 1 - ema_decay)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            rate = (time.time() - t0) / max(1, len(losses))
            print(f"{name} step {step} loss {np.mean(losses[-50:]):.4f} ({rate:.2f}s/step)", flush=True)
        if time.time() - last_save > CHECKPOINT_SECONDS:
            save(step + 1)
            last_save = time.time()
    save(steps)
    for module in modules.values():
        module.eval()


def train_denoiser(data, mean, std, scale, cache: Path, steps: int, batch: int, lr: float, seed: int):
    """The UNet and the text encoder, jointly, by SD's epsilon objective."""
    unet, text = make_unet(), make_text_encoder()
    sched = DDPMScheduler.from_config(sd_scheduler().config)

    def loss_of(x0: torch.Tensor, tokens: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=g)
        pred = unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=text(tokens)[0]).sample
        return F.mse_loss(pred, noise)

    train_stage("denoiser", {"unet": unet, "text": text}, loss_of, data, mean, std, scale, cache, steps, batch,
                lr, seed)
    return unet, text


def save_pipeline(vae, unet, text, scale: float, out: Path) -> None:
    vae.register_to_config(scaling_factor=scale)
    scheduler = DDIMScheduler.from_config(sd_scheduler().config)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16)

    def write(tmp: Path) -> None:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        # 3.5 MB of BPE files that open_clip already ships: `load_pipeline` passes the same tokenizer
        # for a directory without tokenizer/; model_index.json says so (null) for other loaders.
        shutil.rmtree(tmp / "tokenizer")
        index = json.loads((tmp / "model_index.json").read_text())
        index["tokenizer"] = [None, None]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    write_dir_atomically(out, write)


def arguments(description: str, out: str, cache: str) -> argparse.ArgumentParser:
    """The options both toy models' trainers take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/raft-diffusion/toyworld" / cache)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-images", type=int, default=30000)
    parser.add_argument("--steps", type=int, default=4500)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return parser


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], "assets/toyworld/toy-shapes", "sd")
    parser.add_argument("--vae-steps", type=int, default=1500)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = args.cache / f"seed{args.seed}"
    cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    t0 = time.time()
    data = load_data(cache, args.n_images, args.seed)
    vae = train_vae(data, cache, args.vae_steps, 32, args.seed)
    mean, std, scale = encode_all(vae, data, cache)
    print(f"latent scale {scale:.4f} ({time.time() - t0:.0f}s)", flush=True)
    unet, text = train_denoiser(data, mean, std, scale, cache, args.steps, args.batch, args.lr, args.seed)
    save_pipeline(vae, unet, text, scale, args.out)
    print(f"saved {args.out} in {time.time() - t0:.0f}s total", flush=True)


if __name__ == "__main__":
    main()
