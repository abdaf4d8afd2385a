"""`clipcoco eval`: COCO image-text retrieval, scored the way the literature scores it.

Inputs: a run directory (its `latest` checkpoint) or a checkpoint file, the eval shards
(`clipcoco shards`) and the eval text cache (`clipcoco embed-text`, same text model as the run).
Outputs: `RUN_DIR/eval-<split>.json` (recalls as fractions 0-1, ranks, counts, fingerprints, the
train/eval overlap), a table in % on the terminal, and `RUN_DIR/embeddings-<split>.parquet` (every
image and caption embedding, read by `clipcoco search`).

    clipcoco eval runs/coco-karpathy --shards data/shards/karpathy-test \\
        --text data/shards/karpathy-test/text-distilbert-base-uncased-mean.parquet --folds 5

Protocol, over all captions (about 5 per image, not always exactly 5):
- image->text rank of an image = rank of the best-ranked of its own captions among all captions;
- text->image rank of a caption = rank of its image among all images;
- R@K = fraction of queries with rank < K (0-based ranks); medr = floor(median 0-based rank) + 1,
  as in VSE++; mean_recall = mean of the six recalls;
- `folds=5` is the 1K protocol: five folds of consecutive images with their captions, each scored
  alone, every metric averaged over the folds. Shards hold images in image-id order, so the folds
  are consecutive by image id; the literature cuts them in dataset_coco.json order, so 1K numbers
  are comparable but their fold membership differs (the 5K numbers do not depend on any order).
Ties: a competitor whose score equals the positive's counts ahead of it (pessimistic).
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from rich.console import Console
from rich.table import Table

from clip.checkpoint import Checkpoint, resolve_checkpoint, run_dir_of
from clip.model import CLIP
from pipeline import __version__
from pipeline.errors import UserError
from pipeline.files import replacing, sha256_file, write_atomic
from pipeline.loaders import make_loader
from pipeline.progress import rate_bar
from pipeline.runtime import distributed, gather_rows
from pipeline.shard_reader import ShardSet, open_shards
from pipeline.text_cache import TextCache

RECALL_AT = (1, 5, 10)
RECALL_KEYS = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in RECALL_AT)


def _tile_grid(n_images: int, n_texts: int, chunk_images: int, chunk_texts: int):
    """Yield (image slice, text slice) tiles that together cover the full similarity matrix once."""
    for j0 in range(0, n_texts, chunk_texts):
        for i0 in range(0, n_images, chunk_images):
            yield slice(i0, min(i0 + chunk_images, n_images)), slice(j0, min(j0 + chunk_texts, n_texts))


def _ranks(image_feats: torch.Tensor, text_feats: torch.Tensor, text_to_image: torch.Tensor, *,
           chunk_images: int, chunk_texts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based (image->text ranks [I], text->image ranks [T]) without materialising the [I, T] matrix.

    Two passes over the same tile grid: the first takes the positive scores out of the tiles that
    hold a positive pair, the second counts the competitors scoring >= the positive. Reading the
    positives from the very same tile products (not from a separate dot product) keeps the tie rule
    exact: a float computed two ways can differ in its last bit.
    """
    n_images, n_texts = image_feats.shape[0], text_feats.shape[0]
    device = image_feats.device
    best_own = torch.full((n_images,), -math.inf, device=device)  # best score among an image's own captions
    own_score = torch.empty(n_texts, device=device)  # score of each caption with its own image
    i2t = torch.zeros(n_images, dtype=torch.long, device=device)
    t2i = torch.zeros(n_texts, dtype=torch.long, device=device)
    tiles = list(_tile_grid(n_images, n_texts, chunk_images, chunk_texts))

    def scores(rows: slice, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        sim = image_feats[rows] @ text_feats[cols].T  # [i, t]
        own = text_to_image[cols][None, :] == torch.arange(rows.start, rows.stop, device=device)[:, None]
        return sim, own

    for rows, cols in tiles:
        owners = text_to_image[cols]
        here = (owners >= rows.start) & (owners < rows.stop)
        if not bool(here.any()):
            continue
        sim, _ = scores(rows, cols)
        col = torch.nonzero(here).squeeze(1)
        pos = sim[owners[col] - rows.start, col]
        own_score[cols.start + col] = pos
        best_own.scatter_reduce_(0, owners[col], pos, reduce="amax")

    for rows, cols in tiles:
        sim, own = scores(rows, cols)
        i2t[rows] += ((sim >= best_own[rows, None]) & ~own).sum(1)
        t2i[cols] += ((sim >= own_score[None, cols]) & ~own).sum(0)
    return i2t, t2i


def _summary(i2t: np.ndarray, t2i: np.ndarray) -> dict:
    out: dict = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in RECALL_AT:
            out[f"{name}_r{k}"] = float(np.mean(ranks < k))
    out["mean_recall"] = float(np.mean([out[key] for key in RECALL_KEYS]))
    out["i2t_medr"] = float(np.floor(np.median(i2t)) + 1)
    out["t2i_medr"] = float(np.floor(np.median(t2i)) + 1)
    out["n_images"] = int(i2t.shape[0])
    out["n_captions"] = int(t2i.shape[0])
    return out


def retrieval_metrics(image_feats: torch.Tensor, text_feats: torch.Tensor, text_to_image: torch.Tensor, *,
                      folds: int = 1, chunk_images: int = 1024, chunk_texts: int = 8192) -> dict:
    """Recall@1/5/10 both ways, mean_recall and median ranks over every caption.

    image_feats [I, E] and text_feats [T, E] are scored by dot product (pass L2-normalised features
    for cosine similarity); text_to_image [T] is each caption's row in image_feats. Every image needs
    at least one caption. Memory is bounded by one chunk_images x chunk_texts tile.
    With folds > 1: images split into `folds` runs of floor(I / folds) consecutive rows (a remainder
    is left out), each scored alone; the report is the mean of each metric, plus `per_fold`.
    """
    if image_feats.ndim != 2 or text_feats.ndim != 2 or image_feats.shape[1] != text_feats.shape[1]:
        raise ValueError(f"features must be [I, E] and [T, E], got {tuple(image_feats.shape)}, "
                         f"{tuple(text_feats.shape)}")
    n_images = image_feats.shape[0]
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long, device=image_feats.device)
    if text_to_image.shape != (text_feats.shape[0],):
        raise ValueError("text_to_image must hold one image row per caption")
    if text_to_image.numel() and (int(text_to_image.min()) < 0 or int(text_to_image.max()) >= n_images):
        raise ValueError("text_to_image holds a row outside image_feats")
    if folds < 1 or n_images < folds:
        raise UserError(f"--folds {folds} needs at least {max(folds, 1)} images and folds >= 1; got {n_images} images")
    if folds > 1:
        size = n_images // folds
        per_fold = []
        for f in range(folds):
            lo, hi = f * size, (f + 1) * size
            keep = (text_to_image >= lo) & (text_to_image < hi)
            per_fold.append(retrieval_metrics(image_feats[lo:hi], text_feats[keep], text_to_image[keep] - lo,
                                              chunk_images=chunk_images, chunk_texts=chunk_texts))
        out = {key: float(np.mean([m[key] for m in per_fold]))
               for key in (*RECALL_KEYS, "mean_recall", "i2t_medr", "t2i_medr")}
        out.update(n_images=sum(m["n_images"] for m in per_fold), n_captions=sum(m["n_captions"] for m in per_fold),
                   folds=folds, fold_size=size, per_fold=per_fold)
        return out
    counts = torch.bincount(text_to_image, minlength=n_images)
    if n_images == 0 or bool((counts == 0).any()):
        raise ValueError(f"{int((counts == 0).sum())} image(s) have no caption: image->text recall is undefined")
    i2t, t2i = _ranks(image_feats.float(), text_feats.float(), text_to_image,
                      chunk_images=chunk_images, chunk_texts=chunk_texts)
    out = _summary(i2t.cpu().numpy(), t2i.cpu().numpy())
    out["folds"] = 1
    return out


