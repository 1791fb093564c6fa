"""What `raft-diffusion generate` and `score` do once their flags are checked: sample a model (with a
LoRA) into PNG files, all of them or none; score image files with a reward, batched by size."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from .backends.families import family_of
from .backends.loading import check_resolution, load_pipeline, make_scheduler, native_resolution
from .backends.lora_io import load_lora
from .backends.sampling import encode_prompts, generate_latents
from .config import GenerationConfig
from .errors import printable
from .protocols import Reward
from .rewards.jpeg import to_uint8


def generate_images(model: str, prompt: str, out: Path, lora: Path | None, n: int, resolution: int | None, seed: int,
                    check_memory: Callable[..., None], steps: int, guidance_scale: float, scheduler: str, eta: float,
                    negative_prompt: str, batch_size: int) -> None:
    """`n` images of `prompt`, seeds `seed` to `seed + n - 1`, written as out/SEED.png (names printed)."""
    pipe = load_pipeline(model, field="--model")
    resolution = native_resolution(pipe) if resolution is None else resolution
    check_resolution(pipe, resolution, "--resolution")
    if lora is not None:
        load_lora(pipe, lora, "--lora")
    pipe.scheduler = make_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    gen = GenerationConfig(resolution=resolution, steps=steps, guidance_scale=guidance_scale, scheduler=scheduler,
                           eta=eta, negative_prompt=negative_prompt, batch_size=batch_size)
    family_of(pipe).check_generation(gen, "--scheduler", "--eta")
    # Every image holds its own copy of the prompt's encodings too: measured on one, before n are made.
    one = [part for part in encode_prompts(pipe, [prompt], gen) if part is not None]
    check_memory(n, resolution, sum(t.nelement() * t.element_size() for c in one for t in c.values()))
    names = [out / f"{seed + i:06d}.png" for i in range(n)]
    seeds = [seed + i for i in range(n)]
    cond, uncond = encode_prompts(pipe, [prompt] * n, gen)
    images = to_uint8(generate_latents(pipe, cond, uncond, seeds, gen)[1])
    write_images(images, names)


def write_images(images, names: list[Path]) -> None:
    """All the PNG files, or none: each is written under a hidden name, then all are renamed."""
    out = names[0].parent
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    temporary = [path.with_name(f".tmp-{path.name}") for path in names]
    try:
        for array, tmp in zip(images, temporary):
            Image.fromarray(array).save(tmp, format="PNG")
    except BaseException:
        for tmp in temporary:
            tmp.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    for tmp, path in zip(temporary, names):
        os.replace(tmp, path)
        print(printable(str(path)))  # a folder name's terminal escape sequence is shown, not run


def score_images(tensors: Sequence[torch.Tensor], fn: Reward, prompt: str, batch_size: int) -> list[float]:
    """Each image's score against `prompt`, in the order given: images of one size batched together
    (a batch is one tensor), `batch_size` at a time."""
    scores: list[float] = [0.0] * len(tensors)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        by_size.setdefault(tuple(t.shape), []).append(i)
    with torch.inference_mode():
        for indices in by_size.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                batch_scores = fn(torch.stack([tensors[i] for i in chunk]), [prompt] * len(chunk))
                for i, value in zip(chunk, batch_scores):
                    scores[i] = float(value)
    return scores
