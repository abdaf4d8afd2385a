"""Reading COCO caption annotations into one record per image.

Inputs: an official COCO captions file (`captions_train2017.json`, `captions_val2014.json`, ...) with
its image folder, or Karpathy's `dataset_coco.json` (the standard retrieval split) with the COCO root
holding the folders its `filepath` fields name (`train2014/`, `val2014/`).
Output: `ImageRecord`s sorted by image id, each with all its captions sorted by caption id.
Command: used by `clipcoco shards` (pipeline/shards.py); it has no command of its own.

Captions are kept exactly as written (no stripping, no normalising); which ones are usable is
decided by the shard writer, which counts what it drops.
"""

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

KARPATHY_SPLITS = ("train", "restval", "val", "test", "trainval")


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    file_name: str  # relative to the images folder, as the annotations name it (posix separators)
    path: Path  # where the image file should be on disk
    width: int  # as the annotations say; 0 when they do not (Karpathy)
    height: int
    captions: tuple[str, ...]  # sorted by caption id
    caption_ids: tuple[int, ...]


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


def _check_unique(records: list[ImageRecord], source: Path) -> None:
    ids = [r.image_id for r in records]
    if len(set(ids)) != len(ids):
        raise UserError(f"{source} lists the same image id more than once; it is not a valid COCO file")


def read_coco_captions(annotations: Path, images: Path) -> list[ImageRecord]:
    """Every image the official captions file lists, with its captions; sorted by image id."""
    data = _load_json(annotations, "--annotations")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or "annotations" not in data:
        hint = (" (this looks like Karpathy's dataset_coco.json: use --karpathy FILE --split S)"
                if isinstance(data, dict) and "dataset" in data else "")
        raise UserError(f"--annotations {annotations} is not a COCO captions file: it needs 'images' and "
                        f"'annotations' lists{hint}")
    by_image: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for ann in data["annotations"]:
        if "caption" not in ann:
            raise UserError(f"--annotations {annotations} has annotations without a 'caption': pass a "
                            "captions_*.json file, not instances_*.json or person_keypoints_*.json")
        by_image[int(ann["image_id"])].append((int(ann["id"]), ann["caption"]))
    records = []
    for image in data["images"]:
        image_id = int(image["id"])
        caps = sorted(by_image.get(image_id, []))
        records.append(ImageRecord(
            image_id=image_id, file_name=image["file_name"], path=images / image["file_name"],
            width=int(image.get("width", 0)), height=int(image.get("height", 0)),
            captions=tuple(c for _, c in caps), caption_ids=tuple(i for i, _ in caps),
        ))
    records.sort(key=lambda r: r.image_id)
    _check_unique(records, annotations)
    return records


def read_karpathy(karpathy: Path, images_root: Path, split: str) -> list[ImageRecord]:
    """The images of one Karpathy split (`trainval` = train + restval); sorted by image id.

    The caption id is the file's `sentid`, the caption its `raw` text, the image id its `cocoid`.
    """
    if split not in KARPATHY_SPLITS:
        raise UserError(f"--split {split!r} is not a Karpathy split: use one of {', '.join(KARPATHY_SPLITS)}")
    data = _load_json(karpathy, "--karpathy")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or (
            data["images"] and "sentences" not in data["images"][0]):
        raise UserError(f"--karpathy {karpathy} is not Karpathy's dataset_coco.json (images with 'sentences'); "
                        "for an official COCO captions file use --annotations")
    wanted = {"train", "restval"} if split == "trainval" else {split}
    records = []
    for image in data["images"]:
        if image["split"] not in wanted:
            continue
        sentences = sorted((int(s["sentid"]), s["raw"]) for s in image["sentences"])
        file_name = f"{image['filepath']}/{image['filename']}"
        records.append(ImageRecord(
            image_id=int(image["cocoid"]), file_name=file_name,
            path=images_root / image["filepath"] / image["filename"], width=0, height=0,
            captions=tuple(c for _, c in sentences), caption_ids=tuple(i for i, _ in sentences),
        ))
    records.sort(key=lambda r: r.image_id)
    _check_unique(records, karpathy)
    return records
