"""`clipcoco bench ...` on tiny data (each prints one JSON line last), and the `make bench` driver's report.

Tiny runs that check the commands work and what they print; no test asserts a duration.
"""

import dataclasses
import importlib.util
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cache_metadata, write_coco, write_random_text_cache
from typer.testing import CliRunner

from cli.main import app
from clip.apps.bench_data import make_text_model, repeated_coco
from pipeline.shards import build_shards

REPO = Path(__file__).resolve().parents[1]
DIM = 8


def _load_driver():
    spec = importlib.util.spec_from_file_location("bench_driver", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> tuple[Path, Path]:
    """(annotations, images) of 12 random 80x60 JPEGs with 5 captions each."""
    return write_coco(tmp_path_factory.mktemp("bench") / "coco", n_images=12, size=(80, 60))


@pytest.fixture(scope="module")
def shards(coco, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "shards"
    build_shards(out=out, images=coco[1], annotations=coco[0], workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    """A random 1-layer, 64-wide DistilBERT with the word-level tokenizer (`clipcoco bench text-model`)."""
    folder = tmp_path_factory.mktemp("text-model")
    result = CliRunner().invoke(app, ["bench", "text-model", str(folder), "--dim", "64", "--layers", "1"])
    assert result.exit_code == 0, result.output
    assert _last_json(result.stdout)["layers"] == 1 and (folder / "config.json").is_file()
    return folder


@pytest.fixture(scope="module")
def text(shards) -> Path:
    """A text cache as `embed-text` writes it (random vectors: only the shapes matter for speed)."""
    path = shards / "text-random.parquet"
    write_random_text_cache(shards, path, dim=DIM, metadata=cache_metadata(DIM, model="random"))
    return path


def _last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_bench_loader_prints_json_line(shards, kind):
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    args = ["bench", "loader", "--shards", str(shards), "--loader", kind, "--batch-size", "4", "--batches", "4",
            "--image-size", "32", "--threads", "1", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    line = _last_json(result.stdout)
    # 12 images make 3 batches of 4 per epoch: 2 warm-up + 4 counted batches cross an epoch boundary.
    assert line["loader"] == kind and line["batches"] == 4 and line["images"] == 16
    assert line["device"] == "cpu" and line["threads"] == 1 and line["image_size"] == 32
    assert line["images_per_s"] > 0


def test_bench_train_real_vs_synthetic(shards, text):
    args = ["bench", "train", "--shards", str(shards), "--text", str(text), "--image-model", "resnet18",
            "--image-size", "32", "--batch-size", "4", "--steps", "2", "--loader", "torch", "--threads", "1",
            "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    line = _last_json(result.stdout)
    assert line["image_model"] == "resnet18" and line["loader"] == "torch" and line["precision"] == "fp32"
    assert line["real_images_per_s"] > 0 and line["synthetic_images_per_s"] > 0
    assert line["ratio"] == pytest.approx(line["real_images_per_s"] / line["synthetic_images_per_s"], rel=1e-2)
    assert 0 <= line["data_wait_fraction"] < 1


def test_bench_train_synthetic_only(shards, text):
    args = ["bench", "train", "--shards", str(shards), "--text", str(text), "--synthetic", "--image-model",
            "resnet18", "--image-size", "32", "--batch-size", "2", "--steps", "1", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    line = _last_json(result.stdout)
    assert line["synthetic_images_per_s"] > 0
    assert line["real_images_per_s"] is None and line["ratio"] is None and line["loader"] is None


@pytest.mark.parametrize(("extra", "message"), [
    (["--loader", "pytorch"], "use one of auto, dali, torch"),
    (["--batch-size", "50"], "larger than the 12 images"),
    (["--batches", "0"], "--batches must be >= 1"),
])
def test_bench_loader_user_errors(shards, extra, message):
    result = CliRunner().invoke(app, ["bench", "loader", "--shards", str(shards), "--device", "cpu", *extra])
    assert result.exit_code != 0
    assert message in str(result.exception)


def test_bench_loader_missing_shards(tmp_path):
    result = CliRunner().invoke(app, ["bench", "loader", "--shards", str(tmp_path / "nope"), "--device", "cpu"])
    assert result.exit_code != 0 and "clipcoco shards" in str(result.exception)


def test_repeated_coco_copies_under_new_ids(tmp_path):
    ann, images = write_coco(tmp_path / "src", n_images=3)
    out_ann, out_images = repeated_coco([(ann, images)], tmp_path / "rep", repeats=2)
    data = json.loads(out_ann.read_text())
    ids = [im["id"] for im in data["images"]]
    assert ids == [1, 2, 3, 1 + 10**9, 2 + 10**9, 3 + 10**9]
    assert sorted(p.name for p in out_images.iterdir()) == sorted(im["file_name"] for im in data["images"])
    assert len(data["annotations"]) == 2 * 3 * 5
    assert {a["image_id"] for a in data["annotations"]} == set(ids)
    assert (out_images / f"{1 + 10**9:012d}.jpg").read_bytes() == (images / f"{1:012d}.jpg").read_bytes()


def _shards_args(coco, *extra) -> list[str]:
    return ["bench", "shards", "--annotations", str(coco[0]), "--images", str(coco[1]), "--workers", "2", *extra]


@pytest.mark.parametrize(("peer", "side"), [(None, "clipcoco shards"), ("tar", "tar -cf"), ("pil", "PIL decode")])
def test_bench_shards_each_side(coco, peer, side):
    result = CliRunner().invoke(app, _shards_args(coco, *(["--peer", peer] if peer else [])))
    assert result.exit_code == 0, result.output
    line = _last_json(result.stdout)
    assert line["side"] == side and line["images"] == 12 and line["workers"] == 2 and line["resize_shorter"] == 0
    assert line["seconds"] > 0 and line["images_per_s"] > 0


def test_bench_shards_keeps_a_fresh_build_in_out_and_refuses_an_existing_one(coco, tmp_path):
    out = tmp_path / "kept"
    result = CliRunner().invoke(app, _shards_args(coco, "--resize-shorter", "32", "--out", str(out)))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["totals"]["images_packed"] == 12
    again = CliRunner().invoke(app, _shards_args(coco, "--out", str(out)))
    assert again.exit_code != 0 and "exists: remove it or pass a new path" in str(again.exception)


@pytest.mark.parametrize(("extra", "message"), [
    (["--peer", "zip"], "use one of tar, pil"),
    (["--workers", "-1"], "--workers must be >= 0"),
])
def test_bench_shards_user_errors(coco, extra, message):
    result = CliRunner().invoke(app, _shards_args(coco, *extra))
    assert result.exit_code != 0 and message in str(result.exception)


def test_bench_shards_tar_peer_archives_the_listed_files(coco, tmp_path, monkeypatch):
    """The tar peer archives what the annotations list, the files `clipcoco shards` reads."""
    import clip.apps.bench_peers as peers

    archives = []
    real_run = peers.subprocess.run

    def spy(cmd, **kwargs):
        done = real_run(cmd, **kwargs)
        with tarfile.open(cmd[2]) as tar:
            archives.append(sorted(tar.getnames()))
        return done

    monkeypatch.setattr(peers.subprocess, "run", spy)
    peers.bench_shards(annotations=coco[0], images=coco[1], peer="tar")
    listed = json.loads(coco[0].read_text())["images"]
    assert archives == [sorted(im["file_name"] for im in listed)]


def test_bench_decode_cost_splits_both_loaders(shards):
    pytest.importorskip("nvidia.dali")
    args = ["bench", "decode-cost", "--shards", str(shards), "--image-size", "32", "--images", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    line = _last_json(result.stdout)
    steps = {"dali_decode_ms", "dali_resize_ms", "dali_resize_noaa_ms", "dali_normalise_ms", "torchvision_decode_ms",
             "torchvision_resize_ms"}
    assert steps <= line.keys() and all(line[k] > 0 for k in steps)
    assert line["image_size"] == 32 and line["images"] == 8


def _embed_args(shards, model, *extra) -> list[str]:
    return ["bench", "embed-text", "--shards", str(shards), "--model", str(model), "--device", "cpu", *extra]


def test_bench_embed_text_ours_keeps_a_cache_train_can_read(shards, text_model, tmp_path):
    out = tmp_path / "text.parquet"
    result = CliRunner().invoke(app, _embed_args(shards, text_model, "--out", str(out)))
    assert result.exit_code == 0, result.output
    line = _last_json(result.stdout)
    assert line["side"] == "clipcoco embed-text" and line["captions"] == 60 and line["device"] == "cpu"
    assert line["seconds"] > 0 and line["captions_per_s"] > 0
    assert pq.read_metadata(out).num_rows == 60 and pq.read_schema(out).metadata[b"dim"] == b"64"
    again = CliRunner().invoke(app, _embed_args(shards, text_model, "--out", str(out)))
    assert again.exit_code != 0 and "exists: remove it or pass a new path" in str(again.exception)


def test_bench_embed_text_peer_on_the_first_captions(shards, text_model, tmp_path):
    pytest.importorskip("sentence_transformers")
    out = tmp_path / "peer.parquet"
    args = _embed_args(shards, text_model, "--peer", "sentence-transformers", "--captions", "7", "--out", str(out))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    line = _last_json(result.stdout)
    assert line["side"] == "sentence-transformers" and line["captions"] == 7
    table = pq.read_table(out)
    assert table.num_rows == 7 and table.schema.field("embedding").type == pa.list_(pa.float16(), 64)
    first = pq.read_table(shards / "captions.parquet").sort_by([("image_id", "ascending"), ("caption_id", "ascending")])
    assert table.column("caption_id").to_pylist() == first.column("caption_id").to_pylist()[:7]


@pytest.mark.parametrize(("extra", "message"), [
    (["--peer", "openai"], "use one of sentence-transformers"),
    (["--captions", "61"], "--captions 61: pass 1 to 60"),
    (["--device", "gpu"], "--device 'gpu'"),
])
def test_bench_embed_text_user_errors(shards, extra, message):
    result = CliRunner().invoke(app, _embed_args(shards, "unused", *extra))
    assert result.exit_code != 0 and message in str(result.exception)


def test_bench_data_writes_the_coco_layout(tmp_path):
    args = ["bench", "data", str(tmp_path / "gen"), "--images", "3", "--captions-per-image", "2", "--width", "64",
            "--height", "48", "--workers", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    line = _last_json(result.stdout)
    data = json.loads((tmp_path / "gen" / "annotations" / "captions_val2017.json").read_text())
    assert line["n_images"] == 3 and line["n_captions"] == 6 and len(data["annotations"]) == 6
    assert sorted(p.name for p in (tmp_path / "gen" / "val2017").iterdir()) == [im["file_name"]
                                                                                 for im in data["images"]]
    manifest = build_shards(out=tmp_path / "shards", images=tmp_path / "gen" / "val2017",
                            annotations=tmp_path / "gen" / "annotations" / "captions_val2017.json", workers=1,
                            progress=False)
    assert manifest["totals"]["images_packed"] == 3 and manifest["totals"]["captions_packed"] == 6


def test_text_model_with_another_tokenizer(tmp_path, text_model):
    from transformers import AutoTokenizer

    result = make_text_model(tmp_path / "m", dim=64, layers=1, tokenizer=text_model)
    assert result["dim"] == 64
    assert AutoTokenizer.from_pretrained(tmp_path / "m").get_vocab() == AutoTokenizer.from_pretrained(
        text_model).get_vocab()


def test_bench_env_names_the_machine_and_versions():
    result = CliRunner().invoke(app, ["bench", "env"])
    assert result.exit_code == 0, result.output
    line = _last_json(result.stdout)
    assert line["cores"] >= 1 and line["cpu"] and line["gpu"] and "torch" in line["versions"]


# ---------------------------------------------------------------------------------------------
# The driver (scripts/bench.py): the report from canned rows, and a whole --quick run on canned command output


ENV = {"cpu": "Some CPU", "cores": 2, "gpu": "none", "os": "Linux", "load_average": "0.1",
       "versions": {"python": "3.11"}}


def test_report_medians_targets_and_new_doc():
    bench = _load_driver()
    row = bench.Row("loader, 224 px", "DALI", "torch", "images/s", "DALI / torch images/s", ">= 1.2",
                    [["clipcoco", "bench", "loader", "--loader", "dali"]])
    for a in (30.0, 10.0, 20.0):
        row.add(a, 10.0)
    slow = bench.Row("embed-text", "ours", "peer", "s", "peer / ours time", ">= 1.0", [["clipcoco", "embed-text"]],
                     flip=True, extra={"captions/s (ours; peer)": "5; 10"})
    slow.add(2.0, 1.0)
    doc = bench.render([row, slow], env=ENV, data="coco-mini", sizes=bench.QUICK, date="today", minutes=1)
    assert "| loader, 224 px | DALI: 20.0 images/s | torch: 10.0 images/s | 2.00 (DALI / torch images/s) | >= 1.2 " \
           "| yes |" in doc
    assert "| embed-text | ours: 2.00 s | peer: 1.00 s | 0.50 (peer / ours time) | >= 1.0 | **no** |" in doc
    assert "| loader, 224 px | 1 | 30.0 images/s | 10.0 images/s | 3.000 |" in doc
    assert "Some CPU, 2 cores" in doc and "- **embed-text**: captions/s (ours; peer): 5; 10" in doc
    new = bench.splice(doc, None)
    assert new.startswith("# Benchmarks\n\n" + bench.BEGIN) and doc in new
    assert "## What limits each row" in new and "Not measured yet: run `bash scripts/gpu_check.sh`" in new


def test_rerun_keeps_the_hand_written_sections():
    bench = _load_driver()
    fresh = f"{bench.BEGIN}\n\nnew CPU rows\n\n{bench.END}"
    measured = (f"# Benchmarks\n\nintro\n\n{bench.BEGIN}\nold CPU rows\n{bench.END}\n\n## What limits each row\n\n"
                "decode\n\n## GPU\n\nH100: 3,100 images/s\n")
    assert bench.splice(fresh, measured) == (f"# Benchmarks\n\nintro\n\n{fresh}\n\n## What limits each row\n\n"
                                             "decode\n\n## GPU\n\nH100: 3,100 images/s\n")


def test_driver_refuses_a_doc_without_markers_before_measuring(tmp_path, monkeypatch):
    bench = _load_driver()
    monkeypatch.setattr(bench, "run", lambda cmd: pytest.fail("measured before checking the doc"))
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nhand-written only\n")
    with pytest.raises(SystemExit, match="lacks the marker lines"):
        bench.main(["--quick", "--out", str(doc), "--minilm", str(tmp_path)])
    assert doc.read_text() == "# Benchmarks\n\nhand-written only\n"


def _canned(cmd: list[str]) -> tuple[float, dict | None]:
    """What each `clipcoco bench ...` prints last, without running it: ours 1 s / 100 images/s, peers 2 s / 50."""
    args = [str(a) for a in cmd[1:]]
    if args[0].endswith("vs_open_clip.py"):  # one trainer's images/s: clipcoco 100, open_clip 50
        return 1.0, {"images_per_s": 100.0 if args[args.index("--side") + 1] == "clipcoco" else 50.0}
    if args[0] != "bench":
        return 0.25, None  # `clipcoco shards --help`: timed by its wall time
    peer = "--peer" in args or "torch" in args or args[-1] == "1"  # the peer side, or 1 resize worker
    sub = args[1]
    if sub == "shards" and "--out" in args:  # ours keeps the shards the later rows read
        out = Path(args[args.index("--out") + 1])
        out.mkdir(parents=True)
        pq.write_table(pa.table({"image_id": [1, 2, 3], "caption_id": [1, 2, 3], "caption": ["a", "b", "c"]}),
                       out / "captions.parquet")
    results = {"env": ENV, "text-model": {}, "decode-cost": {"dali_decode_ms": 2.0, "torchvision_decode_ms": 1.5},
               "shards": {"seconds": 2.0 if peer else 1.0}, "embed-text": {"seconds": 2.0 if peer else 1.0},
               "loader": {"images_per_s": 50.0 if peer else 100.0},
               "train": {"real_images_per_s": 90.0, "synthetic_images_per_s": 100.0, "ratio": 0.9,
                         "data_wait_fraction": 0.01}}
    return 1.0, results[sub]


def test_quick_run_writes_every_row_alternating(tmp_path, monkeypatch):
    bench = _load_driver()
    calls = []
    monkeypatch.setattr(bench, "run", lambda cmd: calls.append(cmd) or _canned(cmd))
    monkeypatch.setattr(bench, "QUICK", dataclasses.replace(bench.QUICK, rounds=2))
    ann, images = write_coco(tmp_path / "src", n_images=4)
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    ann.rename(tmp_path / "coco" / "annotations" / "captions_val2017.json")
    images.rename(tmp_path / "coco" / "val2017")
    out = tmp_path / "benchmarks.md"
    bench.main(["--quick", "--out", str(out), "--coco", str(tmp_path / "coco"), "--minilm", str(tmp_path / "minilm")])
    doc = out.read_text()
    for row in ("| shards, copy mode (4 JPEGs) | `clipcoco shards --resize-shorter 0`: 1.00 s | `tar -cf` same files: "
                "2.00 s | 0.50 (ours / tar time) | <= 1.5 | yes |",
                "| shards, copy mode (4 JPEGs) | `clipcoco shards --resize-shorter 0`: 1.00 s | PIL decode",
                "| shards, resize 256 (4 JPEGs) | 2 workers: 1.00 s | 1 worker: 2.00 s | 2.00 (1-worker / 2-worker "
                "time) | >= 1.7 | yes |",
                "| loader, 224 px, 2 threads | DALI CPU pipeline: 100.0 images/s |", "| loader, 64 px, 2 threads |",
                "| embed-text, all-MiniLM-L6-v2, 3 captions | `clipcoco embed-text`: 1.00 s | sentence-transformers "
                "`encode`: 2.00 s | 2.00 (peer / ours time) | >= 1.0 | yes |",
                "| embed-text, DistilBERT-sized (random weights), 32 captions |",
                "| train step, resnet18 64 px, batch 8, dali loader | real loader: 90.0 images/s | synthetic batches: "
                "100.0 images/s | 0.90 (real / synthetic images/s) |", "| train step, resnet18 64 px, batch 8, torch",
                "| train vs open_clip, ResNet-18 64 px, batch 64, all-MiniLM-L6-v2 text | `clipcoco train` (cached "
                "text, all captions): 100.0 images/s | `open_clip_train --lock-text`, clipcoco's shards (first "
                "caption): 50.0 images/s | 2.00 (clipcoco / open_clip images/s) | >= 1.0 | yes |",
                "| train vs open_clip, ResNet-18 64 px, batch 64, all-MiniLM-L6-v2 text | `clipcoco train` (cached "
                "text, all captions): 100.0 images/s | `open_clip_train --lock-text`, one sample per caption: 50.0 "
                "images/s"):
        assert row in doc
    vs = [c for c in calls if str(c[1]).endswith("vs_open_clip.py")]  # clipcoco, then the peer, in each round
    assert [c[c.index("--side") + 1] for c in vs] == ["clipcoco", "open_clip-shards"] * 2 + [
        "clipcoco", "open_clip-per-caption"] * 2
    assert ("python scripts/vs_open_clip.py side --shape demo --warmup 1 --steps 1 --coco-mini $CLIPCOCO_COCO_MINI "
            "--out $WORK/vs-open-clip --side clipcoco") in doc
    assert "`clipcoco bench embed-text --shards $WORK/shards-copy --model $MINILM --device cpu" in doc
    assert "coco: real COCO JPEGs and captions, val2017" in doc and "CPU ms per image, one thread" in doc
    assert "dali_decode 2.00, torchvision_decode 1.50" in doc
    assert "| shards, resize 256 (4 JPEGs) | 2 | 1.00 s | 2.00 s | 2.000 |" in doc  # rounds=2: both rounds listed
    assert [c[-1] for c in calls if "--resize-shorter" in c] == ["2", "1", "2", "1"]  # workers, alternated
    assert str(tmp_path) not in doc  # the scratch folder shows as $WORK, the MiniLM folder as $MINILM
