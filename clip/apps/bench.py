"""Benchmarks of the loaders and the training step: throughput, the CPU cost of each loader step, and the step
fed by the real loader against the same step fed synthetic data.

Inputs: a shard directory (`clipcoco shards`) and, for the training step, its text cache (`clipcoco embed-text`).
Outputs: one dict per measurement, which `clipcoco bench loader|decode-cost|train` print as a JSON line.
`make bench` (scripts/bench.py) runs every stage against its peer and writes docs/benchmarks.md.

    clipcoco bench loader --shards data/shards/karpathy-test --loader dali --image-size 224
    clipcoco bench decode-cost --shards data/shards/karpathy-test --image-size 224
    clipcoco bench train --shards data/shards/karpathy-test --text data/shards/karpathy-test/text-....parquet

Warm-up batches and steps are never counted, and on CUDA the clock is read only after `torch.cuda.synchronize`.
"""

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from clip.config import DataConfig, config_from_flat
from clip.loss import create_loss
from clip.model import build_model
from clip.optim import make_optimizer, make_scheduler
from clip.step import train_step
from pipeline.errors import UserError, require_extra
from pipeline.loaders import Batch, Loader, check_kind, make_loader, resolve_kind
from pipeline.progress import console, rate_bar
from pipeline.runtime import resolve_device
from pipeline.shard_reader import SampleIndex, open_shards
from pipeline.text_cache import TextCache
from pipeline.transforms import CROP_ATTEMPTS, ImageTransform


def _sync(device: torch.device) -> None:
    # CUDA work is asynchronous: without this the clock would stop before the GPU did.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1 (got {value})")


def _open_loader(shards_dir: Path, *, kind: str, batch_size: int, transform: ImageTransform, threads: int,
                 device: torch.device, seed: int) -> tuple[Loader, object]:
    check_kind(kind)
    shards = open_shards(Path(shards_dir))
    if shards.n_images < batch_size:
        raise UserError(f"--batch-size {batch_size} is larger than the {shards.n_images} images in {shards_dir}: "
                        "pass a smaller --batch-size")
    loader = make_loader(shards, kind=kind, batch_size=batch_size, transform=transform, train=True,
                         device=device, seed=seed, threads=threads)
    return loader, shards


def cycle(loader: Loader) -> Iterator[Batch]:
    """The loader's batches, epoch after epoch (each pass over `loader` is one epoch)."""
    while True:
        yield from loader


def _progress(enabled: bool) -> Progress:
    # stderr, so that the JSON line is the last thing on stdout.
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                    console=console(stderr=True), transient=True, disable=not enabled)


def batch_mate_repetition(first: list[list[int]], second: list[list[int]]) -> float:
    """Of each image's batch-mates in one epoch, the share that are its batch-mates again in the next: (B - 1) / (N - 1)
    for a global shuffle per epoch; far more when a batch is drawn from images that sit near each other in the tars."""
    mates = {i: set(batch) - {i} for batch in second for i in batch}
    again = total = 0
    for batch in first:
        for i in batch:
            others = set(batch) - {i}
            again += len(others & mates.get(i, set()))
            total += len(others)
    return again / max(total, 1)


def order_statistics(ldr: Loader) -> dict:
    """The loader's train order over two epochs (the order alone: no image is decoded): batch-mate repetition against
    the ideal, the share of the split one batch's images span, and whether the first batch changes."""
    epochs = [[rows.tolist() for rows in np.array_split(ldr.epoch_rows(e), ldr.steps_per_epoch)] for e in (0, 1)]
    n, b = ldr.shards.n_images, ldr.batch_size
    span = float(np.mean([(max(batch) - min(batch) + 1) / n for batch in epochs[0]]))
    return {"batch_mate_repetition": round(batch_mate_repetition(*epochs), 5),
            "ideal_repetition": round((b - 1) / max(n - 1, 1), 5), "batch_span": round(span, 4),
            "first_batch_changes": sorted(epochs[0][0]) != sorted(epochs[1][0])}


