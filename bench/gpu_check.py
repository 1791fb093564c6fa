"""The first thing to run on a GPU machine: does raft-diffusion work here, and how fast?

1. The toy demos (`raft-diffusion demo monet-cat`, `demo resolution`) on this device: wall time and
   the held-out result each prints.
2. One RAFT iteration of an SD 1.5-architecture pipeline with random weights, built from its configs
   (no download): 256 px, b prompts x K samples, DDIM, CFG 7.5, scored by a ViT-L-14 CLIP (random
   weights) plus an aesthetic head on the same image embedding, LoRA fine-tuning on the best of each
   prompt. Seconds per phase, images per second, peak GPU memory, and the ratio against the naive
   loop (one `pipe()` call per prompt, PIL images, VAE re-encoding; bench/iteration.py).
3. One RAFT iteration of SDXL's and FLUX.1-dev's architectures with random weights (`builtin:sdxl-random`,
   `builtin:flux-random`, bfloat16, 512 px, b prompts x K samples, JPEG-size reward, LoRA on the attention),
   twice: with the memory knobs off, then on (prompt embeddings kept, text encoders offloaded, gradient
   checkpointing, VAE slicing). Seconds per phase, images per second and peak GPU memory of each.

    python bench/gpu_check.py              # on CUDA: demos, then SD 1.5 size, fp16
    python bench/gpu_check.py --smoke      # anywhere, a few minutes: demo tiny, then the tiny SD at 64 px

Prints a report and writes bench/results/gpu_check.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/iteration.py
REPO = HERE.parent

FULL = {"demos": ["monet-cat", "resolution"], "demo_settings": [], "model": "builtin:sd15-random", "dtype": "float16",
        "mixed_precision": "fp16", "resolution": 256, "k": 8, "b": 16, "steps": 20, "batch_size": 32,
        "clip": "ViT-L-14", "repeats": 2}
# The smoke run asks whether the demo runs here, not how long its 10 iterations take: 2 of them.
SMOKE = {"demos": ["tiny"], "demo_settings": ["raft.iterations=2"], "model": "builtin:tiny-sd", "dtype": "float32", "mixed_precision": "no",
         "resolution": 64, "k": 4, "b": 2, "steps": 4, "batch_size": 8, "clip": "ViT-B-32", "repeats": 1}
# the families a 24-80 GB GPU fine-tunes today, full size with random weights; the smoke run: their tiny builtins
FAMILIES_FULL = {"models": ["builtin:sdxl-random", "builtin:flux-random"], "dtype": "bfloat16",
                 "mixed_precision": "bf16", "resolution": 512, "k": 4, "b": 2, "steps": 20, "batch_size": 4,
                 "train_batch_size": 2}
FAMILIES_SMOKE = {"models": ["builtin:tiny-sdxl", "builtin:tiny-flux"], "dtype": "float32", "mixed_precision": "no",
                  "resolution": 64, "k": 2, "b": 2, "steps": 2, "batch_size": 4, "train_batch_size": 2}
KNOBS = {"model": {"cache_prompt_embeddings": True, "offload_text_encoders": True, "vae_slicing": True},
         "training": {"gradient_checkpointing": True}}
NO_KNOBS = {"model": {"cache_prompt_embeddings": False, "offload_text_encoders": False, "vae_slicing": False},
            "training": {"gradient_checkpointing": False}}
LORA_TARGETS = {"builtin:sdxl-random": ["to_q", "to_k", "to_v", "to_out.0"],
                "builtin:tiny-sdxl": ["to_q", "to_k", "to_v", "to_out.0"]}
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def device_report() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, memory_gib=round(p.total_memory / 2**30, 1), cuda_version=torch.version.cuda,
                    devices=torch.cuda.device_count())
    else:
        info["device"] = "cpu"
    return info


def run_demo(name: str, workdir: Path, settings: list[str] = ()) -> dict:
    """`raft-diffusion demo NAME [--set S ...]` in a subprocess: its wall time, exit code and evaluation table."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "raft_diffusion", "demo", name, "--output-dir",
                           str(workdir / f"demo-{name}"), *[a for s in settings for a in ("--set", s)]], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    seconds = time.perf_counter() - start
    # What the demo prints after its run: the reward line, and the base-vs-tuned table when it evaluates.
    tail = done.stdout.split("\nreward (mean", 1)
    summary = ("reward (mean" + tail[1]).split("\nbefore/after", 1)[0].split("\nLoRA:", 1)[0].strip() \
        if len(tail) == 2 else ""
    result = {"seconds": round(seconds, 1), "returncode": done.returncode, "evaluation": summary}
    if done.returncode:
        result["error"] = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    return result


def random_head(width: int, path: Path) -> Path:
    """An aesthetic head in LAION's layout with random weights (what it costs, not what it says)."""
    from safetensors.torch import save_file

    from raft_diffusion.rewards.clip import AestheticHead

    torch.manual_seed(0)
    head = AestheticHead([width, 1024, 128, 64, 16, 1])
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path))
    return path


