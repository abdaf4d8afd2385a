"""`clipcoco search`: find a run's eval images by a sentence or by an image (see clip/apps/search.py)."""

from pathlib import Path

import typer

from cli import DEVICE_HELP


def command(
    query: str | None = typer.Argument(None, metavar="QUERY",
                                       help='A sentence, e.g. "a dog on a couch" (or use --image-id).'),
    run: Path = typer.Option(..., "--run", help="Run directory that `clipcoco eval` scored on --shards."),
    shards: Path = typer.Option(..., "--shards", help="The eval shard directory (images and captions to show)."),
    image_id: int | None = typer.Option(None, "--image-id", help="Find the images most like this COCO image id."),
    k: int = typer.Option(8, "--k", help="How many images to return."),
    out: Path | None = typer.Option(None, "--out", help="Grid PNG to write. Default: RUN/search-<split>.png."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Search the eval images of a run with a text query (or an image), print the top k, draw a grid.

    Example: clipcoco search "a dog on a couch" --run runs/coco-karpathy --shards data/shards/karpathy-test --k 8
    """
    from clip.apps.search import search  # here, not at the top: `clipcoco --help` should not import torch

    search(query, run=run, shards=shards, image_id=image_id, k=k, out=out, device=device)
