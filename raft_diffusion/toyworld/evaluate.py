"""How good the toy SD is, by the oracle: accuracy at R and R/2, and the monet-cat base rate.

    python -m raft_diffusion.toyworld.evaluate [--model builtin:toy-shapes | --cache DIR]
        [--resolutions 64 32] [--per-prompt 2] [--out runs/toy-eval]

In-distribution prompts are every (shape, colour, style) of the generator's world except the rare
pair, drawn at random with a fixed seed and worded with every caption template; the monet-cat
prompts are those of the demo. Writes `report.json` and one PNG grid per prompt set and resolution.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from diffusers import StableDiffusionPipeline

from ..paths import PROMPTS
from ..tiny import sd_scheduler
from . import oracle
from .data import COLOURS, SHAPES, STYLES, TEMPLATES, Scene
from ..backends.loading import load_pipeline
from ..backends.sampling import encode_prompts, generate_latents
from ..config import GenerationConfig
from ..tokenizer import clip_tokenizer
from .train_sd import make_text_encoder, make_unet, make_vae
from ..images import grid

MONET_CAT_PROMPTS = PROMPTS / "toy/monet_cat.txt"


def in_distribution_prompts(n: int, seed: int = 1) -> list[str]:
    combos = [c for c in itertools.product(SHAPES, COLOURS, STYLES) if c[::2] != ("cat", "monet")]
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(combos), size=n, replace=False)
    prompts = []
    for k, i in enumerate(picks):
        shape, colour, style = combos[i]
        scene = Scene(shape, colour, style, 0, 0.3, 0.5, 0.5, 0.0, shape, 0)
        prompts.append(scene.caption(k % len(TEMPLATES)))
    return prompts


def pipeline_from_cache(cache: Path) -> StableDiffusionPipeline:
    """The pipeline of an unfinished training run, from its latest checkpoints (for a look mid-way)."""
    from safetensors.torch import load_file

    vae, unet, text = make_vae(), make_unet(), make_text_encoder()
    vae.load_state_dict(load_file(str(cache / "vae/vae.safetensors")))
    vae.register_to_config(scaling_factor=float(load_file(str(cache / "latents.safetensors"))["scale"]))
    unet.load_state_dict(load_file(str(cache / "denoiser/unet.safetensors")))
    text.load_state_dict(load_file(str(cache / "denoiser/text.safetensors")))
    from diffusers import DDIMScheduler

    return StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=clip_tokenizer(),
                                   unet=unet.eval(), scheduler=DDIMScheduler.from_config(sd_scheduler().config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@torch.inference_mode()
def measure(pipe: StableDiffusionPipeline, prompts: list[str], per_prompt: int, resolution: int,
            steps: int = 25, guidance: float = 4.0, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """Oracle accuracy (all prompted attributes, and each one) of `per_prompt` images per prompt."""
    all_prompts = [p for p in prompts for _ in range(per_prompt)]
    gen = GenerationConfig(resolution=resolution, steps=steps, guidance_scale=guidance, batch_size=32)
    cond, uncond = encode_prompts(pipe, all_prompts, gen)
    seeds = [seed + k for k in range(len(all_prompts))]
    _, images = generate_latents(pipe, cond, uncond, seeds, gen, desc="evaluate")
    hits = oracle.attribute_hits(images, all_prompts)
    judged = oracle.judge(images, all_prompts)
    report = {"all": float(np.mean(judged)), "n": len(all_prompts)}
    for style in STYLES:  # monet dissolves 60% of its objects in the generator's own data
        picked = [j for j, p in zip(judged, all_prompts) if oracle.parse_prompt(p).get("style") == style]
        if picked:
            report[f"all|{style}"] = float(np.mean(picked))
    for attribute in ("shape", "colour", "style"):
        named = [h[attribute] for h in hits if attribute in h]
        if named:
            report[attribute] = float(np.mean(named))
    return report, images


def save_grid(images: torch.Tensor, path: Path, per_row: int = 16) -> None:
    arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    grid([Image.fromarray(a) for a in arr], per_row, gap=0, background="black").save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:toy-shapes")
    parser.add_argument("--cache", type=Path, default=None, help="evaluate a training run's checkpoints instead")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 32])
    parser.add_argument("--n-prompts", type=int, default=48)
    parser.add_argument("--per-prompt", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/toy-eval"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.cache is not None:
        pipe = pipeline_from_cache(args.cache)
    else:
        pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    args.out.mkdir(parents=True, exist_ok=True)
    monet = [p for p in MONET_CAT_PROMPTS.read_text().splitlines() if p and not p.startswith("#")]
    report = {}
    for resolution in args.resolutions:
        for name, prompts in (("in_distribution", in_distribution_prompts(args.n_prompts)), ("monet_cat", monet)):
            result, images = measure(pipe, prompts, args.per_prompt if name == "in_distribution" else 4, resolution)
            report[f"{name}@{resolution}"] = result
            save_grid(images, args.out / f"{name}@{resolution}.png")
            print(f"{name} at {resolution}px: {json.dumps(result)}", flush=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
