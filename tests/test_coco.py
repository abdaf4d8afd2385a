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


def _coco_file(tmp_path, mutate, raw: str | None = None) -> Path:
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 3}],
            "annotations": [{"id": 10, "image_id": 1, "caption": "a cat"}]}
    mutate(coco)
    path = tmp_path / "captions.json"
    text = json.dumps(coco)
    path.write_text(text if raw is None else text.replace('"RAW"', raw))
    return path


COCO_MISTAKES = [
    (lambda c: c["images"][0].pop("file_name"), r"images\[0\] \(id 1\) has no 'file_name'"),
    (lambda c: c["images"][0].pop("id"), r"images\[0\] has no 'id'"),
    (lambda c: c["images"][0].update(id="1"), r"images\[0\] has 'id' = '1', expected an integer"),
    (lambda c: c["images"][0].update(id=True), r"images\[0\] has 'id' = True, expected an integer"),
    (lambda c: c["images"][0].update(width="abc"), r"images\[0\] \(id 1\) has 'width' = 'abc', expected an integer"),
    (lambda c: c["images"].append(5), r"images\[1\] is int, not an object"),
    (lambda c: c["annotations"][0].pop("image_id"), r"annotations\[0\] has no 'image_id'"),
    (lambda c: c["annotations"][0].update(caption=None), r"annotations\[0\] has 'caption' = None, expected a string"),
    (lambda c: c["annotations"][0].update(caption=7), r"annotations\[0\] has 'caption' = 7, expected a string"),
    (lambda c: c["annotations"][0].update(id=2**63), r"annotations\[0\] has 'id' = 9223372036854775808, outside "
                                                      r"the 64-bit range"),
    (lambda c: c["annotations"].append({"id": 10, "image_id": 1, "caption": "again"}),
     r"annotations\[0\] and annotations\[1\] give image 1 the caption id 10 twice"),
    (lambda c: c["images"][0].update(file_name="../a.jpg"), r"images\[0\] \(id 1\) names '../a.jpg', outside "
                                                            r"--images .*pass --allow-outside-images"),
    (lambda c: c["images"][0].update(file_name="/data/a.jpg"), r"images\[0\] \(id 1\) names '/data/a.jpg', outside"),
]


@pytest.mark.parametrize(("mutate", "message"), COCO_MISTAKES)
def test_a_bad_entry_is_named_with_its_file_and_index(tmp_path, mutate, message):
    path = _coco_file(tmp_path, mutate)
    with pytest.raises(UserError, match=rf"^--annotations {path}: {message}.*: fix that entry") as err:
        read_coco_captions(path, tmp_path / "imgs")
    assert len(str(err.value).splitlines()) == 1


def test_a_lone_surrogate_is_named_and_outside_files_can_be_allowed(tmp_path):
    path = _coco_file(tmp_path, lambda c: c["annotations"][0].update(caption="RAW"), raw=r'"cat \ud800"')
    with pytest.raises(UserError, match=r"annotations\[0\] has a 'caption' that is not valid Unicode \(a lone "
                                        r"surrogate '\\ud800' at character 4\)"):
        read_coco_captions(path, tmp_path)
    path = _coco_file(tmp_path, lambda c: c["images"][0].update(file_name="../a.jpg"))
    records = read_coco_captions(path, tmp_path / "imgs", allow_outside_images=True).records
    assert records[0].path == tmp_path / "imgs" / ".." / "a.jpg"


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda im: im.pop("split"), r"images\[0\] has no 'split'"),
    (lambda im: im["sentences"][1].pop("raw"), r"images\[0\] \(cocoid 30\) sentences\[1\] has no 'raw'"),
    (lambda im: im["sentences"][0].update(sentid="5"), r"sentences\[0\] has 'sentid' = '5', expected an integer"),
    (lambda im: im["sentences"][1].update(sentid=im["sentences"][0]["sentid"]),
     r"sentences\[0\] and images\[0\] \(cocoid 30\) sentences\[1\] give image 30 the caption id 502 twice"),
    (lambda im: im.update(filepath=".."), r"names '../COCO_train2014_000000000030.jpg', outside --images"),
])
def test_a_bad_karpathy_entry_is_named(tmp_path, mutate, message):
    path = write_karpathy(tmp_path)
    data = json.loads(path.read_text())
    mutate(data["images"][0])
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=rf"^--karpathy {path}: .*{message}.*: fix that entry"):
        read_karpathy(path, tmp_path, "train")
