"""The checkpoint format of a run: what a step saves, how it is written, listed and read back.

Written by `clipcoco train` into `RUN/checkpoints/step_XXXXXXXX.pt`, with `RUN/checkpoints/latest` (one line naming
the newest); read by train (resume), eval, search and `clip.load`. A checkpoint is a plain dict of tensors, numbers,
strings, lists and dicts, so it loads with `torch.load(weights_only=True)`: the fields of `Checkpoint` (what a
trained model is, which every reader needs) and, beside them, the state of each component of the training run by its
name (what a resume restores; clip/train.py). The keys are those earlier versions wrote, so their checkpoints load as
they are. Files are written through `pipeline.files.replacing` (temporary name,
fsync, rename), so a killed save never leaves a half-written checkpoint behind `latest`.

    ckpt = Checkpoint.load(Path("runs/r1"))        # a run directory (its latest) or a .pt file
    model = ckpt.build_model()                      # the trained CLIP, eval mode, on the CPU
"""

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from clip.config import Config, config_from_dict
from clip.model import CLIP, fit_problems, head_form, non_finite
from pipeline.errors import UserError
from pipeline.files import replacing, write_atomic

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
_NAME = re.compile(r"step_(\d{8,})\.pt")


@dataclass
class Checkpoint:
    # What a trained model is: every reader needs these.
    model: dict  # CLIP.state_dict()
    config: dict  # Config.to_dict() of the run
    text_dim: int  # width of the cached text vectors the text head takes
    text_fingerprint: dict  # TextCache.fingerprint of the training cache: eval and search need the same text model
    step: int  # optimisation steps taken
    shards_fingerprint: str  # ShardSet.fingerprint of the training shards
    train_image_ids: torch.Tensor  # [N] int64: what eval counts as overlap with the training set
    epoch: int = 0
    samples_seen: int = 0
    # Where the training cache's text model was found (TextCache.model_path; not in the fingerprint, so a run moved
    # elsewhere still matches its caches): `clip.load` loads it from there to embed queries. "" in older checkpoints.
    text_model_path: str = ""
    # The training state a resume restores: each run component's state_dict() by the component's name (clip/train.py's
    # `Run.parts`: "optimizer", "scheduler", "rng", "loader", "negatives" with --extra-negatives), saved as keys of the
    # same dict beside the fields above, so a new component needs no change here. Empty in a checkpoint written only
    # to be scored.
    state: dict = field(default_factory=dict)

    @property
    def cfg(self) -> Config:
        return config_from_dict(self.config)

    @property
    def world_size(self) -> int:
        """How many processes trained it (one loader state per rank)."""
        return len(self.state.get("loader", ()))

    def build_model(self) -> CLIP:
        """The CLIP with its trained weights, in eval mode on the CPU (no pretrained download)."""
        model = CLIP(self.cfg.model, int(self.text_dim), heads=head_form(self.model))
        model.load_state_dict(self.model)
        return model.eval()

    def to_dict(self) -> dict:
        """The saved dict: every field, and each component's state under its name."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "state"}
        clash = fields.keys() & self.state.keys()
        if clash:
            raise ValueError(f"run parts named like checkpoint fields: {sorted(clash)}")
        return {**fields, **self.state}

    def save(self, run_dir: Path, *, keep_last: int) -> Path:
        """Write checkpoints/step_<step>.pt, point `latest` at it, keep the newest `keep_last`."""
        folder = Path(run_dir) / CHECKPOINT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / checkpoint_name(self.step)
        # Through a Python file, so a full disk raises an OSError (torch's own file writer only says "unexpected pos").
        with replacing(path) as tmp, open(tmp, "wb") as f:
            _save(self.to_dict(), f)
        write_atomic(folder / LATEST, f"{path.name}\n".encode())
        for old in list_checkpoints(run_dir)[:-keep_last]:
            if old != path:
                old.unlink()
        return path

    @classmethod
    def load(cls, run_or_ckpt: Path) -> "Checkpoint":
        """A checkpoint file, or a run directory's latest, on the CPU, loaded with weights_only=True."""
        path = resolve_checkpoint(run_or_ckpt)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            # Not torch.load's own message: for a text file it advises weights_only=False, which would run its pickles.
            raise UserError(f"{path} is not a clipcoco checkpoint or run (torch.load cannot read it: "
                            f"{type(err).__name__}): pass a run directory written by `clipcoco train` or one of its "
                            "checkpoints/step_*.pt") from None
        fields = {f.name for f in dataclasses.fields(cls)} - {"state"}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        if not isinstance(state, dict) or not required <= state.keys():
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise UserError(f"{path} is not a clipcoco checkpoint (it holds {keys}): pass a run directory written "
                            "by `clipcoco train` or one of its checkpoints/step_*.pt")
        ckpt = cls(**{k: v for k, v in state.items() if k in fields},
                   state={k: v for k, v in state.items() if k not in fields})
        _check_weights(path, ckpt)
        return ckpt


def _save(state: dict, f: BinaryIO) -> None:
    try:
        torch.save(state, f)
    except RuntimeError as err:
        # A write that fails in a tensor's data (the disk fills up) raises the file's OSError inside torch's zip
        # writer, which then, closing the archive, raises "unexpected pos" over it: the OSError says what to do.
        cause = err.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        raise cause from None


def _check_weights(path: Path, ckpt: Checkpoint) -> None:
    """Stop unless the model weights are every tensor of the CLIP its config describes, in shape, and finite."""
    weights = ckpt.model if isinstance(ckpt.model, dict) else {}
    with torch.device("meta"):  # the expected names and shapes, without allocating or initialising anything
        model = CLIP(ckpt.cfg.model, int(ckpt.text_dim), heads=head_form(weights))
        expected = {k: v.shape for k, v in model.state_dict().items()}
    missing, unexpected, misshapen = fit_problems(expected, weights)
    if missing or unexpected or misshapen:
        first = (missing or unexpected or misshapen)[0]
        raise UserError(f"{path} is damaged or not a clipcoco checkpoint: its model weights do not fit the model its "
                        f"config describes ({len(missing)} missing, {len(unexpected)} unexpected, {len(misshapen)} of "
                        f"another shape; first: {first}): pass another of the run's checkpoints/step_*.pt")
    bad = non_finite(weights)
    if bad:
        raise UserError(f"{path} holds non-finite weights ({sum(bad.values()):,} NaN/Inf values in {len(bad)} of "
                        f"{len(weights)} tensors, first: {next(iter(bad))}): the training had diverged when it was "
                        "saved; pass an earlier checkpoint (checkpoints/step_*.pt) or train again with a lower --lr")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (temporary files of a killed save are not listed)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


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


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to (RUN/checkpoints/step_*.pt -> RUN)."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINT_DIR else checkpoint.parent
