"""One RAFT iteration, ours versus the naive way, side by side in one process.

Ours: prompts encoded once, all K x b samples generated in batches across prompts, final latents
kept, training on them. Naive: one `pipe()` call per prompt returning PIL images, rewards read
from PIL, the selected images re-encoded by the VAE, prompts re-encoded at every training step.
Both use the same tiny pipeline, LoRA, reward, selection and number of training steps.

    python bench/iteration.py [--resolution 256] [--k 8] [--b 4] [--batch-size 16] [--repeats 3]

Prints seconds per phase and the ratios naive / ours; writes bench/results/iteration.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from raft_diffusion.backends.diffusion import DiffusionBackend
from raft_diffusion.config import RunConfig
from raft_diffusion.rewards.jpeg import jpeg_compressibility
from raft_diffusion.selection import select_per_prompt

PROMPTS = ["a cat in monet style", "a red square on stripes", "a lighthouse at dusk", "a bowl of fruit",
           "a blue star", "a green heart", "an old bicycle", "a mountain lake"]


def _now() -> float:
    """Wall time once the GPU (if any) has finished what it was given."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def ours(backend: DiffusionBackend, prompts, seeds, groups, reward) -> dict[str, float]:
    t = {}
    start = _now()
    samples = backend.generate(prompts, seeds)
    t["generate"] = _now() - start
    start = _now()
    scores = reward(samples.outputs, samples.prompts)
    t["score"] = _now() - start
    chosen = select_per_prompt(scores, groups, 1)
    start = _now()
    backend.train(samples.select(chosen), torch.Generator().manual_seed(0))
    t["train"] = _now() - start
    return t


def naive(backend: DiffusionBackend, unique_prompts, k, seed, reward) -> dict[str, float]:
    pipe, cfg, gen = backend.pipe, backend.config, backend.config.generation
    t = {}
    start = _now()
    images, prompts = [], []
    for i, prompt in enumerate(unique_prompts):  # one pipeline call per prompt
        g = torch.Generator("cpu").manual_seed(seed + i)
        out = pipe(prompt, num_images_per_prompt=k, height=gen.resolution, width=gen.resolution,
                   num_inference_steps=gen.steps, guidance_scale=gen.guidance_scale, generator=g)
        images += out.images
        prompts += [prompt] * k
    t["generate"] = _now() - start
    start = _now()
    tensors = torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images]) / 255
    scores = reward(tensors, prompts)
    t["score"] = _now() - start
    chosen = select_per_prompt(scores, [i // k for i in range(len(prompts))], 1)
    start = _now()
    generator = torch.Generator().manual_seed(0)
    unet, sched = backend.denoiser, backend.noise_scheduler
    unet.train()
    for _ in range(cfg.training.epochs):
        order = [chosen[i] for i in torch.randperm(len(chosen), generator=generator).tolist()]
        for j in range(0, len(order), cfg.training.batch_size):
            batch = order[j:j + cfg.training.batch_size]
            with torch.no_grad():  # the selected images go back through the VAE and the text encoder
                x = (tensors[batch] * 2 - 1).to(backend.device, pipe.vae.dtype)
                x0 = pipe.vae.encode(x).latent_dist.sample() * pipe.vae.config.scaling_factor
                ids = pipe.tokenizer([prompts[i] for i in batch], padding="max_length", max_length=77,
                                     truncation=True, return_tensors="pt").input_ids.to(backend.device)
                text = pipe.text_encoder(ids)[0]
            noise = torch.randn(x0.shape, generator=generator).to(backend.device, x0.dtype)
            ts = torch.randint(0, sched.config.num_train_timesteps, (len(batch),), generator=generator).to(backend.device)
            with backend.precision.autocast():  # the same precision as ours
                pred = unet(sched.add_noise(x0, noise, ts), ts, encoder_hidden_states=text).sample
            target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(x0, noise, ts)
            loss = F.mse_loss(pred.float(), target.float())
            backend.accelerator.backward(backend.precision.scale(loss))
            backend.precision.step(backend.optimizer)
            backend.optimizer.zero_grad()
    unet.eval()
    t["train"] = _now() - start
    return t


def build(model: str, dtype: str, resolution: int, k: int, steps: int, batch_size: int,
          mixed_precision: str = "no") -> DiffusionBackend:
    """Our backend on `model` (builtin:tiny-sd, builtin:sd15-random, a directory, a hub id), on CUDA when present."""
    torch.manual_seed(0)
    config = RunConfig.model_validate({
        "model": {"path": model, "dtype": dtype}, "prompts": {"train": PROMPTS},
        "rewards": [{"name": "jpeg_compressibility"}],
        "generation": {"resolution": resolution, "steps": steps, "samples_per_prompt": k, "batch_size": batch_size},
        "training": {"epochs": 1, "batch_size": 4, "mixed_precision": mixed_precision},
    })
    return DiffusionBackend(config, Accelerator(cpu=not torch.cuda.is_available()))


def compare(backend: DiffusionBackend, reward, k: int, b: int, repeats: int) -> dict:
    """Median seconds per phase of `repeats` iterations ours and naive (alternating), and the ratios."""
    unique = (PROMPTS * (b // len(PROMPTS) + 1))[:b]
    unique = [f"{p} #{i}" if i >= len(PROMPTS) else p for i, p in enumerate(unique)]
    prompts = [p for p in unique for _ in range(k)]
    groups = [i // k for i in range(len(prompts))]
    seeds = list(range(len(prompts)))
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "naive": []}
    ours(backend, prompts[:2], seeds[:2], [0, 0], reward)  # warm-up
    for _ in range(repeats):  # alternate so both see the same machine load
        runs["ours"].append(ours(backend, prompts, seeds, groups, reward))
        runs["naive"].append(naive(backend, unique, k, 0, reward))
    median = {name: {phase: statistics.median(r[phase] for r in rs) for phase in rs[0]} for name, rs in runs.items()}
    for m in median.values():
        m["total"] = sum(m.values())
    ratios = {phase: median["naive"][phase] / median["ours"][phase] for phase in median["ours"]}
    return {"median_seconds": median, "ratio_naive_over_ours": ratios}


def table(result: dict) -> str:
    median, ratios = result["median_seconds"], result["ratio_naive_over_ours"]
    lines = [f"{'phase':10}{'ours (s)':>12}{'naive (s)':>12}{'naive/ours':>12}"]
    for phase in median["ours"]:
        lines.append(f"{phase:10}{median['ours'][phase]:12.2f}{median['naive'][phase]:12.2f}{ratios[phase]:12.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-sd",
                        help="builtin:tiny-sd, builtin:sd15-random (SD 1.5's architecture, random weights), "
                        "a diffusers directory or a hub id")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="the frozen model's weights (float16 wants CUDA)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"],
                        help="training.mixed_precision of the fine-tuning")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--b", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="our generation batch (across prompts)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    backend = build(args.model, args.dtype, args.resolution, args.k, args.steps, args.batch_size, args.mixed_precision)
    result = compare(backend, jpeg_compressibility(), args.k, args.b, args.repeats)
    print(f"one RAFT iteration, {args.model} ({args.dtype}) on {backend.device}, {args.resolution}px, K={args.k}, "
          f"b={args.b}, {args.steps} steps, our batch {args.batch_size}, median of {args.repeats}")
    print(table(result))
    out = Path(__file__).parent / "results" / "iteration.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), **result, "device": str(backend.device),
                               "torch": torch.__version__, "threads": torch.get_num_threads()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
