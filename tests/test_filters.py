"""Discard filters (`filters:`): candidates rejected before scoring are dropped, never selected or
trained on, and counted in metrics.jsonl and marked in samples.jsonl."""

import json
import re
from pathlib import Path

import pytest
import torch

from raft_diffusion.cli import main
from raft_diffusion.config import RunConfig, config_to_yaml, field_help, migrate_saved_config
from raft_diffusion.errors import RunFailed, UserError
from raft_diffusion.filters import FilterSet, blank_image, build_filter, length, regex

from .conftest import TEXT_CONFIG, TINY_CONFIG, deep_update, one_error_line, write_yaml


def _spec(name, options=None, label=None):
    from raft_diffusion.config import FilterSpec

    return FilterSpec(name=name, options=options or {}, label=label)


# --- each built-in, alone -----------------------------------------------------------------------


def test_regex_rejects_what_matches_and_keeps_the_rest():
    texts = ["a fine review", "### ### ###", "one # only", "great####"]
    assert regex("#{3,}")(texts, [""] * 4) == [True, False, True, False]
    assert regex("#{3,}", action="keep")(texts, [""] * 4) == [False, True, False, True]
    assert regex("FINE", ignore_case=True)(texts, [""] * 4) == [False, True, True, True]


def test_length_counts_characters_both_ends_included():
    texts = ["", "a", "abcd", "abcde"]
    assert length(min=1, max=4)(texts, [""] * 4) == [False, True, True, False]
    assert length()(texts, [""] * 4) == [True] * 4


def test_blank_image_rejects_blank_and_single_colour_images_only():
    images = torch.zeros(4, 3, 8, 8)
    images[1] = 1.0  # white
    images[2, 0] = 1.0  # pure red: the channels differ, each is flat
    images[3] = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert blank_image()(images, [""] * 4) == [False, False, False, True]
    assert blank_image(min_std=0.0)(images, [""] * 4) == [True] * 4


def test_a_filter_set_names_the_first_filter_that_rejected_each_sample():
    filters = FilterSet([_spec("regex", {"pattern": "#"}, label="hashes"), _spec("length", {"max": 3}),
                         _spec("python:tests.filters_for_tests:every_other")])
    reasons = filters(["ok", "#", "toolong", "ab", "cd"], [""] * 5)
    # every_other sees only the two the first two kept ("ok", "ab", "cd"): keeps "ok" and "cd"
    assert reasons == [None, "hashes", "length", "python:tests.filters_for_tests:every_other", None]
    assert filters.counts(reasons) == {"hashes": 1, "length": 1, "python:tests.filters_for_tests:every_other": 1}


def test_a_user_filter_that_returns_the_wrong_count_stops_the_run():
    filters = FilterSet([_spec("python:tests.filters_for_tests:one_too_few")])
    with pytest.raises(RunFailed, match="returned 2 values for 3 samples"):
        filters(["a", "b", "c"], [""] * 3)


@pytest.mark.parametrize("name, options, field", [
    ("regex", {"pattern": "(unclosed"}, "config filters.0.options.pattern"),
    ("regex", {"pattern": "#", "colour": 1}, "config filters.0.options"),
    ("regex", {}, "config filters.0.options.pattern"),
    ("regex", {"pattern": 3}, "config filters.0.options.pattern"),
    ("regex", {"pattern": "#", "action": "drop"}, "config filters.0.options.action"),
    ("length", {"min": "one"}, "config filters.0.options.min"),
    ("length", {"min": 5, "max": 2}, "config filters.0.options.max"),
    ("blank_image", {"min_std": "low"}, "config filters.0.options.min_std"),
    ("nope", {}, "config filters.0.name"),
    ("python:tests.filters_for_tests:missing", {}, "config filters.0.name"),
])
def test_a_bad_filter_is_a_user_error_naming_its_field(name, options, field):
    with pytest.raises(UserError) as error:
        build_filter(name, options, "config filters.0")
    assert error.value.field == field


# --- the config ---------------------------------------------------------------------------------


def test_filters_default_to_none_and_show_in_config_help():
    config = RunConfig.model_validate(TINY_CONFIG)
    assert config.filters == []
    rows = {name: default for name, default, _ in field_help()}
    assert rows["filters"] == "[]"
    text = RunConfig.model_validate(deep_update(TEXT_CONFIG, {"filters": [{"name": "regex", "label": "hashes",
                                                                           "options": {"pattern": "#{3,}"}}]}))
    assert text.filters[0].label == "hashes"


def test_a_run_saved_before_filters_existed_resumes_against_today_s_default():
    import yaml

    saved = yaml.safe_load(config_to_yaml(RunConfig.model_validate(TINY_CONFIG)))
    del saved["filters"]
    assert migrate_saved_config(saved)["filters"] == []


# --- runs -----------------------------------------------------------------------------------------


def _rows(run: Path, it: int) -> list[dict]:
    return [json.loads(line) for line in (run / f"samples/iter_{it:04d}/samples.jsonl").read_text().splitlines()]


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


