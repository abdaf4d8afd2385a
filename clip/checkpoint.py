"""Checkpoints of a run: atomic writes, a `latest` pointer, and loading a model back.

Inputs: a run directory (written by `clipcoco train`) and the training state as a dict of tensors,
numbers, strings, lists and dicts. Output: `RUN/checkpoints/step_XXXXXXXX.pt` and
`RUN/checkpoints/latest` (a one-line text file naming the newest checkpoint).
Every file is written under a temporary name and `os.replace`d, so a killed save never leaves a
half-written checkpoint behind `latest`. Checkpoints load with `torch.load(weights_only=True)`.

Keys: model, optimizer, scheduler, step, epoch, samples_seen, rng, loader, config (Config.to_dict()),
text_fingerprint (dict), text_dim (int), shards_fingerprint (str), train_image_ids (int64 tensor).
"""

import os
import re
from pathlib import Path

import torch

from clip.config import config_from_dict
from clip.model import CLIP
from pipeline.errors import UserError

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
_NAME = re.compile(r"step_(\d{8,})\.pt")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())  # the bytes must be on disk before the rename makes them visible
    os.replace(tmp, path)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (temporary files of a killed save are not listed)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(run_dir: Path, state: dict, *, keep_last: int) -> Path:
    """Write `state` as checkpoints/step_<state["step"]>.pt, point `latest` at it, keep the newest `keep_last`."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / checkpoint_name(int(state["step"]))
    _atomic_write(path, lambda f: torch.save(state, f))
    _atomic_write(folder / LATEST, lambda f: f.write(f"{path.name}\n".encode()))
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if old != path:
            old.unlink()
    return path


def resolve_checkpoint(run_or_ckpt: Path) -> Path:
    """A checkpoint file as it is; a run directory (or its checkpoints/) -> the checkpoint `latest` names."""
    target = Path(run_or_ckpt)
    if target.is_file():
        return target
    folder = target if target.name == CHECKPOINT_DIR else target / CHECKPOINT_DIR
    pointer = folder / LATEST
    if not pointer.is_file():
        raise UserError(f"no checkpoint in {target}: pass a run directory written by `clipcoco train` or a .pt file")
    path = folder / pointer.read_text().strip()
    if not path.is_file():
        raise UserError(f"{pointer} names {path.name}, which is missing: pass one of the step_*.pt files instead")
    return path


def load_checkpoint(path: Path) -> dict:
    """The state dict of a checkpoint (or of a run's latest), on the CPU, loaded with weights_only=True."""
    path = resolve_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{path} is not a readable clipcoco checkpoint ({err}); pass another step_*.pt") from None


def model_from_checkpoint(ckpt: dict) -> CLIP:
    """The CLIP of a loaded checkpoint, with its trained weights, in eval mode on the CPU."""
    cfg = config_from_dict(ckpt["config"])
    model = CLIP(cfg.model, int(ckpt["text_dim"]))  # no pretrained download: every weight comes from ckpt
    model.load_state_dict(ckpt["model"])
    return model.eval()
