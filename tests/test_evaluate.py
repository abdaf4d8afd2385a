"""Retrieval metrics against a brute-force reference, and `clipcoco eval` end to end on tiny data."""

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import cache_metadata, clipcoco, edit_captions, write_coco, write_random_text_cache
from typer.testing import CliRunner

import clip.embeddings as embeddings_module
from cli.main import app
from clip.checkpoint import Checkpoint
from clip.config import DataConfig, load_config
from clip.embeddings import embed_split, score_model
from clip.evaluate import evaluate
from clip.model import build_model
from clip.retrieval import retrieval_metrics
from pipeline.errors import UserError
from pipeline.loaders import make_loader
from pipeline.shard_reader import open_shards
from pipeline.shards import build_shards
from pipeline.text_cache import TextCache


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


def test_a_non_finite_score_ranks_worst_never_first():
    # Image 0's features are NaN: its scores with every caption are NaN, its own caption's included.
    images = torch.tensor([[math.nan, 0.0], [0.0, 1.0], [1.0, 0.0]])
    texts = torch.tensor([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])
    got = retrieval_metrics(images, texts, torch.tensor([0, 1, 2]), chunk_images=2, chunk_texts=2)
    # image 0 -> text: its NaN positive has both competitors ahead (rank 3); images 1 and 2 are first. A NaN
    # competitor (image 0 for captions 1 and 2) is never ahead of a finite positive.
    assert (got["i2t_r1"], got["i2t_medr"]) == (pytest.approx(2 / 3), 1.0)
    assert got["t2i_r1"] == pytest.approx(2 / 3) and got["t2i_r5"] == 1.0
    ranks = [retrieval_metrics(images, texts, torch.tensor([0, 1, 2]), chunk_images=1, chunk_texts=1)[key]
             for key in ("i2t_r1", "t2i_r1")]
    assert ranks == [pytest.approx(2 / 3)] * 2  # the same tile by tile
    inf = retrieval_metrics(torch.tensor([[math.inf, 0.0], [0.0, 1.0]]), torch.eye(2), torch.tensor([0, 1]))
    assert inf["i2t_r1"] == 0.5 and inf["t2i_r1"] == 0.5  # +Inf is no better than NaN


def test_shuffled_order_gives_the_same_result():
    images, texts, t2i = random_problem(seed=1)
    want = retrieval_metrics(torch.from_numpy(images), torch.from_numpy(texts), torch.from_numpy(t2i), chunk_images=5)
    rng = np.random.default_rng(2)
    perm, text_perm = rng.permutation(len(images)), rng.permutation(len(texts))
    new_row = np.argsort(perm)  # old image row -> its row after shuffling
    got = retrieval_metrics(torch.from_numpy(images[perm]), torch.from_numpy(texts[text_perm]),
                            torch.from_numpy(new_row[t2i[text_perm]]), chunk_images=5)
    assert_metrics_equal(got, want)


@pytest.mark.parametrize(("n_images", "sizes"), [(44, [11, 11, 11, 11]), (43, [11, 11, 11, 10])])
def test_folds_average_consecutive_image_blocks_that_cover_every_image(n_images, sizes):
    images, texts, t2i = random_problem(n_images=n_images, seed=3)
    got = retrieval_metrics(torch.from_numpy(images), torch.from_numpy(texts), torch.from_numpy(t2i), folds=4)
    refs, lo = [], 0
    for size in sizes:
        keep = (t2i >= lo) & (t2i < lo + size)
        refs.append(reference(images[lo:lo + size], texts[keep], t2i[keep] - lo))
        lo += size
    assert_metrics_equal(got, {key: np.mean([r[key] for r in refs]) for key in refs[0]})
    assert got["folds"] == 4 and got["fold_sizes"] == sizes and len(got["per_fold"]) == 4
    assert got["n_images"] == n_images and got["n_captions"] == len(t2i)  # no image or caption left out


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 1]))
    with pytest.raises(UserError, match="folds"):
        retrieval_metrics(torch.eye(3), torch.eye(3), torch.arange(3), folds=5)


# ---------------------------------------------------------------------------------------------
# `clipcoco eval` on tiny data: shards of 13 random images (3-7 captions each), a random text cache,
# an untrained resnet18 checkpoint; CPU and the torch loader.

TEXT_DIM = 8
TEXT_METADATA = cache_metadata(TEXT_DIM, model="tiny-text")


def write_text_cache(shards_dir: Path, path: Path, metadata=TEXT_METADATA, seed=0) -> Path:
    return write_random_text_cache(shards_dir, path, dim=TEXT_DIM, seed=seed, metadata=metadata)


CONFIG = {"model.image_model": "resnet18", "model.image_weights": "none", "model.embed_dim": 16,
          "data.image_size": 16}


