import pytest

from raft_diffusion.config import RunConfig, apply_override, field_help, load_config
from raft_diffusion.errors import UserError

from .conftest import TINY_CONFIG, write_yaml


def test_set_overrides_coerce_types_and_reach_nested_fields(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", TINY_CONFIG)
    cfg = load_config(path, ["raft.seed=7", "training.learning_rate=2e-4", "rewards.0.weight=0.5",
                             "lora.target_modules=[to_q, to_v]", "training.max_grad_norm=null"])
    assert cfg.raft.seed == 7
    assert cfg.training.learning_rate == pytest.approx(2e-4)
    assert cfg.rewards[0].weight == 0.5
    assert cfg.lora.target_modules == ["to_q", "to_v"]
    assert cfg.training.max_grad_norm is None


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
