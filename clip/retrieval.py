"""Retrieval metrics: Recall@1/5/10 both ways over every caption, computed the way the literature computes them.

Input: L2-normalised image and caption embeddings and each caption's image. Output: a dict of recalls (fractions),
median ranks and counts, or their mean over the 1K protocol's folds. Used by `clipcoco eval` and the periodic eval
of `clipcoco train`; pure tensor math, no files.

Protocol, over all captions (about 5 per image, not always exactly 5):
- image->text rank of an image = rank of the best-ranked of its own captions among all captions;
- text->image rank of a caption = rank of its image among all images;
- R@K = fraction of queries with rank < K (0-based ranks); medr = floor(median 0-based rank) + 1,
  as in VSE++; mean_recall = mean of the six recalls;
- `folds=5` is the 1K protocol: five folds of consecutive images with their captions, each scored
  alone, every metric averaged over the folds. Every image is in one fold: on 5,000 images each fold holds 1,000,
  otherwise the fold sizes differ by at most one (79 images: 16, 16, 16, 16, 15). Shards hold images in image-id
  order, so the folds are consecutive by image id; the literature cuts them in dataset_coco.json order, so 1K numbers
  are comparable but their fold membership differs (the 5K numbers do not depend on any order).
Ties: a competitor whose score equals the positive's counts ahead of it (pessimistic).
Non-finite scores (NaN, +-Inf) count as the worst score, never the best: every comparison with a NaN is false, so a
NaN positive would otherwise have no competitor ahead of it and rank first. (`clipcoco eval` refuses non-finite
embeddings before they get here.)
"""

import math

import numpy as np
import torch

from pipeline.errors import UserError

RECALL_AT = (1, 5, 10)
RECALL_KEYS = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in RECALL_AT)


def check_folds(folds: int, n_images: int) -> None:
    """--folds must split the images into runs of at least one image each."""
    if not 1 <= folds <= n_images:
        raise UserError(f"--folds {folds}: pass 1 (all images) or 5 (the 1K protocol), at most the {n_images} images "
                        "being scored")


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
        sim.masked_fill_(~torch.isfinite(sim), -math.inf)  # the worst: a non-finite positive has all ahead of it
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
    With folds > 1: images split into `folds` runs of consecutive rows whose sizes differ by at most one (every
    image in one fold), each scored alone; the report is the mean of each metric, plus `fold_sizes` and `per_fold`.
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
    check_folds(folds, n_images)
    if folds > 1:
        # np.array_split's sizes: the first I mod folds folds hold one image more.
        sizes = [len(block) for block in np.array_split(np.arange(n_images), folds)]
        bounds = np.cumsum([0, *sizes])
        per_fold = []
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            keep = (text_to_image >= lo) & (text_to_image < hi)
            per_fold.append(retrieval_metrics(image_feats[lo:hi], text_feats[keep], text_to_image[keep] - lo,
                                              chunk_images=chunk_images, chunk_texts=chunk_texts))
        out = {key: float(np.mean([m[key] for m in per_fold]))
               for key in (*RECALL_KEYS, "mean_recall", "i2t_medr", "t2i_medr")}
        out.update(n_images=sum(m["n_images"] for m in per_fold), n_captions=sum(m["n_captions"] for m in per_fold),
                   folds=folds, fold_sizes=sizes, per_fold=per_fold)
        return out
    counts = torch.bincount(text_to_image, minlength=n_images)
    if n_images == 0 or bool((counts == 0).any()):
        raise ValueError(f"{int((counts == 0).sum())} image(s) have no caption: image->text recall is undefined")
    i2t, t2i = _ranks(image_feats.float(), text_feats.float(), text_to_image,
                      chunk_images=chunk_images, chunk_texts=chunk_texts)
    out = _summary(i2t.cpu().numpy(), t2i.cpu().numpy())
    out["folds"] = 1
    return out
