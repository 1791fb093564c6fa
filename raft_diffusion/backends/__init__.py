"""Generative backends: `diffusion` (Stable Diffusion + LoRA) and `text` (causal LM + LoRA).

A backend is one module with a class that has the `protocols.Backend` methods, registered by kind
in `kinds.py`. What both share lives beside them: `training.py` (the fine-tuning schedule, the
LoRA's optimizer and checkpoint state). The diffusion backend's parts: `loading.py` (models),
`lora_io.py` (LoRA files), `sampling.py`, `families/` (one file per pipeline family).
"""
