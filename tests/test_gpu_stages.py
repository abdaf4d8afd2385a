"""GPU-only checks of the stages around training (`pytest -m gpu`; skipped cleanly without CUDA): eval on one GPU
scores every image exactly once, and embed-text in bf16 agrees with fp32. The bf16 + channels_last training step
fed by DALI `mixed` is tests/test_train.py::test_gpu_bf16_dali_run_resumes; decoding is tests/test_gpu.py."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_coco

from clip.apps.bench_data import make_captions, make_text_model
from clip.config import DataConfig, load_config
from clip.embeddings import embed_split, score_model
from clip.model import build_model
from pipeline.embed_text import embed_text
from pipeline.shard_reader import open_shards
from pipeline.shards import build_shards
from pipeline.text_cache import TextCache

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
N_IMAGES = 13  # batches of 4: 4, 4, 4, 1
EMBED_DIM = 16


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    """A random 2-layer DistilBERT with a word-level tokenizer, saved like a hub folder (nothing downloaded)."""
    folder = tmp_path_factory.mktemp("text-model")
    make_text_model(folder, dim=128, layers=2, seed=0)
    return folder


@pytest.fixture(scope="module")
def split(tmp_path_factory, text_model):
    """(ShardSet of 13 images in 3 shards, its text cache, an untrained seeded resnet18 CLIP on the CPU)."""
    root = tmp_path_factory.mktemp("eval")
    annotations, images = write_coco(root / "coco", N_IMAGES, size=(80, 60), first_id=100)
    build_shards(out=root / "shards", images=images, annotations=annotations, samples_per_shard=5, workers=1,
                 progress=False)
    text = embed_text(root / "shards", model=str(text_model), device="cpu", progress=False)
    cache = TextCache.load(text)
    cfg = load_config(None, {"model.image_model": "resnet18", "model.image_weights": "none",
                             "model.embed_dim": EMBED_DIM, "data.image_size": 32})
    torch.manual_seed(0)
    return open_shards(root / "shards"), cache, build_model(cfg.model, cache.dim)


def embed(model, shards, cache, device, loader):
    # The model as `clipcoco eval` places it: on the device, channels_last.
    model = copy.deepcopy(model).to(device, memory_format=torch.channels_last)
    return embed_split(model, shards=shards, text=cache, device=device, loader=loader, batch_size=4,
                       transform=DataConfig(image_size=32).transform(), threads=2, progress=False)


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_eval_on_one_gpu_scores_every_image_once(split, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    shards, cache, model = split
    gpu = embed(model, shards, cache, CUDA, loader)
    assert np.array_equal(gpu.image_ids, shards.image_ids()) and gpu.image_feats.shape == (N_IMAGES, EMBED_DIM)
    assert len(gpu.caption_ids) == len(cache) == 5 * N_IMAGES
    # The same images through the same weights on the CPU (for DALI: libjpeg-turbo instead of nvJPEG). Rows are
    # L2-normalised, so dots are cosines; an untrained tower puts different images at cosines up to ~0.99, so each
    # GPU row must also be nearest to its own CPU row, not only close to it.
    cpu = embed(model, shards, cache, CPU, loader)
    cosine = gpu.image_feats @ cpu.image_feats.T  # [I, I]
    assert torch.equal(cosine.argmax(1), torch.arange(N_IMAGES)) and cosine.diagonal().min() > 0.999
    cuda_model = copy.deepcopy(model).to(CUDA, memory_format=torch.channels_last)
    report = score_model(cuda_model, shards=shards, text=cache, device=CUDA, loader=loader, batch_size=4,
                         transform=DataConfig(image_size=32).transform(), threads=2, progress=False)
    assert report["n_images"] == N_IMAGES and report["n_captions"] == 5 * N_IMAGES


def test_embed_text_in_bf16_matches_fp32(tmp_path, text_model):
    make_captions(tmp_path / "shards", n_captions=300, seed=0)
    options = dict(model=str(text_model), device="cuda", batch_size=64, progress=False)
    fp32 = TextCache.load(embed_text(tmp_path / "shards", dtype="float32", out=tmp_path / "fp32.parquet", **options))
    auto = TextCache.load(embed_text(tmp_path / "shards", dtype="auto", out=tmp_path / "auto.parquet", **options))
    # auto = bf16 on CUDA
    assert fp32.metadata["compute_dtype"] == "float32" and auto.metadata["compute_dtype"] == "bfloat16"
    assert np.array_equal(fp32.caption_ids, auto.caption_ids) and len(fp32) == 300
    a, b = fp32.embeddings.float(), auto.embeddings.float()
    assert not torch.equal(a, b)  # bf16 really ran: its rounding shows in the stored float16 values
    assert torch.nn.functional.cosine_similarity(a, b).min() >= 0.999
