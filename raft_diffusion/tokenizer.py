"""The real CLIP BPE tokenizer, built offline from the vocabulary that open_clip ships.

SD 1.x and open_clip's OpenAI models use the same byte-level BPE (49,408 tokens). open_clip
carries its merges as `bpe_simple_vocab_16e6.txt.gz`; from them we build the vocabulary and merges
that `transformers.CLIPTokenizer` takes, so tiny and toy pipelines tokenize exactly as Stable
Diffusion does, with no download.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

from transformers import CLIPTokenizer

# open_clip's merges file: one header line, then merges; CLIP keeps the first 48,894 of them.
_N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable character map of GPT-2 and CLIP BPE.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def bpe_path() -> Path:
    import open_clip

    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


@functools.lru_cache(maxsize=None)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    lines = gzip.open(bpe_path()).read().decode("utf-8").split("\n")
    merges = tuple(tuple(m.split()) for m in lines[1 : _N_MERGES + 1])
    units = list(_bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A `CLIPTokenizer` that gives the ids of SD 1.x's `openai/clip-vit-large-patch14` tokenizer."""
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)
