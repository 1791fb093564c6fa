"""The `raft-diffusion` command line. User errors become exit code 2 here, and only here."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from .errors import RunFailed, UserError
from .errors import printable as _printable
from .files import read_image
from .paths import CONFIGS

try:  # typer >= 0.29 carries its own click: click's own classes never match the errors it raises
    from typer._click import exceptions as _click_errors
except ImportError:  # older typer runs on click itself (then a dependency of typer)
    from click import exceptions as _click_errors

DEMOS = {"tiny": "demo-tiny.yaml", "monet-cat": "toy-monet-cat.yaml", "resolution": "toy-resolution.yaml",
         "monet-cat-experts": "toy-monet-cat-experts.yaml",
         "text": "text-imdb-smollm2.yaml"}
DEFAULT_DEMO = "monet-cat-experts"
# Demos that also evaluate the base model at another resolution: the toy SD's native R = 64 px.
DEMO_REFERENCE_RESOLUTION = {"resolution": 64}


class _Interrupted(Exception):
    """Ctrl-C (or SIGTERM) in a command, carried past typer (which turns it into a silent exit 130) to `main`."""

    def __init__(self, command: str | None, terminated: bool = False):
        super().__init__(command)
        self.command, self.terminated = command, terminated


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, torchrun's when a peer died): handled as Ctrl-C is."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM ends a command as Ctrl-C does (checkpoints stay, one line says how to resume), where
    nobody else has claimed the signal; the handler before is put back afterwards."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _WriteFailed(Exception):
    """A write that the disk refused (full, quota, read-only, I/O error) in a command: one line in `main`."""

    def __init__(self, command: str | None, error: BaseException, reason: str):
        super().__init__(command)
        self.command, self.error, self.reason = command, error, reason


# errno of a write the disk refused, and how the libraries that write our weights word it
# (safetensors: "IoError(Os { code: 28, kind: StorageFull ..."; torch.save: "file write failed").
_WRITE_ERRNOS = {28: "the disk is full", 122: "the disk quota is exceeded", 30: "the file system is read-only",
                 5: "an input/output error", 27: "the file is too large for the file system"}
_WRITE_WORDS = (("os error 28", 28), ("No space left", 28), ("StorageFull", 28), ("file write failed", 28),
                ("Disk quota", 122), ("os error 122", 122), ("Read-only file system", 30))


# torch.save's writer on a short write: it does not say why ("unexpected pos 102144 vs 102032").
_TORCH_WRITER_WORDS = ("inline_container", "PytorchStreamWriter", "iostream error")


def _write_failure(error: BaseException) -> str | None:
    """Why the disk refused the write that raised `error`, or None when it is not such an error."""
    for e in (error, error.__cause__, error.__context__):
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            return _WRITE_ERRNOS[e.errno]
        if isinstance(e, (RuntimeError, OSError)) or type(e).__name__ == "SafetensorError":
            text = str(e)
            for words, errno in _WRITE_WORDS:
                if words in text:
                    return _WRITE_ERRNOS[errno]
    writing = getattr(error, "raft_writing", None)
    if writing is not None and isinstance(error, RuntimeError) and any(w in str(error) for w in _TORCH_WRITER_WORDS):
        import shutil

        folder = Path(writing)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            full = shutil.disk_usage(folder).free < 2**20
        except OSError:
            full = False
        return _WRITE_ERRNOS[28] if full else "the file could not be written (torch.save stopped short)"
    return None


class _Group(TyperGroup):
    """Typer's command group; a Ctrl-C in a command leaves it as `_Interrupted`, naming the command,
    and a write the disk refused as `_WriteFailed`."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            raise _Interrupted(ctx.invoked_subcommand, isinstance(e, _Terminated)) from e
        except Exception as e:
            reason = _write_failure(e)
            if reason is None:
                raise
            raise _WriteFailed(ctx.invoked_subcommand, e, reason) from e