def make_run(run: Path, *, fingerprint: dict, train_image_ids=(), step=7, text_model_path: str = "") -> Path:
    """A run directory holding one checkpoint of an untrained (seeded) tiny CLIP."""
    cfg = load_config(None, CONFIG)
    torch.manual_seed(0)
    model = build_model(cfg.model, TEXT_DIM)
    return Checkpoint(
        model=model.state_dict(), step=step, epoch=0, config=cfg.to_dict(), text_dim=TEXT_DIM,
        text_fingerprint=fingerprint, shards_fingerprint="the-train-shards",
        train_image_ids=torch.tensor(list(train_image_ids), dtype=torch.int64),
        text_model_path=text_model_path).save(run, keep_last=1)


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    """(shards dir named "test", text cache path) with 13 images of 3 to 7 captions, in 3 shards."""
    root = tmp_path_factory.mktemp("eval")
    ann, images = write_coco(root / "coco", 13, captions_per_image=7, size=(40, 36), first_id=100)
    data = json.loads(ann.read_text())
    counts = {img["id"]: 3 + i % 5 for i, img in enumerate(data["images"])}  # 3..7 captions per image
    kept = []
    for a in data["annotations"]:
        if counts[a["image_id"]] > 0:
            counts[a["image_id"]] -= 1
            kept.append(a)
    data["annotations"] = kept
    ann.write_text(json.dumps(data))
    shards = root / "shards" / "test"
    build_shards(out=shards, images=images, annotations=ann, samples_per_shard=5, workers=1, progress=False)
    return shards, write_text_cache(shards, root / "text.parquet")


@pytest.fixture(scope="module")
def loaded(eval_setup, tmp_path_factory):
    """(ShardSet, TextCache, model) for the library-level tests."""
    shards_dir, text = eval_setup
    cache = TextCache.load(text)
    ckpt = make_run(tmp_path_factory.mktemp("run"), fingerprint=cache.fingerprint)
    return open_shards(shards_dir), cache, Checkpoint.load(ckpt).build_model()


def fingerprint_of(text: Path) -> dict:
    return TextCache.load(text).fingerprint


def embed(loaded, batch_size: int):
    shards, cache, model = loaded
    return embed_split(model, shards=shards, text=cache, device=torch.device("cpu"), loader="torch",
                       batch_size=batch_size, transform=DataConfig(image_size=16).transform(), threads=1,
                       progress=False)


def test_every_image_once_with_a_batch_size_that_does_not_divide(loaded):
    shards, cache, _ = loaded
    emb = embed(loaded, 4)  # 13 images: batches of 4, 4, 4, 1
    assert np.array_equal(emb.image_ids, shards.image_ids()) and emb.image_feats.shape == (13, 16)
    assert len(emb.caption_ids) == len(cache) == 62 and emb.text_to_image.max() == 12
    assert torch.equal(emb.text_to_image, torch.from_numpy(np.searchsorted(emb.image_ids, cache.image_ids)))
    one_batch = embed(loaded, 13)
    torch.testing.assert_close(emb.image_feats, one_batch.image_feats, atol=1e-5, rtol=1e-5)


def test_a_cache_of_more_images_keeps_only_the_shards_captions(loaded, eval_setup, tmp_path):
    shards, cache, model = loaded
    table = pq.read_table(eval_setup[1])
    extra = table.slice(0, 2).set_column(0, "image_id", pa.array([99999, 99999], pa.int64()))
    pq.write_table(pa.concat_tables([table, extra]).replace_schema_metadata(table.schema.metadata), tmp_path / "t.pq")
    bigger = TextCache.load(tmp_path / "t.pq")
    emb = embed_split(model, shards=shards, text=bigger, device=torch.device("cpu"), loader="torch", batch_size=13,
                      transform=DataConfig(image_size=16).transform(), threads=1, progress=False)
    assert len(bigger) == 64 and len(emb.caption_ids) == 62 and 99999 not in emb.caption_image_ids
    torch.testing.assert_close(emb.text_feats, embed(loaded, 13).text_feats)


def test_a_loader_that_repeats_an_image_is_refused(loaded, monkeypatch):
    def padded_loader(*args, **kwargs):  # a loader that pads its last batch by repeating images
        batches = list(make_loader(*args, **kwargs))
        last = batches[-1]
        batches[-1] = type(last)(images=torch.cat([last.images, batches[0].images[:3]]),
                                 image_ids=torch.cat([last.image_ids, batches[0].image_ids[:3]]))
        return contextlib.nullcontext(batches)  # used as `with make_loader(...) as batches`, as a loader is

    monkeypatch.setattr(embeddings_module, "make_loader", padded_loader)
    with pytest.raises(RuntimeError, match="16 images \\(3 repeated, 0 missing\\)"):
        embed(loaded, 4)


