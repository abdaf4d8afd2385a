"""Config: presets load, flags override, unknown keys and bad values are errors naming the fix."""

from pathlib import Path

import numpy as np
import pytest
import torch

import clip
from clip.config import Config, config_from_dict, load_config, parse_assignments, valid_keys
from clip.presets import preset_names
from pipeline.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_presets_are_the_files_of_configs_through_the_link():
    """clip/configs is a link to configs/, the only copy (a wheel gets files: tests/test_package.py)."""
    link = Path(clip.__file__).parent / "configs"
    assert link.is_symlink() and link.resolve() == CONFIGS.resolve()
    assert preset_names() == sorted(p.stem for p in CONFIGS.glob("*.yaml")) == ["coco-karpathy", "demo"]


@pytest.mark.parametrize("name", ["demo", "coco-karpathy"])
def test_presets_load(name):
    cfg = load_config(name)
    assert cfg == load_config(CONFIGS / f"{name}.yaml") == load_config(f"{CONFIGS}/{name}.yaml") != Config()
    assert config_from_dict(cfg.to_dict()) == cfg


def test_the_coco_preset_picks_the_loader_of_the_machine_it_meets():
    from pipeline.loaders import resolve_kind

    # The real recipe runs on GPUs and on a CPU alike: DALI on CUDA, the torch loader on a CPU (as --loader auto).
    assert load_config("coco-karpathy").data.loader == "auto"
    assert resolve_kind("auto", torch.device("cpu")) == "torch"


def test_a_name_with_a_folder_or_an_extension_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("demo").write_text("train:\n  seed: 3\n")
    assert load_config("./demo").train.seed == 3  # the file, not the preset
    assert load_config("demo").train.seed == 0  # the preset
    with pytest.raises(UserError, match="config file demo.yaml not found.*coco-karpathy, demo"):
        load_config("demo.yaml")


def test_unknown_preset_lists_the_presets():
    with pytest.raises(UserError, match="no preset 'dmo': the presets are coco-karpathy, demo"):
        load_config("dmo")


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


def test_assignments_are_strings_coerced_by_field_type():
    pairs = parse_assignments(["optim.beta2=0.95", "train.compile=yes", "data.shards=a=b", " train.seed =4",
                               "train.seed=5"])
    assert pairs == {"optim.beta2": "0.95", "train.compile": "yes", "data.shards": "a=b", "train.seed": "5"}
    cfg = load_config("demo", pairs)
    assert (cfg.optim.beta2, cfg.train.compile, cfg.data.shards, cfg.train.seed) == (0.95, True, "a=b", 5)


@pytest.mark.parametrize("pair", ["optim.beta2", "=0.95", "", " =1"])
def test_malformed_assignment_says_the_form(pair):
    with pytest.raises(UserError, match="write --set section.key=value, e.g. --set optim.beta2=0.95"):
        parse_assignments([pair])


def test_unknown_assigned_key_lists_valid_keys():
    with pytest.raises(UserError, match="unknown config key.*optim.betaa; valid keys: .*optim.beta2"):
        load_config(None, parse_assignments(["optim.betaa=0.9"]))


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="configs/"):
        load_config(tmp_path / "none.yaml")


def test_valid_keys_cover_sections():
    keys = valid_keys()
    assert "model.embed_dim" in keys and "train.batch_size" in keys and len(keys) == len(set(keys))


def test_malformed_yaml_names_the_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  image_model: resnet18\n  embed_dim: [1, 2\ntrain:\n  steps: 3\n")
    with pytest.raises(UserError, match=r"bad.yaml is not valid YAML at line 4, column 6: expected .,. or .\].") as err:
        load_config(bad)
    assert "Traceback" not in str(err.value) and len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("override, message", [
    ({"train.seed": -1}, r"train.seed must be in \[0, 281474976710655\] \(2\*\*48 - 1\)"),
    ({"train.seed": 2**48}, r"train.seed must be in \[0, 281474976710655\]"),
    ({"train.seed": 2**70}, r"train.seed must be in \[0, 281474976710655\]"),
    ({"model.init_logit_bias": "nan"}, "model.init_logit_bias must be a finite number, not nan"),
    ({"model.max_logit_scale": "inf"}, "model.max_logit_scale must be a finite number, not inf"),
    ({"optim.lr": "inf"}, "optim.lr must be a finite number, not inf"),
    ({"optim.grad_clip": "-inf"}, "optim.grad_clip must be a finite number, not -inf"),
    ({"data.crop_scale_min": "nan"}, "data.crop_scale_min must be a finite number, not nan"),
])
def test_seeds_the_generators_refuse_and_numbers_that_are_not_finite_are_refused(override, message):
    with pytest.raises(UserError, match=f"invalid config: {message}") as err:
        load_config(None, override)
    assert len(str(err.value).splitlines()) == 1


def test_the_largest_seed_seeds_every_generator_the_run_feeds_it_to():
    seed = load_config(None, {"train.seed": 2**48 - 1}).train.seed
    torch.manual_seed(seed)
    torch.Generator().manual_seed(seed * 65_536 + 65_535)  # a caption stream: seed x 65536 + rank
    np.random.default_rng([seed, 0, 0]).permutation(3)  # the loaders' orders and crops, the extra negatives
    assert load_config(None, {"train.seed": 0}).train.seed == 0