# ---------------------------------------------------------------------------------------------
# Scoring a model on a shard directory


@dataclass
class EvalEmbeddings:
    image_ids: np.ndarray  # [I] int64, sorted: every image of the shards exactly once
    image_feats: torch.Tensor  # [I, E] float32, L2-normalised, on the CPU
    caption_image_ids: np.ndarray  # [T] int64, the cache's rows for these images, in cache order
    caption_ids: np.ndarray  # [T] int64
    text_feats: torch.Tensor  # [T, E] float32, L2-normalised, on the CPU
    text_to_image: torch.Tensor  # [T] int64, each caption's row in image_feats


@torch.inference_mode()
def _embed_images(model: CLIP, *, shards: ShardSet, device: torch.device, loader: str, batch_size: int, image_size: int,
                  threads: int, rank: int, world: int, progress: bool) -> tuple[np.ndarray, torch.Tensor]:
    batches = make_loader(shards, kind=loader, batch_size=batch_size, image_size=image_size, train=False,
                          device=device, rank=rank, world_size=world, threads=threads)
    ids, feats = [], []
    with rate_bar("scoring images", "images", enabled=progress and rank == 0) as bar:
        task = bar.add_task("images", total=shards.n_images)
        for batch in batches:
            feats.append(model.encode_image(batch.images).float())
            ids.append(batch.image_ids.to(device))
            bar.advance(task, len(batch.image_ids) * world)  # every rank moves at about the same pace
    if feats:
        local_feats = torch.cat(feats)
    else:  # a rank can get no image when there are fewer images than ranks; it still joins the gather
        local_feats = torch.zeros(0, model.encode_text(torch.zeros(1, model.text_dim, device=device)).shape[1],
                                  device=device)
    local_ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long, device=device)
    if world > 1:
        local_ids, local_feats = gather_rows(local_ids), gather_rows(local_feats)
    all_ids, all_feats = local_ids.cpu().numpy(), local_feats.cpu()
    order = np.argsort(all_ids, kind="stable")
    return all_ids[order], all_feats[torch.from_numpy(order)]


