"""The contrastive losses of `clipcoco train`: CLIP's symmetric InfoNCE and SigLIP's pairwise sigmoid loss, with
several captions per image and extra text negatives, exact under DistributedDataParallel.

Inputs: L2-normalised image features [B, E] of this process's batch and text features [B x K, E] (row i x K + k is
caption k of image i; `valid` [B, K] says which of those slots hold a caption, since COCO images have 5 to 7), the
logit scale (and SigLIP's logit bias), and optionally extra text negatives [X, E] with their image ids, which are
masked out where they belong to an image of the (global) batch. Output: a scalar loss.

    loss = clip_loss(img, txt, scale)                                    # one caption per image: CLIP's loss
    loss = clip_loss(img, txt, scale, valid=valid, extra=neg, image_ids=ids, extra_ids=neg_ids, kind="sigmoid", bias=b)

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

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.nn.functional import all_gather

from clip.config import LOSSES
from pipeline.runtime import gather_equal


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather(feats: Tensor) -> Tensor:
    # all_gather from torch.distributed.nn carries gradients back to the rank that owns each row. Recent torch
    # marks it deprecated in favour of a private module; it works, so keep its per-step warning out of the logs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(feats), dim=0)


def clip_loss(image_feats: Tensor, text_feats: Tensor, logit_scale: Tensor, *, valid: Tensor | None = None,
              extra: Tensor | None = None, image_ids: Tensor | None = None, extra_ids: Tensor | None = None,
              kind: str = "infonce", bias: Tensor | None = None) -> Tensor:
    """The loss over the global batch (see the module docstring for the shapes).

    Under DDP every rank gathers all features, masks and ids and computes the same loss over the global batch, so
    it equals a single-process loss on that batch. Each rank's features then receive the sum of the world's
    identical gradients, which DDP's gradient averaging brings back to the true gradient.
    """
    if kind not in LOSSES:
        raise ValueError(f"loss {kind!r} is not one of {LOSSES}")
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
    logits = logit_scale * img @ text_feats.float().T  # [N, N x K]: column i x K + k is caption k of image i
    owner = torch.arange(n, device=device).repeat_interleave(k)  # [N x K]: the image each text column belongs to
    columns = valid.reshape(-1)  # [N x K]: slots holding a caption
    positive = (owner[None, :] == torch.arange(n, device=device)[:, None]) & columns[None, :]  # [N, N x K]
    negative = ~positive & columns[None, :]
    extra_logits = keep = None
    if extra is not None:
        extra_logits = logit_scale * img @ extra.float().T  # [N, X]
        keep = ~torch.isin(extra_ids, image_ids)  # [X]: a caption of a batch image is no negative
    if kind == "sigmoid":
        return _sigmoid(logits, positive, negative, extra_logits, keep, bias)
    return _infonce(logits, positive, negative, owner, columns, extra_logits, keep)


def _infonce(logits: Tensor, positive: Tensor, negative: Tensor, owner: Tensor, columns: Tensor,
             extra_logits: Tensor | None, keep: Tensor | None) -> Tensor:
    minus_inf = torch.tensor(float("-inf"), device=logits.device)
    negatives = torch.where(negative, logits, minus_inf)
    if extra_logits is not None:
        negatives = torch.cat([negatives, torch.where(keep[None, :], extra_logits, minus_inf)], dim=1)
    negative_lse = torch.logsumexp(negatives, dim=1, keepdim=True)  # [N, 1]
    # -log(e^s / (e^s + sum of the negatives' e^s)) for every positive s of a row, averaged per image, then over images.
    per_positive = F.softplus(negative_lse - logits) * positive
    i2t = (per_positive.sum(dim=1) / positive.sum(dim=1)).mean()
    # Text->image: each caption against the N images; its target is its own image.
    t2i = F.cross_entropy(logits.T[columns], owner[columns])
    return (i2t + t2i) / 2


def _sigmoid(logits: Tensor, positive: Tensor, negative: Tensor, extra_logits: Tensor | None, keep: Tensor | None,
             bias: Tensor | None) -> Tensor:
    if bias is None:
        raise ValueError("the sigmoid loss needs the model's logit bias")
    z = logits + bias
    total = -(F.logsigmoid(z) * positive).sum() - (F.logsigmoid(-z) * negative).sum()
    if extra_logits is not None:
        total = total - (F.logsigmoid(-(extra_logits + bias)) * keep[None, :]).sum()
    return total / logits.shape[0]
