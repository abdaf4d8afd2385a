"""The contrastive losses of `clipcoco train`: CLIP's symmetric InfoNCE and SigLIP's pairwise sigmoid loss, with
several captions per image and extra text negatives, exact under DistributedDataParallel.

Inputs: L2-normalised image features [B, E] of this process's batch and text features [B x K, E] (row i x K + k is
caption k of image i; `valid` [B, K] says which of those slots hold a caption, since COCO images have 5 to 7), the
logit scale (and SigLIP's logit bias), and optionally extra text negatives [X, E] with their image ids, which are
masked out where they belong to an image of the (global) batch. Output: a scalar loss.

    loss_fn = create_loss(cfg.model.loss)                                # once, when the run is built
    loss = loss_fn(img, txt, scale)                                      # one caption per image: CLIP's loss
    loss = loss_fn(img, txt, scale, valid=valid, extra=neg, image_ids=ids, extra_ids=neg_ids, bias=b)

InfoNCE with several positives (`K > 1`): image->text is the mean, over an image's captions, of each caption's
-log softmax against the negatives alone (the captions of other images and the extras; an image's own other
captions are never its negatives). That is the expectation over the caption choice of the one-caption loss, so
every caption pulls on the image with the same weight; the other form, -log of the positives' summed probability,
is satisfied by one well-matched caption and lets the rest drift (SupCon, Khosla et al. 2020, found the mean of
log-probabilities, their L_out, the better of the two). Text->image: each caption against the batch's images.
Sigmoid (Zhai et al. 2023): every (image, caption) pair is a binary problem, -log sigmoid(+-(scale x cos + bias)),
summed and divided by the number of images; an image's captions are all positives, extras are negatives.
"""

import warnings
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.nn.functional import all_gather

from pipeline.runtime import gather_equal


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather(feats: Tensor) -> Tensor:
    # all_gather from torch.distributed.nn carries gradients back to the rank that owns each row. Recent torch
    # marks it deprecated in favour of a private module; it works, so keep its per-step warning out of the logs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(feats), dim=0)


class Pairs(NamedTuple):
    """The similarities of a global batch and which of them are positives and negatives (what both losses read)."""

    logits: Tensor  # [N, N x K]: column i x K + k is caption k of image i
    positive: Tensor  # [N, N x K] bool
    negative: Tensor  # [N, N x K] bool
    owner: Tensor  # [N x K]: the image each text column belongs to
    columns: Tensor  # [N x K] bool: slots holding a caption
    extra_logits: Tensor | None  # [N, X]
    keep: Tensor | None  # [X] bool: extras that are negatives of every image (not a caption of a batch image)


def pairs(image_feats: Tensor, text_feats: Tensor, logit_scale: Tensor, *, valid: Tensor | None = None,
          extra: Tensor | None = None, image_ids: Tensor | None = None, extra_ids: Tensor | None = None) -> Pairs:
    """The similarities over the global batch (see the module docstring for the shapes).

    Under DDP every rank gathers all features, masks and ids and computes the same loss over the global batch, so
    it equals a single-process loss on that batch. Each rank's features then receive the sum of the world's
    identical gradients, which DDP's gradient averaging brings back to the true gradient.
    """
    device = image_feats.device
    if valid is None:
        valid = torch.ones(image_feats.shape[0], text_feats.shape[0] // image_feats.shape[0], dtype=torch.bool)
    valid = valid.to(device)
    if extra is not None:
        if image_ids is None or extra_ids is None:
            raise ValueError("extra negatives need image_ids and extra_ids (to mask the batch's own captions)")
        image_ids, extra_ids = image_ids.to(device), extra_ids.to(device)
    if _world() > 1:  # [B, E] -> [B x world, E], and the same for every other input
        image_feats, text_feats = _gather(image_feats), _gather(text_feats)
        valid = gather_equal(valid.to(torch.uint8)).bool()
        if extra is not None:
            extra, image_ids, extra_ids = _gather(extra), gather_equal(image_ids), gather_equal(extra_ids)
    n, k = valid.shape
    img = image_feats.float()
    logits = logit_scale * img @ text_feats.float().T
    owner = torch.arange(n, device=device).repeat_interleave(k)
    columns = valid.reshape(-1)
    positive = (owner[None, :] == torch.arange(n, device=device)[:, None]) & columns[None, :]
    negative = ~positive & columns[None, :]
    extra_logits = keep = None
    if extra is not None:
        extra_logits = logit_scale * img @ extra.float().T
        keep = ~torch.isin(extra_ids, image_ids)
    return Pairs(logits, positive, negative, owner, columns, extra_logits, keep)


class InfoNCE:
    """CLIP's symmetric InfoNCE; with several captions per image, the mean over an image's captions (the module
    docstring says why). The logit bias, SigLIP's, is not used."""

    def __call__(self, image_feats: Tensor, text_feats: Tensor, logit_scale: Tensor, *, bias: Tensor | None = None,
                 **batch) -> Tensor:
        p = pairs(image_feats, text_feats, logit_scale, **batch)
        minus_inf = torch.tensor(float("-inf"), device=p.logits.device)
        negatives = torch.where(p.negative, p.logits, minus_inf)
        if p.extra_logits is not None:
            negatives = torch.cat([negatives, torch.where(p.keep[None, :], p.extra_logits, minus_inf)], dim=1)
        negative_lse = torch.logsumexp(negatives, dim=1, keepdim=True)  # [N, 1]
        # -log(e^s / (e^s + sum of the negatives' e^s)) for every positive s of a row, averaged per image, then over
        # images.
        per_positive = F.softplus(negative_lse - p.logits) * p.positive
        i2t = (per_positive.sum(dim=1) / p.positive.sum(dim=1)).mean()
        # Text->image: each caption against the N images; its target is its own image.
        t2i = F.cross_entropy(p.logits.T[p.columns], p.owner[p.columns])
        return (i2t + t2i) / 2


class SigmoidLoss:
    """SigLIP's pairwise sigmoid loss: every (image, caption) pair a binary problem, with the model's logit bias."""

    def __call__(self, image_feats: Tensor, text_feats: Tensor, logit_scale: Tensor, *, bias: Tensor | None = None,
                 **batch) -> Tensor:
        if bias is None:
            raise ValueError("the sigmoid loss needs the model's logit bias")
        p = pairs(image_feats, text_feats, logit_scale, **batch)
        z = p.logits + bias
        total = -(F.logsigmoid(z) * p.positive).sum() - (F.logsigmoid(-z) * p.negative).sum()
        if p.extra_logits is not None:
            total = total - (F.logsigmoid(-(p.extra_logits + bias)) * p.keep[None, :]).sum()
        return total / p.logits.shape[0]


Loss = InfoNCE | SigmoidLoss


def create_loss(name: str) -> Loss:
    """The loss `model.loss` names (one of config.LOSSES), made once when a run is built. Either is called as
    `loss(image_feats, text_feats, logit_scale, bias=..., valid=..., extra=..., image_ids=..., extra_ids=...)`, the
    keywords optional as `pairs` takes them."""
    return {"infonce": InfoNCE, "sigmoid": SigmoidLoss}[name]()
