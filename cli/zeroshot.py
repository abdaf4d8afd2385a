"""`clipcoco zeroshot`: classify a folder of class folders with the class names alone (see clip/apps/zeroshot.py)."""

from pathlib import Path

import typer

from cli import DEVICE_HELP


def command(
    run: Path = typer.Argument(..., metavar="RUN",
                               help="Run directory (its latest checkpoint) or a checkpoint .pt file."),
    images: Path = typer.Option(..., "--images", help="Folder of class folders (torchvision's ImageFolder layout: "
                                "DIR/<class>/<image>); the folder names are the classes."),
    out: Path | None = typer.Option(None, "--out", help="Report JSON; the confusion-matrix PNG goes next to it "
                                    "(same name, .png). Default: RUN/zeroshot-<folder>.json."),
    classes: Path | None = typer.Option(None, "--classes", help="Class names, one per line, in the sorted order "
                                        "of the class folders. Default: the folder names, _ read as a space."),
    templates: Path | None = typer.Option(None, "--templates", help="Prompt templates, one per line, {} where "
                                          "the class name goes. Default: 8 CLIP-style ones ('a photo of a {}.')."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Images or prompts per forward pass. "
                                          "Default: 256 on a GPU, 64 on a CPU."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Classify a folder of class folders by the class names alone (zero-shot).

    Each image gets the class whose prompts (templates filled with its name) it is most similar to; prints
    top-1/top-5 and per-class accuracy, writes a report JSON and a confusion matrix PNG.

    Example: clipcoco zeroshot demo-out/run --images demo-out/test-by-shapes
    """
    from clip.apps.zeroshot import zeroshot  # here, not at the top: `clipcoco --help` should not import torch

    zeroshot(run, images=images, out=out, classes=classes, templates=templates, device=device,
             batch_size=batch_size, progress=progress)
