"""Generative backends: `diffusion` (Stable Diffusion + LoRA) and `text` (causal LM + LoRA)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from torch import nn

    from ..config import RunConfig, TrainingConfig
    from ..precision import Precision
    from ..protocols import Backend


def check_lora_targets(model: "nn.Module", targets: Sequence[str], what: str, examples: str) -> None:
    """Every `lora.target_modules` entry must name a module of `model` (exactly, or as a dotted suffix)."""
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        from ..errors import UserError

        raise UserError("config lora.target_modules", f"no {what} named {missing}", f"use names such as {examples}")


def fine_tune(accelerator: "Accelerator", model: "nn.Module", optimizer: "torch.optim.Optimizer",
              params: Sequence["torch.Tensor"], cfg: "TrainingConfig", items: Sequence[int],
              generator: "torch.Generator", loss: Callable[[list[int], float], "torch.Tensor"],
              weight_of: Callable[[list[int]], float], precision: "Precision") -> None:
    """The fine-tuning schedule of every backend: `cfg.epochs` shuffles of `items`, micro-batches of
    `cfg.batch_size`, `cfg.gradient_accumulation_steps` of them per optimizer step, gradient clipping,
    autocast and (fp16) loss scaling per `precision`.

    `loss(batch, denominator)` returns the micro-batch's summed (weighted) loss divided by
    `denominator`, ready for backward. The denominator is the optimizer step's total weight,
    `weight_of(every item of the step)`; with several processes, the mean of that over the processes
    (DDP averages their gradients), so that a step weighs every sample of every process as one
    batch would, and zero-weight padding counts for nothing. A short last group still takes its
    step, so nothing carries over between iterations and resume is exact.
    """
    import torch
    from tqdm.auto import tqdm

    n = len(items)
    bar = tqdm(total=cfg.epochs * math.ceil(n / cfg.batch_size), desc="train", unit="batch", leave=False,
               disable=None if accelerator.is_local_main_process else True)
    model.train()
    step = 0
    for _ in range(cfg.epochs):
        order = [items[i] for i in torch.randperm(n, generator=generator).tolist()]
        micro = [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        for g in range(0, len(micro), cfg.gradient_accumulation_steps):
            group = micro[g:g + cfg.gradient_accumulation_steps]
            denominator = _step_weight(accelerator, weight_of([i for b in group for i in b]))
            for j, batch in enumerate(group):
                last = j == len(group) - 1
                with accelerator.no_sync(model) if not last else contextlib.nullcontext():
                    value = loss(batch, denominator)
                    if accelerator.num_processes == 1:  # ranks must not stop alone; the norm below agrees
                        _check_finite("loss", value, cfg, step)
                    accelerator.backward(precision.scale(value))
                bar.update(1)
            precision.unscale(optimizer)
            if cfg.max_grad_norm:
                norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            else:
                norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params
                                                             if p.grad is not None] or [torch.zeros(())]))
            if precision.scaler is None:  # with fp16 loss scaling, inf gradients are the scaler's business
                _check_finite("gradient norm", norm, cfg, step)
            precision.step(optimizer)
            step += 1
            optimizer.zero_grad(set_to_none=True)
    bar.close()
    model.eval()


def _step_weight(accelerator: "Accelerator", weight: float) -> float:
    """A step's loss denominator: its weight, or with several processes the mean of theirs (never 0)."""
    if accelerator.num_processes > 1:
        import torch

        total = accelerator.reduce(torch.tensor([float(weight)], dtype=torch.float64, device=accelerator.device), "mean")
        weight = float(total.item())
    return weight if weight else 1.0


def _check_finite(what: str, value: "torch.Tensor", cfg: "TrainingConfig", step: int) -> None:
    """Stop before a non-finite loss or gradient reaches the weights (and from there a checkpoint)."""
    import torch

    if value is not None and not bool(torch.isfinite(torch.as_tensor(value).detach()).all()):
        from ..errors import RunFailed

        raise RunFailed(f"training diverged: the {what} is {float(torch.as_tensor(value).detach())} at optimizer step {step + 1} "
                        f"(lower training.learning_rate, now {cfg.learning_rate:g}"
                        + (", or set training.max_grad_norm" if not cfg.max_grad_norm else "") + ")")


def training_state(optimizer: "torch.optim.Optimizer", precision: "Precision") -> dict:
    """What training needs to resume exactly besides the adapter: the optimizer and (fp16) the loss scaler."""
    state = {"optimizer": optimizer.state_dict()}
    if precision.scaler is not None:
        state["grad_scaler"] = precision.state_dict()
    return state


def load_training_state(state: dict, optimizer: "torch.optim.Optimizer", precision: "Precision") -> None:
    optimizer.load_state_dict(state["optimizer"])
    precision.load_state_dict(state.get("grad_scaler"))  # absent: a checkpoint from before fp16; scale anew


def build_backend(config: "RunConfig", accelerator: "Accelerator") -> "Backend":
    if config.backend == "diffusion":
        from .diffusion import DiffusionBackend

        return DiffusionBackend(config, accelerator)
    if config.backend == "text":
        from .text import TextBackend

        return TextBackend(config, accelerator)
    from ..errors import UserError

    raise UserError("config backend", f"backend {config.backend!r} is not available", "use diffusion or text")
