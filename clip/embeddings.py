"""Embeddings of an eval split: every image (once, the eval crop) and every cached caption through a model, and
the file `clipcoco eval` keeps them in.

Inputs: a CLIP, a `ShardSet` and its `TextCache`. Outputs: `EvalEmbeddings` in memory, and
`RUN/embeddings-<split>.parquet`: one row per image (`caption_id` -1, `kind` "image") then one per caption
(`kind` "text"), columns `image_id` int64, `caption_id` int64, `kind` string, `embedding`
fixed_size_list<float32>[E] (L2-normalised); schema metadata: clipcoco_version, checkpoint (relative to the
run), step, shards_fingerprint, text_metadata (the cache's metadata, JSON). `clipcoco search` ranks its images.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from clip.model import CLIP
from clip.retrieval import retrieval_metrics
from pipeline.errors import UserError
from pipeline.files import replacing
from pipeline.loaders import make_loader
from pipeline.progress import rate_bar
from pipeline.runtime import gather_rows
from pipeline.shard_reader import ShardSet
from pipeline.text_cache import TextCache, schema_metadata
from pipeline.transforms import ImageTransform


@dataclass
class EvalEmbeddings:
    image_ids: np.ndarray  # [I] int64, sorted: every image of the shards exactly once
    image_feats: torch.Tensor  # [I, E] float32, L2-normalised, on the CPU
    caption_image_ids: np.ndarray  # [T] int64, the cache's rows for these images, in cache order
    caption_ids: np.ndarray  # [T] int64
    text_feats: torch.Tensor  # [T, E] float32, L2-normalised, on the CPU
    text_to_image: torch.Tensor  # [T] int64, each caption's row in image_feats


@torch.inference_mode()
def embed_images(encode: Callable[[torch.Tensor], torch.Tensor], dim: int, *, shards: ShardSet, device: torch.device,
                 loader: str, batch_size: int, transform: ImageTransform, threads: int, rank: int, world: int,
                 progress: bool,
                 label: str = "scoring images") -> tuple[np.ndarray, torch.Tensor]:
    """(sorted image ids [I], `encode`(images) [I, dim] float32 on the CPU) of every image of `shards` once, with the
    eval crop of `transform`; under torchrun each rank encodes a share and every rank gets all back."""
    ids, feats = [], []
    with make_loader(shards, kind=loader, batch_size=batch_size, transform=transform, train=False, device=device,
                     rank=rank, world_size=world, threads=threads) as batches, \
            rate_bar(label, "images", enabled=progress and rank == 0) as bar:
        task = bar.add_task("images", total=shards.n_images)
        for batch in batches:
            feats.append(encode(batch.images).float())
            ids.append(batch.image_ids.to(device))
            bar.advance(task, len(batch.image_ids) * world)  # every rank moves at about the same pace
    # A rank can get no image when there are fewer images than ranks; it still joins the gather.
    local_feats = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)
    local_ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long, device=device)
    if world > 1:
        local_ids, local_feats = gather_rows(local_ids), gather_rows(local_feats)
    all_ids, all_feats = local_ids.cpu().numpy(), local_feats.cpu()
    order = np.argsort(all_ids, kind="stable")
    return all_ids[order], all_feats[torch.from_numpy(order)]


def check_every_image_once(ids: np.ndarray, shards: ShardSet) -> None:
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


def embed_split(model: CLIP, *, shards: ShardSet, text: TextCache, device: torch.device, loader: str = "auto",
                batch_size: int = 256, transform: ImageTransform, threads: int = 2, rank: int = 0,
                world_size: int = 1, progress: bool = True) -> EvalEmbeddings:
    """Every image of `shards` (once, the eval crop of `transform`: a run's is `DataConfig.transform()`) and every
    cached caption of them, through `model`.

    `model` is the bare CLIP (not a DDP wrapper). With world_size > 1 (every rank of the default
    process group calls this) each rank scores a slice of the images and every rank gets all back.
    """
    was_training = model.training
    model.eval()
    try:
        image_ids, image_feats = embed_images(model.encode_image, model.embed_dim, shards=shards, device=device,
                                              loader=loader, batch_size=batch_size, transform=transform,
                                              threads=threads, rank=rank, world=world_size, progress=progress)
        check_every_image_once(image_ids, shards)
        text.check_covers(image_ids)
        keep = np.isin(text.image_ids, image_ids)  # a cache may hold more images than these shards
        caption_image_ids = text.image_ids[keep]
        vectors = text.embeddings if keep.all() else text.embeddings[torch.from_numpy(keep)]  # no copy when all
        text_feats = _embed_texts(model, vectors, device=device)
    finally:
        model.train(was_training)
    bad_images, bad_texts = (int((~torch.isfinite(f)).any(1).sum()) for f in (image_feats, text_feats))
    if bad_images or bad_texts:  # a NaN compares false with everything: it would rank as a perfect match
        cause = ("its weights hold NaN/Inf" if not all(bool(p.isfinite().all()) for p in model.parameters())
                 else "its weights are finite: its arithmetic overflows")
        raise UserError(f"the model gave NaN/Inf for {bad_images:,} of {len(image_feats):,} image embeddings and "
                        f"{bad_texts:,} of {len(text_feats):,} caption embeddings ({cause}; the text cache "
                        f"{text.path} is finite): no recall is computed from them; score another checkpoint")
    return EvalEmbeddings(image_ids=image_ids, image_feats=image_feats, caption_image_ids=caption_image_ids,
                          caption_ids=text.caption_ids[keep], text_feats=text_feats,
                          text_to_image=torch.from_numpy(np.searchsorted(image_ids, caption_image_ids)))


def score_model(model: CLIP, *, shards: ShardSet, text: TextCache, device: torch.device | str, loader: str = "auto",
                batch_size: int = 256, transform: ImageTransform, threads: int = 2, folds: int = 1,
                progress: bool = True) -> dict:
    """Retrieval metrics of `model` on `shards` (a ShardSet) with captions from `text` (a TextCache).

    Scores every image in this process alone (the trainer calls it on rank 0 only).
    """
    emb = embed_split(model, shards=shards, text=text, device=torch.device(device), loader=loader,
                      batch_size=batch_size, transform=transform, threads=threads, progress=progress)
    return retrieval_metrics(emb.image_feats.to(device), emb.text_feats.to(device), emb.text_to_image, folds=folds)


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


def load_image_embeddings(path: Path) -> tuple[np.ndarray, torch.Tensor, dict[str, str]]:
    """(image ids [I], L2-normalised image embeddings [I, E] float32, the file's metadata) of an embeddings file."""
    table = pq.read_table(path)
    metadata = schema_metadata(table.schema)
    images = table.filter(pc.equal(table.column("kind"), "image"))
    column = images.column("embedding").combine_chunks()
    feats = column.flatten().to_numpy(zero_copy_only=False).reshape(len(images), column.type.list_size)
    return images.column("image_id").to_numpy().astype(np.int64), torch.tensor(feats, dtype=torch.float32), metadata
