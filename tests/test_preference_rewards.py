"""PickScore and HPS v2.1 on tiny random weights, each equal to its reference's code path: PickScore's
model card (transformers CLIPModel, its processor on the PNG-rounded images: the diagonal of
`logits_per_image`), and the `hpsv2` package's scoring (open_clip's forward, the diagonal of
`image_features @ text_features.T`; the package itself is not installed here, its code path is
reproduced with open_clip's API). Bad options: one line, exit 2."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from raft_diffusion.cli import main
from raft_diffusion.errors import UserError
from raft_diffusion.rewards import build_reward
from raft_diffusion.rewards.jpeg import to_uint8

from .conftest import TINY_CONFIG, deep_update, one_error_line, write_yaml

PROMPTS = ["a cat in monet style", "a red square", "a blue star on a green field"]


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Images whose pixels are what their PNGs hold (multiples of 1/255)."""
    return (torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255).round() / 255


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory):
    """A tiny random transformers CLIPModel and a CLIPProcessor (open_clip's BPE), saved as directories."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from raft_diffusion.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    model = CLIPModel(CLIPConfig(text_config={**tower, "vocab_size": 49408, "max_position_embeddings": 77},
                                 vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=16,
                                 logit_scale_init_value=4.6052))  # PickScore_v1's scale: e^4.6052 = 100
    folder = tmp_path_factory.mktemp("pickscore")
    model.save_pretrained(folder / "model")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=clip_tokenizer())
    processor.save_pretrained(folder / "processor")
    return folder / "model", folder / "processor"


def test_pickscore_is_the_model_card_s_score(tiny_pickscore):
    from transformers import CLIPModel, CLIPProcessor

    model_dir, processor_dir = tiny_pickscore
    images = _images(3, 48)  # resized and cropped by the processor, as the card's PIL images are
    reward = build_reward("pickscore", {"model": str(model_dir), "processor": str(processor_dir), "batch_size": 2},
                          torch.device("cpu"))
    scores = reward(images, PROMPTS)
    # the model card: processor(images=PIL, text=prompt) -> CLIPModel; logit_scale.exp() * cosine
    model, processor = CLIPModel.from_pretrained(str(model_dir)).eval(), CLIPProcessor.from_pretrained(str(processor_dir))
    pil = [Image.fromarray(a) for a in to_uint8(images)]
    with torch.no_grad():
        expected = [float(model(**processor(text=[p], images=[im], padding=True, truncation=True, max_length=77,
                                          return_tensors="pt")).logits_per_image[0, 0]) for im, p in zip(pil, PROMPTS)]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    assert abs(float(model.logit_scale.exp()) - 100) < 0.01
    assert scores[0] != reward(images[:1], [PROMPTS[1]])[0]  # it reads the prompt


def test_hpsv2_is_the_hpsv2_package_s_score(tiny_clip, tmp_path):
    config, weights = tiny_clip
    checkpoint = tmp_path / "HPS_v2.1_tiny.pt"
    torch.save({"state_dict": load_file(str(weights))}, checkpoint)  # HPS's checkpoint layout
    images = _images(3, 64)  # at the model's image_size: open_clip's transform on PIL and on tensors agree
    reward = build_reward("hpsv2", {"checkpoint": str(checkpoint), "model_config": str(config)}, torch.device("cpu"))
    scores = reward(images, PROMPTS)
    # hpsv2's img_score.score: preprocess_val(PIL), tokenizer([prompt]), model(image, text) as a dict,
    # logits_per_image = image_features @ text_features.T, the score its diagonal
    model, _, preprocess_val = open_clip.create_model_and_transforms(config.stem, output_dict=True)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(config.stem)
    pil = [Image.fromarray(a) for a in to_uint8(images)]
    with torch.no_grad():
        out = model(torch.stack([preprocess_val(im) for im in pil]), tokenizer(PROMPTS))
        expected = torch.diagonal(out["image_features"] @ out["text_features"].T).tolist()
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    assert all(-1 <= s <= 1 for s in scores)  # a cosine, not 100 x


@pytest.mark.parametrize("reward, options, field, problem", [
    ("pickscore", {"model": "/nowhere/pickscore"}, "model", "not found"),
    ("pickscore", {"batch_size": 0}, "batch_size", "not a positive whole number"),
    ("hpsv2", {"checkpoint": "/nowhere/HPS_v2.1_compressed.pt"}, "checkpoint", "file not found"),
    ("hpsv2", {"checkpoint": "hf-hub:xswu"}, "checkpoint", "is not hf-hub:ORG/REPO/FILE"),
])
def test_a_bad_preference_option_is_one_line_naming_it(reward, options, field, problem):
    with pytest.raises(UserError) as e:
        build_reward(reward, options, torch.device("cpu"), field="rewards[0]")
    assert e.value.field == f"rewards[0].options.{field}" and problem in e.value.problem


def test_pickscore_offline_from_the_hub_is_exit_2_and_writes_nothing(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = write_yaml(tmp_path / "c.yaml", deep_update(TINY_CONFIG, {"rewards": [{"name": "pickscore"}]}))
    assert main(["train", str(config), "--output-dir", str(tmp_path / "run")]) == 2
    assert one_error_line(capfd.readouterr().err).startswith("error: config rewards.0.options.model")
    assert not (tmp_path / "run").exists()
