"""What both backends' training shares: the fine-tuning schedule (`fine_tune`), and `LoraTraining`,
the trainable LoRA tensors with their AdamW optimizer, loss precision and the checkpoint state of
the adapter and the optimizer."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from tqdm.auto import tqdm

from ..config import RunConfig, TrainingConfig
from ..errors import RunFailed, UserError
from ..precision import Precision

def check_lora_targets(model: nn.Module, targets: Sequence[str], what: str, examples: str) -> None:
    """Every `lora.target_modules` entry must name a module of `model` (exactly, or as a dotted suffix)."""
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise UserError("config lora.target_modules", f"no {what} named {missing}", f"use names such as {examples}")


def fine_tune(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
              params: Sequence[torch.Tensor], cfg: TrainingConfig, items: Sequence[int],
              generator: torch.Generator, loss: Callable[[list[int], float], torch.Tensor],
              weight_of: Callable[[list[int]], float], precision: Precision) -> None:
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


def _step_weight(accelerator: Accelerator, weight: float) -> float:
    """A step's loss denominator: its weight, or with several processes the mean of theirs (never 0)."""
    if accelerator.num_processes > 1:
        total = accelerator.reduce(torch.tensor([float(weight)], dtype=torch.float64, device=accelerator.device), "mean")
        weight = float(total.item())
    return weight if weight else 1.0


def _check_finite(what: str, value: torch.Tensor, cfg: TrainingConfig, step: int) -> None:
    """Stop before a non-finite loss or gradient reaches the weights (and from there a checkpoint)."""
    if value is not None and not bool(torch.isfinite(torch.as_tensor(value).detach()).all()):
        raise RunFailed(f"training diverged: the {what} is {float(torch.as_tensor(value).detach())} at optimizer step {step + 1} "
                        f"(lower training.learning_rate, now {cfg.learning_rate:g}"
                        + (", or set training.max_grad_norm" if not cfg.max_grad_norm else "") + ")")


def training_state(optimizer: torch.optim.Optimizer, precision: Precision) -> dict:
    """What training needs to resume exactly besides the adapter: the optimizer and (fp16) the loss scaler."""
    state = {"optimizer": optimizer.state_dict()}
    if precision.scaler is not None:
        state["grad_scaler"] = precision.state_dict()
    return state


def load_training_state(state: dict, optimizer: torch.optim.Optimizer, precision: Precision) -> None:
    optimizer.load_state_dict(state["optimizer"])
    precision.load_state_dict(state.get("grad_scaler"))  # absent: a checkpoint from before fp16; scale anew



class LoraTraining:
    """The training half of a backend, the same for both: set up by `_prepare_training` with the
    model whose trainable parameters are the LoRA, once they are float32 (`cast_training_params` for
    diffusion; PEFT casts the text model's adapter itself)."""

    lora_params: list[torch.Tensor]  # the adapter's trainable tensors (what an EMA averages)
    optimizer: torch.optim.Optimizer
    precision: Precision
    peft_state_options: dict[str, Any] = {}  # get_peft_model_state_dict's options (text: no embeddings)

    def _prepare_training(self, model: nn.Module, config: RunConfig, accelerator: Accelerator) -> nn.Module:
        """AdamW over the LoRA's tensors and the loss precision; returns `model` prepared by accelerate."""
        train = config.training
        optimizer = torch.optim.AdamW(self.lora_params, lr=train.learning_rate, weight_decay=train.weight_decay)
        prepared, self.optimizer = accelerator.prepare(model, optimizer)
        self.precision = Precision(train.mixed_precision, accelerator.device)
        return prepared

    def _peft_module(self) -> nn.Module:
        """The unwrapped module that carries the PEFT adapter (the UNet or transformer; the PeftModel)."""
        raise NotImplementedError

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trained adapter tensors, for checkpoints (safetensors)."""
        state = get_peft_model_state_dict(self._peft_module(), **self.peft_state_options)
        return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        result = set_peft_model_state_dict(self._peft_module(), state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"adapter checkpoint has unexpected keys: {unexpected[:3]}")

    def training_state(self) -> dict[str, Any]:
        """Optimizer state (and anything else training needs to resume exactly)."""
        return training_state(self.optimizer, self.precision)

    def load_training_state(self, state: dict[str, Any]) -> None:
        load_training_state(state, self.optimizer, self.precision)
