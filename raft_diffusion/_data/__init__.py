"""Shipped data of an installed wheel: `assets/` (toy-world weights), `configs/` and `prompts/`.

A source checkout keeps them at the repository's top level instead; `paths.py` finds either.
"""
