"""clip_loss against a float64 hand computation, and under 2-rank DDP against one process on the global batch."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clip.loss import clip_loss


def _reference(img: np.ndarray, txt: np.ndarray, scale: float) -> float:
    # InfoNCE written out: for every row, -log softmax of its positive, both directions, averaged.
    n = img.shape[0]
    sims = [[scale * float(np.dot(img[i], txt[j])) for j in range(n)] for i in range(n)]
    i2t = [-(sims[i][i] - math.log(sum(math.exp(s) for s in sims[i]))) for i in range(n)]
    t2i = [-(sims[j][j] - math.log(sum(math.exp(sims[i][j]) for i in range(n)))) for j in range(n)]
    return (sum(i2t) / n + sum(t2i) / n) / 2


def _feats(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def test_loss_matches_float64_hand_computation():
    img, txt = _feats(7, 16, seed=0)
    scale = torch.tensor(1 / 0.07)
    got = clip_loss(img.float(), txt.float(), scale)
    assert got.item() == pytest.approx(_reference(img.numpy(), txt.numpy(), 1 / 0.07), rel=1e-5)


def test_perfect_pairs_give_low_loss_and_swapped_pairs_high():
    img, _ = _feats(8, 32, seed=1)
    scale = torch.tensor(100.0)
    assert clip_loss(img.float(), img.float(), scale).item() < 0.05
    assert clip_loss(img.float(), img.float().roll(1, dims=0), scale).item() > 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, img: torch.Tensor, txt: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = img.shape[0] // world
        local_img = img[rank * b:(rank + 1) * b].clone().requires_grad_()
        local_txt = txt[rank * b:(rank + 1) * b].clone().requires_grad_()
        loss = clip_loss(local_img, local_txt, torch.tensor(1 / 0.07))
        loss.backward()
        out[rank] = (loss.detach(), local_img.grad, local_txt.grad)
    finally:
        dist.destroy_process_group()


def test_ddp_loss_equals_single_process_loss_on_global_batch():
    img, txt = _feats(8, 16, seed=2)
    img, txt = img.float(), txt.float()
    world = 2
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(world, _free_port(), img, txt, out), nprocs=world, join=True)
        out = dict(out)

    ref_img, ref_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    ref = clip_loss(ref_img, ref_txt, torch.tensor(1 / 0.07))
    ref.backward()
    b = img.shape[0] // world
    for rank in range(world):
        loss, g_img, g_txt = out[rank]
        torch.testing.assert_close(loss, ref.detach())
        # Each rank's rows get the world's summed (identical) gradients; DDP divides by world size.
        torch.testing.assert_close(g_img / world, ref_img.grad[rank * b:(rank + 1) * b])
        torch.testing.assert_close(g_txt / world, ref_txt.grad[rank * b:(rank + 1) * b])