def test_shuffled_loader_order_gives_the_same_scores(loaded, monkeypatch):
    shards, cache, model = loaded
    kw = dict(shards=shards, text=cache, device="cpu", loader="torch", batch_size=4,
              transform=DataConfig(image_size=16).transform(), threads=1, progress=False)
    want = score_model(model, **kw)

    def shuffled_loader(*args, **kwargs):
        batches = list(make_loader(*args, **kwargs))
        images = torch.cat([b.images for b in batches])
        ids = torch.cat([b.image_ids for b in batches])
        order = torch.from_numpy(np.random.default_rng(5).permutation(len(ids)))
        return contextlib.nullcontext([type(batches[0])(images=images[order[i:i + 3]], image_ids=ids[order[i:i + 3]])
                                       for i in range(0, len(ids), 3)])

    monkeypatch.setattr(embeddings_module, "make_loader", shuffled_loader)
    got = score_model(model, **kw)
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "i2t_medr", "t2i_medr"):
        assert got[key] == want[key], key
    assert 0 < want["t2i_r5"] < 1  # an informative (not all-or-nothing) result
def test_evaluate_writes_report_and_embeddings_and_counts_the_overlap(eval_setup, tmp_path, capsys):
    shards_dir, text = eval_setup
    train_ids = [100, 105, 112, 999]  # three eval images planted in the run's training set
    ckpt = make_run(tmp_path / "run", fingerprint=fingerprint_of(text), train_image_ids=train_ids)
    report = evaluate(tmp_path / "run", shards=shards_dir, text=text, loader="torch", device="cpu", batch_size=5,
                      progress=False)
    assert "warning" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "eval-test.json").read_text())
    assert saved == report
    assert report["overlap_with_train"] == 3
    assert (report["n_images"], report["n_captions"], report["step"]) == (13, 62, 7)
    assert report["checkpoint"] == str(ckpt) and report["image_size"] == 16
    assert report["shards_fingerprint"] == open_shards(shards_dir).fingerprint
    assert report["text_fingerprint"] == fingerprint_of(text)
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall"):
        assert 0 <= report[key] <= 1
    table = pq.read_table(tmp_path / "run" / "embeddings-test.parquet")
    kinds = table.column("kind").to_pylist()
    assert kinds.count("image") == 13 and kinds.count("text") == 62
    assert table.column("caption_id").to_pylist()[:13] == [-1] * 13
    assert table.schema.field("embedding").type.list_size == 16


def test_clean_run_has_no_overlap_and_folds_name_their_report(eval_setup, tmp_path):
    shards_dir, text = eval_setup
    ckpt = make_run(tmp_path / "run", fingerprint=fingerprint_of(text), train_image_ids=[1, 2, 3])
    (tmp_path / "reports").mkdir()
    result = CliRunner().invoke(app, ["eval", str(ckpt), "--shards", str(shards_dir), "--text", str(text),
                                      "--loader", "torch", "--device", "cpu", "--folds", "2",
                                      "--out", str(tmp_path / "reports" / "r.json")])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output and "R@10" in result.output
    # A finished eval leaves no lock file, neither beside --out nor in the run.
    assert [p.name for p in (tmp_path / "reports").iterdir()] == ["r.json"]
    assert not list(tmp_path.rglob(".lock"))
    report = json.loads((tmp_path / "reports" / "r.json").read_text())
    assert report["overlap_with_train"] == 0 and report["folds"] == 2 and report["fold_sizes"] == [7, 6]
    assert len(report["per_fold"]) == 2 and report["n_images"] == 13  # every image in a fold, none left out
    assert "2 folds of 6-7 images" in " ".join(result.output.split())


def test_mismatched_text_cache_is_refused(eval_setup, tmp_path):
    shards_dir, text = eval_setup
    trained_on = {**fingerprint_of(text), "pooling": "cls"}
    make_run(tmp_path / "run", fingerprint=trained_on)
    with pytest.raises(UserError, match="pooling: cache 'mean', run 'cls'"):
        evaluate(tmp_path / "run", shards=shards_dir, text=text, loader="torch", device="cpu", progress=False)


