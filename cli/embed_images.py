"""`clipcoco embed-images`: the command-line wrapper of `clip.image_features.embed_shards`."""

import json
from pathlib import Path

import typer

from cli import DEVICE_HELP


def command(
    shards_dir: Path = typer.Argument(..., metavar="SHARDS_DIR", help="Shard directory written by `clipcoco shards`."),
    out: Path = typer.Option(..., "--out", help="Parquet file to write "
                             "(e.g. SHARDS_DIR/features-resnet50-224.parquet)."),
    image_model: str = typer.Option("resnet50", "--image-model", help="resnet18, resnet34, resnet50 or resnet101."),
    image_weights: str = typer.Option("imagenet", "--image-weights", help="imagenet (torchvision's, downloaded "
                                      "once) or a path to a ResNet state dict; the same as train's."),
    image_size: int = typer.Option(224, "--image-size", help="The eval crop's size in pixels (train's --image-size)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per forward pass."),
    loader: str = typer.Option("auto", "--loader", help="auto (dali on CUDA, torch on a CPU), dali or torch."),
    threads: int = typer.Option(4, "--threads", help="Decoding threads."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Run every image through the frozen trunk once (the eval crop), into a Parquet cache of pooled features.

    Then: clipcoco train --lock-image --image-features FILE ... trains the heads on the text and image caches
    alone, with no image decoding (an epoch of COCO takes seconds, even on a CPU).
    """
    from clip.image_features import embed_shards

    typer.echo(json.dumps(embed_shards(shards_dir, out=out, image_model=image_model, image_weights=image_weights,
                                       image_size=image_size, device=device, loader=loader, batch_size=batch_size,
                                       threads=threads, progress=progress)))
