"""The toy flow model's plumbing (toyworld/train_flow.py and builtin:toy-shapes-flow), on an untrained
transformer: what training feeds the transformer is what the pipeline gives it when sampling."""

import json

import torch

from raft_diffusion.backends.diffusion import encode_prompts, load_pipeline
from raft_diffusion.config import GenerationConfig
from raft_diffusion.tokenizer import clip_tokenizer
from raft_diffusion.toyworld import train_flow


def _asset(tmp_path):
    torch.manual_seed(0)
    train_flow.save_asset(train_flow.make_transformer(), tmp_path / "flow", steps=0, seed=0)
    return tmp_path / "flow"


def test_the_asset_loads_as_sd3_with_the_toy_vae_and_text_encoder(tmp_path):
    pipe = load_pipeline(str(_asset(tmp_path)))
    sd = load_pipeline("builtin:toy-shapes")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.text_encoder_3 is None
    assert pipe.text_encoder is pipe.text_encoder_2 and pipe.t5_tokens == train_flow.T5_TOKENS == 0
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