PATTERN = "ti"  # some of the tiny LLaMA's random texts (all three of one prompt in iteration 1), not all


def test_a_text_run_never_selects_what_a_regex_filter_rejects(tmp_path, tiny_llama, capfd):
    cfg = deep_update(TEXT_CONFIG, {"model": {"path": str(tiny_llama)}, "eval": {"every": 0},
                                    "filters": [{"name": "regex", "label": "ti",
                                                 "options": {"pattern": PATTERN, "action": "reject"}}]})
    run = tmp_path / "run"
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", cfg)), "--output-dir", str(run)]) == 0
    out = capfd.readouterr().out
    metrics = _metrics(run)
    total = 0
    for it, record in enumerate(metrics):
        rows = _rows(run, it)
        rejected = [r for r in rows if re.search(PATTERN, r["text"])]
        assert all(r["filtered"] == "ti" and not r["selected"] and r["reward"] is None
                   and all(v is None for v in r["scores"].values()) for r in rejected)
        assert all(r["filtered"] is None and r["reward"] is not None for r in rows if r not in rejected)
        assert record["filtered"] == {"ti": len(rejected)} and record["n_filtered"] == len(rejected)
        assert record["n_dropped"] == len(rejected) and record["n_selected"] == sum(r["selected"] for r in rows)
        total += len(rejected)
    assert total > 0, "the pattern rejected nothing: pick one the tiny model's texts match"
    # Iteration 1's second prompt lost all three candidates: it contributes nothing, as when its rewards all fail.
    assert [r["filtered"] for r in _rows(run, 0)[3:]] == ["ti"] * 3 and metrics[0]["n_selected"] == 1
    assert "filtered" in out


def test_an_image_run_with_blank_image_and_a_python_filter_and_its_exact_resume(tmp_path):
    cfg = deep_update(TINY_CONFIG, {"eval": {"every": 0},
                                    "filters": [{"name": "blank_image"},
                                                {"name": "python:tests.filters_for_tests:every_other",
                                                 "label": "odd"}]})
    config = write_yaml(tmp_path / "c.yaml", cfg)
    straight = tmp_path / "straight"
    assert main(["train", str(config), "--output-dir", str(straight)]) == 0
    for it, record in enumerate(_metrics(straight)):
        rows = _rows(straight, it)
        assert [r["filtered"] for r in rows] == [None if i % 2 == 0 else "odd" for i in range(len(rows))]
        assert not any(r["selected"] for r in rows[1::2])
        assert record["filtered"] == {"blank_image": 0, "odd": 3} and record["n_selected"] == 2

    # One iteration, then resumed to two: the same records and the same adapter as straight through.
    resumed = tmp_path / "resumed"
    assert main(["train", str(config), "--output-dir", str(resumed), "--set", "raft.iterations=1"]) == 0
    assert main(["train", str(config), "--output-dir", str(resumed), "--resume"]) == 0
    assert _metrics(resumed) == _metrics(straight)
    assert (resumed / "final/pytorch_lora_weights.safetensors").read_bytes() == \
        (straight / "final/pytorch_lora_weights.safetensors").read_bytes()


def test_a_run_whose_filters_reject_every_candidate_fails_and_says_so(tmp_path, capfd):
    cfg = deep_update(TINY_CONFIG, {"eval": {"every": 0}, "raft": {"iterations": 1},
                                    "filters": [{"name": "blank_image", "options": {"min_std": 1.0}}]})
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", cfg)), "--output-dir", str(tmp_path / "run")]) != 0
    assert "the filters rejected every candidate (blank_image: 6)" in capfd.readouterr().err


# --- mistakes: one line, exit 2, nothing written ----------------------------------------------------


MISTAKES = {
    "text_filter_on_images": ("diffusion", [{"name": "regex", "options": {"pattern": "#"}}], "filters.0.name"),
    "image_filter_on_texts": ("text", [{"name": "blank_image"}], "filters.0.name"),
    "invalid_regex": ("diffusion-text", [{"name": "regex", "options": {"pattern": "[oops"}}], "filters.0.options.pattern"),
    "unknown_filter": ("diffusion", [{"name": "no_such_filter"}], "filters.0.name"),
    "bad_option": ("diffusion", [{"name": "blank_image", "options": {"min_std": "low"}}], "filters.0.options.min_std"),
    "unknown_option": ("diffusion", [{"name": "blank_image", "options": {"threshold": 1}}], "filters.0.options"),
    "unknown_key": ("diffusion", [{"name": "blank_image", "weight": 2}], "filters.0.weight"),
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_a_filter_mistake_exits_2_with_one_line_and_writes_nothing(tmp_path, tiny_llama, capfd, case):
    backend, filters, field = MISTAKES[case]
    base = deep_update(TEXT_CONFIG, {"model": {"path": str(tiny_llama)}}) if backend.endswith("text") else TINY_CONFIG
    path = write_yaml(tmp_path / "c.yaml", deep_update(base, {"filters": filters}))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["train", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    line = one_error_line(capfd.readouterr().err)
    assert line.startswith(f"error: config {field}"), line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
