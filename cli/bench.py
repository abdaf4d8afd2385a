"""`clipcoco bench loader` and `clipcoco bench train`: throughput numbers, printed as one JSON line last.

`make bench` runs these (and every other stage against its peer) and writes docs/benchmarks.md.
"""

import json
from pathlib import Path

import typer

from cli import DEVICE_HELP

app = typer.Typer(help="Measure each stage against its peer; each command prints one JSON line last.",
                  no_args_is_help=True)


@app.command("loader", no_args_is_help=True)
def loader(
    shards: Path = typer.Option(..., "--shards", help="Shard directory written by `clipcoco shards`."),
    kind: str = typer.Option("dali", "--loader", help="dali | torch (webdataset + torchvision decode)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per batch."),
    batches: int = typer.Option(20, "--batches", help="Batches counted (after 2 warm-up batches)."),
    image_size: int = typer.Option(224, "--image-size", help="Square crop size in pixels."),
    threads: int = typer.Option(2, "--threads", help="Decoding threads (DALI) or DataLoader workers (torch)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Decode + augment throughput (training mode), cycling over the shards.

    Example: clipcoco bench loader --shards data/shards/karpathy-test --loader torch --image-size 64
    """
    from clip.bench import bench_loader

    result = bench_loader(shards, loader=kind, batch_size=batch_size, batches=batches, image_size=image_size,
                          threads=threads, device=device)
    typer.echo(json.dumps(result))


@app.command("train", no_args_is_help=True)
def train(
    shards: Path = typer.Option(..., "--shards", help="Shard directory written by `clipcoco shards`."),
    text: Path = typer.Option(..., "--text", help="Its text cache, written by `clipcoco embed-text`."),
    synthetic: bool = typer.Option(False, "--synthetic", help="Only the synthetic block: the compute ceiling."),
    image_model: str = typer.Option("resnet50", "--image-model", help="resnet18 | resnet34 | resnet50 | resnet101."),
    image_size: int = typer.Option(224, "--image-size", help="Square crop size in pixels."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per step."),
    steps: int = typer.Option(10, "--steps", help="Steps counted per block (after 2 warm-up steps)."),
    kind: str = typer.Option("dali", "--loader", help="dali | torch."),
    threads: int = typer.Option(2, "--threads", help="Loader decoding threads."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    precision: str = typer.Option("bf16", "--precision", help="bf16 (autocast on CUDA; fp32 on a CPU) | fp32."),
) -> None:
    """Training images/s from the real loader vs the same step on synthetic batches already on the device.

    Prints real and synthetic images/s, their ratio and the data-wait fraction of the real block.

    Example: clipcoco bench train --shards data/shards/karpathy-test --text data/shards/karpathy-test/text.parquet
    --image-model resnet18 --image-size 64 --steps 5
    """
    from clip.bench import bench_train

    result = bench_train(shards, text=text, synthetic=synthetic, image_model=image_model, image_size=image_size,
                         batch_size=batch_size, steps=steps, loader=kind, device=device, precision=precision,
                         threads=threads)
    typer.echo(json.dumps(result))
