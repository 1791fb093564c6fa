import open_clip
import pytest
import torch

from raft_diffusion.tiny import tiny_pipeline
from raft_diffusion.tokenizer import clip_tokenizer

PROMPTS = [
    "a photo of a cat in monet style",
    "A RED square on a striped background, 4k, trending on artstation",
    "it's the dog's toy -- isn't it?",
    "naïve café au lait with 2 croissants",
    "a   lighthouse\tat dusk",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_clip_tokenizer_ids_equal_open_clip(prompt):
    ours = clip_tokenizer()(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    theirs = open_clip.tokenize([prompt])[0].tolist()
    n = theirs.index(49407) + 1  # through the end-of-text token; open_clip pads with 0, SD with eot
    assert ours[:n] == theirs[:n]
    assert ours[n:] == [49407] * (77 - n)


def test_clip_tokenizer_truncates_long_prompts_like_open_clip():
    prompt = " ".join(["monet"] * 120)
    ours = clip_tokenizer()(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    theirs = open_clip.tokenize([prompt])[0].tolist()
    assert len(ours) == 77 and ours == theirs


def test_tiny_pipeline_has_sd_shape_and_is_deterministic():
    pipe = tiny_pipeline(seed=0)
    n_unet = sum(p.numel() for p in pipe.unet.parameters())
    assert 1_000_000 <= n_unet <= 2_000_000
    assert pipe.vae_scale_factor == 8
    assert pipe.text_encoder.config.num_hidden_layers == 2
    again = tiny_pipeline(seed=0)
    other = tiny_pipeline(seed=1)
    w = next(iter(pipe.unet.parameters()))
    assert torch.equal(w, next(iter(again.unet.parameters())))
    assert not torch.equal(w, next(iter(other.unet.parameters())))
