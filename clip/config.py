"""The one typed configuration of a training run.

Inputs: a YAML file (optional): a preset of `configs/` by name or any file by path (clip/presets.py), then
overrides {"section.key": value} (`clipcoco train --set section.key=value` and its named flags).
Output: a frozen `Config`, validated, which a run records as `config.yaml` and in every checkpoint.

    cfg = load_config("demo", {"optim.lr": 1e-3})          # or load_config(Path("my.yaml"), ...)

Sections: `model`, `data`, `optim`, `train`. The defaults live here only: a preset sets what differs from them.
An unknown section or key is an error that lists the valid ones, so a typo in a preset or a --set never
silently falls back to a default.
"""

import dataclasses
import math
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from clip.presets import read_config
from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.transforms import ImageTransform

LOSSES = ("infonce", "sigmoid")  # clip/loss.py implements each
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
# Each rank's caption stream is seeded with seed x 65536 + rank, which torch.manual_seed takes up to 2**64 - 1; numpy's
# generators (the loaders' permutations and crops, the extra negatives) take no negative seed.
SEED_LIMIT = 2**48


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(f"invalid config: {message}")


def _check_finite(section: str, values: object) -> None:
    # First: a NaN fails no check written as a range (init_logit_bias has none), and an inf passes "> 0".
    for f in dataclasses.fields(values):
        value = getattr(values, f.name)
        _check(not isinstance(value, float) or math.isfinite(value),
               f"{section}.{f.name} must be a finite number, not {value}")


@dataclass(frozen=True)
class ModelConfig:
    image_model: str = "resnet50"  # torchvision ResNet trunk: resnet18/34/50/101
    image_weights: str = "imagenet"  # imagenet (torchvision's weights enum) | none | path to a state dict
    embed_dim: int = 512  # size of the shared image-text space
    head: str = "linear"  # projection heads: linear | mlp (one hidden layer)
    init_temperature: float = 0.07  # CLIP's initial softmax temperature (logit scale 1/0.07)
    max_logit_scale: float = 100.0  # clamp on the learned logit scale, as in CLIP
    loss: str = "infonce"  # infonce (CLIP's softmax) | sigmoid (SigLIP's pairwise loss, with a learned bias)
    init_logit_bias: float = -10.0  # SigLIP's initial logit bias (sigmoid loss only)
    lock_image: bool = False  # freeze the pretrained trunk (eval mode, no grad): only the heads train

    def __post_init__(self) -> None:
        _check_finite("model", self)
        _check(self.image_model in RESNETS, f"model.image_model must be one of {RESNETS}")
        _check(self.embed_dim > 0, "model.embed_dim must be > 0")
        _check(self.head in ("linear", "mlp"), "model.head must be linear or mlp")
        _check(0 < self.init_temperature < 1, "model.init_temperature must be in (0, 1)")
        _check(self.max_logit_scale >= 1 / self.init_temperature, "model.max_logit_scale < 1/init_temperature")
        _check(self.loss in LOSSES, f"model.loss must be one of {', '.join(LOSSES)}")


@dataclass(frozen=True)
class DataConfig:
    shards: str = ""  # training shard directory (written by `clipcoco shards`)
    text: str = ""  # text cache Parquet (written by `clipcoco embed-text`)
    eval_shards: str = ""  # optional shard directory scored during training
    eval_text: str = ""  # text cache for eval_shards
    image_size: int = 224  # square crop fed to the image tower
    crop_scale_min: float = 0.9  # random-resized-crop area scale range is [crop_scale_min, 1]
    loader: str = "auto"  # auto (dali on CUDA, torch on a CPU) | dali (JPEGs decoded on the GPU) | torch (torchvision)
    threads: int = 4  # decoding threads per process
    image_features: str = ""  # pooled trunk features from `clipcoco embed-images`: train the heads on caches alone

    def __post_init__(self) -> None:
        from pipeline.loaders import KINDS as LOADER_KINDS  # here: reading the defaults (--help) needs no torch

        _check_finite("data", self)
        _check(self.image_size >= 16, "data.image_size must be >= 16")
        _check(0 < self.crop_scale_min <= 1, "data.crop_scale_min must be in (0, 1]")
        _check(self.loader in LOADER_KINDS, f"data.loader must be one of {', '.join(LOADER_KINDS)}")
        _check(self.threads >= 1, "data.threads must be >= 1")
        _check(bool(self.eval_shards) == bool(self.eval_text), "data.eval_shards and data.eval_text go together")

    def transform(self) -> "ImageTransform":
        """The image transform of this config (train and eval): what the loaders and `clip.api` apply."""
        from pipeline.transforms import ImageTransform  # here: reading the defaults (--help) needs no torch

        return ImageTransform(size=self.image_size, crop_scale_min=self.crop_scale_min)


