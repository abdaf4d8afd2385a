"""Helper of tests/test_train.py, run under torchrun (gloo on the CPU); each rank writes OUT/rank<R>.json.

    torchrun --nproc_per_node 2 tests/train_ranks.py SHARDS TEXT OUT OPTIONS

Trains OUT/straight to step 6 uninterrupted, then OUT/resumed stopped by a SIGTERM that reaches rank 1 only during
step 3 (mid-epoch: 4 steps per epoch), then resumed to step 6 (across the epoch's end), in one process group;
OPTIONS is a JSON object of config keys. Records every step's image ids and loss, and this rank's whole training
state at the end of each run: the global RNG, the caption generator, the loader and extra-negative positions.
"""

import hashlib
import json
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import clip.train as train_module
from clip.config import load_config
from pipeline.errors import Interrupted


def _digest(state: torch.Tensor) -> str:
    return hashlib.sha256(state.numpy().tobytes()).hexdigest()


def main(shards: str, text: str, out: str, options: str) -> None:
    # Joined here, once: each train() below runs in this group (and leaves it in place), as a DDP run would.
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = load_config(None, {"data.shards": shards, "data.text": text, "data.image_size": 32, "data.loader": "torch",
                             "data.threads": 1, "model.image_model": "resnet18", "model.image_weights": "none",
                             "model.embed_dim": 16, "train.batch_size": 2, "train.steps": 6, "train.device": "cpu",
                             "train.log_every": 1, "train.save_every": 100, "optim.warmup_steps": 2,
                             "optim.lr": 1e-3, **json.loads(options)})
    runs, steps, stop_in = [], [], {"step": None}
    build_run, train_step = train_module.build_run, train_module.train_step

    def recording_build_run(*args, **kwargs):
        runs.append(build_run(*args, **kwargs))
        return runs[-1]

    def recording_step(*args, image_ids, **kwargs):
        loss = train_step(*args, image_ids=image_ids, **kwargs)
        # A different number of draws from the global RNG on each rank, as work done on one rank alone would make:
        # each rank's own state must come back, not rank 0's.
        torch.rand(rank + 1)
        steps.append((image_ids.tolist(), loss.item()))
        if rank == 1 and len(steps) == stop_in["step"]:
            signal.raise_signal(signal.SIGTERM)  # a stop that reaches one rank only, while its step runs
        return loss

    def state() -> dict:
        run = runs[-1]
        return {"steps": steps[:], "global_rng": _digest(torch.get_rng_state()),
                "captions": _digest(run.text.caption_rng.get_state()), "loader": run.loader.state_dict(),
                "negatives": run.text.negatives.state_dict() if run.text.negatives is not None else None}

    train_module.build_run, train_module.train_step = recording_build_run, recording_step
    train_module.train(cfg, out=Path(out, "straight"), progress=False)
    straight = state()
    steps.clear()
    stop_in["step"] = 3
    try:
        train_module.train(cfg, out=Path(out, "resumed"), progress=False)
        stopped = None
    except Interrupted as stop:
        stopped = str(stop)
    stop_in["step"] = None
    train_module.train(cfg, out=Path(out, "resumed"), progress=False)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"straight": straight, "resumed": state(),
                                                         "stopped": stopped}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