def _check_every_image_once(ids: np.ndarray, shards: ShardSet) -> None:
    # A loader that pads its last batch or repeats samples across ranks would silently bias the recalls.
    expected = shards.image_ids()
    if len(ids) != shards.n_images or not np.array_equal(ids, expected):
        repeated = int(len(ids) - len(np.unique(ids)))
        missing = int(np.setdiff1d(expected, ids).size)
        raise RuntimeError(f"the eval loader yielded {len(ids)} images ({repeated} repeated, {missing} missing) "
                           f"for the {shards.n_images} of {shards.root}: every image must be scored exactly once")


@torch.inference_mode()
def _embed_texts(model: CLIP, vectors: torch.Tensor, *, device: torch.device, batch_size: int = 16384) -> torch.Tensor:
    return torch.cat([model.encode_text(vectors[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, vectors.shape[0], batch_size)])


def embed_split(model: CLIP, *, shards: ShardSet, text: TextCache, device: torch.device, loader: str = "dali",
                batch_size: int = 256, image_size: int = 224, threads: int = 2, rank: int = 0, world_size: int = 1,
                progress: bool = True) -> EvalEmbeddings:
    """Every image of `shards` (once, deterministic crop) and every cached caption of them, through `model`.

    `model` is the bare CLIP (not a DDP wrapper). With world_size > 1 (every rank of the default
    process group calls this) each rank scores a slice of the images and every rank gets all back.
    """
    was_training = model.training
    model.eval()
    try:
        image_ids, image_feats = _embed_images(model, shards=shards, device=device, loader=loader,
                                               batch_size=batch_size, image_size=image_size, threads=threads,
                                               rank=rank, world=world_size, progress=progress)
        _check_every_image_once(image_ids, shards)
        text.check_covers(image_ids)
        keep = np.isin(text.image_ids, image_ids)  # a cache may hold more images than these shards
        caption_image_ids = text.image_ids[keep]
        vectors = text.embeddings if keep.all() else text.embeddings[torch.from_numpy(keep)]  # no copy when all
        text_feats = _embed_texts(model, vectors, device=device)
    finally:
        model.train(was_training)
    return EvalEmbeddings(image_ids=image_ids, image_feats=image_feats, caption_image_ids=caption_image_ids,
                          caption_ids=text.caption_ids[keep], text_feats=text_feats,
                          text_to_image=torch.from_numpy(np.searchsorted(image_ids, caption_image_ids)))


def score_model(model: CLIP, *, shards: ShardSet, text: TextCache, device: torch.device | str, loader: str = "dali",
                batch_size: int = 256, image_size: int = 224, threads: int = 2, folds: int = 1,
                progress: bool = True) -> dict:
    """Retrieval metrics of `model` on `shards` (a ShardSet) with captions from `text` (a TextCache).

    Scores every image in this process alone (the trainer calls it on rank 0 only).
    """
    emb = embed_split(model, shards=shards, text=text, device=torch.device(device), loader=loader,
                      batch_size=batch_size, image_size=image_size, threads=threads, progress=progress)
    return retrieval_metrics(emb.image_feats.to(device), emb.text_feats.to(device), emb.text_to_image, folds=folds)


# ---------------------------------------------------------------------------------------------
# The `clipcoco eval` stage: checks, report, embeddings file


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


def save_embeddings(path: Path, emb: EvalEmbeddings, metadata: dict[str, str]) -> Path:
    """Image rows (caption_id -1) then caption rows, as one Parquet file; written atomically."""
    n_images, dim = emb.image_feats.shape
    feats = torch.cat([emb.image_feats, emb.text_feats]).numpy().astype(np.float32)
    table = pa.table({
        "image_id": np.concatenate([emb.image_ids, emb.caption_image_ids]).astype(np.int64),
        "caption_id": np.concatenate([np.full(n_images, -1, dtype=np.int64), emb.caption_ids.astype(np.int64)]),
        "kind": pa.array(["image"] * n_images + ["text"] * len(emb.caption_ids), type=pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), dim),
    }).replace_schema_metadata(metadata)
    with replacing(path) as tmp:
        pq.write_table(table, tmp)
    return path


