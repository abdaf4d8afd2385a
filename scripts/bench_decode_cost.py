"""Where a loader's CPU time goes: CPU milliseconds per image for each step of the DALI and torchvision paths.

    python scripts/bench_decode_cost.py SHARDS_DIR [--image-size 224] [--images 256]

One thread each (DALI num_threads=1, torch.set_num_threads(1)), CPU time of the process (`time.process_time`),
so the split does not depend on other load on the machine. Steps, each including the ones before it:
DALI: decode (fused random crop, as pipeline/loaders.py) -> + resize (antialiased linear) -> + normalise, and
+ resize without antialiasing (not what the loader does: it shows what DALI's CPU resampler costs by itself);
torchvision: decode_jpeg -> + crop and antialiased resize (uint8). Prints one JSON line.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

CROP = {"random_area": [0.9, 1.0], "random_aspect_ratio": [3 / 4, 4 / 3], "num_attempts": 10}


def dali_costs(tars: list[Path], size: int, n: int, batch: int = 32) -> dict:
    from nvidia.dali import fn, pipeline_def, types

    def build(stage: str):
        @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=0)
        def pipe():
            jpegs = fn.readers.webdataset(paths=[str(t) for t in tars],
                                          index_paths=[str(t.with_suffix(".idx")) for t in tars], ext=["jpg"],
                                          random_shuffle=True)
            images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB, **CROP)
            if stage != "decode":
                # resize_noaa: the same resize without antialiasing, only to show what the resampler costs
                images = fn.resize(images, size=[size, size], antialias=stage != "resize_noaa")
            if stage == "normalise":
                images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC",
                                                  mean=[123.7, 116.3, 103.5], std=[58.4, 57.1, 57.4])
            return images

        p = pipe()
        p.build()
        return p

    out = {}
    for stage in ("decode", "resize", "resize_noaa", "normalise"):
        p = build(stage)
        p.run()  # warm-up
        start = time.process_time()
        for _ in range(max(1, n // batch)):
            p.run()
        out[f"dali_{stage}_ms"] = round(1000 * (time.process_time() - start) / (max(1, n // batch) * batch), 3)
        del p
    return out


def torchvision_costs(tars: list[Path], size: int, n: int) -> dict:
    import torchvision.transforms.v2.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    from pipeline.loaders import index_samples, random_resized_crop_box

    torch.set_num_threads(1)
    table = index_samples(tars, [t.with_suffix(".idx") for t in tars])[:n]
    blobs = []
    for tar, offset, length, _ in table:
        with open(tars[tar], "rb") as f:
            f.seek(offset)
            blobs.append(torch.frombuffer(bytearray(f.read(length)), dtype=torch.uint8))
    rng = np.random.default_rng(0)
    out = {}
    for stage in ("decode", "resize"):
        start = time.process_time()
        for data in blobs:
            image = decode_jpeg(data, mode=ImageReadMode.RGB)
            if stage == "resize":
                top, left, h, w = random_resized_crop_box(*image.shape[1:], scale=(0.9, 1.0), rng=rng)
                crop = image[:, top: top + h, left: left + w].permute(1, 2, 0).contiguous().permute(2, 0, 1)
                F.resize(crop, [size, size], antialias=True)
        out[f"torchvision_{stage}_ms"] = round(1000 * (time.process_time() - start) / len(blobs), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", type=Path)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    tars = sorted(args.shards.glob("shard-*.tar"))
    result = {"image_size": args.image_size, "images": args.images,
              **dali_costs(tars, args.image_size, args.images), **torchvision_costs(tars, args.image_size, args.images)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
