"""The two small protocols the RAFT loop knows: a generative `Backend` and a `Reward`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

# A reward scores a batch of generated outputs (images as a float tensor (N, 3, H, W) in [0, 1],
# or texts) against their prompts; one float per sample, higher is better.
Reward = Callable[[Any, Sequence[str]], Sequence[float]]


def take(items: Any, indices: Sequence[int]) -> Any:
    """`items[indices]` for tensors and lists alike."""
    if isinstance(items, torch.Tensor):
        return items[torch.as_tensor(list(indices), dtype=torch.long)]
    return [items[i] for i in indices]


@dataclass
class Samples:
    """A batch of generated candidates: what rewards read, and what the backend trains on."""

    prompts: list[str]
    seeds: list[int]
    outputs: Any  # images (N, 3, H, W) in [0, 1] or list[str]: what rewards score
    payload: dict[str, Any] = field(default_factory=dict)  # backend data, e.g. final latents

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, indices: Sequence[int]) -> "Samples":
        return Samples(
            prompts=[self.prompts[i] for i in indices],
            seeds=[self.seeds[i] for i in indices],
            outputs=take(self.outputs, indices),
            payload={k: take(v, indices) for k, v in self.payload.items()},
        )


class Backend(Protocol):
    """A generative model with a trainable adapter."""

    lora_params: list[torch.Tensor]  # the adapter's trainable tensors (what an EMA averages)

    def generate(self, prompts: list[str], seeds: list[int], desc: str = "generate") -> Samples:
        """One sample per (prompt, seed); the same seed gives the same sample."""

    def train(self, samples: Samples, generator: torch.Generator) -> float:
        """Fine-tune the adapter on `samples` (epochs, batches, accumulation); mean loss."""

    def write_samples(self, samples: Samples, directory: Path, start: int = 0) -> list[dict[str, Any]]:
        """Write the samples into `directory`, the first being sample number `start` of its
        iteration (a process writes its share); per sample, what its samples.jsonl row records of
        it (an image's file name, `{"file": "0003.png"}`, or a text itself, `{"text": "..."}`)."""

    def eval_metrics(self, samples: Samples) -> dict[str, float]:
        """Metrics of evaluation samples that only the backend can compute (text: perplexity under
        the frozen base model, diversity); `{}` when there are none. Every process calls it with
        its share; the result is over all of them, the same on every process."""

    def save_adapter(self, directory: Path) -> None:
        """The adapter in the format its ecosystem loads (diffusers LoRA / PEFT adapter)."""

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trained adapter tensors, for checkpoints (safetensors)."""

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def training_state(self) -> dict[str, Any]:
        """Optimizer state (and anything else training needs to resume exactly)."""

    def load_training_state(self, state: dict[str, Any]) -> None: ...
