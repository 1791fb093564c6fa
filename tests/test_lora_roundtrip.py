"""A run's final LoRA, loaded by plain diffusers, is the trained adapter: every layer, the same pixels.

The toy demos train attention and convolution layers together; this mix is what a saved file must
carry whole (attention alone loaded fine even when the convolutions were dropped).
"""

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from raft_diffusion.paths import REPO
from raft_diffusion.train import run_training

from .test_run_directory import _fresh_pipeline, _images


def _demo_targets(name: str) -> list[str]:
    return yaml.safe_load((REPO / "configs" / name).read_text())["lora"]["target_modules"]


def _layers(state: dict) -> set[str]:
    """The LoRA-wrapped modules of a PEFT state dict (`<module>.lora_A.weight` -> `<module>`)."""
    return {key.rsplit(".lora_", 1)[0] for key in state}


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _load_capturing_warnings(pipe, directory: Path) -> list[str]:
    """`pipe.load_lora_weights(directory)`; returns what diffusers logged and PEFT warned meanwhile."""
    handler = _Messages()
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(directory))
    finally:
        logger.removeHandler(handler)
    return handler.messages + [str(w.message) for w in caught]


@pytest.mark.parametrize("demo", ["toy-monet-cat.yaml", "toy-resolution.yaml"])
def test_final_lora_of_the_demo_target_mix_loads_every_layer_and_reproduces_eval(tiny_config, demo):
    targets = _demo_targets(demo)
    config = tiny_config(lora={"rank": 4, "alpha": 8, "target_modules": targets}, raft={"iterations": 1},
                         training={"learning_rate": 5e-3, "epochs": 2})
    run_training(config, log=lambda s: None)
    run = Path(config.output_dir)
    trained = load_file(str(run / "checkpoints/iter_0000/adapter.safetensors"))  # PEFT names, as trained
    assert {layer.rsplit(".", 1)[-1] for layer in _layers(trained)} >= {"to_q", "conv1", "conv2", "proj_in"}

    pipe = _fresh_pipeline(config)
    messages = _load_capturing_warnings(pipe, run / "final")
    (adapter,) = pipe.unet.peft_config
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=adapter)
    attached = {layer for layer in _layers(trained)
                if all(loaded.get(k) is not None and loaded[k].equal(v)
                       for k, v in trained.items() if k.rsplit(".lora_", 1)[0] == layer)}
    assert len(attached) == len(_layers(trained)), f"attached {len(attached)} of {len(_layers(trained))} layers"
    assert _layers(loaded) == _layers(trained)
    lost = [m for m in messages if "missing keys" in m or "unexpected keys" in m or "inconsistency" in m]
    assert not lost, lost[0][:300]
    assert pipe.unet.peft_config[adapter].lora_alpha == 8

    # The run's last eval images, regenerated with the loaded LoRA: identical pixels.
    eval_dir = run / "samples/iter_0000/eval"
    rows = [json.loads(x) for x in (eval_dir / "samples.jsonl").read_text().splitlines()]
    written = np.stack([np.asarray(Image.open(eval_dir / r["file"])) for r in rows])
    again = _images(pipe, config, [r["prompt"] for r in rows], [r["seed"] for r in rows])
    np.testing.assert_array_equal(again, written)


def test_legacy_mixed_name_lora_loads_every_layer(tmp_path):
    """A final/ saved before PEFT names (attention under `lora.down`, the rest under `lora_A`) loads whole."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from raft_diffusion.backends.diffusion import load_lora, load_pipeline

    targets = _demo_targets("toy-monet-cat.yaml")
    unet = load_pipeline("builtin:tiny-sd").unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p))
    trained = get_peft_model_state_dict(unet)
    legacy = convert_state_dict_to_diffusers(trained)
    assert any(".lora.down." in k for k in legacy) and any(".lora_A." in k for k in legacy)
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=legacy, unet_lora_adapter_metadata={
        "r": 4, "lora_alpha": 8, "target_modules": targets})
    pipe = load_pipeline("builtin:tiny-sd")
    load_lora(pipe, tmp_path)
    (adapter,) = pipe.unet.peft_config
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=adapter)
    assert set(loaded) == set(trained) and all(torch.equal(loaded[k], v) for k, v in trained.items())
    assert pipe.unet.peft_config[adapter].lora_alpha == 8
