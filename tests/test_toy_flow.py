"""The toy flow model (toyworld/train_flow.py and builtin:toy-shapes-flow): its plumbing on an untrained
transformer (what training feeds the transformer is what the pipeline gives it when sampling), then
the shipped model: what it draws, and the monet-cat demo on it."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from raft_diffusion.backends.loading import load_pipeline
from raft_diffusion.backends.sampling import encode_prompts
from raft_diffusion.config import GenerationConfig
from raft_diffusion.paths import ASSETS
from raft_diffusion.tokenizer import clip_tokenizer
from raft_diffusion.toyworld import oracle, train_flow

from .conftest import run_in_process
from .test_toy_sd import draw_in_distribution, one_thread_pipeline

FLOW = ASSETS / "toyworld/toy-shapes-flow"
MIN_JUDGED = 0.625  # 8 prompts, one image each: 6 right when measured (83% held out on these styles)


def _asset(tmp_path):
    torch.manual_seed(0)
    train_flow.save_asset(train_flow.make_transformer(), tmp_path / "flow", steps=0, seed=0)
    return tmp_path / "flow"


def test_the_asset_loads_as_sd3_with_the_toy_vae_and_text_encoder(tmp_path):
    pipe = load_pipeline(str(_asset(tmp_path)))
    sd = load_pipeline("builtin:toy-shapes")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.text_encoder_3 is None
    assert pipe.text_encoder is pipe.text_encoder_2 and pipe.config["_t5_tokens"] == train_flow.T5_TOKENS == 0
    assert all(torch.equal(a, b.float()) for a, b in zip(pipe.vae.parameters(), sd.vae.parameters()))
    # the toy CLIPTextModel's weights, and an identity projection: its pooled output is the EOS hidden state
    ids = clip_tokenizer()(["a red cat in monet style"], padding="max_length", max_length=77,
                           return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(pipe.text_encoder(ids).text_embeds, sd.text_encoder.float()(ids).pooler_output)
    meta = json.loads((tmp_path / "flow/raft_diffusion.json").read_text())
    assert meta["vae_and_text_encoder"] == "builtin:toy-shapes"


def test_training_encodes_prompts_as_the_pipeline_does_when_sampling(tmp_path):
    pipe = load_pipeline(str(_asset(tmp_path)))
    prompts = ["a red cat in monet style", ""]
    cond, _ = encode_prompts(pipe, prompts, GenerationConfig(guidance_scale=1.0))
    ids = clip_tokenizer()(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden, pooled = train_flow.prompt_encoding(pipe.text_encoder, ids)
    assert cond["prompt_embeds"].shape == (2, 77, 2 * train_flow.TEXT_DIM)  # no T5 tokens after the 77
    torch.testing.assert_close(cond["prompt_embeds"], hidden)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], pooled)


def test_training_phases_are_cut_at_the_steps_asked_and_the_asset_samples_with_the_last_one_s_shift(tmp_path):
    assert train_flow.phases(train_flow.PHASES[-1][0]) == list(train_flow.PHASES)
    assert train_flow.phases(6000) == [(4500, 3.0), (6000, 3.0)]
    assert train_flow.phases(100) == [(100, 3.0)]
    torch.manual_seed(0)
    for steps, shift in ((6000, 3.0), (train_flow.PHASES[-1][0], train_flow.PHASES[-1][1])):
        train_flow.save_asset(train_flow.make_transformer(), tmp_path / str(steps), steps=steps, seed=0)
        pipe = load_pipeline(str(tmp_path / str(steps)))
        assert pipe.scheduler.config.shift == shift
        meta = json.loads((tmp_path / str(steps) / "raft_diffusion.json").read_text())
        assert meta["phases"][-1] == {"last_step": steps, "shift": shift}


@pytest.fixture(scope="module")
def flow_pipe():
    yield from one_thread_pipeline("builtin:toy-shapes-flow")


def test_the_shipped_flow_model_is_fp16_on_disk_and_fp32_when_loaded(flow_pipe):
    with safe_open(str(FLOW / "transformer/diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118
    assert flow_pipe.transformer.dtype == torch.float32
    meta = json.loads((FLOW / "raft_diffusion.json").read_text())
    assert meta["steps"] == train_flow.PHASES[-1][0] and flow_pipe.scheduler.config.shift == train_flow.PHASES[-1][1]


def test_the_shipped_flow_model_draws_what_in_distribution_prompts_ask_at_64_px(flow_pipe):
    images, prompts = draw_in_distribution(flow_pipe)
    assert images.shape == (8, 3, 64, 64)
    hits = oracle.attribute_hits(images, prompts)
    assert np.mean([h["colour"] for h in hits]) == 1.0 and np.mean([h["style"] for h in hits]) >= 0.875
    assert np.mean(oracle.judge(images, prompts)) >= MIN_JUDGED


def test_the_monet_cat_demo_runs_on_the_toy_flow_model(tmp_path, capfd):
    out = tmp_path / "flow"
    small = ["model.path=builtin:toy-shapes-flow", "raft.iterations=1", "raft.prompts_per_iteration=2",
             "generation.samples_per_prompt=2", "eval.samples_per_prompt=1", "eval.every=1"]
    result = run_in_process(capfd, "demo", "monet-cat", "--output-dir", str(out),
                            *[a for s in small for a in ("--set", s)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no such layers" in result.stderr  # the demo's UNet conv targets, skipped on the transformer
    lora = load_file(str(out / "final/pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("transformer.") for k in lora)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and {"oracle", "cat_in_monet"} <= set(metrics[0]["eval_before"])


def _stage(cache, steps, ema_decay, stop_after=None):
    """train_stage on a one-layer model and 8 fake latents (what both toy trainers' loop does);
    `stop_after` calls of the loss, it stops as a killed process would."""
    from raft_diffusion.toyworld.train_sd import train_stage

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    data = {"ids": np.arange(8 * 2 * 77).reshape(8, 2, 77) % 500, "empty": np.zeros(77, dtype=np.int64)}
    mean, std = torch.randn(8, 4, 2, 2), torch.rand(8, 4, 2, 2)
    calls = []

    def loss_of(x0, tokens, g):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append(1)
        return (model(x0.permute(0, 2, 3, 1)) - tokens[:, :1, None, None].float() / 500).pow(2).mean()

    train_stage("m", {"m": model}, loss_of, data, mean, std, 1.0, cache, steps, 4, 1e-2, 0, ema_decay=ema_decay)
    return load_file(str(cache / "m/m.safetensors")), load_file(str(cache / "m/ema_m.safetensors"))


def test_the_toy_trainers_loop_resumes_exactly_with_its_weight_average(tmp_path, monkeypatch):
    from raft_diffusion.toyworld import train_sd

    monkeypatch.setattr(train_sd, "CHECKPOINT_SECONDS", -1)  # a checkpoint after every step
    straight = _stage(tmp_path / "a", 6, 0.9)
    with pytest.raises(KeyboardInterrupt):
        _stage(tmp_path / "b", 6, 0.9, stop_after=4)
    assert json.loads((tmp_path / "b/m/state.json").read_text())["step"] == 4
    resumed = _stage(tmp_path / "b", 6, 0.9)
    for a, b in zip(straight, resumed):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    weights, average = straight
    assert not torch.equal(weights["weight"], average["weight"])  # an average, not a copy
