"""Reading COCO caption annotations into one record per image.

Inputs: an official COCO captions file (`captions_train2017.json`, `captions_val2014.json`, ...) with
its image folder, or Karpathy's `dataset_coco.json` (the standard retrieval split) with the COCO root
holding the folders its `filepath` fields name (`train2014/`, `val2014/`).
Output: `Annotations`: `ImageRecord`s sorted by image id, each with all its captions sorted by caption id, and
the caption counts the manifest reports.
Command: used by `clipcoco shards` (pipeline/shards.py); it has no command of its own.

Captions are kept exactly as written (no stripping, no normalising); which ones are usable is
decided by the shard writer, which counts what it drops. An entry the writer could not use as it is (a key
missing or of the wrong type, text that is not valid Unicode, a caption listed twice, a file outside the images
folder) stops the command with the file, the entry and what is wrong.
"""

import json
import posixpath
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

KARPATHY_SPLITS = ("train", "restval", "val", "test", "trainval")
INT64 = (-(2**63), 2**63 - 1)  # caption ids are stored as int64 (captions.parquet, the text cache)


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    file_name: str  # relative to the images folder, as the annotations name it (posix separators)
    path: Path  # where the image file should be on disk
    width: int  # as the annotations say; 0 when they do not (Karpathy)
    height: int
    captions: tuple[str, ...]  # sorted by caption id
    caption_ids: tuple[int, ...]


@dataclass(frozen=True)
class Annotations:
    records: list[ImageRecord]  # the listed images, sorted by image id
    captions_listed: int  # every caption of the file (of the split, for Karpathy)
    captions_without_image: int  # captions naming an image the file does not list (never packed)


def _load_json(path: Path, flag: str) -> Any:
    if not path.is_file():
        where = ("Karpathy's dataset_coco.json comes in caption_datasets.zip (cs.stanford.edu/people/karpathy/"
                 "deepimagesent)" if flag == "--karpathy" else "COCO's captions files live in annotations/ of "
                 "annotations_trainval2017.zip")
        raise UserError(f"{flag} {path}: no such file; check the path ({where})")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{flag} {path} is not valid JSON ({err}); re-download it") from None