def sd_iteration(cfg: dict, workdir: Path) -> dict:
    """One iteration ours against naive, plus images per second and peak memory."""
    import open_clip

    from iteration import build, compare, table
    from raft_diffusion.config import RewardSpec
    from raft_diffusion.rewards.compose import RewardSet

    start = time.perf_counter()
    backend = build(cfg["model"], cfg["dtype"], cfg["resolution"], cfg["k"], cfg["steps"], cfg["batch_size"],
                    cfg["mixed_precision"])
    built = time.perf_counter() - start
    width = open_clip.get_model_config(cfg["clip"])["embed_dim"]
    head = random_head(width, workdir / "head.safetensors")
    clip = {"model": cfg["clip"], "pretrained": None}
    rewards = RewardSet([RewardSpec(name="clip", options=clip),
                         RewardSpec(name="aesthetic", options={**clip, "head": str(head)})],
                        backend.device, dtype=backend.pipe.unet.dtype)

    def reward(images, prompts):
        return rewards(images, prompts, list(range(len(prompts)))).total

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = compare(backend, reward, cfg["k"], cfg["b"], cfg["repeats"])
    n = cfg["k"] * cfg["b"]
    ours = result["median_seconds"]["ours"]
    result.update(
        unet_parameters_millions=round(sum(p.numel() for p in backend.pipe.unet.parameters()) / 1e6, 1),
        build_seconds=round(built, 1), images=n, images_per_second=round(n / ours["generate"], 2),
        peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        table=table(result))
    return result


def family_iteration(model: str, cfg: dict, knobs: dict, workdir: Path) -> dict:
    """One RAFT iteration (`run_training`, 1 iteration, no eval) of `model`: seconds per phase from the
    run's metrics, images per second of generation, and peak GPU memory (model loading included)."""
    import gc

    from raft_diffusion.config import RunConfig
    from raft_diffusion.train import run_training

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    name = model.split(":")[-1] + ("-knobs" if knobs is KNOBS else "")
    data = {"backend": "diffusion", "output_dir": str(workdir / name),
            "model": {"path": model, "dtype": cfg["dtype"], **knobs["model"]},
            "lora": {"rank": 16, "alpha": 16, "target_modules": LORA_TARGETS.get(model, FLUX_TARGETS)},
            "prompts": {"train": ["a cat in monet style", "a red square on a blue field", "a lighthouse at dusk",
                                  "a bowl of ramen, studio photo"]},
            "generation": {"resolution": cfg["resolution"], "steps": cfg["steps"], "samples_per_prompt": cfg["k"],
                           "batch_size": cfg["batch_size"],
                           "guidance_scale": 3.5 if "flux" in model else 5.0},
            "rewards": [{"name": "jpeg_compressibility"}], "selection": {"strategy": "per_prompt", "top": 1},
            "training": {"learning_rate": 1e-4, "epochs": 1, "batch_size": cfg["train_batch_size"],
                         "mixed_precision": cfg["mixed_precision"], **knobs["training"]},
            "raft": {"iterations": 1, "prompts_per_iteration": cfg["b"], "seed": 0}, "eval": {"every": 0}}
    start = time.perf_counter()
    record = run_training(RunConfig.model_validate(data), log=lambda _: None)[0]
    n = cfg["k"] * cfg["b"]
    seconds = record["seconds"]
    return {"knobs": knobs is KNOBS, "wall_seconds": round(time.perf_counter() - start, 1), "seconds": seconds,
            "images": n, "images_per_second": round(n / seconds["generate"], 2) if seconds["generate"] else None,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available()
            else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes, CPU or GPU, a few minutes")
    parser.add_argument("--skip-demos", action="store_true", help="no demos")
    parser.add_argument("--skip-sd15", action="store_true", help="no SD 1.5-architecture iteration")
    parser.add_argument("--skip-families", action="store_true", help="no SDXL / FLUX iterations")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu_check.json")
    args = parser.parse_args()
    cfg = SMOKE if args.smoke else FULL
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
                 "run with --smoke for the CPU rehearsal")
    report = {"mode": "smoke" if args.smoke else "full", "settings": cfg, "device": device_report()}
    print(f"gpu_check ({report['mode']}): {report['device']}")
    with tempfile.TemporaryDirectory(prefix="raft-gpu-check-") as tmp:
        workdir = Path(tmp)
        report["demos"] = {}
        for name in [] if args.skip_demos else cfg["demos"]:
            print(f"demo {name} ...", flush=True)
            report["demos"][name] = run_demo(name, workdir, cfg["demo_settings"])
            d = report["demos"][name]
            print(f"demo {name}: {d['seconds']} s, exit {d['returncode']}\n{d['evaluation'] or d.get('error', '')}")
        if not args.skip_sd15:
            print(f"one iteration of {cfg['model']} ({cfg['dtype']}, {cfg['resolution']} px, {cfg['b']} prompts x "
                  f"{cfg['k']}, {cfg['steps']} steps) ...", flush=True)
            report["iteration"] = it = sd_iteration(cfg, workdir)
            print(f"UNet {it['unet_parameters_millions']} M parameters, built in {it['build_seconds']} s; "
                  f"{it['images']} images at {it['images_per_second']} images/s; peak GPU memory "
                  f"{it['peak_memory_gib']} GiB\n{it['table']}", flush=True)
        families = FAMILIES_SMOKE if args.smoke else FAMILIES_FULL
        report["families"] = {}
        for model in [] if args.skip_families else families["models"]:
            for knobs in (NO_KNOBS, KNOBS):
                label = "memory knobs on" if knobs is KNOBS else "memory knobs off"
                print(f"one iteration of {model} ({families['resolution']} px, {label}) ...", flush=True)
                try:
                    r = family_iteration(model, families, knobs, workdir)
                except torch.cuda.OutOfMemoryError as e:  # what the knobs are for: say so and go on
                    r = {"knobs": knobs is KNOBS, "error": f"out of memory: {str(e).splitlines()[0]}"}
                report["families"].setdefault(model, []).append(r)
                print(f"{model}, {label}: {r}", flush=True)
    failed = [n for n, d in report["demos"].items() if d["returncode"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    if failed:
        sys.exit(f"gpu_check: demo {', '.join(failed)} failed")


if __name__ == "__main__":
    main()
