"""Config bombs: YAML read with limits (alias expansion, self-reference, depth, size, duplicate keys).

Each hostile config, `--set` or `--option` value is one line on stderr naming the field, exit 2, no
traceback, within seconds and without the memory a "billion laughs" would take; nothing is written.
"""

import time

import pytest
import yaml

from raft_diffusion.config import (MAX_ALIAS_VALUES, MAX_SET_KEY_PARTS, MAX_YAML_BYTES, MAX_YAML_DEPTH, YamlRefused,
                                   load_config, read_saved_config, read_yaml)
from raft_diffusion.errors import UserError

from .conftest import run_in_process

BASE = """backend: diffusion
model: {path: builtin:tiny-sd}
generation: {resolution: 64, steps: 1, samples_per_prompt: 2}
raft: {iterations: 1, prompts_per_iteration: 1}
eval: {every: 0}
output_dir: OUT
"""


def _laughs(levels: int = 9) -> str:
    """A flow list of anchored lists, each ten aliases of the one before: 10**levels strings expanded."""
    items = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    items += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


def _nested(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "list" else "{a: " * depth + "1" + "}" * depth


# case -> (the config's text after BASE, what the error line must name)
CONFIGS = {
    "laughs_in_prompts_train": (f"prompts: {{train: {_laughs()}}}\nrewards: [{{name: jpeg_compressibility}}]\n",
                                "config prompts.train"),
    "laughs_in_a_reward_label": ("prompts: {train: [a cat]}\n"
                                 f"rewards: [{{name: jpeg_compressibility, label: {_laughs()}}}]\n",
                                 "config rewards.0.label"),
    "laughs_in_block_style": ("prompts:\n  train:\n" + "".join(
        f"    - &b{i} [{', '.join([f'*b{i - 1}'] * 10) if i else 'x, x, x, x, x, x, x, x, x, x'}]\n" for i in range(9))
        + "rewards: [{name: jpeg_compressibility}]\n", "config prompts.train"),
    "self_referencing_anchor": ("prompts: {train: [a cat]}\n"
                                "rewards: [{name: jpeg_compressibility, options: &o {self: *o}}]\n",
                                "config rewards.0.options.self"),
    "self_referencing_list": ("prompts: {train: &p [a cat, *p]}\nrewards: [{name: jpeg_compressibility}]\n",
                              "config prompts.train.1"),
    "lists_nested_1000_deep": ("prompts: {train: [a cat]}\n"
                               f"rewards: [{{name: jpeg_compressibility, options: {{x: {_nested(1000, 'list')}}}}}]\n",
                               "config rewards.0.options.x"),
    "mappings_nested_5000_deep": ("prompts: {train: [a cat]}\n"
                                  f"rewards: [{{name: jpeg_compressibility, options: {_nested(5000, 'map')}}}]\n",
                                  "config rewards.0.options.a"),
    "duplicate_top_level_key": ("prompts: {train: [a cat]}\nrewards: [{name: jpeg_compressibility}]\n"
                                "raft: {iterations: 3}\n", "config raft"),
    "duplicate_nested_key": ("prompts: {train: [a cat]}\n"
                             "rewards: [{name: jpeg_compressibility, weight: 1.0, weight: -1.0}]\n",
                             "config rewards.0.weight"),
    "integer_of_5000_digits": ("prompts: {train: [a cat]}\nrewards: [{name: jpeg_compressibility}]\n"
                               f"checkpoint: {{keep_last: {'9' * 5000}}}\n", "config"),
}


def _refused(result, names: str, started: float) -> str:
    err = result.stderr
    lines = err.strip().splitlines()
    assert result.returncode == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"error: {names}"), err[-2000:]
    assert "Traceback" not in err and len(lines[0]) < 600, lines[0][:1000]
    assert time.monotonic() - started < 30  # refused while reading, not after expanding
    return lines[0]


@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_config_bomb_is_one_line_exit_2_and_writes_nothing(tmp_path, capfd, case):
    text, names = CONFIGS[case]
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(BASE.replace("OUT", str(out)) + text, encoding="utf-8")
    started = time.monotonic()
    line = _refused(run_in_process(capfd, "train", str(config)), names, started)
    assert str(config) in line  # the file is named
    assert not out.exists()
    if case.startswith("duplicate_top"):
        assert "duplicate key 'raft'" in line and "line 9" in line and "first at line 4" in line
    if case.startswith("duplicate_nested"):
        assert "duplicate key 'weight'" in line and "line 8" in line


def test_a_config_file_over_the_size_limit_is_refused_before_it_is_parsed(tmp_path, capfd):
    config = tmp_path / "c.yaml"
    prompts = "prompts: {train: [a cat]}\nrewards: [{name: jpeg_compressibility}]\n"
    config.write_text(BASE.replace("OUT", str(tmp_path / "run")) + prompts + "#" * MAX_YAML_BYTES, encoding="utf-8")
    line = _refused(run_in_process(capfd, "train", str(config)), "config", time.monotonic())
    assert f"more than the {MAX_YAML_BYTES // 2**20} MiB" in line
    assert not (tmp_path / "run").exists()


