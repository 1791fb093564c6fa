"""Rewards by name: a name -> factory registry, as in DDPO's `rewards.py`.

A factory takes the reward's `options` (keyword arguments) plus, if it declares them, `device`,
`dtype` and `field` (the config path of its options, for error messages), loads its models once,
and returns a function `(outputs, prompts) -> scores`. Adding a reward means adding one factory
here. `python:package.module:function` names a user's own `(outputs, prompts) -> scores` function.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch

from ..errors import UserError
from ..protocols import Reward
from . import clip, http, image_reward, jpeg, ocr, oracle, preference, text, vlm

REGISTRY: dict[str, Callable[..., Reward]] = {
    "jpeg_compressibility": jpeg.jpeg_compressibility,
    "jpeg_incompressibility": jpeg.jpeg_incompressibility,
    "clip": clip.clip_score,
    "aesthetic": clip.aesthetic,
    "vader": text.vader,
    "hf_classifier": text.hf_classifier,
    "minilm_sentiment": text.minilm_sentiment,
    "oracle": oracle.oracle,
    "pickscore": preference.pickscore,
    "hpsv2": preference.hpsv2,
    "image_reward": image_reward.image_reward,
    "vlm_judge": vlm.vlm_judge,
    "http": http.http_reward,
    "ocr": ocr.ocr,
}
# What each reward reads: images (N, 3, H, W) in [0, 1], or texts (list[str]). `http` reads what its
# `reads` option says (default images): see `reads_of`.
READS = {name: "texts" if name in ("vader", "hf_classifier", "minilm_sentiment") else "images" for name in REGISTRY}
OPTION_READS = {"http": "images"}  # rewards whose `reads` option (this its default) says what they read
INJECTED = ("device", "dtype", "field")


def available() -> list[str]:
    return sorted(REGISTRY)


def check_name(name: str, field: str) -> None:
    """Refuse an unknown reward name before any model is loaded."""
    if name.startswith("python:") or name in REGISTRY:
        return
    raise UserError(field, f"unknown reward {name!r}",
                    f"available: {', '.join(available())}, or python:module:function")


def reads_of(name: str, options: dict[str, Any] | None = None, field: str = "rewards.options") -> str | None:
    """What a registered reward reads ("images" or "texts"; None for python:...). A reward of
    OPTION_READS reads its `reads` option; a bad one is a UserError naming `field`.reads."""
    if name in OPTION_READS:
        reads = (options or {}).get("reads", OPTION_READS[name])
        return http.check_reads_option(reads, field)
    return READS.get(name)


def check_reads(name: str, outputs: str, field: str, options: dict[str, Any] | None = None,
                options_field: str | None = None) -> None:
    """Refuse a registered reward that cannot read what the backend makes ("images" or "texts").

    `field` names the reward's name; `options_field` (default: `field` less its last part, plus
    `.options`) its options, where what it reads is an option (http's `reads`)."""
    if options_field is None:
        options_field = f"{field.rsplit('.', 1)[0]}.options" if "." in field else f"{field} options"
    reads = reads_of(name, options, options_field)
    if reads is not None and reads != outputs:
        usable = ", ".join(n for n in available() if READS[n] == outputs and n not in OPTION_READS)
        usable += f", http (with reads: {outputs})"
        if name in OPTION_READS:
            raise UserError(f"{options_field}.reads", f"{name} reads {reads}, but this backend makes {outputs}",
                            f"set reads: {outputs}")
        raise UserError(field, f"reward {name!r} scores {reads}, but this backend makes {outputs}",
                        f"rewards for {outputs}: {usable}")


def _load_user_function(name: str, field: str) -> Reward:
    target = name[len("python:"):]
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise UserError(field, f"{name!r} is not python:module:function", "e.g. python:mypkg.rewards:score")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(field, f"cannot import {module_name!r}: {e}", "check the module is on PYTHONPATH") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(field, f"{module_name} has no function {attr!r}", "name an existing function")
    return fn


def build_reward(name: str, options: dict[str, Any], device: torch.device,
                 dtype: torch.dtype = torch.float32, field: str = "rewards") -> Reward:
    """The scoring function of a reward, its models loaded once, on `device`."""
    check_name(name, field)
    if name.startswith("python:"):
        return _load_user_function(name, field)
    injected = {"device": torch.device(device), "dtype": dtype, "field": f"{field}.options"}
    return call_factory(REGISTRY[name], name, options, injected, f"{field}.options")


def call_factory(factory: Callable, name: str, options: dict[str, Any], injected: dict[str, Any], field: str):
    """`factory(**options)` plus those of `injected` it declares, once its options are checked: an unknown
    one, or a number or boolean of the wrong kind, is a UserError naming `field` (the options' path)."""
    params = inspect.signature(factory).parameters
    allowed = [p for p in params if p not in INJECTED]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(field, f"unknown option(s) {unknown} for {name}", f"allowed: {', '.join(allowed) or 'none'}")
    for key, value in options.items():
        _check_option_type(name, key, value, params[key].default, f"{field}.{key}")
    return factory(**options, **{k: v for k, v in injected.items() if k in params})


def _check_option_type(reward: str, key: str, value: Any, default: Any, field: str) -> None:
    """Refuse an option value of the wrong kind where the factory's default is a number or a boolean.

    Such a value would otherwise fail deep inside the reward (`quality: abc` in PIL's JPEG encoder).
    Options with text or no default (names, paths) are checked by the factories themselves.
    """
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        return
    if not ok:
        raise UserError(field, f"{reward}'s {key} must be {kind}, got {value!r}", f"e.g. {key}: {default!r}")
