"""`clipcoco eval`: score a run with COCO image-text retrieval (the metrics: clip/retrieval.py).

Inputs: a run directory (its `latest` checkpoint) or a checkpoint file, the eval shards
(`clipcoco shards`) and the eval text cache (`clipcoco embed-text`, same text model as the run).
Outputs: `RUN_DIR/eval-<split>-stepNNNNNNNN.json` (recalls as fractions 0-1, ranks, counts, fingerprints,
the train/eval overlap), a table in % on the terminal, and `RUN_DIR/embeddings-<split>-stepNNNNNNNN.parquet`
(every image and caption embedding, clip/embeddings.py), one of each per evaluated checkpoint;
`eval-<split>.json` and `embeddings-<split>.parquet` (which `clipcoco search` reads) are second names (hard
links) of the latest evaluated.

    clipcoco eval runs/coco-karpathy --shards data/shards/karpathy-test \\
        --text data/shards/karpathy-test/text-distilbert-base-uncased-mean.parquet --folds 5
"""

import contextlib
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from clip.checkpoint import Checkpoint, resolve_checkpoint, run_dir_of
from clip.embeddings import embed_split, save_embeddings
from clip.retrieval import RECALL_AT, check_folds, retrieval_metrics
from pipeline import __version__
from pipeline.errors import UserError
from pipeline.files import link_atomic, sha256_file, write_atomic
from pipeline.loaders import check_kind, resolve_kind
from pipeline.progress import console as make_console
from pipeline.runtime import distributed, main_locked
from pipeline.shard_reader import open_shards
from pipeline.text_cache import TextCache


def _relative_to(path: Path, root: Path) -> Path:
    return path.relative_to(root) if path.is_relative_to(root) else path


def check_text_cache(ckpt: Checkpoint, text: TextCache, text_path: Path) -> None:
    """Refuse a cache whose text model differs from the one the run was trained with."""
    cache, run = dict(text.fingerprint), dict(ckpt.text_fingerprint)
    differ = [k for k in sorted(cache.keys() | run.keys()) if cache.get(k) != run.get(k)]
    if differ:
        raise UserError(
            f"text cache {text_path} (model {cache.get('model')!r}, pooling {cache.get('pooling')!r}) does not match "
            f"the text model the run was trained with (model {run.get('model')!r}, pooling {run.get('pooling')!r}): "
            + "; ".join(f"{k}: cache {cache.get(k)!r}, run {run.get(k)!r}" for k in differ)
            + ". Embed the eval captions the way the run's cache was made "
            f"(`clipcoco embed-text SHARDS --model {run.get('model')} --pooling {run.get('pooling')}`)")


def overlap_with_train(ckpt: Checkpoint, image_ids: np.ndarray) -> int:
    """How many eval images the run trained on (COCO train2017 holds most Karpathy test images)."""
    return int(np.intersect1d(np.asarray(ckpt.train_image_ids, dtype=np.int64), image_ids).size)


def print_report(report: dict, console: Console | None = None) -> None:
    console = console or make_console()
    protocol = f"{report['n_images']:,} images, {report['n_captions']:,} captions"
    if report["folds"] > 1:
        low, high = min(report["fold_sizes"]), max(report["fold_sizes"])
        sizes = f"{low:,}" if low == high else f"{low:,}-{high:,}"
        protocol = f"{report['folds']} folds of {sizes} images (mean over folds; all {report['n_images']:,} scored)"
    table = Table(title=f"retrieval on {report['split']} (step {report['step']}): {protocol}, recall in %",
                  caption=f"mean recall {100 * report['mean_recall']:.2f}%")
    for column in ("", "R@1", "R@5", "R@10", "median rank"):
        table.add_column(column, justify="right")
    for name, label in (("i2t", "image -> text"), ("t2i", "text -> image")):
        table.add_row(label, *(f"{100 * report[f'{name}_r{k}']:.2f}" for k in RECALL_AT), f"{report[f'{name}_medr']:g}")
    console.print(table)


