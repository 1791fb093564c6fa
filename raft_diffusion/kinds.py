"""The registry of backends by kind (`backend:` in a run's config), and what each kind means outside
its own module: what it generates, what its final/ holds, which export formats it has.

Nothing else in the package tests the `backend` string: it asks `kind_of(config)` (or
`KINDS[name]` for a saved run's config) and reads the answer. The backend class is named by its
import path, so reading a run directory or a config never imports diffusers or transformers; a new
backend is its module (a class with the `protocols.Backend` methods) and one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .model_registry import resolve

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .protocols import Backend


@dataclass(frozen=True)
class BackendKind:
    name: str  # the config's `backend`
    output: str  # what one sample is, for rewards and sample folders: "image" or "text"
    outputs: str  # the same, plural, as rewards declare what they read
    backend: str  # "module:Class" of the Backend
    lora_format: str  # export's name for what final/ holds
    lora_file: str  # the file of final/ that says a LoRA of this kind is there
    final_files: frozenset[str]  # the LoRA files this kind's final/ holds
    final_extras: frozenset[str] = frozenset()  # and what else its library writes there
    client_formats: tuple[str, ...] = ()  # export formats for other programs (kohya's names)
    single_file_merge: bool = False  # export --format merged can write one .safetensors checkpoint

    def backend_class(self) -> Any:
        return resolve(self.backend)

    def check_model_path(self, path: str, field: str) -> None:
        """What can be known of a model path before loading anything (a `builtin:NAME` of this kind)."""
        self.backend_class().check_model_path(path, field)


KINDS = {
    "diffusion": BackendKind(
        "diffusion", "image", "images", "raft_diffusion.backends.diffusion:DiffusionBackend", "diffusers",
        "pytorch_lora_weights.safetensors",
        frozenset({"pytorch_lora_weights.safetensors", "lora_kohya.safetensors"}),
        client_formats=("kohya",), single_file_merge=True),
    "text": BackendKind(
        "text", "text", "texts", "raft_diffusion.backends.text:TextBackend", "peft", "adapter_model.safetensors",
        frozenset({"adapter_model.safetensors", "adapter_config.json"}),
        final_extras=frozenset({"README.md"})),  # the model card PEFT writes
}


def kind_of(config: Any) -> BackendKind:
    """The kind of a run's config (a `RunConfig`), or of a backend name."""
    name = config if isinstance(config, str) else config.backend
    if name not in KINDS:
        raise UserError("config backend", f"backend {name!r} is not available", f"use {' or '.join(KINDS)}")
    return KINDS[name]


def lora_dir_kind(directory: Any) -> BackendKind:
    """The kind whose final/ files a LoRA directory holds most of (diffusion when it holds none)."""
    present = {kind.name: sum((Path(directory) / f).is_file() for f in kind.final_files) for kind in KINDS.values()}
    best = max(present.values())
    return KINDS["diffusion"] if not best else next(KINDS[n] for n, c in present.items() if c == best)


def build_backend(config: Any, accelerator: "Accelerator") -> "Backend":
    return kind_of(config).backend_class()(config, accelerator)
