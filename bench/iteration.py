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


def ours(backend: DiffusionBackend, prompts, seeds, groups, reward) -> dict[str, float]:
    t = {}
    start = time.perf_counter()
    samples = backend.generate(prompts, seeds)
    t["generate"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = reward(samples.outputs, samples.prompts)
    t["score"] = time.perf_counter() - start
    chosen = select_per_prompt(scores, groups, 1)
    start = time.perf_counter()
    backend.train(samples.select(chosen), torch.Generator().manual_seed(0))
    t["train"] = time.perf_counter() - start
    return t


def naive(backend: DiffusionBackend, unique_prompts, k, seed, reward) -> dict[str, float]:
    pipe, cfg, gen = backend.pipe, backend.config, backend.config.generation
    t = {}
    start = time.perf_counter()
    images, prompts = [], []
    for i, prompt in enumerate(unique_prompts):  # one pipeline call per prompt
        g = torch.Generator("cpu").manual_seed(seed + i)
        out = pipe(prompt, num_images_per_prompt=k, height=gen.resolution, width=gen.resolution,
                   num_inference_steps=gen.steps, guidance_scale=gen.guidance_scale, generator=g)
        images += out.images
        prompts += [prompt] * k
    t["generate"] = time.perf_counter() - start
    start = time.perf_counter()
    tensors = torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images]) / 255
    scores = reward(tensors, prompts)
    t["score"] = time.perf_counter() - start
    chosen = select_per_prompt(scores, [i // k for i in range(len(prompts))], 1)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    unet, sched = backend.unet, backend.noise_scheduler
    unet.train()
    for _ in range(cfg.training.epochs):
        order = [chosen[i] for i in torch.randperm(len(chosen), generator=generator).tolist()]
        for j in range(0, len(order), cfg.training.batch_size):
            batch = order[j:j + cfg.training.batch_size]
            with torch.no_grad():  # the selected images go back through the VAE and the text encoder
                x = tensors[batch] * 2 - 1
                x0 = pipe.vae.encode(x).latent_dist.sample() * pipe.vae.config.scaling_factor
                ids = pipe.tokenizer([prompts[i] for i in batch], padding="max_length", max_length=77,
                                     truncation=True, return_tensors="pt").input_ids
                text = pipe.text_encoder(ids)[0]
            noise = torch.randn(x0.shape, generator=generator)
            ts = torch.randint(0, sched.config.num_train_timesteps, (len(batch),), generator=generator)
            pred = unet(sched.add_noise(x0, noise, ts), ts, encoder_hidden_states=text).sample
            loss = F.mse_loss(pred, noise if backend.prediction_type == "epsilon" else sched.get_velocity(x0, noise, ts))
            loss.backward()
            backend.optimizer.step()
            backend.optimizer.zero_grad()
    unet.eval()
    t["train"] = time.perf_counter() - start
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--b", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="our generation batch (across prompts)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = RunConfig.model_validate({
        "model": {"path": "builtin:tiny-sd"}, "prompts": {"train": PROMPTS},
        "rewards": [{"name": "jpeg_compressibility"}],
        "generation": {"resolution": args.resolution, "steps": args.steps, "samples_per_prompt": args.k,
                       "batch_size": args.batch_size},
        "training": {"epochs": 1, "batch_size": 4},
    })
    backend = DiffusionBackend(config, Accelerator(cpu=True))
    reward = jpeg_compressibility()
    unique = PROMPTS[:args.b]
    prompts = [p for p in unique for _ in range(args.k)]
    groups = [i // args.k for i in range(len(prompts))]
    seeds = list(range(len(prompts)))
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "naive": []}
    ours(backend, prompts[:2], seeds[:2], [0, 0], reward)  # warm-up
    for _ in range(args.repeats):  # alternate so both see the same machine load
        runs["ours"].append(ours(backend, prompts, seeds, groups, reward))
        runs["naive"].append(naive(backend, unique, args.k, 0, reward))
    median = {name: {phase: statistics.median(r[phase] for r in rs) for phase in rs[0]} for name, rs in runs.items()}
    for m in median.values():
        m["total"] = sum(m.values())
    ratios = {phase: median["naive"][phase] / median["ours"][phase] for phase in median["ours"]}
    print(f"one RAFT iteration, tiny SD pipeline, {args.resolution}px, K={args.k}, b={args.b}, "
          f"{args.steps} steps, our batch {args.batch_size}, median of {args.repeats}")
    print(f"{'phase':10}{'ours (s)':>12}{'naive (s)':>12}{'naive/ours':>12}")
    for phase in median["ours"]:
        print(f"{phase:10}{median['ours'][phase]:12.2f}{median['naive'][phase]:12.2f}{ratios[phase]:12.2f}")
    out = Path(__file__).parent / "results" / "iteration.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "median_seconds": median, "ratio_naive_over_ours": ratios,
                               "torch": torch.__version__, "threads": torch.get_num_threads()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
