"""Lexical diversity of a set of generated texts, as reported in the RAFT paper's text tables.

All four read words: lower-cased runs of letters, digits and apostrophes, each other non-space
character a word of its own ("Great, great!" -> great , great !). N-grams never cross texts.

- distinct-n: distinct n-grams / all n-grams, over the whole set (1.0: no n-gram repeats).
- unique-n: how many n-grams occur exactly once in the whole set (a count, not a ratio; it grows
  with the amount of text, so compare it between sets of the same size).
- MSTTR: mean segmental type-token ratio: the words of all texts in order, cut into segments of
  `window` words (the last, shorter segment is dropped); the mean of distinct/total per segment.
  NaN when there are fewer than `window` words.

A reward that is gamed by repeating the same praise shows here first: distinct-n and MSTTR fall.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

WORD = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngram_counts(texts: Sequence[str], n: int) -> Counter:
    counts: Counter = Counter()
    for text in texts:
        w = words(text)
        counts.update(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    return counts


def distinct_n(texts: Sequence[str], n: int) -> float:
    counts = ngram_counts(texts, n)
    total = sum(counts.values())
    return len(counts) / total if total else math.nan


def unique_n(texts: Sequence[str], n: int) -> int:
    return sum(1 for c in ngram_counts(texts, n).values() if c == 1)


def msttr(texts: Sequence[str], window: int = 100) -> float:
    stream = [w for text in texts for w in words(text)]
    segments = [stream[i:i + window] for i in range(0, len(stream) - window + 1, window)]
    if not segments:
        return math.nan
    return sum(len(set(s)) / window for s in segments) / len(segments)


def diversity(texts: Sequence[str], window: int = 100) -> dict[str, float]:
    """distinct-1, distinct-2, unique-2 and MSTTR of `texts`."""
    return {
        "distinct-1": distinct_n(texts, 1),
        "distinct-2": distinct_n(texts, 2),
        "unique-2": float(unique_n(texts, 2)),
        "msttr": msttr(texts, window),
    }
