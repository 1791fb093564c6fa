"""Diversity metrics on strings small enough to count by hand."""

import math

import pytest

from raft_diffusion.diversity import distinct_n, diversity, msttr, unique_n, words


def test_words_are_lowercased_and_punctuation_stands_alone():
    assert words("Great, great fun!  It's 10/10") == ["great", ",", "great", "fun", "!", "it's", "10", "/", "10"]


def test_distinct_and_unique_counted_by_hand():
    texts = ["a b a b", "b a c"]
    # unigrams: a b a b b a c -> 7 in all, 3 distinct
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    # bigrams: (a b) (b a) (a b) | (b a) (a c) -> 5 in all, 3 distinct; only (a c) occurs once
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert unique_n(texts, 2) == 1
    # unigrams occurring once: c
    assert unique_n(texts, 1) == 1


def test_ngrams_do_not_cross_texts():
    assert math.isnan(distinct_n(["a", "b"], 2))  # no bigram at all
    assert unique_n(["a", "b"], 2) == 0


def test_msttr_averages_full_segments_and_drops_the_rest():
    # windows of 4 words: [a b a b] -> 2/4, [c d e f] -> 4/4; the trailing [g] is dropped
    assert msttr(["a b a b c", "d e f g"], window=4) == pytest.approx((0.5 + 1.0) / 2)
    assert math.isnan(msttr(["a b c"], window=4))


def test_a_collapsed_set_scores_lower_than_a_varied_one():
    varied = diversity(["the plot moves quickly", "a quiet film about two sisters"], window=4)
    collapsed = diversity(["great great great great", "great great great great"], window=4)
    for key in ("distinct-1", "distinct-2", "unique-2", "msttr"):
        assert collapsed[key] < varied[key], key
    assert collapsed == {"distinct-1": 1 / 8, "distinct-2": 1 / 6, "unique-2": 0.0, "msttr": 0.25}
