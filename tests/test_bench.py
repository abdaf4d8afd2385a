"""`clipcoco bench loader|train` on tiny shards (each prints one JSON line last), and the `make bench` report.

Tiny runs that check the commands work and what they print; no test asserts a duration.
"""

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import cache_metadata, write_coco, write_random_text_cache
from typer.testing import CliRunner

from cli.main import app
from pipeline.shards import build_shards

REPO = Path(__file__).resolve().parents[1]
DIM = 8


def _load_bench_all():
    spec = importlib.util.spec_from_file_location("bench_all", REPO / "scripts" / "bench_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    ann, images = write_coco(root / "coco", n_images=12, size=(80, 60))
    build_shards(out=root / "shards", images=images, annotations=ann, workers=1, progress=False)
    return root / "shards"


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
    line = _last_json(result.output)
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
    line = _last_json(result.output)
    assert line["image_model"] == "resnet18" and line["loader"] == "torch" and line["precision"] == "fp32"
    assert line["real_images_per_s"] > 0 and line["synthetic_images_per_s"] > 0
    assert line["ratio"] == pytest.approx(line["real_images_per_s"] / line["synthetic_images_per_s"], rel=1e-2)
    assert 0 <= line["data_wait_fraction"] < 1


def test_bench_train_synthetic_only(shards, text):
    args = ["bench", "train", "--shards", str(shards), "--text", str(text), "--synthetic", "--image-model",
            "resnet18", "--image-size", "32", "--batch-size", "2", "--steps", "1", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    line = _last_json(result.output)
    assert line["synthetic_images_per_s"] > 0
    assert line["real_images_per_s"] is None and line["ratio"] is None and line["loader"] is None


@pytest.mark.parametrize(("extra", "message"), [
    (["--loader", "pytorch"], "use one of dali, torch"),
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
    bench_all = _load_bench_all()
    ann, images = write_coco(tmp_path / "src", n_images=3)
    out_ann, out_images = bench_all.repeated_coco([(ann, images)], tmp_path / "rep", repeats=2)
    data = json.loads(out_ann.read_text())
    ids = [im["id"] for im in data["images"]]
    assert ids == [1, 2, 3, 1 + 10**9, 2 + 10**9, 3 + 10**9]
    assert sorted(p.name for p in out_images.iterdir()) == sorted(im["file_name"] for im in data["images"])
    assert len(data["annotations"]) == 2 * 3 * 5
    assert {a["image_id"] for a in data["annotations"]} == set(ids)
    assert (out_images / f"{1 + 10**9:012d}.jpg").read_bytes() == (images / f"{1:012d}.jpg").read_bytes()


def test_report_medians_targets_and_gpu_line():
    bench_all = _load_bench_all()
    row = bench_all.Row("loader, 224 px", "DALI", "torch", "images/s", "DALI / torch images/s", ">= 1.2",
                        lambda r: r >= 1.2, ["clipcoco bench loader --loader dali"], "decode-bound")
    bench_all.alternate(row, iter([30.0, 10.0, 20.0]).__next__, iter([10.0, 10.0, 10.0]).__next__,
                        lambda a, b: a / b, rounds=3)
    slow = bench_all.Row("embed-text", "ours", "peer", "s", "peer / ours time", ">= 1.0", lambda r: r >= 1.0,
                         ["clipcoco embed-text"], "tokenizer")
    slow.rounds.append((2.0, 1.0, 0.5))
    info = {"date": "today", "cpu": "Some CPU", "cores": 2, "gpu": "none", "os": "Linux", "load_average": "0.1"}
    doc = bench_all.render([row, slow], info=info, vers={"python": "3.11"}, data="coco-mini",
                           sizes=bench_all.QUICK, seconds=60)
    assert "| loader, 224 px | DALI: 20.0 images/s | torch: 10.0 images/s | 2.00 (DALI / torch images/s) | >= 1.2 " \
           "| yes |" in doc
    assert "| embed-text | ours: 2.00 s | peer: 1.00 s | 0.50 (peer / ours time) | >= 1.0 | **no** |" in doc
    assert "| loader, 224 px | 1 | 30.0 images/s | 10.0 images/s | 3.000 |" in doc
    assert "Some CPU, 2 cores" in doc and "- **embed-text**: tokenizer" in doc
    assert "Not measured yet: needs a lent GPU (issue 9)" in doc


def test_rerun_keeps_a_measured_gpu_section():
    bench_all = _load_bench_all()
    fresh = "# Benchmarks\n\nCPU rows\n\n## GPU\n\nNot measured yet: needs a lent GPU (issue 9).\n"
    assert bench_all.keep_gpu_section(fresh, None) == fresh
    assert bench_all.keep_gpu_section(fresh, "# old\n\n## GPU\n\nNot measured yet: needs a lent GPU\n") == fresh
    measured = "# old\n\nold CPU rows\n\n## GPU\n\nH100: 3,100 images/s\n"
    assert bench_all.keep_gpu_section(fresh, measured) == "# Benchmarks\n\nCPU rows\n\n## GPU\n\nH100: 3,100 images/s\n"
