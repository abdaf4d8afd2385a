"""`clipcoco eval`: score a run with COCO image-text retrieval Recall@1/5/10 (see clip/evaluate.py)."""

from pathlib import Path

import typer

from cli import DEVICE_HELP


def command(
    run: Path = typer.Argument(..., metavar="RUN",
                               help="Run directory (its latest checkpoint) or a checkpoint .pt file."),
    shards: Path = typer.Option(..., "--shards", help="Eval shard directory (clipcoco shards), e.g. karpathy-test."),
    text: Path = typer.Option(..., "--text", help="Text cache of those shards, made with the run's text model."),
    out: Path | None = typer.Option(None, "--out", help="Report JSON. Default: RUN/eval-<split>[-folds<N>].json."),
    folds: int = typer.Option(1, "--folds", help="1: all images (5K protocol); 5: five folds of consecutive "
                              "images, mean (1K protocol)."),
    loader: str = typer.Option("auto", "--loader", help="auto (dali on CUDA, torch on a CPU), dali (JPEGs decoded on "
                                "the GPU) or torch."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per batch (per process under torchrun)."),
    image_size: int | None = typer.Option(None, "--image-size", help="Center-crop size. Default: the run's."),
    threads: int = typer.Option(2, "--threads", help="Decoding threads per process."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Score a run with COCO image-text retrieval Recall@1/5/10 over all captions, both directions.

    Example: clipcoco eval runs/coco-karpathy --shards data/shards/karpathy-test
    --text data/shards/karpathy-test/text-distilbert-base-uncased-mean.parquet --folds 5
    """
    from clip.evaluate import evaluate  # here, not at the top: `clipcoco --help` should not import torch

    evaluate(run, shards=shards, text=text, out=out, folds=folds, loader=loader, device=device,
             batch_size=batch_size, image_size=image_size, threads=threads, progress=progress)
