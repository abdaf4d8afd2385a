"""The symmetric InfoNCE loss of CLIP, with global negatives under DistributedDataParallel.

Inputs: L2-normalised image and text features of this process's batch ([B, E] each, row i of one
paired with row i of the other) and the logit scale. Output: a scalar loss.
Used by the training loop of `clipcoco train`.
"""

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.nn.functional import all_gather


def _gather(feats: Tensor) -> Tensor:
    # all_gather from torch.distributed.nn carries gradients back to the rank that owns each row. Recent torch
    # marks it deprecated in favour of a private module; it works, so keep its per-step warning out of the logs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(feats), dim=0)


def clip_loss(image_feats: Tensor, text_feats: Tensor, logit_scale: Tensor) -> Tensor:
    """Mean of image->text and text->image cross-entropy over the global batch.

    Under DDP every rank gathers all features and computes the same loss over the global batch,
    so it equals a single-process loss on that batch. Each rank's features then receive the sum of
    the world's identical gradients, which DDP's gradient averaging brings back to the true gradient.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        image_feats, text_feats = _gather(image_feats), _gather(text_feats)  # [B, E] -> [B x world, E]
    logits = logit_scale * image_feats.float() @ text_feats.float().T  # [N, N]; row i's positive is column i
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