SET_VALUES = {
    "laughs": ("rewards.0.options.x=" + _laughs(), "YAML bomb"),
    "self_referencing_anchor": ("rewards.0.options.x=&o {self: *o}", "contains it"),
    "value_nested_3000_deep": ("rewards.0.options.x=" + _nested(3000, "list"), "nested more than"),
    "key_nested_3000_deep": ("rewards.0.options." + ".".join(["k"] * 3000) + "=1", "dotted parts"),
    "key_nested_1000_deep_with_a_deep_value": ("rewards.0.options." + ".".join(["k"] * 1000) + "="
                                                + _nested(1000, "map"), "dotted parts"),
    "duplicate_key_in_the_value": ("rewards.0.options={a: 1, a: 2}", "duplicate key 'a'"),
}


@pytest.mark.parametrize("case", list(SET_VALUES))
def test_a_set_bomb_is_one_line_exit_2_and_writes_nothing(tmp_path, capfd, case):
    assignment, words = SET_VALUES[case]
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(BASE.replace("OUT", str(out)) + "prompts: {train: [a cat]}\n"
                      "rewards: [{name: jpeg_compressibility}]\n", encoding="utf-8")
    started = time.monotonic()
    line = _refused(run_in_process(capfd, "train", str(config), "--set", assignment), "--set: ", started)
    assert words in line and "rewards.0.options" in line
    assert not out.exists()


def test_a_score_option_bomb_is_one_line_exit_2(tmp_path, capfd):
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    line = _refused(run_in_process(capfd, "score", "--reward", "jpeg_compressibility", "--option",
                                   "quality=" + _laughs(), str(image)), "--option: quality", time.monotonic())
    assert "YAML bomb" in line


@pytest.mark.parametrize("text, words", [
    (f"backend: diffusion\nprompts: {{train: {_laughs()}}}\n", "YAML bomb"),
    ("backend: diffusion\nbackend: text\n", "duplicate key 'backend'"),
    ("x: " + _nested(2000, "list") + "\n", "nested more than"),
])
def test_a_damaged_saved_config_is_a_user_error_naming_the_run(tmp_path, text, words):
    saved = tmp_path / "config.yaml"
    saved.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as info:
        read_saved_config(saved)
    assert info.value.field == "output_dir" and words in str(info.value) and str(saved) in str(info.value)


# --- what stays allowed --------------------------------------------------------------------------


def test_anchors_merges_and_nesting_within_the_limits_still_load(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(BASE.replace("OUT", str(tmp_path / "run")) +
                      "prompts: {train: &p [a cat, a dog], eval: *p}\n"
                      "rewards: [&r {name: jpeg_compressibility, weight: 0.5}]\n"
                      "training: &t {learning_rate: 1.0e-3, epochs: 1}\n"
                      "selection: {<<: {strategy: global, fraction: 0.5}, fraction: 0.25}\n", encoding="utf-8")
    cfg = load_config(config, ["rewards.0.options." + ".".join(["k"] * (MAX_SET_KEY_PARTS - 3))
                               + "=" + _nested(MAX_YAML_DEPTH - MAX_SET_KEY_PARTS, "list")])
    assert cfg.prompts.eval == ["a cat", "a dog"] and cfg.selection.fraction == 0.25
    assert cfg.selection.strategy == "global"
    from raft_diffusion.config import config_to_yaml

    # what a run saves from an accepted config reads back within the same limits (for --resume)
    assert read_yaml(config_to_yaml(cfg))["rewards"][0]["weight"] == 0.5


def test_the_limits_sit_where_they_say():
    assert read_yaml(_nested(MAX_YAML_DEPTH, "list")) is not None
    with pytest.raises(YamlRefused, match="nested more than"):
        read_yaml(_nested(MAX_YAML_DEPTH + 1, "list"))
    just_fits = "a: &a [" + ", ".join(["x"] * 999) + "]\nb: [" + ", ".join(["*a"] * (MAX_ALIAS_VALUES // 1000)) + "]\n"
    assert len(read_yaml(just_fits)["b"]) == MAX_ALIAS_VALUES // 1000
    with pytest.raises(YamlRefused, match="YAML bomb"):
        read_yaml(just_fits.replace("]\nb: [", "]\nb: [*a, "))
    with pytest.raises(YamlRefused, match="YAML bomb"):  # few values, but each a long text
        read_yaml("a: &a '" + "x" * 2**20 + "'\nb: [" + ", ".join(["*a"] * 9) + "]\n")
    with pytest.raises(yaml.YAMLError):  # plain syntax errors stay PyYAML's
        read_yaml("a: [unclosed")