class _Entry:
    """One object of a list in an annotations file, read with checks that name the file and the entry."""

    def __init__(self, entry: Any, source: str, name: str) -> None:
        self.source, self.name = source, name  # "--annotations FILE", "annotations[3]"
        if not isinstance(entry, dict):
            self.fail(f"is {type(entry).__name__}, not an object")
        self.entry = entry

    def fail(self, problem: str) -> None:
        raise UserError(f"{self.source}: {self.name} {problem}: fix that entry (or re-download the file)")

    def integer(self, key: str, *, default: int | None = None, limits: tuple[int, int] | None = None) -> int:
        value = self.entry.get(key, default)
        if value is None:
            self.fail(f"has no {key!r}" if key not in self.entry else f"has {key!r} null, expected an integer")
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"has {key!r} = {value!r}, expected an integer")
        if limits is not None and not limits[0] <= value <= limits[1]:
            self.fail(f"has {key!r} = {value}, outside the 64-bit range clipcoco stores")
        return value

    def text(self, key: str) -> str:
        value = self.entry.get(key)
        if not isinstance(value, str):
            self.fail(f"has no {key!r}" if key not in self.entry else f"has {key!r} = {value!r}, expected a string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            self.fail(f"has a {key!r} that is not valid Unicode (a lone surrogate {value[err.start]!r} at "
                      f"character {err.start})")
        return value

    def file_name(self, name: str, images: Path, allow_outside: bool) -> str:
        if not name:
            self.fail("has an empty file name")
        normal = posixpath.normpath(name)
        if not allow_outside and (posixpath.isabs(normal) or normal == ".." or normal.startswith("../")):
            self.fail(f"names {name!r}, outside --images {images} (pass --allow-outside-images if that is meant)")
        return name


def _entries(items: Any, source: str, name: str) -> list[_Entry]:
    return [_Entry(item, source, f"{name}[{i}]") for i, item in enumerate(items)]


def _check_unique(records: list[ImageRecord], source: Path) -> None:
    ids = [r.image_id for r in records]
    if len(set(ids)) != len(ids):
        raise UserError(f"{source} lists the same image id more than once; it is not a valid COCO file")


def _captions(pairs: list[tuple[int, str, str]], image_id: int,
              source: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(captions, caption ids) sorted by caption id, from (caption id, caption, entry name) triples of one image."""
    pairs = sorted(pairs)
    for (a, _, first), (b, _, second) in zip(pairs, pairs[1:], strict=False):
        if a == b:
            raise UserError(f"{source}: {first} and {second} give image {image_id} the caption id {a} twice (a "
                            "caption is identified by image id and caption id): fix that entry (or re-download the "
                            "file)")
    return tuple(c for _, c, _ in pairs), tuple(i for i, _, _ in pairs)


def read_coco_captions(annotations: Path, images: Path, *, allow_outside_images: bool = False) -> Annotations:
    """Every image the official captions file lists, with its captions; sorted by image id."""
    data = _load_json(annotations, "--annotations")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or \
            not isinstance(data.get("annotations"), list):
        hint = (" (this looks like Karpathy's dataset_coco.json: use --karpathy FILE --split S)"
                if isinstance(data, dict) and "dataset" in data else "")
        raise UserError(f"--annotations {annotations} is not a COCO captions file: it needs 'images' and "
                        f"'annotations' lists{hint}")
    by_image: dict[int, list[tuple[int, str, str]]] = defaultdict(list)
    for ann in _entries(data["annotations"], f"--annotations {annotations}", "annotations"):
        if "caption" not in ann.entry:
            raise UserError(f"--annotations {annotations} has annotations without a 'caption': pass a "
                            "captions_*.json file, not instances_*.json or person_keypoints_*.json")
        caption_id = ann.integer("id", limits=INT64)
        by_image[ann.integer("image_id")].append((caption_id, ann.text("caption"), ann.name))
    records = []
    for image in _entries(data["images"], f"--annotations {annotations}", "images"):
        image_id = image.integer("id")
        image.name += f" (id {image_id})"
        file_name = image.file_name(image.text("file_name"), images, allow_outside_images)
        captions, caption_ids = _captions(by_image.pop(image_id, []), image_id, image.source)
        records.append(ImageRecord(
            image_id=image_id, file_name=file_name, path=images / file_name,
            width=image.integer("width", default=0), height=image.integer("height", default=0),
            captions=captions, caption_ids=caption_ids,
        ))
    records.sort(key=lambda r: r.image_id)
    _check_unique(records, annotations)
    return Annotations(records, captions_listed=len(data["annotations"]),
                       captions_without_image=sum(len(pairs) for pairs in by_image.values()))


def read_karpathy(karpathy: Path, images_root: Path, split: str, *, allow_outside_images: bool = False) -> Annotations:
    """The images of one Karpathy split (`trainval` = train + restval); sorted by image id.

    The caption id is the file's `sentid`, the caption its `raw` text, the image id its `cocoid`.
    """
    if split not in KARPATHY_SPLITS:
        raise UserError(f"--split {split!r} is not a Karpathy split: use one of {', '.join(KARPATHY_SPLITS)}")
    data = _load_json(karpathy, "--karpathy")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or (
            data["images"] and not (isinstance(data["images"][0], dict) and "sentences" in data["images"][0])):
        raise UserError(f"--karpathy {karpathy} is not Karpathy's dataset_coco.json (images with 'sentences'); "
                        "for an official COCO captions file use --annotations")
    wanted = {"train", "restval"} if split == "trainval" else {split}
    records = []
    for image in _entries(data["images"], f"--karpathy {karpathy}", "images"):
        if image.text("split") not in wanted:
            continue
        image_id = image.integer("cocoid")
        image.name += f" (cocoid {image_id})"
        if not isinstance(image.entry.get("sentences"), list):
            image.fail("has no 'sentences' list")
        sentences = [(s.integer("sentid", limits=INT64), s.text("raw"), s.name)
                     for s in _entries(image.entry["sentences"], image.source, f"{image.name} sentences")]
        filepath, filename = image.text("filepath"), image.text("filename")
        file_name = image.file_name(f"{filepath}/{filename}", images_root, allow_outside_images)
        captions, caption_ids = _captions(sentences, image_id, image.source)
        records.append(ImageRecord(
            image_id=image_id, file_name=file_name, path=images_root / filepath / filename, width=0, height=0,
            captions=captions, caption_ids=caption_ids,
        ))
    records.sort(key=lambda r: r.image_id)
    _check_unique(records, karpathy)
    return Annotations(records, captions_listed=sum(len(r.captions) for r in records), captions_without_image=0)
