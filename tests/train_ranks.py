"""Helper of tests/test_train.py, run under torchrun: trains one epoch and writes the image ids this rank saw.

    torchrun --nproc_per_node 2 tests/train_ranks.py SHARDS TEXT OUT
"""

import json
import os
import sys
from pathlib import Path

import clip.train as train_module
from clip.config import load_config


def main(shards: str, text: str, out: str) -> None:
    seen: list[list[int]] = []
    make_loader = train_module.make_loader

    def recording_loader(*args, **kwargs):
        loader = make_loader(*args, **kwargs)
        iterate = type(loader).__iter__

        class Recording(type(loader)):
            def __iter__(self):
                for batch in iterate(self):
                    seen.append(batch.image_ids.tolist())
                    yield batch

        loader.__class__ = Recording
        return loader

    train_module.make_loader = recording_loader
    cfg = load_config(None, {"data.shards": shards, "data.text": text, "data.image_size": 32, "data.loader": "torch",
                             "data.threads": 1, "model.image_model": "resnet18", "model.image_weights": "none",
                             "model.embed_dim": 16, "train.batch_size": 4, "train.epochs": 1, "train.device": "cpu",
                             "train.log_every": 1, "train.save_every": 2})
    result = train_module.train(cfg, out=Path(out), progress=False)
    Path(out, f"rank{os.environ['RANK']}.json").write_text(json.dumps({"ids": seen, "result": result}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