CAPTIONS = ("one", "all")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-4  # peak learning rate (AdamW), reached after warmup
    weight_decay: float = 0.1  # AdamW decay; never applied to biases, norms or the temperature
    beta1: float = 0.9
    beta2: float = 0.98  # CLIP's choice; more stable than 0.999 at large batch
    eps: float = 1e-6
    warmup_steps: int = 500  # linear warmup, then cosine decay to 0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def __post_init__(self) -> None:
        _check_finite("optim", self)
        _check(self.lr > 0, "optim.lr must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2 must be in [0, 1)")
        _check(self.eps > 0, "optim.eps must be > 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 256  # images per process per step (global batch = batch_size x world size)
    epochs: int = 10  # used when steps is 0
    steps: int = 0  # total target step count; 0 = epochs x steps per epoch
    device: str = "auto"  # auto (cuda when available) | cpu | cuda (cuda:LOCAL_RANK under torchrun) | cuda:N
    precision: str = "bf16"  # bf16 autocast on CUDA (fp32 on CPU) | fp32
    compile: bool = False  # torch.compile the whole model as stepped (its DDP wrapper under torchrun)
    seed: int = 0  # seeds model init, shuffling, caption choice and extra negatives
    captions: str = "all"  # all (every caption of each image, each step: docs/recipes.md) | one (a random one)
    extra_negatives: int = 0  # captions of other images drawn from the training cache each step (global count)
    save_every: int = 1000  # checkpoint period in steps (a final checkpoint is always written)
    keep_last: int = 3  # checkpoints kept on disk
    eval_every: int = 0  # eval period in steps when data.eval_shards is set; 0 = only at the end
    log_every: int = 10  # metrics.jsonl period in steps

    def __post_init__(self) -> None:
        from pipeline.runtime import DEVICE_CHOICES, is_device_name  # here: as in DataConfig

        _check(self.batch_size >= 2, "train.batch_size must be >= 2 (contrastive loss needs negatives)")
        _check(self.epochs >= 0 and self.steps >= 0, "train.epochs and train.steps must be >= 0")
        _check(self.epochs > 0 or self.steps > 0, "set train.epochs or train.steps")
        _check(is_device_name(self.device), f"train.device must be {DEVICE_CHOICES}")
        _check(self.precision in ("bf16", "fp32"), "train.precision must be bf16 or fp32")
        _check(self.save_every >= 1 and self.keep_last >= 1, "train.save_every and train.keep_last must be >= 1")
        _check(self.eval_every >= 0 and self.log_every >= 1, "train.eval_every >= 0, train.log_every >= 1")
        _check(self.captions in CAPTIONS, f"train.captions must be one of {', '.join(CAPTIONS)}")
        _check(self.extra_negatives >= 0, "train.extra_negatives must be >= 0")
        _check(0 <= self.seed < SEED_LIMIT, f"train.seed must be in [0, {SEED_LIMIT - 1}] (2**48 - 1)")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _check(not self.data.image_features or self.model.lock_image,
               "data.image_features (cached trunk features) needs model.lock_image: a trained trunk would change them")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}


def valid_keys() -> list[str]:
    """Every settable key as `section.key`."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def defaults() -> dict[str, Any]:
    """Every key's default, {"section.key": value}, read off the dataclasses (no Config is built)."""
    return {f"{s}.{f.name}": f.default for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def _coerce(value: Any, kind: type, key: str) -> Any:
    # YAML reads 5e-4 as a string and CLI overrides may be strings; convert by the field's type.
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"invalid config: {key} = {value!r} is not a valid {kind.__name__}") from None


def _flatten(tree: Mapping[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, body in tree.items():
        if section not in SECTIONS:
            raise UserError(
                f"unknown config section {section!r} in {source}; valid sections: {', '.join(SECTIONS)}"
            )
        if not isinstance(body, Mapping):
            raise UserError(f"config section {section!r} in {source} must be a mapping of keys")
        for key, value in body.items():
            flat[f"{section}.{key}"] = value
    return flat


def parse_assignments(pairs: Iterable[str]) -> dict[str, str]:
    """`--set` pairs `section.key=value` as {"section.key": "value"}, a later pair winning. The values stay
    strings: building the Config coerces each by its field's type and rejects an unknown key, listing them all."""
    flat: dict[str, str] = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key.strip():
            raise UserError(f"--set {pair!r}: write --set section.key=value, e.g. --set optim.beta2=0.95 "
                            "(one key per --set; repeat it for more)")
        flat[key.strip()] = value
    return flat


def load_config(source: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file (a preset name or a path: clip/presets.py), then `overrides`
    ({"section.key": value}; None values are skipped); validated."""
    flat = dict(read_config_file(source)[0]) if source is not None else {}
    flat.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return config_from_flat(flat)


def config_origins(source: str | Path | None, assignments: Mapping[str, Any],
                   flags: Mapping[str, Any]) -> dict[str, str]:
    """{"section.key": where its value came from} for the keys `load_config(source, {**assignments, **flags})` did
    not take from the defaults: "--config PRESET_OR_FILE", "--set section.key" or the named flag, the later winning
    as in load_config. An error about a path can then say which of them to change."""
    origins = {key: f"--config {source}" for key in read_config_file(source)[0]} if source is not None else {}
    origins.update({key: f"--set {key}" for key in assignments})
    origins.update({key: "--" + key.partition(".")[2].replace("_", "-") for key in flags})
    return origins


def read_config_file(source: str | Path) -> tuple[dict[str, Any], str]:
    """({"section.key": value} of a YAML config file or preset, where it came from: "preset NAME (PATH)" or PATH)."""
    text, where = read_config(source)
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise UserError(f"{where} is not valid YAML{at}: {problem}; fix the file or pass a preset "
                        "(clipcoco train --help lists them)") from None
    if not isinstance(tree, Mapping):
        raise UserError(f"{where} must hold a mapping of sections (model, data, optim, train)")
    return _flatten(tree, where), where


def config_from_dict(tree: Mapping[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (as stored in a checkpoint)."""
    return config_from_flat(_flatten(tree, "the stored config"))


def config_from_flat(flat: Mapping[str, Any]) -> Config:
    known = set(valid_keys())
    unknown = sorted(set(flat) - known)
    if unknown:
        raise UserError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(valid_keys())}")
    sections = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        kwargs = {
            name: _coerce(flat[f"{section}.{name}"], hints[name], f"{section}.{name}")
            for name in hints
            if f"{section}.{name}" in flat
        }
        sections[section] = cls(**kwargs)
    return Config(**sections)