app = typer.Typer(cls=_Group, add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Align generative models with rewards by RAFT (Reward rAnked FineTuning).")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks of errors (anywhere in the "
                                     "command line).")) -> None:
    """Align generative models with rewards by RAFT."""
    # `main` takes --debug out of the arguments before typer parses them; the option stays here
    # so that --help lists it.


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from diffusers.utils import logging as dlog
    from huggingface_hub.utils import logging as hlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()  # "Loading pipeline components": our own bars show the long work
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    # diffusers >= 0.36 renamed from_pretrained's torch_dtype to dtype; older ones (which we
    # support) know only torch_dtype, so keep it and drop the rename notice.
    warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
    tlog.disable_progress_bar()  # "Loading weights" / GGUF dequantisation bars at every model load
    hlog.set_verbosity_error()  # no retry chatter when the hub is unreachable: the error line says it


def _search_dirs(config_path: Path) -> list[Path]:
    parent = config_path.resolve().parent
    return [parent, parent.parent]


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML run configuration."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: --set raft.seed=1 (repeatable)."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", help="Run directory (overrides output_dir)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in the directory (only a run's "
                                   "own files are removed; a directory holding anything else is refused)."),
) -> None:
    """Run RAFT: sample, rank with the rewards, fine-tune the LoRA; repeat."""
    from .config import load_config

    cfg = load_config(config, list(set_))
    if output_dir is not None:
        _set_output_dir(cfg, output_dir)  # a read-only directory is refused when the run claims it
    _quiet_libraries()
    from .train import run_training

    run_training(cfg, search=_search_dirs(config), resume=resume, overwrite=overwrite)
    if os.environ.get("RANK", "0") == "0":
        print(f"done: {cfg.output_dir}/final")
        print(f"report: {cfg.output_dir}/report.html")


def _set_output_dir(cfg, value: str, field: str = "--output-dir") -> None:
    if not value.strip():
        raise UserError(field, "is empty", "name a run directory, e.g. --output-dir runs/my-run")
    cfg.output_dir = value


