"""Retrieval metrics against a brute-force reference, and `clipcoco eval` end to end on tiny data."""

import numpy as np
import pytest
import torch

from clip.evaluate import retrieval_metrics
from pipeline.errors import UserError


def reference(image_feats: np.ndarray, text_feats: np.ndarray, text_to_image: np.ndarray) -> dict:
    """VSE++-style: the full similarity matrix, argsort, the position of the first positive."""
    sim = image_feats.astype(np.float64) @ text_feats.astype(np.float64).T
    i2t = np.array([np.flatnonzero(np.isin(np.argsort(-sim[i]), np.flatnonzero(text_to_image == i))).min()
                    for i in range(sim.shape[0])])
    t2i = np.array([np.flatnonzero(np.argsort(-sim[:, j]) == text_to_image[j])[0] for j in range(sim.shape[1])])
    out = {f"{d}_r{k}": float(np.mean(r < k)) for d, r in (("i2t", i2t), ("t2i", t2i)) for k in (1, 5, 10)}
    out["mean_recall"] = float(np.mean(list(out.values())))
    out["i2t_medr"] = float(np.floor(np.median(i2t)) + 1)
    out["t2i_medr"] = float(np.floor(np.median(t2i)) + 1)
    return out


def random_problem(n_images=40, dim=8, seed=0):
    """Random unit features with 3 to 7 captions per image, captions noisy copies of their image."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n_images, dim)).astype(np.float32)
    counts = rng.integers(3, 8, size=n_images)
    text_to_image = np.repeat(np.arange(n_images), counts)
    texts = images[text_to_image] + 1.5 * rng.standard_normal((len(text_to_image), dim)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    return images, texts, text_to_image


def assert_metrics_equal(got: dict, want: dict):
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("chunks", [(1, 1), (3, 7), (7, 2), (16, 64), (1000, 10000)])
def test_matches_brute_force(chunks):
    images, texts, t2i = random_problem()
    want = reference(images, texts, t2i)
    assert 0 < want["i2t_r1"] < 1 and 0 < want["t2i_r10"] < 1  # a problem where the recalls are informative
    got = retrieval_metrics(torch.from_numpy(images), torch.from_numpy(texts), torch.from_numpy(t2i),
                            chunk_images=chunks[0], chunk_texts=chunks[1])
    assert_metrics_equal(got, want)
    assert got["n_images"] == len(images) and got["n_captions"] == len(texts)


def test_identity_embeddings_are_perfect():
    n = 9
    t2i = np.repeat(np.arange(n), 5)
    eye = torch.eye(n)
    got = retrieval_metrics(eye, eye[t2i], torch.from_numpy(t2i), chunk_images=4, chunk_texts=6)
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall"):
        assert got[key] == 1.0
    assert got["i2t_medr"] == 1.0 and got["t2i_medr"] == 1.0


def test_six_and_four_captions_by_hand():
    # image_feats = identity, so the similarity matrix is exactly the hand-written S.
    s = np.array([
        # image 0's six captions          | image 1's four captions
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.9, 0.95, 0.8, 0.7, 0.6],
        [0.5, 0.6, 0.7, 0.8, 0.9, 0.4, 0.2, 0.3, 0.1, 0.05],
    ], dtype=np.float32)
    t2i = torch.tensor([0] * 6 + [1] * 4)
    got = retrieval_metrics(torch.eye(2), torch.from_numpy(s.T.copy()), t2i, chunk_images=1, chunk_texts=3)
    # image 0: best own 0.9, beaten by 0.95 -> rank 1; image 1: best own 0.3, beaten by six -> rank 6.
    assert (got["i2t_r1"], got["i2t_r5"], got["i2t_r10"]) == (0.0, 0.5, 1.0)
    assert got["i2t_medr"] == 4.0  # floor(median(1, 6)) + 1
    # captions: only image 0's last caption prefers its own image.
    assert (got["t2i_r1"], got["t2i_r5"], got["t2i_r10"]) == (pytest.approx(0.1), 1.0, 1.0)
    assert got["t2i_medr"] == 2.0
    assert got["mean_recall"] == pytest.approx(0.6)
    assert (got["n_images"], got["n_captions"]) == (2, 10)


def test_ties_count_against_the_positive():
    # Two identical images, each with one caption identical to it: every positive ties a competitor.
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    got = retrieval_metrics(feats, feats.clone(), torch.tensor([0, 1]))
    assert got["i2t_r1"] == 0.0 and got["t2i_r1"] == 0.0
    assert got["i2t_r5"] == 1.0 and got["t2i_r5"] == 1.0


def test_shuffled_order_gives_the_same_result():
    images, texts, t2i = random_problem(seed=1)
    want = retrieval_metrics(torch.from_numpy(images), torch.from_numpy(texts), torch.from_numpy(t2i), chunk_images=5)
    rng = np.random.default_rng(2)
    perm, text_perm = rng.permutation(len(images)), rng.permutation(len(texts))
    new_row = np.argsort(perm)  # old image row -> its row after shuffling
    got = retrieval_metrics(torch.from_numpy(images[perm]), torch.from_numpy(texts[text_perm]),
                            torch.from_numpy(new_row[t2i[text_perm]]), chunk_images=5)
    assert_metrics_equal(got, want)


def test_folds_average_consecutive_image_blocks():
    images, texts, t2i = random_problem(n_images=43, seed=3)
    got = retrieval_metrics(torch.from_numpy(images), torch.from_numpy(texts), torch.from_numpy(t2i), folds=4)
    size = 43 // 4  # the remaining 3 images are left out
    refs = []
    for f in range(4):
        keep = (t2i >= f * size) & (t2i < (f + 1) * size)
        refs.append(reference(images[f * size:(f + 1) * size], texts[keep], t2i[keep] - f * size))
    assert_metrics_equal(got, {key: np.mean([r[key] for r in refs]) for key in refs[0]})
    assert got["folds"] == 4 and got["fold_size"] == size and len(got["per_fold"]) == 4
    assert got["n_images"] == 4 * size and got["n_captions"] == int(((t2i >= 0) & (t2i < 4 * size)).sum())


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 1]))
    with pytest.raises(UserError, match="folds"):
        retrieval_metrics(torch.eye(3), torch.eye(3), torch.arange(3), folds=5)
