"""The report's flags fire on runs that were gamed or collapsed, and stay quiet on one that was not."""

import pytest

from raft_diffusion.config import ReportConfig
from raft_diffusion.flags import find


def _records(evals, rewards=("clip",), before=None):
    """metrics.jsonl records: `evals` is a list of eval dicts, one per iteration (None: not evaluated)."""
    out = []
    for i, e in enumerate(evals):
        r = {"iteration": i, "rewards": {k: 0.0 for k in rewards}, "eval": e or {}}
        if i == 0:
            r["eval_before"] = before
        out.append(r)
    return out


# The monet-cat collapse, as measured: held-out 6% -> 35% at iteration 4 -> 8% at 12; toy CLIP 54.6 -> 63 -> 38.8.
COLLAPSE = _records(
    [None, None, None, {"reward": 63.0, "clip": 63.0, "cat_in_monet": 0.35},
     None, None, None, {"reward": 50.0, "clip": 50.0, "cat_in_monet": 0.20},
     None, None, None, {"reward": 38.8, "clip": 38.8, "cat_in_monet": 0.08}],
    before={"reward": 54.6, "clip": 54.6, "cat_in_monet": 0.0625})

# The text demo gamed at 10 iterations: VADER 0.04 -> 0.98, distinct-2 0.88 -> 0.37, the MiniLM judge still rising.
GAMED_TEXT = _records(
    [{"reward": 0.5, "vader": 0.5, "minilm_sentiment": 0.3, "perplexity": 14.0, "distinct-2": 0.80},
     {"reward": 0.98, "vader": 0.98, "minilm_sentiment": 0.6, "perplexity": 30.0, "distinct-2": 0.37}],
    rewards=("vader",),
    before={"reward": 0.04, "vader": 0.04, "minilm_sentiment": 0.04, "perplexity": 13.8, "distinct-2": 0.88})

HEALTHY = _records(
    [{"reward": 58.0, "clip": 58.0, "cat_in_monet": 0.15}, {"reward": 61.0, "clip": 61.0, "cat_in_monet": 0.25},
     {"reward": 62.5, "clip": 62.5, "cat_in_monet": 0.24}],
    before={"reward": 54.6, "clip": 54.6, "cat_in_monet": 0.0625})


def test_collapse_is_flagged_on_every_metric_that_gave_back_its_gain():
    flags = find(COLLAPSE)
    assert sorted((f.kind, f.metric) for f in flags) == [("collapse", "cat_in_monet"), ("collapse", "clip"),
                                                          ("collapse", "reward")]
    held_out = next(f for f in flags if f.metric == "cat_in_monet")
    assert "peaked at 0.35 at iteration 4" in held_out.message and "iteration 12" in held_out.message


def test_gamed_text_is_flagged_for_diversity_and_perplexity_not_for_the_judge_that_rose():
    kinds = sorted((f.kind, f.metric) for f in find(GAMED_TEXT))
    assert kinds == [("diversity", "distinct-2"), ("perplexity", "perplexity")]


def test_a_judge_falling_while_the_trained_reward_rises_is_flagged():
    records = _records([{"reward": 70.0, "clip": 70.0, "cat_in_monet": 0.05}],
                       before={"reward": 54.6, "clip": 54.6, "cat_in_monet": 0.0625})
    (flag,) = find(records)
    assert (flag.kind, flag.metric) == ("judge", "cat_in_monet")
    assert find(records, ReportConfig(judge_drop=0.5)) == []  # within a looser threshold


def test_a_healthy_run_raises_no_flag():
    assert find(HEALTHY) == []


@pytest.mark.parametrize("records", [[], _records([{"reward": 1.0}], before=None)])
def test_runs_without_a_base_evaluation_raise_no_flag(records):
    assert find(records) == []


def test_collapse_is_for_rewards_and_judges_not_the_backend_metrics():
    # the text demo run on to 10 iterations: unique-2 went 857 -> 860 -> 300 and perplexity 13.8 -> 6.2 -> 9.6;
    # the diversity rule says what happened, a "collapse" of 18667% of a 3-bigram gain would not
    evals = [{"vader": 0.04, "unique-2": 857, "perplexity": 13.8}, {"vader": 0.3, "unique-2": 860, "perplexity": 6.2},
             {"vader": 0.98, "unique-2": 300, "perplexity": 9.6}]
    records = [{"iteration": i, "rewards": {"vader": e["vader"]}, "eval": e} for i, e in enumerate(evals[1:])]
    records[0]["eval_before"] = evals[0]
    flags = find(records)
    assert [(f.kind, f.metric) for f in flags] == [("diversity", "unique-2")]
