"""The losses of create_loss against float64 hand computations (InfoNCE and sigmoid, one or several captions per
image, extra negatives), and under 2-rank DDP against one process on the global batch."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clip.loss import create_loss


def _reference(img: np.ndarray, txt: np.ndarray, scale: float) -> float:
    # InfoNCE written out: for every row, -log softmax of its positive, both directions, averaged.
    n = img.shape[0]
    sims = [[scale * float(np.dot(img[i], txt[j])) for j in range(n)] for i in range(n)]
    i2t = [-(sims[i][i] - math.log(sum(math.exp(s) for s in sims[i]))) for i in range(n)]
    t2i = [-(sims[j][j] - math.log(sum(math.exp(sims[i][j]) for i in range(n)))) for j in range(n)]
    return (sum(i2t) / n + sum(t2i) / n) / 2


def _reference_multi(img, txt, owner, scale, extra=None, extra_owner=(), *, kind="infonce", bias=0.0) -> float:
    """Written out per pair: `owner[c]` is the image of caption c; extras whose owner is in the batch are dropped.
    InfoNCE: image->text = mean over an image's captions p of -log(e^s_p / (e^s_p + sum over negatives e^s)), the
    negatives being the other images' captions and the kept extras; text->image = each caption's -log softmax over
    the images. Sigmoid: -sum over pairs of log sigmoid(+-(scale cos + bias)), divided by the number of images."""
    n, m = img.shape[0], txt.shape[0]
    kept = [] if extra is None else [x for x, o in zip(extra, extra_owner, strict=True) if o not in range(n)]
    s = [[scale * float(np.dot(img[i], txt[c])) for c in range(m)] for i in range(n)]
    x = [[scale * float(np.dot(img[i], e)) for e in kept] for i in range(n)]
    if kind == "sigmoid":
        def logsig(v):
            return -math.log1p(math.exp(-v))
        total = sum(-logsig((1 if owner[c] == i else -1) * (s[i][c] + bias)) for i in range(n) for c in range(m))
        total += sum(-logsig(-(v + bias)) for i in range(n) for v in x[i])
        return total / n
    i2t = []
    for i in range(n):
        neg = sum(math.exp(s[i][c]) for c in range(m) if owner[c] != i) + sum(math.exp(v) for v in x[i])
        pos = [c for c in range(m) if owner[c] == i]
        i2t.append(sum(-math.log(math.exp(s[i][c]) / (math.exp(s[i][c]) + neg)) for c in pos) / len(pos))
    t2i = [-(s[owner[c]][c] - math.log(sum(math.exp(s[i][c]) for i in range(n)))) for c in range(m)]
    return (sum(i2t) / n + sum(t2i) / m) / 2


def _slots(counts: list[int], txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions laid out K = max(counts) slots per image (unused slots repeat a caption) and their valid mask."""
    k, rows, valid, start = max(counts), [], [], 0
    for c in counts:
        rows += [start + min(j, c - 1) for j in range(k)]
        valid.append([j < c for j in range(k)])
        start += c
    return txt[rows], torch.tensor(valid)


