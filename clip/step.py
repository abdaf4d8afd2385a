"""One training step of `clipcoco train` (and `clipcoco bench train`): the text side of a batch from the caches
(`TextStream` → `TextBatch`), then forward, loss, backward and update (`train_step`).

The text tower is frozen and cached, so a step runs only the image tower (or, on cached trunk features, the heads)
and the text head: the text side of a batch is rows of the text cache, one random caption per image or all of them,
plus `train.extra_negatives` captions of other images (clip/negatives.py).
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from clip.loss import Loss
from clip.negatives import ExtraNegatives
from pipeline.text_cache import TextCache


@dataclass
class TextBatch:
    """The text side of one step, from the caches: [B x K, D] caption vectors (K slots per image, `valid` [B, K]
    saying which hold one; K = 1 and valid None for one caption per image) and optional extra negatives."""

    caption_vectors: Tensor
    valid: Tensor | None = None
    extra: Tensor | None = None  # [X, D]
    extra_ids: Tensor | None = None  # [X] int64, the images the extras belong to


class TextStream:
    """The cached text of each step on this rank: every caption of each image (`every_caption`, train.captions
    `all`) or one drawn from `caption_rng` (`one`: one stream per rank, saved in the run's "rng" component), and
    this rank's share of the extra negatives."""

    def __init__(self, cache: TextCache, *, every_caption: bool, caption_rng: torch.Generator,
                 negatives: ExtraNegatives | None, device: torch.device) -> None:
        self.cache, self.every_caption, self.caption_rng = cache, every_caption, caption_rng
        self.negatives, self.device = negatives, device

    def batch(self, image_ids: Tensor) -> TextBatch:
        if self.every_caption:
            vectors, valid = self.cache.all_captions(image_ids, self.cache.max_captions)
            batch = TextBatch(vectors.to(self.device, non_blocking=True), valid)
        else:
            batch = TextBatch(self.cache.sample(image_ids, self.caption_rng).to(self.device, non_blocking=True))
        if self.negatives is not None:
            extra, extra_ids = self.negatives.draw()
            batch.extra, batch.extra_ids = extra.to(self.device, non_blocking=True), extra_ids
        return batch


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, images: Tensor,
               text: Tensor | TextBatch, *, loss: Loss, grad_clip: float, bf16: bool,
               image_ids: Tensor | None = None) -> Tensor:
    """One optimisation step on a batch of images (or cached trunk features) and their captions' cached vectors,
    `text` a [B, D] tensor (one caption per image) or a TextBatch, with the run's `loss` (clip.loss.create_loss);
    returns the loss."""
    if not isinstance(text, TextBatch):
        text = TextBatch(text)
    n_captions = text.caption_vectors.shape[0]
    # Captions and extras through the text head in one forward, so DDP sees the head used once.
    rows = text.caption_vectors if text.extra is None else torch.cat([text.caption_vectors, text.extra])
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        image_feats, text_feats, logit_scale, logit_bias = model(images, rows)
        extra = text_feats[n_captions:] if text.extra is not None else None
        value = loss(image_feats, text_feats[:n_captions], logit_scale, valid=text.valid, extra=extra,
                     image_ids=image_ids, extra_ids=text.extra_ids, bias=logit_bias)
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return value.detach()
