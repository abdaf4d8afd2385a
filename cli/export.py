"""`clipcoco export`: a run's checkpoint as an open_clip model folder (see clip/export.py)."""

from pathlib import Path

import typer


def command(
    run: Path = typer.Argument(..., metavar="RUN",
                               help="Run directory (its latest checkpoint, or --step) or a checkpoint .pt file."),
    out: Path = typer.Option(..., "--out", help="The folder to write (new, or empty)."),
    step: int | None = typer.Option(None, "--step", help="Export the run's checkpoint of this step."),
    hub_id: str | None = typer.Option(None, "--hub-id", help="The Hugging Face Hub repo (org/name) the folder is "
                                      "meant for: open_clip then reads the text tower's config from there."),
) -> None:
    """Write a run as an open_clip model folder for open_clip, CLIP_benchmark and the Hugging Face Hub.

    The folder holds open_clip_config.json, open_clip_model.safetensors, the text tower's config and tokenizer and a
    model card; open_clip, CLIP_benchmark and the Hub use it as it is.

    Example: clipcoco export runs/coco-karpathy --out exports/coco-karpathy
    """
    from clip.export import export  # here, not at the top: `clipcoco --help` should not import torch

    folder = export(run, out=out, step=step, hub_id=hub_id)
    if hub_id:  # its text tower's config is read from the Hub repo: it loads once uploaded there
        typer.echo(f"wrote {folder}: upload it with `huggingface-cli upload {hub_id} {folder} .`, then load it with "
                   f"open_clip.create_model_and_transforms('hf-hub:{hub_id}')")
    else:
        typer.echo(f"wrote {folder}: load it with open_clip.create_model_and_transforms('local-dir:{folder}')")