def _feats(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def test_loss_matches_float64_hand_computation():
    img, txt = _feats(7, 16, seed=0)
    scale = torch.tensor(1 / 0.07)
    got = create_loss("infonce")(img.float(), txt.float(), scale)
    assert got.item() == pytest.approx(_reference(img.numpy(), txt.numpy(), 1 / 0.07), rel=1e-5)


def test_perfect_pairs_give_low_loss_and_swapped_pairs_high():
    img, _ = _feats(8, 32, seed=1)
    scale = torch.tensor(100.0)
    loss = create_loss("infonce")
    assert loss(img.float(), img.float(), scale).item() < 0.05
    assert loss(img.float(), img.float().roll(1, dims=0), scale).item() > 5


@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
def test_several_captions_and_extra_negatives_match_float64_hand_computation(kind):
    counts = [2, 3, 1, 2]  # captions per image: slots are padded to 3 and masked
    owner = [i for i, c in enumerate(counts) for _ in range(c)]
    img, _ = _feats(len(counts), 16, seed=3)
    g = torch.Generator().manual_seed(4)
    txt = F.normalize(img[owner] + 0.7 * torch.randn(len(owner), 16, generator=g, dtype=torch.float64), dim=-1)
    extra = F.normalize(torch.randn(5, 16, generator=g, dtype=torch.float64), dim=-1)
    extra_owner = [10, 2, 11, 12, 0]  # two of them belong to batch images 2 and 0: they must not count
    slots, valid = _slots(counts, txt)
    scale, bias = 1 / 0.07, -3.0
    got = create_loss(kind)(img.float(), slots.float(), torch.tensor(scale), valid=valid, extra=extra.float(),
                            image_ids=torch.arange(4), extra_ids=torch.tensor(extra_owner), bias=torch.tensor(bias))
    want = _reference_multi(img.numpy(), txt.numpy(), owner, scale, extra.numpy(), extra_owner, kind=kind, bias=bias)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # Without extras, and with one caption per image, the InfoNCE form is CLIP's loss exactly.
    if kind == "infonce":
        one = create_loss(kind)(img.float(), txt[[0, 2, 5, 6]].float(), torch.tensor(scale),
                                valid=torch.ones(4, 1).bool())
        assert one.item() == pytest.approx(_reference(img.numpy(), txt[[0, 2, 5, 6]].numpy(), scale), rel=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, img: torch.Tensor, txt: torch.Tensor, out: dict,
                extras: dict | None = None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = img.shape[0] // world
        local_img = img[rank * b:(rank + 1) * b].clone().requires_grad_()
        if extras is None:
            local_txt = txt[rank * b:(rank + 1) * b].clone().requires_grad_()
            loss = create_loss("infonce")(local_img, local_txt, torch.tensor(1 / 0.07))
        else:  # several caption slots per image, a share of the extra negatives, the sigmoid or InfoNCE form
            k, x = extras["valid"].shape[1], extras["extra"].shape[0] // world
            local_txt = txt[rank * b * k:(rank + 1) * b * k].clone().requires_grad_()
            local_extra = extras["extra"][rank * x:(rank + 1) * x].clone().requires_grad_()
            loss = create_loss(extras["kind"])(local_img, local_txt, torch.tensor(1 / 0.07),
                                               valid=extras["valid"][rank * b:(rank + 1) * b], extra=local_extra,
                                               image_ids=extras["ids"][rank * b:(rank + 1) * b],
                                               extra_ids=extras["extra_ids"][rank * x:(rank + 1) * x],
                                               bias=torch.tensor(-2.0))
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
    ref = create_loss("infonce")(ref_img, ref_txt, torch.tensor(1 / 0.07))
    ref.backward()
    b = img.shape[0] // world
    for rank in range(world):
        loss, g_img, g_txt = out[rank]
        torch.testing.assert_close(loss, ref.detach())
        # Each rank's rows get the world's summed (identical) gradients; DDP divides by world size.
        torch.testing.assert_close(g_img / world, ref_img.grad[rank * b:(rank + 1) * b])
        torch.testing.assert_close(g_txt / world, ref_txt.grad[rank * b:(rank + 1) * b])


@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
def test_ddp_multi_caption_loss_with_extras_equals_single_process(kind):
    world, k = 2, 3
    img, _ = _feats(6, 8, seed=6)
    g = torch.Generator().manual_seed(7)
    txt = F.normalize(img.repeat_interleave(k, 0) + torch.randn(18, 8, generator=g, dtype=torch.float64), dim=-1)
    valid = torch.tensor([[True, True, False], [True, False, False], [True, True, True]] * 2)
    # Rank 1's extras include a caption of image 102, which sits in rank 0's batch: masked on both ranks.
    extras = {"valid": valid, "extra": F.normalize(torch.randn(4, 8, generator=g), dim=-1),
              "ids": torch.arange(100, 106), "extra_ids": torch.tensor([7, 8, 102, 9]), "kind": kind}
    img, txt = img.float(), txt.float()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(world, _free_port(), img, txt, out, extras), nprocs=world, join=True)
        out = dict(out)
    ref_img, ref_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    ref = create_loss(kind)(ref_img, ref_txt, torch.tensor(1 / 0.07), valid=valid, extra=extras["extra"],
                            image_ids=extras["ids"], extra_ids=extras["extra_ids"], bias=torch.tensor(-2.0))
    ref.backward()
    b = 3
    for rank in range(world):
        loss, g_img, g_txt = out[rank]
        torch.testing.assert_close(loss, ref.detach())
        torch.testing.assert_close(g_img / world, ref_img.grad[rank * b:(rank + 1) * b])
        torch.testing.assert_close(g_txt / world, ref_txt.grad[rank * b * k:(rank + 1) * b * k])
