"""Reading COCO captions files and Karpathy's dataset_coco.json into ImageRecords."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.coco import read_coco_captions, read_karpathy
from pipeline.errors import UserError

SPLITS = {"train": [30, 10, 20], "restval": [50, 40], "val": [60, 70], "test": [90, 80]}


def write_karpathy(root: Path) -> Path:
    """A small dataset_coco.json over train2014/ and val2014/ folders; caption `raw` texts keep odd spacing."""
    rng = np.random.default_rng(0)
    images, sentid = [], 500
    for split, ids in SPLITS.items():
        folder = "train2014" if split == "train" else "val2014"
        (root / folder).mkdir(parents=True, exist_ok=True)
        for cocoid in ids:
            name = f"COCO_{folder}_{cocoid:012d}.jpg"
            Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / folder / name)
            # sentids deliberately out of order in the file: records sort them
            sentences = [{"tokens": ["x"], "raw": f"{cocoid} caption {k} ", "imgid": 0, "sentid": sentid + 2 - k}
                         for k in range(3)]
            images.append({"filepath": folder, "filename": name, "cocoid": cocoid, "split": split,
                           "sentids": [s["sentid"] for s in sentences], "imgid": len(images), "sentences": sentences})
            sentid += 3
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_read_coco_captions_sorted_with_all_captions(tmp_path):
    coco = {"images": [{"id": 9, "file_name": "b.jpg", "width": 3, "height": 2},
                       {"id": 4, "file_name": "a.jpg", "width": 5, "height": 6},
                       {"id": 7, "file_name": "c.jpg", "width": 1, "height": 1}],
            "annotations": [{"id": 12, "image_id": 9, "caption": "second"},
                            {"id": 3, "image_id": 9, "caption": "first"},
                            {"id": 5, "image_id": 4, "caption": " spaced  é "},
                            {"id": 1, "image_id": 99, "caption": "x"}]}
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    listing = read_coco_captions(path, tmp_path / "imgs")
    records = listing.records
    assert (listing.captions_listed, listing.captions_without_image) == (4, 1)  # image 99 is not listed
    assert [r.image_id for r in records] == [4, 7, 9]
    assert records[0].path == tmp_path / "imgs" / "a.jpg" and (records[0].width, records[0].height) == (5, 6)
    assert records[0].captions == (" spaced  é ",)  # byte-exact, not stripped
    assert records[1].captions == () and records[1].caption_ids == ()
    assert records[2].captions == ("first", "second") and records[2].caption_ids == (3, 12)


def test_read_coco_captions_mistakes(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_coco_captions(tmp_path / "missing.json", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_coco_captions(bad, tmp_path)
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1, "image_id": 1,
                                                                                             "bbox": [0, 0, 1, 1]}]}))
    with pytest.raises(UserError, match="instances_"):
        read_coco_captions(bad, tmp_path)
    with pytest.raises(UserError, match="use --karpathy"):
        read_coco_captions(write_karpathy(tmp_path / "k"), tmp_path)
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],
                               "annotations": []}))
    with pytest.raises(UserError, match="same image id"):
        read_coco_captions(bad, tmp_path)


def test_read_karpathy_splits(tmp_path):
    path = write_karpathy(tmp_path)
    test = read_karpathy(path, tmp_path, "test").records
    assert [r.image_id for r in test] == [80, 90]
    assert test[0].file_name == "val2014/COCO_val2014_000000000080.jpg"
    assert test[0].path == tmp_path / "val2014" / "COCO_val2014_000000000080.jpg" and test[0].path.is_file()
    assert test[0].caption_ids == tuple(sorted(test[0].caption_ids))
    assert test[0].captions == ("80 caption 2 ", "80 caption 1 ", "80 caption 0 ")  # raw text, in sentid order
    assert [r.image_id for r in read_karpathy(path, tmp_path, "train").records] == [10, 20, 30]
    assert [r.image_id for r in read_karpathy(path, tmp_path, "trainval").records] == [10, 20, 30, 40, 50]


def test_read_karpathy_mistakes(tmp_path):
    path = write_karpathy(tmp_path)
    with pytest.raises(UserError, match="not a Karpathy split"):
        read_karpathy(path, tmp_path, "validation")
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}))
    with pytest.raises(UserError, match="use --annotations"):
        read_karpathy(coco, tmp_path, "test")