def bench_loader(shards_dir: Path, *, loader: str = "auto", batch_size: int = 64, batches: int = 20,
                 warmup: int = 2, image_size: int = 224, threads: int = 2, device: str = "auto", seed: int = 0,
                 progress: bool = True) -> dict:
    """Decode + augment throughput of one loader in training mode (a run's transform at `image_size`), cycling over
    the shards."""
    _check_positive(batch_size=batch_size, batches=batches, image_size=image_size, threads=threads)
    dev = resolve_device(device)
    loader = resolve_kind(loader, dev)
    ldr, _ = _open_loader(shards_dir, kind=loader, batch_size=batch_size,
                          transform=DataConfig(image_size=image_size).transform(), threads=threads, device=dev,
                          seed=seed)
    stream = cycle(ldr)
    images = 0
    with _progress(progress) as bar:
        task = bar.add_task(f"{loader} loader", total=warmup + batches, rate="")
        for _ in range(warmup):
            next(stream)
            bar.advance(task)
        _sync(dev)
        start = time.perf_counter()
        for _ in range(batches):
            images += next(stream).images.shape[0]
            bar.update(task, advance=1, rate=f"{images / (time.perf_counter() - start):.0f} images/s")
        _sync(dev)
        seconds = time.perf_counter() - start
    return {"bench": "loader", "loader": loader, "images_per_s": round(images / seconds, 2), "batches": batches,
            "images": images, "seconds": round(seconds, 4), "batch_size": batch_size, "image_size": image_size,
            "threads": threads, "device": dev.type, **order_statistics(ldr)}


def _timed_steps(step: Callable[[Batch], None], batches: Iterator[Batch], *, warmup: int, steps: int,
                 batch_size: int, device: torch.device, bar: Progress, label: str) -> tuple[float, float]:
    """Run warmup + steps; return (seconds, seconds spent waiting for a batch) over the counted steps.

    As in the training loop, the wait is the host's time inside `next(batches)` and there is no sync per step
    (that would stall the GPU queue); the clock starts and stops on a synchronised device.
    """
    task = bar.add_task(label, total=warmup + steps, rate="")
    for _ in range(warmup):
        step(next(batches))
        bar.advance(task)
    _sync(device)
    start = time.perf_counter()
    wait = 0.0
    for i in range(steps):
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        step(batch)
        bar.update(task, advance=1, rate=f"{batch_size * (i + 1) / (time.perf_counter() - start):.1f} images/s")
    _sync(device)
    return time.perf_counter() - start, wait


def bench_train(shards_dir: Path, *, text: Path, synthetic: bool = False, image_model: str = "resnet50",
                image_size: int = 224, batch_size: int = 64, steps: int = 10, warmup: int = 2, loader: str = "auto",
                device: str = "auto", precision: str = "bf16", threads: int = 2, seed: int = 0,
                progress: bool = True) -> dict:
    """Training images/s fed by the real loader, then by synthetic batches already on the device.

    The same model and step run both blocks (real first, then synthetic), so `ratio` = real / synthetic
    images/s is the share of the step's speed the data pipeline keeps. With `synthetic=True` only the
    synthetic block runs: the compute ceiling alone.
    """
    _check_positive(batch_size=batch_size, steps=steps, image_size=image_size, threads=threads)
    dev = resolve_device(device)
    loader = resolve_kind(loader, dev)
    cfg = config_from_flat({
        "model.image_model": image_model, "model.image_weights": "none", "data.image_size": image_size,
        "data.loader": loader, "data.threads": threads, "train.batch_size": batch_size, "train.steps": steps,
        "train.device": dev.type, "train.precision": precision, "train.seed": seed,
    })
    cache = TextCache.load(Path(text))
    torch.manual_seed(seed)
    on_cuda = dev.type == "cuda"
    # Model, optimizer, schedule and step exactly as `clipcoco train` builds them (clip/train.py).
    model = build_model(cfg.model, cache.dim)
    model = model.to(dev, memory_format=torch.channels_last if on_cuda else torch.contiguous_format)
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, warmup=cfg.optim.warmup_steps, total=2 * (warmup + steps))
    loss = create_loss(cfg.model.loss)
    bf16 = on_cuda and cfg.train.precision == "bf16"
    caption_rng = torch.Generator().manual_seed(seed)

    def step(batch: Batch) -> None:
        text_batch = cache.sample(batch.image_ids, caption_rng).to(dev, non_blocking=True)
        train_step(model, optimizer, scheduler, batch.images, text_batch, loss=loss, grad_clip=cfg.optim.grad_clip,
                   bf16=bf16)

    real_seconds = real_wait = None
    with _progress(progress) as bar:
        if not synthetic:
            ldr, shards = _open_loader(shards_dir, kind=loader, batch_size=batch_size,
                                       transform=cfg.data.transform(), threads=threads, device=dev, seed=seed)
            cache.check_matches(shards)
            real_seconds, real_wait = _timed_steps(step, cycle(ldr), warmup=warmup, steps=steps,
                                                   batch_size=batch_size, device=dev, bar=bar, label="real")
            # The loader's threads must not compete with the synthetic block for the same cores.
            del ldr
        images = torch.randn(batch_size, 3, image_size, image_size, device=dev)
        picks = torch.randint(len(cache.image_ids), (batch_size,), generator=caption_rng)
        ids = torch.from_numpy(cache.image_ids)[picks]
        fixed = Batch(images=images.contiguous(memory_format=torch.channels_last), image_ids=ids)
        synth_seconds, _ = _timed_steps(step, iter(lambda: fixed, None), warmup=warmup, steps=steps,
                                        batch_size=batch_size, device=dev, bar=bar, label="synthetic")

    synth_rate = batch_size * steps / synth_seconds
    real_rate = None if real_seconds is None else batch_size * steps / real_seconds
    return {
        "bench": "train", "image_model": image_model, "image_size": image_size, "batch_size": batch_size,
        "steps": steps, "warmup": warmup, "loader": None if synthetic else loader, "device": dev.type,
        "precision": "bf16" if bf16 else "fp32", "threads": threads,
        "real_images_per_s": None if real_rate is None else round(real_rate, 3),
        "synthetic_images_per_s": round(synth_rate, 3),
        "ratio": None if real_rate is None else round(real_rate / synth_rate, 4),
        "data_wait_fraction": None if real_wait is None else round(real_wait / real_seconds, 4),
    }


