"""`vlm_judge`: a vision-language model asked a yes/no question about each image, scored by P(Yes).

As Flow-Factory and flow_grpo judge with a VLM: the question (default "Does this image show {prompt}?
Answer yes or no.", `{prompt}` filled with the sample's prompt) goes with the image through the model's
own chat template as one user turn; the score is the probability of `answer`'s first token ("Yes") at
the first position of the assistant's reply (the softmax of the next-token logits over the whole
vocabulary), in [0, 1]. Any transformers `AutoModelForImageTextToText` with its `AutoProcessor`:
Qwen2.5-VL, SmolVLM, LLaVA, ..., from a hub id or a local directory, read as safetensors.

Options: `model` (default `Qwen/Qwen2.5-VL-3B-Instruct`), `question`, `answer` (default "Yes"),
`batch_size` (default 4). Batches are left-padded, so every row's last position is its reply's first.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import UserError
from .preference import error_reason

VLM_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
QUESTION = "Does this image show {prompt}? Answer yes or no."


def vlm_judge(model: str = VLM_MODEL, question: str = QUESTION, answer: str = "Yes", batch_size: int = 4,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, field: str = "options"):
    """Reward = P(`answer`) as the VLM's first reply token to `question` about the image."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"{field}.batch_size", f"{batch_size!r} is not a positive whole number", "use e.g. 4")
    try:
        question.format(prompt="a cat")
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise UserError(f"{field}.question", f"{question!r} is not a question template ({error_reason(e)})",
                        "write the question with {prompt} where the sample's prompt goes, and no other braces"
                        ) from None
    if str(model).startswith(("/", "./", "../", "~")) and not Path(model).expanduser().is_dir():
        raise UserError(f"{field}.model", f"directory not found: {model}",
                        "pass a local directory saved by save_pretrained, or a hub id")
    try:
        processor = AutoProcessor.from_pretrained(model)
        vlm = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - offline machines, wrong directories, text-only models
        raise UserError(f"{field}.model", f"cannot load the vision-language model {model!r}: {error_reason(e)}",
                        "pass a transformers image-text-to-text model (e.g. Qwen/Qwen2.5-VL-3B-Instruct) or its "
                        "local directory") from None
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "chat_template", None) is None:
        raise UserError(f"{field}.model", f"{model} has no tokenizer or chat template in its processor",
                        "use an instruction-tuned VLM whose processor has a chat template")
    ids = tokenizer.encode(answer, add_special_tokens=False)
    if not ids:
        raise UserError(f"{field}.answer", f"{answer!r} is no token of {model}'s vocabulary", "use e.g. Yes")
    yes = ids[0]
    vlm.to(device).eval().requires_grad_(False)

    def score(images: torch.Tensor, prompts: Sequence[str]) -> list[float]:
        from PIL import Image

        from .jpeg import to_uint8

        pil = [Image.fromarray(a) for a in to_uint8(images)]
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question.format(prompt=p)}]}],
            add_generation_prompt=True) for p in prompts]
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            inputs = processor(text=texts, images=[[im] for im in pil], return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = side
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(vlm.dtype)
        logits = vlm(**inputs).logits[:, -1].float()
        return torch.softmax(logits, dim=-1)[:, yes].cpu().tolist()

    def reward(images: torch.Tensor, prompts: Sequence[str]) -> list[float]:
        out: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                out += score(images[start:start + batch_size], list(prompts[start:start + batch_size]))
        return out

    return reward
