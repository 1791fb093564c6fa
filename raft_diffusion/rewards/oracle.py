"""The `oracle` reward: the toy world's program oracle, 1.0 when an image shows every attribute its prompt names.

Options (`rewards[i].options`):
- `weights`: an oracle safetensors file; default the shipped `assets/toyworld/oracle.safetensors`
  (relative to the repository root), built by
  `python -m raft_diffusion.toyworld.oracle --out assets/toyworld/oracle.safetensors --seed 0`.
- `attributes`: which of `shape`, `colour`, `style` to check (default all three, each only when
  the prompt names it); e.g. `[shape, style]` asks "is this a cat in monet style?" whatever its colour.

The mean over a batch is the fraction of images with shape, colour and style (those the prompt
names) all right: the toy world's ground-truth alignment judge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import UserError
from ..toyworld import oracle as toy_oracle


def oracle(weights: str | None = None, attributes: Sequence[str] | None = None,
           device: torch.device | str = "cpu", field: str = "options"):
    """Reward = 1.0 per image whose shape, colour and style (as far as its prompt names them) are right, else 0.0."""
    known = tuple(toy_oracle.CLASSES)
    if attributes is not None:
        if isinstance(attributes, str) or not attributes or any(a not in known for a in attributes):
            raise UserError(f"{field}.attributes", f"got {attributes!r}",
                            f"give a non-empty list drawn from {', '.join(known)}, e.g. [shape, style]")
    loaded = toy_oracle.load(weights, device=device, field=f"{field}.weights" if weights else field)

    def reward(images: torch.Tensor, prompts: Sequence[str]) -> list[float]:
        try:
            return loaded.judge(images, prompts, attributes)
        except ValueError as e:  # a prompt outside the toy world's vocabulary is the config's mistake
            raise UserError(field, f"oracle cannot judge: {e}",
                            "use toy-world prompts, e.g. 'a red cat in monet style'") from None

    def check_prompts(prompts: Sequence[str], where: str) -> None:
        """Refuse a prompt that names none of the checked attributes (every sample of it would drop)."""
        checked = attributes or known
        for p in dict.fromkeys(prompts):
            if not any(k in checked for k in toy_oracle.parse_prompt(p)):
                raise UserError(where, f"the oracle cannot judge the prompt {p!r}: it names no toy-world "
                                f"{', '.join(checked)}", "use toy-world prompts, e.g. 'a red cat in monet style'")

    reward.check_prompts = check_prompts
    return reward
