"""The protocols the RAFT loop knows: a generative `Backend` (and the `Expert` models beside it) and a `Reward`."""

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


class Expert(Protocol):
    """Another model of the run's kind that adds candidates (`generation.experts[].model`), frozen."""

    def generate(self, prompts: list[str], seeds: list[int], desc: str) -> Any:
        """Outputs as rewards read them (images (N, 3, H, W) in [0, 1], or texts), one per (prompt, seed)."""


class Backend(Protocol):
    """A generative model with a trainable adapter: everything the loop (loop.py, state.py,
    candidates.py, observers.py), the experts and the checkpoints call. Registered by kind in
    kinds.py; the two are backends/diffusion.py and backends/text.py."""

    kind: str  # its entry in kinds.KINDS (the config's `backend`)
    lora_params: list[torch.Tensor]  # the adapter's trainable tensors (what an EMA averages)

    @staticmethod
    def check_model_path(path: str, field: str) -> None:
        """Refuse, before anything loads, a model path that cannot be of this kind (an unknown `builtin:NAME`)."""

    def generate(self, prompts: list[str], seeds: list[int], desc: str = "generate") -> Samples:
        """One sample per (prompt, seed); the same seed gives the same sample."""

    def train(self, samples: Samples, generator: torch.Generator, old_policy: Any = None) -> float:
        """Fine-tune the adapter on `samples` (epochs, batches, accumulation); mean loss. Per-sample
        `weight` and `optimality` in the payload come from the objective (objectives.py);
        `old_policy` is the LoRA's EMA (`ema.LoraEMA`) that negative_aware's implicit policies
        reach from, None when the run keeps no EMA."""

    def load_expert(self, spec: Any, field: str) -> Expert:
        """The model of a `generation.experts[]` entry (`config.ExpertConfig`), loaded frozen."""

    def adopt(self, prompts: list[str], seeds: list, outputs: Any) -> Samples:
        """Outputs of experts (or of a sample folder) as candidates this backend can train on: what
        `generate` keeps of its own samples (diffusion: latents and prompt encodings; text: token ids)."""

    def write_samples(self, samples: Samples, directory: Path, start: int = 0) -> list[dict[str, Any]]:
        """Write the samples into `directory`, the first being sample number `start` of its
        iteration (a process writes its share); per sample, what its samples.jsonl row records of
        it (an image's file name, `{"file": "0003.png"}`, or a text itself, `{"text": "..."}`)."""

    def eval_metrics(self, samples: Samples) -> dict[str, float]:
        """Metrics of evaluation samples that only the backend can compute (text: perplexity under
        the frozen base model, diversity); `{}` when there are none. Every process calls it with
        its share; the result is over all of them, the same on every process."""

    def save_adapter(self, directory: Path) -> None:
        """final/: the adapter in the formats its ecosystem loads (kinds.KINDS: final_files)."""

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trained adapter tensors, for checkpoints (safetensors)."""

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def training_state(self) -> dict[str, Any]:
        """Optimizer state (and anything else training needs to resume exactly)."""

    def load_training_state(self, state: dict[str, Any]) -> None: ...


class TokenizedBackend(Backend, Protocol):
    """A text backend, which experts' texts are checked against before the run writes anything."""

    tokenizer: Any

    def encode(self, prompt: str) -> list[int]:
        """A prompt's token ids, as the backend generates after them."""

    def context_length(self) -> int | None:
        """The most tokens (prompt and response together) the policy attends to, if its config says."""