def print_report(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    protocol = f"{report['n_images']:,} images, {report['n_captions']:,} captions"
    if report["folds"] > 1:
        protocol = f"{report['folds']} folds of {report['fold_size']:,} images (mean)"
    table = Table(title=f"retrieval on {report['split']} (step {report['step']}): {protocol}, recall in %",
                  caption=f"mean recall {100 * report['mean_recall']:.2f}%")
    for column in ("", "R@1", "R@5", "R@10", "median rank"):
        table.add_column(column, justify="right")
    for name, label in (("i2t", "image -> text"), ("t2i", "text -> image")):
        table.add_row(label, *(f"{100 * report[f'{name}_r{k}']:.2f}" for k in RECALL_AT), f"{report[f'{name}_medr']:g}")
    console.print(table)


def evaluate(run_or_ckpt: Path, *, shards: Path, text: Path, out: Path | None = None, folds: int = 1,
             loader: str = "dali", device: str = "auto", batch_size: int = 256, image_size: int | None = None,
             threads: int = 2, progress: bool = True) -> dict:
    """Score a run (its latest checkpoint) or a checkpoint on `shards` with the captions of `text`.

    Writes the report JSON (default RUN_DIR/eval-<split>.json, eval-<split>-folds<N>.json with folds > 1)
    and RUN_DIR/embeddings-<split>.parquet; returns the report. Under torchrun, rank 0 writes and prints.
    """
    if loader not in ("dali", "torch"):
        raise UserError(f"--loader {loader!r}: pass dali or torch")
    ckpt_path = resolve_checkpoint(Path(run_or_ckpt))
    ckpt = Checkpoint.load(ckpt_path)
    shard_set = open_shards(Path(shards))
    if not 1 <= folds <= shard_set.n_images:  # checked before the images are scored, not after
        raise UserError(f"--folds {folds}: pass 1 (all images) or 5 (the 1K protocol), at most the "
                        f"{shard_set.n_images} images of {shard_set.root}")
    cache = TextCache.load(Path(text))
    check_text_cache(ckpt, cache, Path(text))
    run_dir = run_dir_of(ckpt_path)
    split = shard_set.root.resolve().name
    with distributed(device) as rt:
        model = ckpt.build_model().to(rt.device).to(memory_format=torch.channels_last)
        if image_size is None:
            image_size = ckpt.cfg.data.image_size
        emb = embed_split(model, shards=shard_set, text=cache, device=rt.device, loader=loader,
                          batch_size=batch_size, image_size=image_size, threads=threads, rank=rt.rank,
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
        "image_size": image_size,
        "loader": loader,
        "clipcoco_version": __version__,
    }
    console = Console()
    if overlap:
        console.print(f"[bold yellow]warning:[/] {overlap:,} of the {len(emb.image_ids):,} eval images in "
                      f"{shard_set.root} were in this run's training set: these recalls overstate the model "
                      "(train on shards that leave the eval images out, e.g. Karpathy trainval vs test)")
    suffix = f"-folds{folds}" if folds > 1 else ""
    out = Path(out) if out is not None else run_dir / f"eval-{split}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, (json.dumps(report, indent=2) + "\n").encode())
    embeddings = save_embeddings(run_dir / f"embeddings-{split}.parquet", emb, {
        "clipcoco_version": __version__,
        # relative to the run when inside it, so a moved or copied run still finds its text head
        "checkpoint": str(_relative_to(ckpt_path.resolve(), run_dir.resolve())),
        "step": str(int(ckpt.step)),
        "shards_fingerprint": shard_set.fingerprint,
        "text_metadata": json.dumps(cache.metadata),  # what `clipcoco search` embeds a query with
    })
    print_report(report, console)
    console.print(f"report: {out}\nembeddings: {embeddings}")
    return report
