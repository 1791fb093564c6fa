"""Train the toy flow-matching model (`builtin:toy-shapes-flow`): SD 3's architecture on the toy world.

    python -m raft_diffusion.toyworld.train_flow --out assets/toyworld/toy-shapes-flow [--seed 0] [--threads 1]

An SD3Transformer2DModel (MMDiT) trained by rectified flow on the generator world's data, with the
toy SD's VAE and text encoder, frozen (`builtin:toy-shapes`), so the two models differ only in
their denoiser and objective. Stages, each resumable from `--cache` (default
~/.cache/raft-diffusion/toyworld/flow):
1. render the skewed generator world (the same data as train_sd: same seed, same scenes);
2. encode it with the shipped toy VAE (its latent mean and std per image);
3. train the transformer: logit-normal sigmas (SD 3's training), velocity target `noise - x0`,
   10% caption dropout; checkpointed every few minutes. In the phases of `PHASES`, each a cosine
   learning-rate cycle: first with SD 3's shift of 3 towards noise, then with shift 1. At 64 px
   (8x8 patches) shift 3 leaves sigmas below 0.3 under 3% of the training, and the model drew
   blobs: the SD 3 paper's shift grows with the resolution, and 1 fits this one. The asset's
   scheduler samples with the last phase's shift, and RAFT fine-tunes with it. The shipped weights
   are an exponential moving average of the trained ones (`EMA_DECAY`), as DiTs are sampled.

The text encoder is SD 3's pair of CLIP encoders made of the one toy encoder: it serves as
`text_encoder` and `text_encoder_2` (CLIPTextModelWithProjection with an identity projection), and
SD 3 reads the penultimate layer. There is no T5: the prompt sequence is the 77 CLIP tokens alone
(`T5_TOKENS` = 0; SD 3 without T5 would append 256 zero tokens by default, which cost a CPU 3x
and carry nothing). The asset directory holds the transformer, the scheduler and
`raft_diffusion.json`; the loader takes the VAE and text encoder from toy-shapes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..backends.loading import load_pipeline
from ..checkpoint import write_dir_atomically
from ..tiny import flow_scheduler, tiny_sd3_transformer
from .models import text_encoder_with_projection
from .train_sd import RESOLUTION, arguments, load_data, load_stage, to_tensor, train_stage

# (last step, sigma shift) of each training phase: a cosine learning-rate cycle each, resumed from
# the phase before; the first two are the shift-3 training this model started with.
PHASES = ((4500, 3.0), (9000, 3.0), (14000, 1.0))
EMA_DECAY = 0.999  # the shipped weights are this average of the training weights (from step 10,958 on)
T5_TOKENS = 0  # the T5 part of the prompt sequence this model was trained with (see the docstring)
TEXT_DIM = 96  # the toy text encoder's width


def make_transformer():
    # 16x16x4 latents in 2x2 patches: 64 image tokens beside the 77 prompt tokens.
    return tiny_sd3_transformer(text_dims=(TEXT_DIM, TEXT_DIM), sample_size=RESOLUTION // 4, in_channels=4,
                                layers=6, heads=4, head_dim=32)


def frozen_parts():
    """The shipped toy SD's VAE and text encoder, float32, frozen."""
    sd = load_pipeline("builtin:toy-shapes")
    vae, text = sd.vae.float().eval(), text_encoder_with_projection(sd.text_encoder.float())
    for part in (vae, text):
        part.requires_grad_(False)
    return vae, text


