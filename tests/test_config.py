from pathlib import Path

import pytest
import yaml

from raft_diffusion.config import (DiffusionGenerationConfig, DiffusionRunConfig, GenerationConfig, RunConfig,
                                   TextRunConfig, apply_override, config_to_yaml, field_help, load_config,
                                   migrate_saved_config, read_saved_config)
from raft_diffusion.errors import UserError

from .conftest import TEXT_CONFIG, TINY_CONFIG, deep_update, one_error_line, run_in_process, write_yaml

DATA = Path(__file__).parent / "data"


def test_set_overrides_coerce_types_and_reach_nested_fields(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", TINY_CONFIG)
    cfg = load_config(path, ["raft.seed=7", "training.learning_rate=2e-4", "rewards.0.weight=0.5",
                             "lora.target_modules=[to_q, to_v]", "training.max_grad_norm=null"])
    assert cfg.raft.seed == 7
    assert cfg.training.learning_rate == pytest.approx(2e-4)
    assert cfg.rewards[0].weight == 0.5
    assert cfg.lora.target_modules == ["to_q", "to_v"]
    assert cfg.training.max_grad_norm is None


def test_set_reaches_any_key_of_a_rewards_free_options_dict(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", TINY_CONFIG)
    cfg = load_config(path, ["rewards.0.options.quality=50", "rewards.0.options.extra.deep=x"])
    assert cfg.rewards[0].options == {"quality": 50, "extra": {"deep": "x"}}
    with pytest.raises(UserError, match="holds a value"):
        load_config(path, ["rewards.0.options.quality=50", "rewards.0.options.quality.x=1"])


@pytest.mark.parametrize("backend", ["diffusion", "text"])
def test_a_field_of_the_other_backend_is_refused_but_a_runs_own_config_yaml_loads(tmp_path, backend):
    data = TINY_CONFIG if backend == "diffusion" else TEXT_CONFIG
    other = {"generation": {"temperature": 0.5}} if backend == "diffusion" else {"generation": {"steps": 5}}
    with pytest.raises(UserError, match="applies only to backend"):
        load_config(write_yaml(tmp_path / "other.yaml", deep_update(data, other)))
    # A run's config.yaml holds every field, defaults of the other backend included: it must load.
    cfg = load_config(write_yaml(tmp_path / "c.yaml", data))
    (tmp_path / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_a_byte_order_mark_does_not_start_the_first_prompt(tmp_path):
    from raft_diffusion.prompts import load_prompts

    (tmp_path / "p.txt").write_bytes("\ufeffa cat in monet style\na dog\n".encode("utf-8"))
    assert load_prompts(str(tmp_path / "p.txt"), "prompts.train") == ["a cat in monet style", "a dog"]


def test_unknown_set_key_names_the_key_and_the_allowed_ones():
    data = dict(TINY_CONFIG)
    with pytest.raises(UserError) as e:
        apply_override(data, "training.learnin_rate=1")
    assert "learnin_rate" in str(e.value) and "learning_rate" in str(e.value)


def test_unknown_yaml_key_is_rejected_with_the_field_path(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {**TINY_CONFIG, "generation": {"resolutoin": 64}})
    with pytest.raises(UserError) as e:
        load_config(path)
    assert "generation.resolutoin" in str(e.value) and "unknown key" in str(e.value)


def test_every_field_has_a_description():
    rows = field_help()
    assert len(rows) > 30
    assert [name for name, _, text in rows if not text] == []


def test_defaults_match_design():
    cfg = RunConfig.model_validate({"prompts": {"train": ["x"]}, "rewards": [{"name": "clip"}]})
    assert cfg.generation.resolution == 256
    assert cfg.selection.strategy == "per_prompt" and cfg.selection.top == 1
    assert cfg.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]


# --- a config shaped like the run: one per backend ------------------------------------------------


def test_model_validate_returns_the_config_of_the_backend():
    diffusion = RunConfig.model_validate(TINY_CONFIG)
    text = RunConfig.model_validate(TEXT_CONFIG)
    default = RunConfig.model_validate({"prompts": {"train": ["x"]}, "rewards": [{"name": "clip"}]})
    assert type(diffusion) is DiffusionRunConfig and type(default) is DiffusionRunConfig
    assert type(text) is TextRunConfig
    assert isinstance(diffusion, RunConfig) and isinstance(text, RunConfig)
    # each holds its own backend's fields only
    assert diffusion.generation.resolution == 64 and not hasattr(diffusion.generation, "temperature")
    assert not hasattr(diffusion.model, "gguf_file") and diffusion.training.negative_aware.beta == 1.0
    assert text.generation.max_new_tokens == (4, 8) and not hasattr(text.generation, "steps")
    assert not hasattr(text.training, "caption_dropout") and not hasattr(text.training, "negative_aware")
    assert text.model.trust_remote_code is False
    # a config's own YAML carries no field of the other backend
    assert "temperature" not in yaml.safe_load(config_to_yaml(diffusion))["generation"]
    assert "resolution" not in yaml.safe_load(config_to_yaml(text))["generation"]
    # the image generation config keeps its old name
    assert GenerationConfig is DiffusionGenerationConfig


def test_an_unknown_backend_names_both(tmp_path):
    with pytest.raises(UserError, match="config backend: Input should be 'diffusion' or 'text', got 'audio'"):
        load_config(write_yaml(tmp_path / "c.yaml", deep_update(TINY_CONFIG, {"backend": "audio"})))


@pytest.mark.parametrize("backend, other, field, owner", [
    ("diffusion", {"generation": {"temperature": 0.5}}, "generation.temperature", "text"),
    ("diffusion", {"generation": {"top_p": 0.9}}, "generation.top_p", "text"),
    ("diffusion", {"generation": {"max_new_tokens": 12}}, "generation.max_new_tokens", "text"),
    ("diffusion", {"model": {"gguf_file": "model.gguf"}}, "model.gguf_file", "text"),
    ("diffusion", {"model": {"trust_remote_code": True}}, "model.trust_remote_code", "text"),
    ("text", {"generation": {"steps": 5}}, "generation.steps", "diffusion"),
    ("text", {"generation": {"resolution": 512}}, "generation.resolution", "diffusion"),
    ("text", {"generation": {"negative_prompt": "blurry"}}, "generation.negative_prompt", "diffusion"),
    ("text", {"training": {"caption_dropout": 0.1}}, "training.caption_dropout", "diffusion"),
    ("text", {"training": {"negative_aware": {"beta": 0.5}}}, "training.negative_aware", "diffusion"),
])
def test_a_config_refuses_a_field_of_the_other_backend(tmp_path, backend, other, field, owner):
    data = deep_update(TINY_CONFIG if backend == "diffusion" else TEXT_CONFIG, other)
    expected = (f"config {field}: applies only to backend {owner}, and this run's backend is {backend} "
                f"(remove it, or set backend: {owner})")
    with pytest.raises(UserError) as e:
        load_config(write_yaml(tmp_path / "c.yaml", data))
    assert str(e.value) == expected
    with pytest.raises(UserError) as e:  # the same through --set
        key, value = field, yaml.safe_dump(other[field.split(".")[0]][field.split(".")[1]],
                                           default_flow_style=True).strip().removesuffix("...").strip()
        load_config(write_yaml(tmp_path / "own.yaml", TINY_CONFIG if backend == "diffusion" else TEXT_CONFIG),
                    [f"{key}={value}"])
    assert str(e.value) == expected


@pytest.mark.parametrize("backend, field, owner", [("diffusion", "temperature", "text"),
                                                   ("text", "guidance_scale", "diffusion")])
def test_an_expert_refuses_a_setting_of_the_other_backend(tmp_path, backend, field, owner):
    data = deep_update(TINY_CONFIG if backend == "diffusion" else TEXT_CONFIG,
                       {"generation": {"experts": [{"model": "builtin:tiny-sd", "per_prompt": 1, field: 0.5}]}})
    with pytest.raises(UserError) as e:
        load_config(write_yaml(tmp_path / "c.yaml", data))
    assert str(e.value) == (f"config generation.experts.0.{field}: applies only to backend {owner}, and this run's "
                            f"backend is {backend} (remove it)")


def test_a_field_of_the_other_backend_at_its_default_is_dropped(tmp_path):
    data = deep_update(TINY_CONFIG, {"generation": {"temperature": 1.0, "max_new_tokens": 48},
                                     "model": {"gguf_file": None, "trust_remote_code": False}})
    assert load_config(write_yaml(tmp_path / "c.yaml", data)) == load_config(write_yaml(tmp_path / "t.yaml",
                                                                                         TINY_CONFIG))


# --- each objective's knobs in its own block -------------------------------------------------------


@pytest.mark.parametrize("backend, old, value, line", [
    ("diffusion", "beta", 0.5, "config training.beta: moved to training.reward_weighted.beta "
                               "(write it under training as reward_weighted: {beta: 0.5})"),
    ("text", "beta", 0.5, "config training.beta: moved to training.reward_weighted.beta "
                          "(write it under training as reward_weighted: {beta: 0.5})"),
    ("diffusion", "nft_beta", 0.3, "config training.nft_beta: moved to training.negative_aware.beta "
                                   "(write it under training as negative_aware: {beta: 0.3})"),
    ("diffusion", "nft_advantage_clip", 1.5, "config training.nft_advantage_clip: moved to "
                                             "training.negative_aware.advantage_clip "
                                             "(write it under training as negative_aware: {advantage_clip: 1.5})"),
    ("text", "nft_beta", 1.0, "config training.nft_beta: moved to training.negative_aware.beta "
                              "(remove it: training.negative_aware applies only to backend diffusion)"),
])
def test_an_old_objective_name_is_one_line_naming_its_new_place(tmp_path, capfd, backend, old, value, line):
    own = TINY_CONFIG if backend == "diffusion" else TEXT_CONFIG
    path = write_yaml(tmp_path / "c.yaml", deep_update(own, {"training": {old: value}}))
    with pytest.raises(UserError) as e:
        load_config(path)
    assert str(e.value) == line
    with pytest.raises(UserError) as e:  # --set names it the same way
        load_config(write_yaml(tmp_path / "own.yaml", own), [f"training.{old}={value}"])
    assert str(e.value) == line
    result = run_in_process(capfd, "train", str(path), "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2 and one_error_line(result.stderr) == f"error: {line}"
    assert not (tmp_path / "run").exists()


def test_the_objectives_knobs_are_read_from_their_blocks(tmp_path):
    cfg = load_config(write_yaml(tmp_path / "c.yaml", deep_update(TINY_CONFIG, {"training": {
        "objective": "negative_aware", "ema_decay": 0.5, "reward_weighted": {"beta": 0.25},
        "negative_aware": {"beta": 0.3, "advantage_clip": 1.5}}})))
    assert cfg.training.reward_weighted.beta == 0.25
    assert (cfg.training.negative_aware.beta, cfg.training.negative_aware.advantage_clip) == (0.3, 1.5)
    cfg = load_config(write_yaml(tmp_path / "s.yaml", TINY_CONFIG), ["training.negative_aware.beta=0.7"])
    assert cfg.training.negative_aware.beta == 0.7
    with pytest.raises(UserError, match="config training.negative_aware.beta: Input should be greater than 0"):
        load_config(write_yaml(tmp_path / "z.yaml", TINY_CONFIG), ["training.negative_aware.beta=0"])


# --- a run's config.yaml saved before the split ------------------------------------------------------

# The configs tests/data/saved-config-*-v1.yaml were made from, by the code before the split
# (config_to_yaml: every field of both backends, defaults included, the objectives' flat names).
OLD_RUNS = {
    "diffusion": {"backend": "diffusion", "prompts": {"train": ["a cat"]}, "rewards": [{"name": "jpeg_compressibility"}],
                  "generation": {"experts": [{"model": "builtin:tiny-sd", "per_prompt": 1, "steps": 4}]}},
    "text": {"backend": "text", "model": {"path": "builtin:tiny-llama"}, "prompts": {"train": ["a cat"]},
             "rewards": [{"name": "text_length"}],
             "generation": {"experts": [{"model": "builtin:tiny-llama", "per_prompt": 1, "temperature": 0.7}]}},
}


@pytest.mark.parametrize("backend", ["diffusion", "text"])
def test_a_saved_config_yaml_from_before_the_split_loads_and_resumes(tmp_path, backend):
    from raft_diffusion.run_dir import RunDirectory

    saved = DATA / f"saved-config-{backend}-v1.yaml"
    old = yaml.safe_load(saved.read_text())
    assert "temperature" in old["generation"] and "nft_beta" in old["training"]  # the old layout indeed
    migrated = read_saved_config(saved)
    cfg = RunConfig.model_validate(migrated)
    assert type(cfg) is (DiffusionRunConfig if backend == "diffusion" else TextRunConfig)
    assert cfg.training.reward_weighted.beta == 1.0
    assert cfg == RunConfig.model_validate(OLD_RUNS[backend])
    # --resume compares the run's config.yaml with the resolved config of today: the same
    assert yaml.safe_load(config_to_yaml(cfg)) == migrated
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(saved.read_text())
    directory = RunDirectory(run)
    now = RunConfig.model_validate(OLD_RUNS[backend])
    assert directory.claim(yaml.safe_load(config_to_yaml(now)), resume=True, overwrite=False) == "resume"
    directory.abandon()
    # a changed setting is still told apart
    changed = now.model_copy(update={"raft": now.raft.model_copy(update={"seed": 1})})
    with pytest.raises(UserError, match="config raft.seed: differs from the run's"):
        RunDirectory(run).claim(yaml.safe_load(config_to_yaml(changed)), resume=True, overwrite=False)


def test_a_saved_config_keeps_its_objectives_knobs_in_their_new_place():
    old = yaml.safe_load((DATA / "saved-config-diffusion-v1.yaml").read_text())
    old["training"].update(objective="negative_aware", ema_decay=0.5, nft_beta=0.3, nft_advantage_clip=1.5, beta=0.25)
    cfg = RunConfig.model_validate(migrate_saved_config(old))
    assert cfg.training.negative_aware.beta == 0.3 and cfg.training.negative_aware.advantage_clip == 1.5
    assert cfg.training.reward_weighted.beta == 0.25
    assert "nft_beta" in old["training"]  # the dict read is not changed
    text = yaml.safe_load((DATA / "saved-config-text-v1.yaml").read_text())
    text["training"]["nft_beta"] = 0.5  # never read by a text run: dropped
    assert RunConfig.model_validate(migrate_saved_config(text)) == RunConfig.model_validate(OLD_RUNS["text"])


def test_field_help_lists_both_backends_and_the_objectives_blocks():
    rows = {name: text for name, _, text in field_help()}
    for name in ("generation.resolution", "generation.temperature", "generation.max_new_tokens", "model.gguf_file",
                 "training.caption_dropout", "training.reward_weighted.beta", "training.negative_aware.beta",
                 "training.negative_aware.advantage_clip", "generation.experts[].steps",
                 "generation.experts[].temperature"):
        assert name in rows and rows[name], name
    assert not {"training.beta", "training.nft_beta", "training.nft_advantage_clip"} & set(rows)
    assert rows["generation.temperature"].startswith("text:") and rows["generation.steps"].startswith("diffusion:")


def test_a_bad_value_names_where_it_came_from_the_set_or_the_file(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", deep_update(TINY_CONFIG, {"training": {"epochs": 0}}))
    with pytest.raises(UserError) as from_file:
        load_config(path)
    assert f"fix the value in {path}" in str(from_file.value)
    good = write_yaml(tmp_path / "good.yaml", TINY_CONFIG)
    for assignment, field in (("training.replay=-1", "training.replay"),
                              ("rewards=[{name: clip, weight: abc}]", "rewards")):
        with pytest.raises(UserError) as from_set:
            load_config(good, ["raft.seed=3", assignment])
        assert f"--set {field}=... of the command line" in str(from_set.value)
        assert str(good) not in str(from_set.value)
    # a --set that is fine does not take the blame for the file's bad value
    with pytest.raises(UserError) as mixed:
        load_config(path, ["raft.seed=3"])
    assert f"fix the value in {path}" in str(mixed.value)
