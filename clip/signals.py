"""Stopping a training run cleanly: SIGINT and SIGTERM noted and acted on between steps (`StopSignals`), and the
command that continues the run exactly (`resume_command`), which the stop message prints."""

import os
import signal
import sys
import threading
from pathlib import Path


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM while training: noted by the handler, acted on between steps (finish the step,
    checkpoint, stop), so no step is lost. In a single process a second Ctrl-C stops at once (KeyboardInterrupt:
    the steps since the last checkpoint are lost), for a run held up in a long eval or a stalled loader. With
    several processes later signals are noted only, since one rank aborting alone would leave the others waiting
    in a collective (torchrun forwards a Ctrl-C to each rank and kills ranks not done 30 s later; Slurm signals
    every process). Outside the main thread (where Python cannot set handlers) signals keep their default action."""

    def __init__(self, announce: bool, *, world_size: int = 1) -> None:
        self.received: str | None = None
        self.announce, self._saved = announce, {}
        self.second_aborts = world_size == 1

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._saved = {sig: signal.signal(sig, self._note) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def message(self, step: int, total: int, saved: Path, out: Path, world_size: int) -> str:
        """What a run stopped after `step` (and checkpointed to `saved`) tells the user."""
        signal_name = self.received or "a stop signal on another rank"
        return (f"stopped by {signal_name} after step {step} of {total}: saved {saved}; to continue exactly where it "
                f"stopped, run: {resume_command(out, world_size)}")

    def _note(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            if self.announce:
                again = " (Ctrl-C again stops at once, without it)" if self.second_aborts else ""
                sys.stderr.write(f"\n{self.received}: finishing this step, then saving a checkpoint{again}\n")
        elif signum == signal.SIGINT and self.second_aborts:
            raise KeyboardInterrupt


def resume_command(out: Path, world_size: int) -> str:
    """The command that continues the run in `out` exactly: its resolved config.yaml holds every setting."""
    command = f"train --config {out / 'config.yaml'} --out {out}"
    if world_size == 1:
        return f"clipcoco {command}"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    nodes = f"--nnodes {world_size // per_node} " if world_size > per_node else ""
    return f"torchrun {nodes}--nproc_per_node {per_node} $(which clipcoco) {command}"
