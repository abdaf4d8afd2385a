"""`clipcoco embed-text`: the command-line wrapper of `pipeline.embed_text.embed_text`."""

from pathlib import Path

import typer

from cli import DEVICE_HELP
from pipeline import defaults


def command(
    shards_dir: Path = typer.Argument(..., metavar="SHARDS_DIR",
                                      help="Shard directory written by `clipcoco shards` (its captions.parquet "
                                      "is read)."),
    model: str = typer.Option(defaults.TEXT_MODEL, "--model", help="Hugging Face encoder-only model: a hub "
                              "name or a local folder."),
    pooling: str = typer.Option(defaults.POOLING, "--pooling", help="mean (masked mean over tokens) or cls (first "
                                "token)."),
    max_length: int = typer.Option(defaults.MAX_LENGTH, "--max-length", help="Tokens per caption; longer captions "
                                   "are truncated."),
    batch_size: int = typer.Option(None, "--batch-size", help="Captions per forward pass (default: 256 on CUDA, "
                                   "64 on a CPU, where small batches stay in cache)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto (bfloat16 on CUDA, float32 on CPU), "
                              "float32 or bfloat16. Storage is always float16."),
    out: Path = typer.Option(None, "--out", help="Cache file (default: SHARDS_DIR/text-<model-slug>-<pooling>"
                             ".parquet)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Run every caption through the frozen text tower once, into a Parquet cache.

    Example: clipcoco embed-text data/shards/karpathy-test --model distilbert-base-uncased --pooling mean

    Rerun the same command after a crash: it resumes from the last finished part.

    Under torchrun each rank embeds its share of the captions and rank 0 writes the file.
    """
    from pipeline.embed_text import embed_text

    embed_text(shards_dir, model=model, pooling=pooling, max_length=max_length, batch_size=batch_size,
               device=device, dtype=dtype, out=out, progress=progress)
