"""The built-in models and the model directory formats of this package, by name.

The loaders consult these tables (`backends/loading.py` for diffusion pipelines); whoever provides
a model owns the function that builds it: `tiny.py` the random tiny pipelines, the toy world
(`toyworld/models.py`) its trained assets and its flow model's directory format. A table names each
function by its import path, so a backend never imports what it loads (the toy world imports the
loaders, not the other way round), and `builtin:NAME` resolves without importing every provider.
A new built-in model is one function where it is built and one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# builtin:NAME -> a function(dtype: torch.dtype, field: str) returning the diffusers pipeline
DIFFUSION_BUILTINS = {
    "tiny-sd": "raft_diffusion.tiny:builtin_tiny_sd",  # random, built on the fly
    "tiny-sd-v": "raft_diffusion.tiny:builtin_tiny_sd_v",
    "tiny-sd3": "raft_diffusion.tiny:builtin_tiny_sd3",
    "tiny-sdxl": "raft_diffusion.tiny_sdxl:builtin_tiny_sdxl",  # SDXL's configuration: two CLIPs, size conditioning
    "tiny-flux": "raft_diffusion.tiny_flux:builtin_tiny_flux",  # FLUX.1-dev's configuration (guidance embedding)
    "tiny-flux-schnell": "raft_diffusion.tiny_flux:builtin_tiny_flux_schnell",  # schnell's: no guidance, no shift
    "sd15-random": "raft_diffusion.tiny:builtin_sd15_random",  # SD 1.5's architecture, random weights (benchmarks)
    "sdxl-random": "raft_diffusion.tiny_sdxl:builtin_sdxl_random",  # SDXL base 1.0's architecture, random, float16
    "flux-random": "raft_diffusion.tiny_flux:builtin_flux_random",  # FLUX.1-dev's architecture, random, bfloat16
    "toy-shapes": "raft_diffusion.toyworld.models:toy_shapes",  # trained, shipped pipelines
    "toy-shapes-flow": "raft_diffusion.toyworld.models:toy_shapes_flow",  # SD 3's architecture; toy-shapes' VAE and text
}

# a file that marks a local model directory of a format of its own -> a function(directory, dtype name, field)
DIRECTORY_FORMATS = {
    "raft_diffusion.json": "raft_diffusion.toyworld.models:flow_directory",  # toyworld/train_flow.py's output
}


def resolve(reference: str) -> Callable[..., Any]:
    """The function a table entry names ("package.module:function")."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)
