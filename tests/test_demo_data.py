"""The generated demo data set: deterministic bytes, held-out scenes, valid COCO captions JSON."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.coco import read_coco_captions
from pipeline.demo_data import (
    COLOURS,
    SHAPE_WORDS,
    Scene,
    all_scenes,
    captions_for,
    generate_demo_data,
    split_scenes,
    write_image_folder,
)
from pipeline.errors import UserError


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return generate_demo_data(tmp_path_factory.mktemp("demo"), n_train=120, n_test=30, seed=3)


def _coco(demo, split: str) -> dict:
    return json.loads(demo.annotations[split].read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_arguments_give_the_same_bytes(demo, tmp_path):
    again = generate_demo_data(tmp_path / "again", n_train=120, n_test=30, seed=3)
    first, second = _files(demo.root), _files(again.root)
    assert len(first) == 120 + 30 + 2
    assert first == second
    other = generate_demo_data(tmp_path / "other", n_train=120, n_test=30, seed=4)
    assert _files(other.root) != first


def test_loads_as_coco_captions(demo):
    for split, n in (("train", 120), ("test", 30)):
        records = read_coco_captions(demo.annotations[split], demo.images[split]).records
        assert len(records) == n == demo.n_images[split]
        assert sum(len(r.captions) for r in records) == demo.n_captions[split]
        for r in records:
            assert r.path.is_file()
            with Image.open(r.path) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (r.width, r.height) == (64, 64)
    ids = {s: {r.image_id for r in read_coco_captions(demo.annotations[s], demo.images[s]).records}
           for s in ("train", "test")}
    assert not ids["train"] & ids["test"]
    caption_ids = [a["id"] for s in ("train", "test") for a in _coco(demo, s)["annotations"]]
    assert len(caption_ids) == len(set(caption_ids))


def test_test_scenes_never_occur_in_train(demo):
    scenes = {s: [im["scene"] for im in _coco(demo, s)["images"]] for s in ("train", "test")}
    assert len(set(scenes["test"])) == len(scenes["test"])  # one image per held-out scene
    assert not set(scenes["test"]) & set(scenes["train"])
    # At the demo's full size too, where train repeats scenes: checked on the plan, without rendering.
    plan = split_scenes(n_train=3000, n_test=250, seed=0)
    train_keys = {s.key() for s in plan["train"]}
    assert not {s.key() for s in plan["test"]} & train_keys
    assert len(train_keys) == len(all_scenes()) - 250  # train covers every other scene


def test_captions_name_both_objects_and_vary_in_count():
    rng = np.random.default_rng(0)
    counts = []
    for scene in all_scenes()[::37]:
        captions = captions_for(scene, rng)
        counts.append(len(captions))
        assert len(set(captions)) == len(captions)
        for text in captions:
            lower = text.lower()
            for colour, shape in (scene.first, scene.second):
                assert colour in lower
                assert any(word in lower for word in SHAPE_WORDS[shape])
            # Colours other than the scene's never appear.
            assert not {c for c in COLOURS if c in lower} - {scene.first[0], scene.second[0]}
    assert min(counts) == 4 and max(counts) == 6


def test_bad_sizes_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="n_test"):
        generate_demo_data(tmp_path, n_train=10, n_test=0)
    with pytest.raises(UserError, match="n_train"):
        generate_demo_data(tmp_path, n_train=0, n_test=10)


def test_scene_key_round_trips_and_describes():
    for scene in all_scenes()[::53]:
        assert Scene.from_key(scene.key()) == scene
    scene = Scene("vertical", ("orange", "circle"), ("red", "square"))
    assert scene.describe() == "an orange circle above a red square"


def test_image_folder_files_every_test_image_under_its_scene_class(demo, tmp_path):
    out = tmp_path / "folder"
    counts = write_image_folder(demo.annotations["test"], demo.images["test"], out, classes="shapes")
    assert sum(counts.values()) == 30 and counts == {p.name: len(list(p.iterdir())) for p in out.iterdir()}
    for image in _coco(demo, "test")["images"]:
        scene = Scene.from_key(image["scene"])
        shapes = sorted({scene.first[1], scene.second[1]})
        folder = f"{shapes[0]}s" if len(shapes) == 1 else f"{shapes[0]}_and_{shapes[1]}"
        name = image["file_name"]
        assert (out / folder / name).read_bytes() == (demo.images["test"] / name).read_bytes()
    # Rewriting replaces the folder: no class of the previous set is left behind.
    colours = write_image_folder(demo.annotations["test"], demo.images["test"], out, classes="colours")
    assert sorted(p.name for p in out.iterdir()) == list(colours) and not set(colours) & set(counts)
    assert all(set(name.split("_and_")) <= set(COLOURS) or name[:-1] in COLOURS for name in colours)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an image folder written by the demo"):
        write_image_folder(demo.annotations["test"], demo.images["test"], tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").is_file()
    with pytest.raises(UserError, match="shapes, colours"):
        write_image_folder(demo.annotations["test"], demo.images["test"], out, classes="sizes")
