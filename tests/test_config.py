import pytest

from raft_diffusion.config import RunConfig, apply_override, config_to_yaml, field_help, load_config
from raft_diffusion.errors import UserError

from .conftest import TEXT_CONFIG, TINY_CONFIG, deep_update, write_yaml


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
