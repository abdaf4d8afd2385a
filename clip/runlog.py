"""What a training run reports: `metrics.jsonl` (and TensorBoard scalars when tensorboard is installed) through
`RunLog`, the logging window's loss, throughput and data wait through `Meter`, and the progress bar.

metrics.jsonl holds one JSON object per line: `{"kind": "train", "step", "epoch", "loss", "lr", "temperature",
"images_per_s", "data_wait", "peak_mem_gb"}` every `train.log_every` steps (data_wait: the fraction of wall time
spent waiting for the next batch; peak_mem_gb: GPU memory on CUDA, the process's peak RSS on a CPU),
`{"kind": "eval", "step", ...scores}` after each eval, and `{"kind": "start", "step", "world_size",
"steps_per_epoch", "dropped_per_epoch", "target_step"}` each time a run starts or resumes (a resume adds
`"changed"`: the config keys that differ from the checkpoint's, as [before, now]).
Rank 0 alone writes them.
"""

import json
import math
import resource
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor

from pipeline.progress import console


class Meter:
    """Throughput, data-wait fraction and the losses of a logging window; the losses stay on the device until the
    window is read or checked (no sync per step)."""

    def __init__(self) -> None:
        self.last_finite: tuple[int, float] | None = None  # (step, loss) of the newest finite loss checked
        self.reset()

    def reset(self) -> None:
        self.start, self.wait, self.steps, self.losses = time.perf_counter(), 0.0, [], []

    def add(self, step: int, loss: Tensor) -> None:
        self.steps.append(step)
        self.losses.append(loss)

    def first_non_finite(self) -> tuple[int, float] | None:
        """(step, loss) of the window's first NaN/Inf loss, or None (the finite ones update `last_finite`)."""
        if not self.losses:
            return None
        values = torch.stack(self.losses).float().cpu().tolist()  # one sync
        for step, value in zip(self.steps, values, strict=True):
            if not math.isfinite(value):
                return step, value
            self.last_finite = step, value
        return None

    def timed(self, batches: Iterable) -> Iterator:
        """Yield from `batches`, counting the time spent waiting for each one."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t0
            yield batch

    def read(self, images_per_step: int) -> dict:
        loss = torch.stack(self.losses).float().mean().item()  # the one sync per window
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"loss": loss, "images_per_s": len(self.steps) * images_per_step / elapsed,
               "data_wait": self.wait / elapsed}
        self.reset()
        return out


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: peak resident set (KiB on Linux)


class RunLog:
    """metrics.jsonl lines (and TensorBoard scalars when tensorboard is installed), written by rank 0 only."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.path, self.enabled, self.tb = out / "metrics.jsonl", enabled, None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: metrics.jsonl is the record, TensorBoard only a viewer
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train_progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]train[/] step"), MofNCompleteColumn(), BarColumn(),
                    TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=console(stderr=True),
                    disable=not enabled)