@torch.no_grad()
def encode_all(vae, data, cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    path = cache / "latents.safetensors"
    if path.is_file():
        saved = load_file(str(path))
        return saved["mean"], saved["std"]
    means, stds = [], []
    for i in range(0, len(data["images"]), 256):
        post = vae.encode(to_tensor(data["images"][i:i + 256])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    mean, std = torch.cat(means).contiguous(), torch.cat(stds).contiguous()
    save_file({"mean": mean, "std": std}, str(path))
    return mean, std


@torch.no_grad()
def prompt_encoding(text, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What StableDiffusion3Pipeline.encode_prompt gives with this encoder as both CLIPs and no T5:
    the penultimate hidden states side by side, and the pooled embeddings side by side."""
    out = text(tokens, output_hidden_states=True)
    hidden, pooled = out.hidden_states[-2], out.text_embeds
    return torch.cat([hidden, hidden], dim=-1), torch.cat([pooled, pooled], dim=-1)


def train(data, mean, std, scale: float, text, cache: Path, steps: int, batch: int, lr: float, seed: int,
          shift: float):
    """The transformer by rectified flow to `steps`: the loss the diffusion backend fine-tunes with
    (families.py), sigmas shifted by `shift`."""
    transformer = make_transformer()
    sched = flow_scheduler(shift)

    def loss_of(x0: torch.Tensor, tokens: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=g)
        u = torch.sigmoid(torch.randn(x0.shape[0], generator=g))  # logit-normal (0, 1)
        index = (u * sched.config.num_train_timesteps).long().clamp(max=len(sched.sigmas) - 1)
        sigma = sched.sigmas[index].view(-1, 1, 1, 1)
        hidden, pooled = prompt_encoding(text, tokens)
        pred = transformer(hidden_states=(1 - sigma) * x0 + sigma * noise, timestep=sched.timesteps[index],
                           encoder_hidden_states=hidden, pooled_projections=pooled).sample
        return F.mse_loss(pred, noise - x0)

    train_stage("transformer", {"transformer": transformer}, loss_of, data, mean, std, scale, cache, steps, batch,
                lr, seed, ema_decay=EMA_DECAY)
    return transformer


def phases(steps: int) -> list[tuple[int, float]]:
    """`PHASES` up to `steps`: the last one cut there."""
    out = []
    for end, shift in PHASES:
        out.append((min(end, steps), shift))
        if end >= steps:
            break
    return out


def trained_weights(cache: Path) -> tuple:
    """The transformer of the latest checkpoint (its moving average where it has one) and its step."""
    transformer = make_transformer()
    ckpt = cache / "transformer"
    step = load_stage(ckpt, {"transformer": transformer}, torch.optim.AdamW(transformer.parameters()),
                      torch.Generator())
    if (ckpt / "ema_transformer.safetensors").is_file():
        transformer.load_state_dict(load_file(str(ckpt / "ema_transformer.safetensors")))
    return transformer.eval(), step


def checkpoint_step(ckpt: Path) -> int:
    state = ckpt / "state.json"
    return json.loads(state.read_text())["step"] if state.is_file() else 0


def save_asset(transformer, out: Path, steps: int, seed: int) -> None:
    """transformer/ (fp16), scheduler/, and raft_diffusion.json: what the loader needs beyond toy-shapes."""
    done = phases(steps)

    def write(tmp: Path) -> None:
        transformer.to(torch.float16).save_pretrained(str(tmp / "transformer"), safe_serialization=True)
        flow_scheduler(done[-1][1]).save_pretrained(str(tmp / "scheduler"))
        (tmp / "raft_diffusion.json").write_text(json.dumps({
            "pipeline": "StableDiffusion3Pipeline", "vae_and_text_encoder": "builtin:toy-shapes",
            "t5_tokens": T5_TOKENS, "steps": steps, "seed": seed,
            "phases": [{"last_step": end, "shift": shift} for end, shift in done]}, indent=2) + "\n")

    write_dir_atomically(out, write)


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], "assets/toyworld/toy-shapes-flow", "flow")
    parser.add_argument("--export", action="store_true",
                        help="write the latest checkpoint as an asset to --out and stop (a look mid-way)")
    parser.set_defaults(steps=PHASES[-1][0])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = args.cache / f"seed{args.seed}"
    if args.export:
        transformer, step = trained_weights(cache)
        save_asset(transformer, args.out, step, args.seed)
        print(f"exported step {step} to {args.out}", flush=True)
        return
    cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    t0 = time.time()
    data = load_data(cache, args.n_images, args.seed)
    vae, text = frozen_parts()
    mean, std = encode_all(vae, data, cache)
    scale = float(vae.config.scaling_factor)
    print(f"latents encoded with the toy VAE, scale {scale:.4f} ({time.time() - t0:.0f}s)", flush=True)
    for end, shift in phases(args.steps):
        if checkpoint_step(cache / "transformer") >= end:
            continue  # a phase done before
        print(f"phase to step {end}: sigma shift {shift}", flush=True)
        train(data, mean, std, scale, text, cache, end, args.batch, args.lr, args.seed, shift)
    transformer, _ = trained_weights(cache)
    save_asset(transformer, args.out, args.steps, args.seed)
    print(f"saved {args.out} in {time.time() - t0:.0f}s total", flush=True)


if __name__ == "__main__":
    main()
