"""`clipcoco shards`: the command-line wrapper of `pipeline.shards.build_shards` / `verify_shards`."""

from pathlib import Path

import typer

from pipeline import defaults
from pipeline.errors import UserError


def command(
    annotations: Path = typer.Option(None, "--annotations", help="Official COCO captions JSON "
                                     "(captions_train2017.json, captions_val2014.json, ...)."),
    images: Path = typer.Option(None, "--images", help="Folder holding the images (with --karpathy: the COCO root "
                                "holding train2014/ and val2014/)."),
    out: Path = typer.Option(None, "--out", help="Shard directory to write (one per split)."),
    karpathy: Path = typer.Option(None, "--karpathy", help="Karpathy's dataset_coco.json instead of --annotations."),
    split: str = typer.Option(None, "--split", help="With --karpathy: train, restval, val, test or trainval "
                              "(= train + restval)."),
    resize_shorter: int = typer.Option(defaults.RESIZE_SHORTER, "--resize-shorter", help="Resize the shorter side "
                                       "to N pixels (never upscaled) and re-encode; 0 keeps the original JPEG bytes "
                                       "where valid."),
    quality: int = typer.Option(defaults.QUALITY, "--quality", help="JPEG quality when re-encoding."),
    samples_per_shard: int = typer.Option(defaults.SAMPLES_PER_SHARD, "--samples-per-shard", help="Images per tar."),
    workers: int = typer.Option(defaults.WORKERS, "--workers", help="Decoding processes; 0 = all cores. The bytes "
                                "do not depend on it."),
    max_failure_rate: float = typer.Option(defaults.MAX_FAILURE_RATE, "--max-failure-rate", help="Exit non-zero "
                                           "(after writing everything) when more than this fraction of listed images "
                                           "is left out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace shards built with other inputs or options."),
    allow_outside_images: bool = typer.Option(False, "--allow-outside-images", help="Accept file names that lead "
                                              "outside --images (absolute, or through ..); refused otherwise."),
    verify: Path = typer.Option(None, "--verify", help="Only check an existing shard directory against its "
                                "sidecars, indexes and captions.parquet."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar and a summary."),
) -> None:
    """Pack COCO images and captions into WebDataset shards with DALI indexes.

    Example: clipcoco shards --annotations coco/annotations/captions_val2017.json --images coco/val2017
    --out data/shards/val2017

    Rerun the same command after a crash: complete shards are kept and the result is byte-identical. Rerun it
    after fixing images that were left out (failures.jsonl): they are retried, and packed where they now decode.
    """
    from pipeline.shard_verify import verify_shards
    from pipeline.shards import build_shards

    if verify is not None:
        verify_shards(verify, progress=progress)
        return
    if images is None or out is None:
        raise UserError("pass --images DIR and --out DIR (or --verify DIR to check existing shards)")
    build_shards(out=out, images=images, annotations=annotations, karpathy=karpathy, split=split,
                 resize_shorter=resize_shorter, quality=quality, samples_per_shard=samples_per_shard,
                 workers=workers, max_failure_rate=max_failure_rate, overwrite=overwrite,
                 allow_outside_images=allow_outside_images, progress=progress)