DALI_STAGES = ("decode", "resize", "resize_noaa", "normalise")
TORCHVISION_STAGES = ("decode", "resize")


def _dali_stage(tars: list[Path], indexes: list[Path], *, stage: str, transform: ImageTransform, batch: int):
    """DALI's side of the train pipeline up to `stage`, on the CPU with one thread: a decode with a random crop box
    fused into it (DALI's own random crop here; the loader passes its box to `image_slice`, the same ROI decode),
    then resize and normalise. `resize_noaa` is the same resize without antialiasing: not what the loader does, it
    shows what DALI's CPU resampler costs alone."""
    from nvidia.dali import fn, pipeline_def, types  # decode_cost checked that DALI is installed

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=0)
    def pipe():
        jpegs = fn.readers.webdataset(paths=[str(t) for t in tars], index_paths=[str(i) for i in indexes],
                                      ext=["jpg"], random_shuffle=True)
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB,
                                               random_area=list(transform.crop_scale),
                                               random_aspect_ratio=list(transform.aspect_ratio),
                                               num_attempts=CROP_ATTEMPTS)
        if stage != "decode":
            images = fn.resize(images, size=[transform.size, transform.size],
                               interp_type=getattr(types, transform.dali_interpolation),
                               antialias=stage != "resize_noaa")
        if stage == "normalise":
            mean, std = transform.scaled_mean_std()
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC", mean=mean, std=std)
        return images

    p = pipe()
    p.build()
    return p


def decode_cost(shards_dir: Path, *, image_size: int = 224, images: int = 256, progress: bool = True) -> dict:
    """CPU milliseconds per image of each step of the two loaders, one thread each, with a run's transform at
    `image_size`: DALI decode (the fused random crop) -> + resize -> + normalise (and resize without antialiasing,
    for comparison); torchvision decode_jpeg -> + crop and antialiased uint8 resize. Steps include the ones before
    them.

    The clock is the process's CPU time (`time.process_time`), so the split does not depend on other load.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    _check_positive(image_size=image_size, images=images)
    transform = DataConfig(image_size=image_size).transform()
    require_extra("nvidia.dali", "dali", "bench decode-cost's DALI stages")  # before any work
    shards = open_shards(Path(shards_dir))
    batch = min(32, images)
    runs = max(1, images // batch)
    with SampleIndex.load(shards.indexes, tars=shards.tars) as index:
        blobs = [torch.frombuffer(bytearray(index.read(row, "jpg")), dtype=torch.uint8)
                 for row in range(min(images, len(index)))]
    out = {"bench": "decode-cost", "image_size": image_size, "images": images}
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    with rate_bar("decode-cost", "images", enabled=progress) as bar:
        task = bar.add_task("decode-cost", total=len(DALI_STAGES) * runs * batch + len(TORCHVISION_STAGES) * len(blobs))
        for stage in DALI_STAGES:
            p = _dali_stage(shards.tars, shards.indexes, stage=stage, transform=transform, batch=batch)
            p.run()  # warm-up: the first run allocates
            start = time.process_time()
            for _ in range(runs):
                p.run()
                bar.advance(task, batch)
            out[f"dali_{stage}_ms"] = round(1000 * (time.process_time() - start) / (runs * batch), 3)
            del p
        for stage in TORCHVISION_STAGES:
            start = time.process_time()
            for data in blobs:
                image = decode_jpeg(data, mode=ImageReadMode.RGB)
                if stage == "resize":  # as the torch loader crops and resizes
                    transform.resize(image, transform.train_box(*image.shape[1:], rng))
                bar.advance(task)
            out[f"torchvision_{stage}_ms"] = round(1000 * (time.process_time() - start) / len(blobs), 3)
    return out
