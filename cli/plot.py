"""`clipcoco plot`: a run's training curves (loss, lr, temperature, throughput, data wait, recall) as a PNG."""

from pathlib import Path

import typer


def command(
    run: Path = typer.Argument(..., metavar="RUN",
                               help="Run directory written by `clipcoco train` (reads its metrics.jsonl)."),
    out: Path | None = typer.Option(None, "--out", help="PNG to write. Default: RUN/curves.png."),
) -> None:
    """Plot a run's training curves to one PNG.

    Example: clipcoco plot runs/coco-karpathy --out curves.png
    """
    from clip.apps.plot import plot_run  # here, not at the top: `clipcoco --help` should not import torch

    typer.echo(plot_run(run, out=out))
