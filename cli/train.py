"""`clipcoco train`: the command-line wrapper of `clip.train.train`.

Every config key is reachable: `--set section.key=value` (repeatable) sets any of them, and the common ones have
a named flag. Each named flag is called after its config field (`--image-size` sets `data.image_size`), so the
key is derived from the option and there is no list to keep in step; tests/test_cli.py checks that every option
not in NOT_CONFIG names exactly one key. Later wins: the dataclass defaults (clip/config.py), the --config file,
the --set pairs, the named flags.
"""

import inspect
import json
from pathlib import Path

import typer

from cli import DEVICE_HELP
from clip.config import defaults, valid_keys
from clip.presets import preset_names
from pipeline.errors import UserError

# The options that are not config fields (ctx.params names).
NOT_CONFIG = ("out", "config", "assignments", "overwrite", "progress")
KEY_OF_FIELD = {key.partition(".")[2]: key for key in valid_keys()}


def command(
    ctx: typer.Context,
    shards: Path = typer.Option(None, "--shards", help="Training shard directory (from `clipcoco shards`)."),
    text: Path = typer.Option(None, "--text", help="Text cache of those shards (from `clipcoco embed-text`)."),
    out: Path = typer.Option(..., "--out", help="Run directory; rerun with the same --out to resume."),
    config: str = typer.Option(None, "--config", help=f"A preset: {', '.join(preset_names())} (the files of "
                               "configs/), or a path to a YAML file. --set and the flags below override it; the "
                               "defaults below are clip/config.py's, which a --config file overrides."),
    assignments: list[str] = typer.Option([], "--set", metavar="SECTION.KEY=VALUE", help="Set any config key, "
                                          "repeatable: --set optim.beta2=0.95 --set train.keep_last=5. Sections: "
                                          "model, data, optim, train (clip/config.py; an unknown key lists every "
                                          "key). Overrides --config; the named flags override --set."),
    image_model: str = typer.Option(None, "--image-model", help="resnet18, resnet34, resnet50 or resnet101."),
    image_weights: str = typer.Option(None, "--image-weights", help="imagenet (torchvision's, downloaded once), "
                                      "none, or a path to a ResNet state dict."),
    image_size: int = typer.Option(None, "--image-size", help="Square crop size in pixels."),
    embed_dim: int = typer.Option(None, "--embed-dim", help="Size of the shared image-text space."),
    head: str = typer.Option(None, "--head", help="Projection heads: linear or mlp."),
    loss: str = typer.Option(None, "--loss", help="infonce (CLIP's softmax over the batch) or sigmoid (SigLIP's "
                             "pairwise loss with a learned bias; said to do better at small batches)."),
    lock_image: bool = typer.Option(None, "--lock-image/--no-lock-image", help="Freeze the pretrained trunk (eval "
                                    "mode, no grad); only the heads train. With --image-features no image is decoded."),
    image_features: Path = typer.Option(None, "--image-features", help="Pooled trunk features of --shards from "
                                        "`clipcoco embed-images` (needs --lock-image): an epoch takes seconds."),
    captions: str = typer.Option(None, "--captions", help="all (every caption of each image in each step, all "
                                 "positives, never each other's negatives) or one (one drawn at random)."),
    extra_negatives: int = typer.Option(None, "--extra-negatives", help="Captions of other images drawn from the "
                                        "training cache each step, through the current text head, as extra "
                                        "image->text negatives (a global count, split over the processes)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Images per process per step."),
    epochs: int = typer.Option(None, "--epochs", help="Train for N epochs (instead of --steps)."),
    steps: int = typer.Option(None, "--steps", help="Total target step count (a resumed run continues to it; 0: "
                              "count --epochs)."),
    lr: float = typer.Option(None, "--lr", help="Peak AdamW learning rate."),
    weight_decay: float = typer.Option(None, "--weight-decay", help="AdamW weight decay (not on biases/norms)."),
    warmup_steps: int = typer.Option(None, "--warmup-steps", help="Linear warmup steps before the cosine decay."),
    loader: str = typer.Option(None, "--loader", help="auto (dali on CUDA, torch on a CPU), dali (GPU "
                                "decoding on CUDA) or torch."),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP),
    precision: str = typer.Option(None, "--precision", help="bf16 (autocast on CUDA) or fp32."),
    compile: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
    seed: int = typer.Option(None, "--seed", help="Seeds init, shuffling and caption choice."),
    save_every: int = typer.Option(None, "--save-every", help="Checkpoint period in steps."),
    eval_shards: Path = typer.Option(None, "--eval-shards", help="Shard directory scored during training."),
    eval_text: Path = typer.Option(None, "--eval-text", help="Text cache of --eval-shards."),
    eval_every: int = typer.Option(None, "--eval-every", help="Eval period in steps (0 = at the end only)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh in --out even if it holds a run."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train the image tower and heads on shards against the cached text vectors (DALI on CUDA, torch on a CPU).

    Example: clipcoco train --config coco-karpathy --shards data/shards/train
    --text data/shards/train/text-distilbert-base-uncased-mean.parquet --out runs/r1 --set optim.beta2=0.95

    Multi-GPU: torchrun --nproc_per_node 8 $(which clipcoco) train ... (one process per GPU).
    """
    from clip.config import config_origins, load_config, parse_assignments
    from clip.train import train

    if epochs is not None and steps is not None:
        raise UserError("pass --epochs or --steps, not both")
    flags = {KEY_OF_FIELD[name]: value for name, value in ctx.params.items()
             if name not in NOT_CONFIG and value is not None}
    if epochs is not None:  # --epochs means "count in epochs": a step target from --config or --set must not win.
        flags["train.steps"] = 0
    assigned = parse_assignments(assignments)
    cfg = load_config(config, {**assigned, **flags})
    result = train(cfg, out=out, overwrite=overwrite, progress=progress,
                   origins=config_origins(config, assigned, flags))
    typer.echo(json.dumps(result))


def _shown(name: str, value) -> str:
    """How --help shows a config default: a bool as its flag (--no-compile)."""
    if isinstance(value, bool):
        return "--" + ("" if value else "no-") + name.replace("_", "-")
    return str(value)


# Each named flag defaults to None (an unset flag leaves the --config file's value), which typer would show as no
# default: its help names the dataclass default instead, from clip/config.py, the only home of the defaults.
for _name, _param in inspect.signature(command).parameters.items():
    _default = defaults().get(KEY_OF_FIELD.get(_name, ""), "")
    if isinstance(_param.default, typer.models.OptionInfo) and _name not in NOT_CONFIG and _default != "":
        _param.default.help += f" Default: {_shown(_name, _default)}."