def test_non_finite_weights_cache_or_embeddings_are_refused(loaded, eval_setup, tmp_path):
    shards_dir, text = eval_setup
    # A checkpoint holding NaN weights: named, before anything is scored.
    run = make_run(tmp_path / "run", fingerprint=fingerprint_of(text))
    state = torch.load(run, weights_only=True)
    state["model"]["image_head.weight"][0, 0] = math.nan
    torch.save(state, run)
    with pytest.raises(UserError, match=r"step_00000007.pt holds non-finite weights \(1 NaN/Inf values in 1 of"):
        evaluate(tmp_path / "run", shards=shards_dir, text=text, loader="torch", device="cpu", progress=False)
    # A text cache holding NaN (written past embed-text's check): named with its count.
    table = pq.read_table(text)
    values = table.column("embedding").combine_chunks().flatten().to_numpy().copy()
    values[TEXT_DIM * 5] = np.nan
    column = pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float16()), TEXT_DIM)
    pq.write_table(table.set_column(3, "embedding", column), tmp_path / "nan.parquet")
    make_run(tmp_path / "good", fingerprint=fingerprint_of(text))
    with pytest.raises(UserError, match=r"the text cache .*nan.parquet holds 1 NaN/Inf values in 1 of its 62"):
        evaluate(tmp_path / "good", shards=shards_dir, text=tmp_path / "nan.parquet", loader="torch", device="cpu",
                 progress=False)
    # A model whose output is NaN: no recall is computed from it.
    shards, cache, model = loaded
    broken = build_model(load_config(None, CONFIG).model, TEXT_DIM).eval()
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.text_head.weight[0, 0] = math.inf
    with pytest.raises(UserError, match=r"NaN/Inf for 0 of 13 image embeddings and 62 of 62 caption embeddings "
                                        r"\(its weights hold NaN/Inf"):
        embed((shards, cache, broken), 13)


def test_a_cache_of_edited_captions_is_refused_in_one_line(tmp_path):
    ann, images = write_coco(tmp_path / "coco", 6, captions_per_image=2, size=(32, 32))
    shards = tmp_path / "shards" / "test"
    build_shards(out=shards, images=images, annotations=ann, workers=1, progress=False)
    text = write_text_cache(shards, shards / "text-tiny-text-mean.parquet")
    make_run(tmp_path / "run", fingerprint=fingerprint_of(text))
    edit_captions(ann, 3)
    build_shards(out=shards, images=images, annotations=ann, workers=1, overwrite=True, progress=False)
    code, stderr = clipcoco("eval", str(tmp_path / "run"), "--shards", str(shards), "--text", str(text),
                            "--loader", "torch", "--device", "cpu")
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "was made from other captions than" in stderr and "(3 of its 12 captions are not in the cache" in stderr
    assert f"rerun `clipcoco embed-text {shards} --model tiny-text --pooling mean --max-length 77`" in stderr
    assert not (tmp_path / "run" / "eval-test.json").exists()


def _damage(shards: Path, how: str) -> str:
    """Damage a shard folder as disks and people do; returns the file the message must name."""
    if how == "manifest cut short":
        text = (shards / "manifest.json").read_text()
        (shards / "manifest.json").write_text(text[: len(text) // 2])
        return "manifest.json"
    line = (shards / "shard-000001.idx").read_text().splitlines()[2].split()
    offset, size = int(line[line.index("jpg") + 1]), int(line[line.index("jpg") + 2])
    if how == "idx size lost a digit":
        idx = shards / "shard-000001.idx"
        idx.write_text(idx.read_text().replace(f"jpg {offset} {size} ", f"jpg {offset} {size // 10} "))
        return "shard-000001.idx"
    # Another real JPEG over this one, zero-padded to its length: the size and every header stay right.
    others = (shards / "shard-000002.idx").read_text().splitlines()[1:]
    other = next(f for f in (o.split() for o in others) if int(f[f.index("jpg") + 2]) < size)
    with open(shards / "shard-000002.tar", "rb") as tar:
        tar.seek(int(other[other.index("jpg") + 1]))
        jpeg = tar.read(int(other[other.index("jpg") + 2]))
    with open(shards / "shard-000001.tar", "r+b") as tar:
        tar.seek(offset)
        tar.write(jpeg.ljust(size, b"\0"))
    return "shard-000001.tar"


@pytest.mark.parametrize("how", ["same-size JPEG swap", "idx size lost a digit", "manifest cut short"])
def test_damaged_shards_stop_eval_in_one_line_that_names_the_file(eval_setup, tmp_path, how):
    """Nothing is scored from damaged shards, and the one line says which file and how to check the folder."""
    import shutil

    shards_dir, text = eval_setup
    shards = tmp_path / "test"
    shutil.copytree(shards_dir, shards)
    damaged = _damage(shards, how)
    make_run(tmp_path / "run", fingerprint=fingerprint_of(text))
    code, stderr = clipcoco("eval", str(tmp_path / "run"), "--shards", str(shards), "--text", str(text),
                            "--loader", "torch", "--device", "cpu", "--batch-size", "4")
    error = stderr.strip().splitlines()[-1]  # after the progress bar (which a terminal erases), if it started
    assert code == 2 and "Traceback" not in stderr and stderr.count("error:") == 1, stderr
    assert error.startswith(f"error: {shards / damaged} ") and f"`clipcoco shards --verify {shards}`" in error, stderr
    assert not (tmp_path / "run" / "eval-test.json").exists()