def evaluate(run_or_ckpt: Path, *, shards: Path, text: Path, out: Path | None = None, folds: int = 1,
             loader: str = "auto", device: str = "auto", batch_size: int = 256, image_size: int | None = None,
             threads: int = 2, progress: bool = True) -> dict:
    """Score a run (its latest checkpoint) or a checkpoint on `shards` with the captions of `text`.

    Writes the report JSON (default RUN_DIR/eval-<split>[-folds<N>]-step<NNNNNNNN>.json, linked as
    eval-<split>[-folds<N>].json) and RUN_DIR/embeddings-<split>-step<NNNNNNNN>.parquet (linked as
    embeddings-<split>.parquet); returns the report. Under torchrun, rank 0 writes and prints. The run directory
    stays locked until both are written.
    """
    check_kind(loader)
    ckpt_path = resolve_checkpoint(Path(run_or_ckpt))
    ckpt = Checkpoint.load(ckpt_path)  # before the lock: a file that is no checkpoint leaves no .lock beside it
    with contextlib.ExitStack() as held:
        # The run folder (embeddings) and, for --out elsewhere, the report's folder, as embed-text locks its --out's.
        for folder in dict.fromkeys([run_dir_of(ckpt_path).resolve(), *([Path(out).parent.resolve()] if out else [])]):
            held.enter_context(main_locked(folder, "clipcoco eval"))
        return _evaluate(ckpt_path, ckpt, shards=shards, text=text, out=out, folds=folds, loader=loader, device=device,
                         batch_size=batch_size, image_size=image_size, threads=threads, progress=progress)


def _evaluate(ckpt_path: Path, ckpt: Checkpoint, *, shards: Path, text: Path, out: Path | None, folds: int,
              loader: str, device: str, batch_size: int, image_size: int | None, threads: int, progress: bool) -> dict:
    shard_set = open_shards(Path(shards))
    check_folds(folds, shard_set.n_images)  # before the images are scored, not after
    cache = TextCache.load(Path(text))
    check_text_cache(ckpt, cache, Path(text))
    cache.check_matches(shard_set)
    run_dir = run_dir_of(ckpt_path)
    split = shard_set.root.resolve().name
    with distributed(device) as rt:
        loader = resolve_kind(loader, rt.device)
        model = ckpt.build_model().to(rt.device).to(memory_format=torch.channels_last)
        # The run's own transform (its eval crop), at --image-size when one is given.
        transform = ckpt.cfg.data.transform()
        if image_size is not None:
            transform = dataclasses.replace(transform, size=image_size)
        emb = embed_split(model, shards=shard_set, text=cache, device=rt.device, loader=loader,
                          batch_size=batch_size, transform=transform, threads=threads, rank=rt.rank,
                          world_size=rt.world_size, progress=progress)
        if not rt.main:
            return {}
        metrics = retrieval_metrics(emb.image_feats.to(rt.device), emb.text_feats.to(rt.device),
                                    emb.text_to_image, folds=folds)
    overlap = overlap_with_train(ckpt, emb.image_ids)
    report = {
        **metrics,
        "split": split,
        "checkpoint": str(ckpt_path),
        "step": int(ckpt.step),
        "checkpoint_sha256": sha256_file(ckpt_path),
        "text_cache": str(text),
        "text_fingerprint": cache.fingerprint,
        "shards": str(shard_set.root),
        "shards_fingerprint": shard_set.fingerprint,
        "train_shards_fingerprint": ckpt.shards_fingerprint,
        "overlap_with_train": overlap,
        "image_size": transform.size,
        "loader": loader,
        "clipcoco_version": __version__,
    }
    console = make_console()
    if overlap:
        console.print(f"[bold yellow]warning:[/] {overlap:,} of the {len(emb.image_ids):,} eval images in "
                      f"{shard_set.root} were in this run's training set: these recalls overstate the model "
                      "(train on shards that leave the eval images out, e.g. Karpathy trainval vs test)")
    # One report and one embeddings file per checkpoint (by step), so scoring another checkpoint keeps this one's;
    # the plain names are second names of the latest evaluated, which search and the README read.
    suffix, at_step = f"-folds{folds}" if folds > 1 else "", f"-step{int(ckpt.step):08d}"
    latest = run_dir / f"eval-{split}{suffix}.json" if out is None else None
    out = Path(out) if out is not None else run_dir / f"eval-{split}{suffix}{at_step}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, (json.dumps(report, indent=2) + "\n").encode())
    if latest is not None:
        link_atomic(out, latest)
    embeddings = save_embeddings(run_dir / f"embeddings-{split}{at_step}.parquet", emb, {
        "clipcoco_version": __version__,
        # relative to the run when inside it, so a moved or copied run still finds its text head
        "checkpoint": str(_relative_to(ckpt_path.resolve(), run_dir.resolve())),
        "step": str(int(ckpt.step)),
        "shards_fingerprint": shard_set.fingerprint,
        "text_metadata": json.dumps(cache.metadata),  # the text cache the caption rows came from
    })
    link_atomic(embeddings, run_dir / f"embeddings-{split}.parquet")
    print_report(report, console)
    console.print(f"report: {out}\nembeddings: {embeddings}")
    return report
