"""Config: presets load, flags override, unknown keys and bad values are errors naming the fix."""

from pathlib import Path

import pytest

from clip.config import Config, config_from_dict, load_config, valid_keys
from pipeline.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_default_yaml_equals_dataclass_defaults():
    assert load_config(CONFIGS / "default.yaml") == Config()


@pytest.mark.parametrize("name", ["default.yaml", "demo.yaml", "coco-karpathy.yaml"])
def test_presets_load(name):
    cfg = load_config(CONFIGS / name)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_overrides_beat_file_and_are_coerced():
    cfg = load_config(CONFIGS / "demo.yaml", {"optim.lr": "1e-2", "train.steps": 7, "train.compile": "true"})
    assert cfg.optim.lr == pytest.approx(1e-2)
    assert cfg.train.steps == 7
    assert cfg.train.compile is True
    assert cfg.model.image_model == "resnet18"  # from the file


def test_none_override_keeps_file_value():
    from_file = load_config(CONFIGS / "demo.yaml").train.steps
    assert from_file != Config().train.steps
    assert load_config(CONFIGS / "demo.yaml", {"train.steps": None}).train.steps == from_file


def test_unknown_key_lists_valid_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(UserError) as err:
        load_config(bad)
    assert "optim.learning_rate" in str(err.value)
    assert "optim.lr" in str(err.value)


def test_unknown_section(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer:\n  lr: 0.1\n")
    with pytest.raises(UserError, match="valid sections"):
        load_config(bad)


@pytest.mark.parametrize(
    "override",
    [{"model.image_model": "vit"}, {"train.batch_size": 1}, {"optim.lr": -1}, {"train.epochs": 0},
     {"data.loader": "ffcv"}, {"train.steps": "many"}, {"data.eval_shards": "x"}],
)
def test_validation(override):
    with pytest.raises(UserError):
        load_config(None, override)


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="configs/"):
        load_config(tmp_path / "none.yaml")


def test_valid_keys_cover_sections():
    keys = valid_keys()
    assert "model.embed_dim" in keys and "train.batch_size" in keys and len(keys) == len(set(keys))
