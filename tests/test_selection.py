import math

from raft_diffusion.selection import select, select_global, select_per_prompt

NAN = math.nan


def test_per_prompt_keeps_best_top_of_each_prompt():
    scores = [0.1, 0.9, 0.5, 3.0, 2.0, 1.0]
    groups = [0, 0, 0, 1, 1, 1]
    assert select_per_prompt(scores, groups, top=1) == [1, 3]
    assert select_per_prompt(scores, groups, top=2) == [1, 2, 3, 4]


def test_ties_break_towards_lower_index():
    assert select_per_prompt([1.0, 1.0, 1.0], [0, 0, 0], top=1) == [0]
    assert select_global([2.0, 5.0, 5.0, 5.0], fraction=0.5) == [1, 2]


def test_dropped_samples_are_never_selected_and_empty_prompts_are_skipped():
    scores = [NAN, 0.2, NAN, NAN, 7.0, 1.0]
    groups = [0, 0, 1, 1, 2, 2]
    assert select_per_prompt(scores, groups, top=1) == [1, 4]
    assert select_global(scores, fraction=1.0) == [1, 4, 5]
    assert select_global([NAN, NAN], fraction=0.5) == []


def test_global_keeps_fraction_of_valid_samples():
    scores = list(range(16))
    assert select_global(scores, fraction=0.125) == [14, 15]
    assert select(scores, [0] * 16, "global", fraction=0.25) == [12, 13, 14, 15]
    assert select(scores, [i // 4 for i in range(16)], "per_prompt", top=1) == [3, 7, 11, 15]
