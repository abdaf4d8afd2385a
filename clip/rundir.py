"""The run directory of `clipcoco train`: whether the checkpoint in it can be resumed by this config, data and process
count (`find_resume`), what a (re)start warns about (`warn_about_start`), and its files made ready for it
(`prepare_run_dir`: config.yaml, metrics.jsonl).

A run directory holds RUN_FILES: `config.yaml` (the resolved config), `metrics.jsonl`, `checkpoints/` (clip/
checkpoint.py) and `tensorboard/`.
"""

import json
import shutil
import sys
from pathlib import Path

from clip.checkpoint import CHECKPOINT_DIR, LATEST, Checkpoint
from clip.config import Config
from clip.inputs import Inputs, differences
from pipeline.errors import UserError
from pipeline.files import write_atomic

RUN_FILES = ("config.yaml", "metrics.jsonl", CHECKPOINT_DIR, "tensorboard")
# Config keys that only act when a run starts (the initial weights and temperature): a resume cannot apply another
# value, so it is refused. The model's shape is compared on its own; the loader refuses a change of what fixes its
# order (batch size, seed, image size, crop scale, loader kind). Every other key a resume applies as given.
SET_AT_START = ("model.image_weights", "model.init_temperature", "model.init_logit_bias")


def config_changes(before: Config, after: Config) -> dict[str, list]:
    """{"section.key": [before, after]} for every key whose value differs."""
    old, new = before.to_dict(), after.to_dict()
    return {f"{section}.{key}": [old[section][key], value] for section, keys in new.items()
            for key, value in keys.items() if old[section][key] != value}


def _shape(model: dict, text_dim: int) -> str:
    locked = ", trunk locked" if model.get("lock_image") else ""
    return (f"{model['image_model']}, embed_dim {model['embed_dim']}, {model['head']} heads, text dim {text_dim}, "
            f"{model.get('loss', 'infonce')} loss{locked}")


def find_resume(out: Path, cfg: Config, inputs: Inputs, world_size: int, *, overwrite: bool) -> Checkpoint | None:
    """The checkpoint to continue from, after checking it belongs to this model, data and process count."""
    if overwrite or not (out / CHECKPOINT_DIR / LATEST).is_file():
        return None
    ckpt = Checkpoint.load(out)
    start_over = "pass --overwrite to start a new run there, or choose another --out"
    if not ckpt.state:
        raise UserError(f"{out} holds a checkpoint without training state (it can be scored, not resumed): "
                        f"{start_over}")
    theirs = _shape(ckpt.cfg.to_dict()["model"], int(ckpt.text_dim))
    ours = _shape(cfg.to_dict()["model"], inputs.text.dim)
    if theirs != ours:
        raise UserError(f"{out} holds a run of a different model ({theirs}; this config: {ours}): {start_over}")
    fixed = {k: v for k, v in config_changes(ckpt.cfg, cfg).items() if k in SET_AT_START}
    if fixed:
        raise UserError(f"{out} started with " + ", ".join(f"{k} {old!r} (this config: {new!r})"
                                                            for k, (old, new) in fixed.items())
                        + f", which only acts when a run starts: pass the run's value (its config.yaml) to resume, "
                        f"or {start_over}")
    if ckpt.text_fingerprint != inputs.text.fingerprint:
        raise UserError(f"text cache {inputs.text.path} is not the one {out} was trained with "
                        f"({differences(ckpt.text_fingerprint, inputs.text.fingerprint)}): pass that run's "
                        f"cache to resume, or {start_over}")
    if ckpt.shards_fingerprint != inputs.shards.fingerprint:
        raise UserError(f"shards {inputs.shards.root} are not the ones {out} was trained on: pass those to resume, "
                        f"or {start_over}")
    if cfg.train.extra_negatives and "negatives" not in ckpt.state:
        raise UserError(f"{out} was trained without --extra-negatives: resume without it, {start_over}")
    if ckpt.world_size != world_size:
        raise UserError(f"{out} was trained with {ckpt.world_size} processes and this run has {world_size}: "
                        f"resume with torchrun --nproc_per_node {ckpt.world_size}, or {start_over}")
    return ckpt


def warn_about_start(out: Path, cfg: Config, step: int, total: int, changes: dict[str, list]) -> None:
    """A warmup that never ends, and the config keys a resume changes (config.yaml is rewritten with them, so the
    printed resume command uses these values)."""
    if cfg.optim.warmup_steps >= total:
        sys.stderr.write(f"warning: optim.warmup_steps {cfg.optim.warmup_steps} >= the run's {total} steps: the "
                         f"learning rate never leaves warmup; pass --warmup-steps below {total}\n")
    if changes:
        sys.stderr.write(f"resuming {out} at step {step} with " + ", ".join(
            f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
            + f"; {out / 'config.yaml'} now holds them\n")


def prepare_run_dir(out: Path, cfg: Config, resume: Checkpoint | None, *, overwrite: bool) -> None:
    """Write the resolved config; keep only the metrics up to the resumed step (a killed run may have logged more)."""
    if overwrite:
        for name in RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.yaml", cfg.to_yaml().encode())
    metrics = out / "metrics.jsonl"
    kept = []
    if resume is not None and metrics.is_file():
        kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= resume.step]
    write_atomic(metrics, "".join(f"{line}\n" for line in kept).encode())
