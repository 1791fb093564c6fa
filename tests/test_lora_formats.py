"""A run's final/ also holds its LoRA under kohya's names, the file ComfyUI, Forge, AUTOMATIC1111 and
kohya's sd-scripts load whole; diffusers' own kohya loader attaches every layer of it at its strength.

The naming rules checked are kohya sd-scripts' (networks/lora.py: `lora_unet_` + the module path with
dots as underscores, `.lora_down.weight` / `.lora_up.weight` / `.alpha`) and ComfyUI's
`model_lora_keys_unet` (`lora_unet_{diffusers key without .weight, dots as underscores}`).
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from raft_diffusion.cli import main
from raft_diffusion.errors import UserError
from raft_diffusion.lora_formats import KOHYA_FILE, check_kohya, kohya_state_dict, write_kohya

from .conftest import DEMO_TARGETS, TINY_CONFIG, deep_update, finished_config, run_in_process, write_yaml
from .test_lora_roundtrip import _layers, assert_reproduces_eval
from .test_run_directory import _fresh_pipeline, _images

KOHYA_KEY = re.compile(r"^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def _header(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _saved_by_a_backend(tmp_path: Path, lora: dict) -> Path:
    """final/ as `DiffusionBackend.save_adapter` writes it, for a tiny-sd LoRA of `lora` with random B
    (a trained adapter, without the training)."""
    from accelerate import Accelerator

    from raft_diffusion.backends.diffusion import DiffusionBackend
    from raft_diffusion.config import RunConfig

    config = RunConfig.model_validate(deep_update(TINY_CONFIG, {"lora": lora, "output_dir": str(tmp_path / "run")}))
    torch.manual_seed(0)  # PEFT's gaussian init of lora_A draws from the global generator
    backend = DiffusionBackend(config, Accelerator(cpu=True))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in backend._denoiser().named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    final = tmp_path / "final"
    final.mkdir(parents=True)
    backend.save_adapter(final)
    return final


def _assert_kohya_rules(path: Path, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    state = load_file(str(path))
    bad = [k for k in state if not KOHYA_KEY.match(k)]
    assert not bad, bad[:3]
    modules: dict[str, set[str]] = {}
    for key in state:
        module, part = key.split(".", 1)
        modules.setdefault(module, set()).add(part)
    assert all(parts == {"lora_down.weight", "lora_up.weight", "alpha"} for parts in modules.values())
    for module in modules:
        assert state[f"{module}.alpha"].ndim == 0 and float(state[f"{module}.alpha"]) == alpha
        assert state[f"{module}.lora_down.weight"].shape[0] == rank == state[f"{module}.lora_up.weight"].shape[1]
    meta = _header(path)
    assert meta["ss_network_dim"] == str(rank) and float(meta["ss_network_alpha"]) == alpha
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_sd_model_name"] == "builtin:tiny-sd"
    return state


def _assert_same_deltas(final: Path, rank: int, alpha: float) -> int:
    """Every layer's update up @ down * alpha / rank in the kohya file equals the diffusers file's
    lora_B @ lora_A * alpha / rank; returns the number of layers."""
    kohya = load_file(str(final / KOHYA_FILE))
    diffusers = load_file(str(final / "pytorch_lora_weights.safetensors"))
    meta = json.loads(_header(final / "pytorch_lora_weights.safetensors")["lora_adapter_metadata"])
    assert meta["unet.r"] == rank and meta["unet.lora_alpha"] == alpha
    layers = sorted({k[len("unet."):].rsplit(".lora_", 1)[0] for k in diffusers})
    assert len(kohya) == 3 * len(layers)
    for layer in layers:
        a, b = diffusers[f"unet.{layer}.lora_A.weight"], diffusers[f"unet.{layer}.lora_B.weight"]
        name = "lora_unet_" + layer.replace(".", "_")
        down, up, k_alpha = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"], kohya[f"{name}.alpha"]
        expected = (b.flatten(1) @ a.flatten(1)) * alpha / rank
        got = (up.flatten(1) @ down.flatten(1)) * float(k_alpha) / down.shape[0]
        assert torch.equal(got, expected), layer
    return len(layers)


def _load_attached(pipe, path: Path) -> dict[str, torch.Tensor]:
    pipe.load_lora_weights(str(path))
    (adapter,) = pipe.unet.peft_config
    return get_peft_model_state_dict(pipe.unet, adapter_name=adapter), adapter


def test_kohya_file_of_the_demo_mix_loads_every_layer_and_reproduces_eval(finished_run):
    config, run = finished_config(), finished_run
    final = run / "final"
    state = _assert_kohya_rules(final / KOHYA_FILE, rank=4, alpha=8)
    trained = load_file(str(run / "checkpoints/iter_0001/adapter.safetensors"))  # PEFT names, as trained
    assert {layer.rsplit(".", 1)[-1] for layer in _layers(trained)} >= {"to_q", "conv1", "conv2", "proj_in",
                                                                        "proj_out"}
    assert len(state) == 3 * len(_layers(trained))
    assert _assert_same_deltas(final, rank=4, alpha=8) == len(_layers(trained))

    pipe = _fresh_pipeline(config)
    loaded, adapter = _load_attached(pipe, final / KOHYA_FILE)  # diffusers' own loader for kohya names
    attached = {layer for layer in _layers(trained)
                if all(loaded.get(k) is not None and loaded[k].equal(v)
                       for k, v in trained.items() if k.rsplit(".lora_", 1)[0] == layer)}
    assert len(attached) == len(_layers(trained)), f"attached {len(attached)} of {len(_layers(trained))} layers"
    assert all(pipe.unet.get_submodule(layer).scaling[adapter] == 2.0 for layer in attached)  # alpha 8 / rank 4
    assert_reproduces_eval(pipe, config, run / "samples/iter_0001/eval")


def test_kohya_file_is_byte_identical_across_saves(tmp_path):
    lora = {"rank": 4, "alpha": 8, "target_modules": DEMO_TARGETS}
    first, second = _saved_by_a_backend(tmp_path / "a", lora), _saved_by_a_backend(tmp_path / "b", lora)
    for name in (KOHYA_FILE, "pytorch_lora_weights.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert sorted(p.name for p in first.iterdir()) == sorted([KOHYA_FILE, "pytorch_lora_weights.safetensors"])


@pytest.mark.parametrize("lora", [
    {"rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},  # attention only
    {"rank": 4, "alpha": 3, "target_modules": DEMO_TARGETS},  # alpha != rank, and not 2 * rank
], ids=["attention-only", "alpha-3-rank-4"])
def test_kohya_alpha_and_deltas_equal_the_diffusers_files(tmp_path, lora):
    final = _saved_by_a_backend(tmp_path, lora)
    _assert_kohya_rules(final / KOHYA_FILE, lora["rank"], lora["alpha"])
    layers = _assert_same_deltas(final, lora["rank"], lora["alpha"])

    config = finished_config()
    kohya_pipe, diffusers_pipe = _fresh_pipeline(config), _fresh_pipeline(config)
    loaded, adapter = _load_attached(kohya_pipe, final / KOHYA_FILE)
    assert len(_layers(loaded)) == layers
    scale = lora["alpha"] / lora["rank"]
    assert all(kohya_pipe.unet.get_submodule(m).scaling[adapter] == scale for m in _layers(loaded))
    diffusers_pipe.load_lora_weights(str(final))
    prompts, seeds = ["a red square", "a blue star"], [1, 2]
    np.testing.assert_array_equal(_images(kohya_pipe, config, prompts, seeds),
                                  _images(diffusers_pipe, config, prompts, seeds))


def test_generate_takes_the_kohya_file(finished_run, tmp_path):
    config, run = finished_config(), finished_run
    eval_dir = run / "samples/iter_0001/eval"
    row = json.loads((eval_dir / "samples.jsonl").read_text().splitlines()[0])
    g = config.generation
    args = ["generate", "--model", "builtin:tiny-sd", "--prompt", row["prompt"], "-n", "1", "--seed",
            str(row["seed"]), "--resolution", str(g.resolution), "--steps", str(g.steps),
            "--guidance-scale", str(g.guidance_scale), "--scheduler", g.scheduler, "--eta", str(g.eta),
            "--negative-prompt", g.negative_prompt]
    for source in (run / "final" / KOHYA_FILE, run / "final" / "pytorch_lora_weights.safetensors"):
        out = tmp_path / source.stem
        assert main([*args, "--lora", str(source), "--out", str(out)]) == 0
        again = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(out / f"{row['seed']:06d}.png"))
        # one image alone against the run's batch of 8: within one grey level (README, `generate`;
        # batched float sums round differently on the CPU; failed here on 1 of 12,288 values)
        np.testing.assert_allclose(again.astype(int), np.asarray(
            __import__("PIL.Image", fromlist=["Image"]).open(eval_dir / row["file"])).astype(int), atol=1, rtol=0)


def test_generate_refuses_a_kohya_file_of_another_model(tmp_path, capfd):
    state = {"lora_unet_no_such_layer.lora_down.weight": torch.zeros(4, 8),
             "lora_unet_no_such_layer.lora_up.weight": torch.zeros(8, 4),
             "lora_unet_no_such_layer.alpha": torch.tensor(4.0)}
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "other.safetensors"))
    result = run_in_process(capfd, "generate", "--model", "builtin:tiny-sd", "--prompt", "a cat", "-n", "1",
                            "--steps", "1", "--lora", str(tmp_path / "other.safetensors"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--lora" in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change", [{"use_dora": True}, {"use_rslora": True},
                                    {"rank_pattern": {"to_q": 8}}, {"alpha_pattern": {"conv1": 16}}],
                         ids=["dora", "rslora", "rank-pattern", "alpha-pattern"])
def test_a_lora_kohya_cannot_carry_is_refused_and_nothing_written(tmp_path, change):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q"], **change).to_dict()
    with pytest.raises(UserError) as refused:
        check_kohya(config)
    assert "\n" not in str(refused.value)
    layers = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 8),
              "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(8, 4)}
    with pytest.raises(UserError):
        write_kohya(tmp_path / KOHYA_FILE, layers, config, {}, "builtin:tiny-sd")
    assert list(tmp_path.iterdir()) == []
    plain = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q"]).to_dict()
    assert set(kohya_state_dict(layers, plain)) == {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q." + p
        for p in ("lora_down.weight", "lora_up.weight", "alpha")}


def test_a_run_whose_lora_kohya_cannot_carry_exits_2_before_training(tmp_path, capfd, monkeypatch):
    """The config cannot ask for DoRA today; were an adapter built with it, the run is refused at the
    start with one line, and writes no final/."""
    import raft_diffusion.backends.diffusion as diffusion

    monkeypatch.setattr(diffusion, "LoraConfig", lambda **kw: LoraConfig(use_dora=True, **kw))
    config = write_yaml(tmp_path / "c.yaml", TINY_CONFIG)
    result = run_in_process(capfd, "train", str(config), "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "DoRA" in lines[0], lines
    assert not list((tmp_path / "run").glob("final/*"))
