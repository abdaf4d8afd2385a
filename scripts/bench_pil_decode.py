"""The peer of `clipcoco shards --resize-shorter 0`: a plain PIL decode of the same JPEGs, nothing else.

    python scripts/bench_pil_decode.py IMAGES_DIR [--workers N]

Decodes every *.jpg in IMAGES_DIR fully (`Image.load()`), in N processes (0 = all cores, as `clipcoco shards`),
and prints one JSON line: images, seconds (decode only, process start-up excluded), images_per_s.
"""

import argparse
import json
import multiprocessing
import os
import time
from pathlib import Path

from PIL import Image


def decode(path: str) -> int:
    with Image.open(path) as image:
        image.load()
        return image.size[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", type=Path)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    files = sorted(str(p) for p in args.images.glob("*.jpg"))
    workers = args.workers or len(os.sched_getaffinity(0))
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for _ in pool.imap(decode, files, chunksize=4):
            pass
    seconds = time.perf_counter() - start
    print(json.dumps({"images": len(files), "seconds": round(seconds, 4),
                      "images_per_s": round(len(files) / seconds, 2), "workers": workers}))


if __name__ == "__main__":
    main()