@app.command()
def demo(
    name: str = typer.Argument(DEFAULT_DEMO, help=f"Demo to run: {', '.join(DEMOS)}."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", help="Run directory (default runs/demo-NAME)."),
    set_: list[str] = typer.Option([], "--set", help="Override a field of the demo's config: --set raft.iterations=2."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace another run in the directory (a run's own "
                                   "files only; a directory holding anything else is refused)."),
) -> None:
    """Run a shipped CPU demo end to end (a re-run replaces the same demo's earlier run)."""
    if name not in DEMOS:
        raise UserError("demo", f"unknown demo {name!r}", f"available: {', '.join(DEMOS)}")
    path = CONFIGS / DEMOS[name]
    if not path.is_file():
        raise UserError("demo", f"{path} is missing", "reinstall raft-diffusion")
    from .config import load_config

    cfg = load_config(path, list(set_))
    set_dir = any(a.partition("=")[0].strip() == "output_dir" for a in set_)
    if output_dir is not None:
        _set_output_dir(cfg, output_dir)
    elif not set_dir:
        cfg.output_dir = str(Path("runs") / f"demo-{name}")
    _quiet_libraries()
    from .train import run_training

    pictures: list[Path] = []

    def finish() -> None:  # still holding the run directory's lock
        if name in DEMO_REFERENCE_RESOLUTION:
            from .train import evaluate_reference

            evaluate_reference(cfg, DEMO_REFERENCE_RESOLUTION[name], search=_search_dirs(path))
        if cfg.eval.every:
            from . import report

            pictures.append(report.before_after_samples(cfg.output_dir))

    print(f"demo {name}: configs/{DEMOS[name]} -> {cfg.output_dir}")
    metrics = run_training(cfg, search=_search_dirs(path), overwrite=overwrite, command=f"demo {name}",
                           replaces=name, after=finish)
    first, last = metrics[0], metrics[-1]
    from .records import raw_rewards

    def mean(record: dict) -> str:
        return "n/a" if record["reward_mean"] is None else f"{record['reward_mean']:.4f}"

    print(f"\nreward (mean over the iteration's samples): iteration 1 {mean(first)}{raw_rewards(first)}"
          f" -> iteration {last['iteration'] + 1} {mean(last)}{raw_rewards(last)}")
    if first.get("eval_before"):
        from . import report

        print("\nevaluation on fixed prompts and seeds, base model vs tuned:\n" + report.table(cfg.output_dir))
        print(f"before/after samples: {pictures[0]}")
    weights = sorted((Path(cfg.output_dir) / "final").glob("*.safetensors"))
    print(f"LoRA: {weights[0] if len(weights) == 1 else Path(cfg.output_dir) / 'final'}")
    print(f"report: {Path(cfg.output_dir) / 'report.html'}")


@app.command()
def generate(
    model: str = typer.Option(..., "--model", help="Hub id, local dir, single file or builtin:NAME."),
    prompt: str = typer.Option(..., "--prompt", help="Text prompt."),
    out: Path = typer.Option(..., "--out", help="Directory for the PNG files."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="A run's final/ directory, or one LoRA .safetensors "
                                        "file (diffusers' names or kohya's, e.g. final/lora_kohya.safetensors)."),
    n: int = typer.Option(4, "-n", help="Number of images."),
    resolution: Optional[int] = typer.Option(
        None, "--resolution", help="Image side in pixels (default: the model's own, e.g. 64 for builtin:toy-shapes)."),
    steps: int = typer.Option(20, "--steps", help="Denoising steps."),
    guidance_scale: float = typer.Option(7.5, "--guidance-scale", help="Classifier-free guidance; <= 1 disables it."),
    scheduler: str = typer.Option("ddim", "--scheduler", help="Sampler: ddim or dpm_solver (as generation.scheduler)."),
    eta: float = typer.Option(0.0, "--eta", help="DDIM eta; 0 is deterministic given the seed."),
    negative_prompt: str = typer.Option("", "--negative-prompt", help="Negative prompt for guidance."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first image; image i uses seed + i."),
    batch_size: int = typer.Option(1, "--batch-size", help="Images per forward pass (1: each image depends on "
                                   "its seed alone, bit for bit)."),
) -> None:
    """Generate images with a model and, optionally, a trained LoRA.

    Sampling is the training run's own: with a run's final/, its scheduler, steps, guidance and an
    eval sample's seed (samples.jsonl), the image is the one the run wrote in samples/iter_NNNN/eval/:
    bit for bit where the run generated it alone (generation.batch_size 1), else to within a grey level
    on a few pixels, as kernels round a batch of 32 slightly differently from a batch of 1.
    """
    _check_generate_options(n, resolution, steps, guidance_scale, scheduler, eta, batch_size)
    _check_generate_seed_and_out(seed, n, out)
    if resolution is not None:
        _check_generate_memory(n, resolution)  # before anything of size -n is made (100000000 would hang)
    lora_file = None if lora is None else lora if lora.is_file() else lora / "pytorch_lora_weights.safetensors"
    if lora is not None and not lora_file.is_file():
        raise UserError("--lora", f"no pytorch_lora_weights.safetensors in {lora}", "pass a run's final/ directory")
    if lora is not None:
        _check_lora_finite(lora_file)
    taken = _taken_names(out, seed, n)
    if taken:
        raise UserError("--out", f"{taken[0]} exists", "choose another --out or --seed")
    _quiet_libraries()
    from .inference import generate_images

    generate_images(model, prompt, out, lora, n, resolution, seed, check_memory=_check_generate_memory,
                    steps=steps, guidance_scale=guidance_scale, scheduler=scheduler, eta=eta,
                    negative_prompt=negative_prompt, batch_size=batch_size)


# The `generate` options that are fields of the image generation config: field -> (flag, what the
# value counts, the fix). `_check_generate_options` validates them with the model, so the limits
# are the config's own (generation.steps > 0, generation.eta in [0, 1], ...).
_GENERATE_FLAGS = {
    "steps": ("--steps", " denoising steps", "use at least 1, e.g. 20"),
    "resolution": ("--resolution", " pixels", "use a positive multiple of the model's latent scale, or leave it out "
                   "for the model's own size"),
    "guidance_scale": ("--guidance-scale", "", "use e.g. 7.5, or 1 for no guidance"),
    "scheduler": ("--scheduler", "", "use one of: {choices}"),
    "eta": ("--eta", "", "use a value from 0 (deterministic) to 1"),
    "batch_size": ("--batch-size", "", "use a positive batch size"),
}


def _check_generate_options(n: int, resolution: int | None, steps: int, guidance_scale: float, scheduler: str,
                            eta: float, batch_size: int) -> None:
    """Refuse, before any model loads, the values that would fail late or give black images: the
    image generation config validates them, and its first error is one line naming the flag."""
    from pydantic import ValidationError

    from .config import DiffusionGenerationConfig

    if n <= 0:
        raise UserError("-n", f"{n} images", "ask for at least 1")
    values = {"steps": steps, "resolution": resolution, "guidance_scale": guidance_scale, "scheduler": scheduler,
              "eta": eta, "batch_size": batch_size}
    try:
        DiffusionGenerationConfig(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        # the first in the flags' order (pydantic reports them in the model's field order)
        order = list(_GENERATE_FLAGS)
        first = min(e.errors(), key=lambda err: order.index(err["loc"][0]) if err["loc"] and err["loc"][0] in order
                    else len(order))
        raise _generate_option_error(first) from None


def _generate_option_error(error: dict) -> UserError:
    """One pydantic error of the image generation config as the `generate` flag's error line."""
    import typing

    from .config import DiffusionGenerationConfig

    name = str(error["loc"][0]) if error["loc"] else ""
    flag, unit, fix = _GENERATE_FLAGS.get(name, (f"--{name.replace('_', '-')}", "", "see raft-diffusion generate --help"))
    value, ctx = error.get("input"), error.get("ctx") or {}
    kind = error["type"]
    if kind == "literal_error":
        choices = typing.get_args(DiffusionGenerationConfig.model_fields[name].annotation)
        return UserError(flag, f"unknown {name} {value!r}", fix.format(choices=", ".join(choices)))
    if kind == "finite_number":
        problem = f"{value} is not a finite number"
    elif kind == "greater_than":
        problem = f"{value}{unit}; generation.{name} must be more than {ctx['gt']:g}"
    elif kind == "greater_than_equal":
        problem = f"{value}{unit}; generation.{name} must be at least {ctx['ge']:g}"
    elif kind == "less_than_equal":
        problem = f"{value}{unit} is more than {ctx['le']:g}, the largest generation.{name} allows"
    elif kind == "less_than":
        problem = f"{value}{unit}; generation.{name} must be less than {ctx['lt']:g}"
    else:
        problem = f"{value}{unit}: {error['msg'][0].lower()}{error['msg'][1:].rstrip('.')}"
    return UserError(flag, problem, fix)


# torch.Generator.manual_seed takes 0 to 2**64 - 1 (and would map a negative seed onto one of them).
_LARGEST_SEED = 2**64 - 1


def _check_generate_seed_and_out(seed: int, n: int, out: Path) -> None:
    """Refuse a seed torch cannot take (image i uses seed + i) and an --out that cannot be a directory."""
    if seed < 0 or seed + n - 1 > _LARGEST_SEED:
        last = f" (the last of the -n {n} images uses seed + {n - 1})" if n > 1 and seed >= 0 else ""
        raise UserError("--seed", f"{seed} is outside 0 to {_LARGEST_SEED} (2**64 - 1), the seeds torch takes{last}",
                        "use e.g. --seed 0, or a run's seed from its samples.jsonl")
    folder = out
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent  # the nearest existing folder, which the PNG files' folder is made in
    if folder.exists() and not folder.is_dir() or folder.is_symlink() and not folder.exists():
        kind = "a file" if folder.exists() else "a link to nothing"
        what = f"{out} is {kind}" if folder == out else f"{folder} (above {out}) is {kind}"
        raise UserError("--out", f"{what}, not a directory", "choose a directory for the PNG files")


def _check_generate_memory(n: int, resolution: int, per_image: int = 0) -> None:
    """Refuse -n images that cannot be held in memory at once (generate keeps all of them until it writes
    them): each holds its float32 image, its uint8 copy, its latents and `per_image` bytes more (its
    prompt's encodings); at most half of this machine's memory, as a training run's check allows."""
    from .train import _memory_bytes

    need = n * (3 * resolution**2 * 4 + 3 * resolution**2 + 4 * (resolution // 8) ** 2 * 4 + per_image)
    available = _memory_bytes()
    if available and need > available // 2:
        fit = max(1, (available // 2) // max(1, need // n))
        raise UserError("-n", f"{n} images at {resolution} px hold about {need / 2**30:.1f} GiB, more than half of "
                        f"this machine's {available / 2**30:.1f} GiB", f"ask for at most {fit} at a time; each call "
                        "can take its own --seed")


def _taken_names(out: Path, seed: int, n: int) -> list[Path]:
    """The PNG files of this call (seed to seed + n - 1) that `out` holds already, found without making
    n names (-n may be large)."""
    if not out.is_dir():
        return []
    taken = []
    with os.scandir(out) as entries:
        for entry in entries:
            stem, dot, suffix = entry.name.partition(".")
            if dot and suffix == "png" and stem.isdigit() and stem.isascii() and seed <= int(stem) < seed + n \
                    and entry.name == f"{int(stem):06d}.png":
                taken.append(out / entry.name)
    return sorted(taken)


def _check_lora_finite(path: Path) -> None:
    """Refuse a LoRA file whose tensors hold NaN or inf (a run that diverged): it would give black or
    noise images, and loading it would blame the model's layers instead."""
    import torch

    from .weights import read_tensors

    try:
        state = read_tensors(path, "--lora")
    except UserError as e:  # the message load_lora gives for a garbage or truncated file
        raise UserError("--lora", e.problem, "pass a run's final/ directory, as training saved it") from None
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise UserError("--lora", f"{path} holds non-finite values (NaN or inf) in {len(bad)} of {len(state)} "
                        f"tensors, e.g. {bad[0]}", "pass the final/ of a run that did not diverge")


@app.command()
def score(
    images: list[Path] = typer.Argument(..., help="Image files."),
    reward: str = typer.Option(..., "--reward", help="Reward name (see the error for the list)."),
    prompt: str = typer.Option("", "--prompt", help="Prompt the images are scored against."),
    option: list[str] = typer.Option([], "--option", help="A reward option, key=value (YAML value; repeatable): "
                                      "--option model_config=tiny.json --option pretrained=none."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images scored per forward pass."),
) -> None:
    """Score images with a reward; prints one score a line, in the order given."""
    from .rewards import check_name, check_reads

    check_name(reward, "--reward")
    options = _parse_options(option)
    check_reads(reward, "images", "--reward", options, options_field="--option")
    if batch_size <= 0:
        raise UserError("--batch-size", f"{batch_size}", "use a positive batch size")
    for path in images:
        if not path.is_file():
            raise UserError("IMAGE", f"file not found: {path}", "pass existing image files")
    _quiet_libraries()
    import torch

    from .inference import score_images
    from .rewards import build_reward

    tensors = [read_image(path) for path in images]  # before the reward's models: its errors come cheap
    fn = build_reward(reward, options, torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                      field="--reward")
    check = getattr(fn, "check_prompts", None)
    if check is not None:  # ocr: a prompt without quoted text; the oracle: one outside the toy world
        check([prompt], "--prompt")
    scores = score_images(tensors, fn, prompt, batch_size)
    for value in scores:
        print(f"{value:.6g}")


@app.command("serve-reward")
def serve_reward(
    reward: str = typer.Argument(..., help="A built-in reward's name (the list: any wrong name)."),
    options: str = typer.Option("{}", "--options", help='The reward\'s options as a JSON object, e.g. '
                                '\'{"quality": 80}\'.'),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on; 0 picks a free one (the line printed names it)."),
    device: str = typer.Option("cpu", "--device", help="Where the reward computes: cpu, cuda, cuda:1."),
) -> None:
    """Serve a reward over HTTP (POST /score, GET /health) for the `http` reward of another machine's run."""
    import json

    from .rewards import REGISTRY, available, check_name, reads_of

    check_name(reward, "REWARD")
    if reward.startswith("python:") or reward == "http":
        raise UserError("REWARD", f"{reward!r} cannot be served", f"serve a built-in reward: "
                        f"{', '.join(n for n in available() if n != 'http')}")
    try:
        parsed = json.loads(options)
    except ValueError as e:
        raise UserError("--options", f"not JSON: {e}", 'write e.g. --options \'{"quality": 80}\'') from None
    if not isinstance(parsed, dict):
        raise UserError("--options", "not a JSON object", 'write e.g. --options \'{"quality": 80}\'')
    if not 0 <= port <= 65535:
        raise UserError("--port", f"{port} is outside 0..65535", "use e.g. --port 8000, or 0 for a free one")
    _quiet_libraries()
    import torch

    try:
        where = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError("--device", f"{device!r} is not a device", "use cpu, cuda or cuda:N") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device", "CUDA is not available here", "use --device cpu")
    from .rewards import build_reward
    from .rewards.http import make_server

    assert reward in REGISTRY
    try:
        fn = build_reward(reward, parsed, where, field="REWARD")
    except UserError as e:  # REWARD.options.quality: as the user wrote it, --options' quality
        if not e.field.startswith("REWARD.options"):
            raise
        raise UserError("--options" + e.field[len("REWARD.options"):], e.problem, e.fix) from None
    try:
        server = make_server(fn, reward, reads_of(reward), host, port, device=where)
    except OSError as e:
        raise UserError("--port", f"cannot listen on {host}:{port}: {e.strerror or e}",
                        "pick another --port (0: a free one) or --host") from None
    bound_host, bound_port = server.server_address[:2]
    print(f"serving {reward} on http://{bound_host}:{bound_port}/score", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop listening, and end without a traceback
        pass
    finally:
        server.server_close()
    print(f"stopped serving {reward}", flush=True)


def _parse_options(assignments: list[str]) -> dict:
    import yaml

    from .config import YamlRefused, read_yaml

    options = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key.strip():
            raise UserError("--option", f"{assignment!r} is not key=value", "write e.g. --option pretrained=openai")
        try:
            options[key.strip()] = read_yaml(raw)
        except yaml.YAMLError:
            options[key.strip()] = raw
        except YamlRefused as e:  # a YAML bomb, a value that holds itself, nesting past the limit
            raise UserError("--option", f"{key.strip()}: {e.problem}", e.fix or "give a plain value") from None
    return options


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run directory (it holds metrics.jsonl)."),
) -> None:
    """Write RUN_DIR/report.html: flags, curves, before/after, per-prompt table, candidates, config."""
    if not run_dir.is_dir():
        raise UserError("RUN_DIR", f"{run_dir} is not a directory", "pass a run directory, e.g. runs/demo-monet-cat")
    from .html_report import write

    print(write(run_dir, warn=lambda line: print(_printable(line), file=sys.stderr)))


@app.command()
def export(
    source: Path = typer.Argument(..., help="A run directory, or its final/ or one LoRA .safetensors file "
                                  "(with --model for merged)."),
    format_: str = typer.Option(..., "--format", help="kohya (ComfyUI, Forge, A1111, kohya sd-scripts), diffusers "
                                "or peft (the run's LoRA file), or merged (the base model with the LoRA fused in)."),
    out: Path = typer.Option(..., "--out", help="Where to write it (a new path): merged NAME.safetensors is one "
                             "SD 1.x/2.x checkpoint file, any other name a directory."),
    scale: float = typer.Option(1.0, "--scale", help="merged: the LoRA's strength when fused."),
    model: Optional[str] = typer.Option(None, "--model", help="The base model (default: the run's model.path)."),
) -> None:
    """Write a run's LoRA in the form another program loads."""
    from .export import export as write

    _quiet_libraries()
    print(write(source, format_, out, scale, model))


@app.command("config-help")
def config_help() -> None:
    """List every config field with its default and one line of help."""
    from .config import field_help

    for name, default, text in field_help():
        print(f"{name:42} {default:28} {text}")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; the exit code: 0 done, 2 a user error (one line on stderr), 130 Ctrl-C."""
    args = list(sys.argv[1:] if argv is None else argv)
    # --debug may stand anywhere (`raft-diffusion train run.yaml --debug`), but typer knows it only
    # before the command: take it out here (not after `--`, where it would be an argument).
    end = args.index("--") if "--" in args else len(args)
    debug = "--debug" in args[:end]
    args = [arg for i, arg in enumerate(args) if i >= end or arg != "--debug"]
    try:
        with _sigterm_as_interrupt():
            result = app(args=args, standalone_mode=False, prog_name="raft-diffusion")
        return result if isinstance(result, int) else 0
    except UserError as e:
        return _fail(f"error: {e}", 2, debug)
    except RunFailed as e:  # the run went wrong (diverged, rewards failed): nothing of it was saved
        return _fail(f"error: {e}", 1, debug)
    except _click_errors.ClickException as e:
        return _fail(_usage_error(e), 2, debug)
    except _Interrupted as e:
        # A run's checkpoints are complete (written atomically), so train can continue from the last.
        what, code = ("terminated (SIGTERM)", 143) if e.terminated else ("interrupted", 130)
        if e.terminated and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # torchrun stops every process when one of them ends: its report below names which
            what = "terminated (SIGTERM): another process of this run stopped, see the launcher's report"
        return _fail(f"{what}; continue with --resume" if e.command == "train" else what, code, debug)
    except _Terminated:
        return _fail("terminated (SIGTERM)", 143, debug)
    except RuntimeError as e:
        # A collective (gather, barrier) found another process gone before torchrun's SIGTERM reached this one
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and _peer_lost(e):
            resume = "; continue with --resume" if args[:1] == ["train"] else ""
            return _fail("terminated: another process of this run stopped (its connection closed), see the "
                         f"launcher's report{resume}", 143, debug)
        raise
    except (KeyboardInterrupt, typer.Abort):  # Ctrl-C outside any command (older click: Abort)
        return _fail("interrupted", 130, debug)
    except typer.Exit as e:
        return e.exit_code
    except _WriteFailed as e:
        return _fail(_write_failed_line(e), 1, debug)


PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
             "NCCL communicator was aborted", "Socket Timeout")


def _peer_lost(error: RuntimeError) -> bool:
    """Whether a torch.distributed error says another process went away (gloo's and NCCL's words for it)."""
    return any(words in str(error) for words in PEER_LOST)


def _write_failed_line(e: _WriteFailed) -> str:
    where = getattr(e.error, "raft_writing", None) or getattr(e.error, "filename", None)
    what = f"writing {where}" if where else "writing"
    if e.command == "train":
        after = ("the last checkpoint is intact and nothing saved before was lost; free space and continue "
                 "with --resume")
    elif e.command == "demo":
        after = "nothing saved before was lost; free space and run the demo again"
    else:
        after = "nothing half-written was left; free space and run it again"
    return f"error: {what}: {e.reason} ({after})"


def _fail(line: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    # Every process of a multi-process run ends with the same error (distributed.together): one says it.
    if os.environ.get("RANK", "0") == "0" or debug:
        print(_printable(line), file=sys.stderr)
    return code


def _usage_error(e) -> str:
    """The `error: FIELD: problem (see ... --help)` line of a command-line mistake typer found."""
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None else "raft-diffusion"
    param = getattr(e, "param", None)
    if isinstance(e, getattr(_click_errors, "NoArgsIsHelpError", ())):
        # A bare `raft-diffusion`: click >= 8.2 shows the help (typer's rich help is printed
        # already, plain click's is the message) and makes it a usage error.
        if e.format_message().strip():
            print(e.format_message(), file=sys.stderr)
        field, problem = "COMMAND", "no command given"
    elif isinstance(e, _click_errors.NoSuchOption):
        field, problem = e.option_name, "no such option"
        if e.possibilities:
            problem += f"; did you mean {' or '.join(sorted(e.possibilities))}?"
    elif isinstance(e, _click_errors.BadOptionUsage):
        field, problem = e.option_name, e.message
    elif isinstance(e, _click_errors.MissingParameter) and param is not None:
        field, problem = _param_name(param), f"missing {param.param_type_name}"
    elif isinstance(e, _click_errors.BadParameter) and param is not None:
        field, problem = _param_name(param), e.message
    elif ctx is not None and hasattr(ctx.command, "commands"):  # the group's own: an unknown command
        field, problem = "COMMAND", e.format_message()
    else:
        field, problem = where, e.format_message()
    problem = problem.rstrip(".")
    return f"error: {UserError(field, problem[:1].lower() + problem[1:], f'see {where} --help')}"


def _param_name(param) -> str:
    """How the user writes a parameter: --out or -n for options, CONFIG or IMAGES for arguments."""
    if param.param_type_name == "option":
        return max(param.opts, key=len)
    return (param.metavar or param.name or "ARGUMENT").upper()


def entry() -> None:
    sys.exit(main())
