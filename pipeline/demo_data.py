"""The demo data set: pictures of two coloured shapes in a spatial arrangement, with paraphrased captions.

Input: a seed and the split sizes (nothing is shipped as files; the same arguments give the same bytes).
Output, under `out`: `annotations/captions_{train,test}.json` in the official COCO captions layout and
`{train,test}/NNNNNNNNNNNN.jpg`, ready for `clipcoco shards --annotations ... --images ...`.
Command: `clipcoco demo` (clip/apps/demo.py) generates it before running the real pipeline on it.

    data = generate_demo_data(Path("demo-out/data"), n_train=3000, n_test=250)

A scene is an ordered layout: (axis, first object, second object), where an object is a (colour, shape)
and `first` is the left one (horizontal) or the top one (vertical). "A left of B" and "B right of A" are
the same scene, so a held-out scene can never reach train through a paraphrase. The test split is one
image per held-out scene, and no test scene occurs in train: test recall measures whether the model
composes colours, shapes and positions it has seen in other combinations, not whether it remembers.
"""

import json
import shutil
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.errors import UserError
from pipeline.files import write_atomic

COLOURS = {  # name -> RGB centre; each image jitters it a little
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SHAPE_WORDS = {  # varied wording: a caption picks one of these for each shape
    "circle": ("circle", "circle", "disc", "round dot"),
    "square": ("square", "square", "box"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "diamond", "rhombus"),
}
AXES = ("horizontal", "vertical")
# {a} and {b} are the first (left / top) and second (right / bottom) object; {ka} names what tells a from b.
# Noun phrases, which may take a prefix ("a picture of ..."), and whole sentences, which may not.
PHRASES = {
    "horizontal": (
        "{a} to the left of {b}",
        "{b} to the right of {a}",
        "{a} on the left and {b} on the right",
        "{a} and {b} side by side, the {ka} on the left",
        "{b} with {a} on its left",
    ),
    "vertical": (
        "{a} above {b}",
        "{b} below {a}",
        "{a} at the top and {b} at the bottom",
        "{b} underneath {a}",
        "{a} and {b} stacked, the {ka} on top",
        "{b} with {a} above it",
    ),
}
SENTENCES = {
    "horizontal": ("{b} is right of {a}", "{a} sits left of {b}", "on the left {a}, on the right {b}"),
    "vertical": ("{a} is over {b}", "at the top {a}, at the bottom {b}"),
}
PREFIXES = ("", "", "", "", "a picture of ", "an image of ", "a drawing of ")
CAPTIONS_PER_IMAGE = (4, 6)  # inclusive range, so the count is not always COCO's 5
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Scene:
    axis: str  # horizontal: first is left of second; vertical: first is above second
    first: tuple[str, str]  # (colour, shape)
    second: tuple[str, str]

    def key(self) -> str:
        return f"{self.axis}:{'-'.join(self.first)}:{'-'.join(self.second)}"

    @classmethod
    def from_key(cls, key: str) -> "Scene":
        axis, first, second = key.split(":")
        return cls(axis, tuple(first.split("-")), tuple(second.split("-")))

    def describe(self) -> str:
        """The plainest caption of the scene, e.g. "a red circle to the left of a blue square"."""
        relation = "to the left of" if self.axis == "horizontal" else "above"
        return f"{_article(' '.join(self.first))} {relation} {_article(' '.join(self.second))}"


@dataclass(frozen=True)
class DemoData:
    root: Path
    annotations: dict[str, Path]  # split -> captions JSON
    images: dict[str, Path]  # split -> image folder
    n_images: dict[str, int]
    n_captions: dict[str, int]


def all_scenes() -> list[Scene]:
    """Every scene, in a fixed order: two different objects on either axis."""
    objects = list(product(COLOURS, SHAPES))
    return [Scene(axis, a, b) for axis in AXES for a in objects for b in objects if a != b]


def split_scenes(*, n_train: int, n_test: int, seed: int) -> dict[str, list[Scene]]:
    """The scene of every image of each split: `n_test` held-out scenes once each, train from the rest.

    Train covers each of its scenes before repeating any, so every colour, shape and position is seen.
    """
    scenes = all_scenes()
    if not 1 <= n_test < len(scenes) // 2:
        raise UserError(f"n_test={n_test}: choose 1 to {len(scenes) // 2 - 1} (there are {len(scenes)} scenes)")
    if n_train < 1:
        raise UserError(f"n_train={n_train}: choose at least 1")
    rng = np.random.default_rng([seed, 0])
    order = rng.permutation(len(scenes))
    test = [scenes[i] for i in order[:n_test]]
    pool = [scenes[i] for i in order[n_test:]]
    train = [pool[i % len(pool)] for i in range(n_train)]
    train = [train[i] for i in rng.permutation(n_train)]
    return {"train": train, "test": test}


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _object_phrase(obj: tuple[str, str], rng: np.random.Generator) -> str:
    colour, shape = obj
    words = SHAPE_WORDS[shape]
    return _article(f"{colour} {words[rng.integers(len(words))]}")


def _distinguisher(scene: Scene) -> str:
    # What tells the first object from the second in "the X one on the left": its colour when they differ.
    (ca, sa), (cb, _) = scene.first, scene.second
    return f"{ca} one" if ca != cb else sa


def captions_for(scene: Scene, rng: np.random.Generator) -> list[str]:
    """4 to 6 different paraphrases of the scene, COCO-like in their casing and punctuation."""
    phrases, sentences = PHRASES[scene.axis], SENTENCES[scene.axis]
    templates = phrases + sentences
    count = int(rng.integers(CAPTIONS_PER_IMAGE[0], CAPTIONS_PER_IMAGE[1] + 1))
    captions = []
    for t in rng.choice(len(templates), size=count, replace=False):
        text = templates[t].format(a=_object_phrase(scene.first, rng), b=_object_phrase(scene.second, rng),
                                   ka=_distinguisher(scene))
        if t < len(phrases):
            text = PREFIXES[rng.integers(len(PREFIXES))] + text
        if rng.random() < 0.6:
            text = text[0].upper() + text[1:]
        if rng.random() < 0.5:
            text += "."
        captions.append(text)
    return captions


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.85  # a square of the same half-width looks much bigger than the circle
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


def render(scene: Scene, rng: np.random.Generator, size: int) -> Image.Image:
    """The scene on a pale background, positions, sizes and colours jittered; the relation stays unambiguous."""
    background = tuple(int(v) for v in rng.integers(200, 256, size=3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    u = size / 64  # positions below are in 64-pixel units
    # Large shapes, so they stay recognisable when the trainer shrinks the picture to 32 px; they never touch.
    radius = rng.uniform(8, 11, size=2)
    first = rng.uniform(radius[0] + 1, 26)
    along = (first, rng.uniform(max(first + radius.sum() + 2, 38), 63 - radius[1]))  # coordinates on the axis
    # The other coordinate: offsets kept well under the gap along the axis, so "left of" never reads as "above".
    offset = rng.uniform(-1, 1) * min(0.2 * (along[1] - along[0]), 6)
    centre = rng.uniform(20, 44)
    across = (centre - offset, centre + offset)
    for obj, a, c, r in zip((scene.first, scene.second), along, across, radius, strict=True):
        colour = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in COLOURS[obj[0]])
        cx, cy = (a, c) if scene.axis == "horizontal" else (c, a)
        _draw_shape(draw, obj[1], cx * u, cy * u, r * u, colour)
    return image


def write_split(out: Path, split: str, scenes: list[Scene], *, first_id: int, seed: int, image_size: int,
                quality: int) -> tuple[Path, Path, int]:
    """Render and caption one split; returns (annotations JSON, image folder, caption count)."""
    images_dir = out / split
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, scene in enumerate(scenes):
        image_id = first_id + i
        # Generators per image, so its bytes depend only on (seed, split, index), and separate ones for the
        # picture and the captions, so changing how pictures are drawn leaves the captions (and text cache) alone.
        picture_rng, caption_rng = (np.random.default_rng([seed, SPLITS.index(split) + 1, i, s]) for s in (0, 1))
        name = f"{image_id:012d}.jpg"
        render(scene, picture_rng, image_size).save(images_dir / name, format="JPEG", quality=quality)
        images.append({"id": image_id, "file_name": name, "width": image_size, "height": image_size,
                       "license": 0, "scene": scene.key()})
        for caption in captions_for(scene, caption_rng):
            # At most 6 captions per image, so ids from 10 x first_id never reach the next split's range.
            annotations.append({"id": first_id * 10 + len(annotations), "image_id": image_id, "caption": caption})
    data = {
        "info": {"description": f"clipcoco demo shapes, {split} split", "version": "1", "seed": seed},
        "licenses": [{"id": 0, "name": "generated by clipcoco", "url": ""}],
        "images": images,
        "annotations": annotations,
    }
    ann_path = out / "annotations" / f"captions_{split}.json"
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(ann_path, (json.dumps(data, indent=1) + "\n").encode("utf-8"))
    return ann_path, images_dir, len(annotations)


def generate_demo_data(out: Path, *, n_train: int = 3000, n_test: int = 250, seed: int = 0, image_size: int = 64,
                       quality: int = 90) -> DemoData:
    """Write the train and test splits under `out` (overwriting an earlier generation); a few seconds."""
    if image_size < 32:
        raise UserError(f"image_size={image_size}: choose at least 32, smaller shapes are not recognisable")
    out = Path(out)
    scenes = split_scenes(n_train=n_train, n_test=n_test, seed=seed)
    # Image ids: train from 1, test after it, so the two never share an id (eval refuses overlaps).
    first_ids = {"train": 1, "test": 1 + n_train}
    annotations, images, n_captions = {}, {}, {}
    for split in SPLITS:
        annotations[split], images[split], n_captions[split] = write_split(
            out, split, scenes[split], first_id=first_ids[split], seed=seed, image_size=image_size, quality=quality)
    return DemoData(root=out, annotations=annotations, images=images,
                    n_images={s: len(scenes[s]) for s in SPLITS}, n_captions=n_captions)


def _pair(first: str, second: str) -> str:
    # Unordered, so the class is what is in the picture, not where: "circle and square" = "square and circle".
    return f"{first}s" if first == second else "_and_".join(sorted((first, second)))


# Class sets over the scenes for `clipcoco zeroshot`: a scene's class folder (`_` reads as a space there).
CLASS_SETS = {
    "shapes": lambda scene: _pair(scene.first[1], scene.second[1]),  # "circle_and_square", "triangles"
    "colours": lambda scene: _pair(scene.first[0], scene.second[0]),  # "blue_and_red", "greens"
}


def write_image_folder(annotations: Path, images: Path, out: Path, *, classes: str = "shapes") -> dict[str, int]:
    """Copy a split's images into torchvision's ImageFolder layout, OUT/<class>/<file>, the class of each image
    given by its scene and CLASS_SETS[classes]; returns {class folder: images}. The labels are known by
    construction, so `clipcoco zeroshot RUN --images OUT` measures the demo model against the truth.

    OUT is replaced; it must be absent or a folder this function wrote (class folders of .jpg files only).
    """
    if classes not in CLASS_SETS:
        raise UserError(f"classes {classes!r}: choose one of {', '.join(CLASS_SETS)}")
    out = Path(out)
    if out.exists():
        foreign = [p for p in out.rglob("*") if not (p.is_dir() and p.parent == out)
                   and not (p.suffix == ".jpg" and p.parent.parent == out)]
        if foreign or not out.is_dir():
            raise UserError(f"{out} exists and is not an image folder written by the demo (e.g. {foreign[:1]}): "
                            "pass a new folder")
        shutil.rmtree(out)  # stale classes or images of another generation would skew the accuracy
    counts: dict[str, int] = {}
    for image in json.loads(Path(annotations).read_text())["images"]:
        name = CLASS_SETS[classes](Scene.from_key(image["scene"]))
        (out / name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(images) / image["file_name"], out / name / image["file_name"])
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))
