"""`clipcoco zeroshot`: scoring against hand-built answers, the ImageFolder rules, and the command end to end
against a brute-force computation of the same logits."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_api import evaluated_run, png16
from typer.testing import CliRunner

from cli.main import app
from clip import load
from clip.apps.zeroshot import DEFAULT_TEMPLATES, class_names, find_images, read_templates, score, zeroshot
from pipeline.errors import UserError


def test_score_by_hand():
    # Classes are the axes of R^3; each image points at one class, so its prediction is chosen here.
    classes = torch.eye(3)
    predicted = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 2])
    images = F.normalize(classes[predicted] + 0.1 * torch.tensor([0.0, 1.0, 2.0])[None, :], dim=-1)
    got = score(images, labels, classes, k=2)
    assert got["confusion"] == [[2, 1, 0], [0, 0, 1], [0, 1, 2]]  # rows true, columns predicted
    assert got["top1"] == pytest.approx(4 / 7) and got["n_images"] == 7 and got["n_classes"] == 3
    # second choice: the image's perturbation favours class 2, then 1, then 0
    second = [2, 2, 2, 1, 1, 1, 2]
    in_top2 = [(p == y or s == y) for p, s, y in zip(predicted.tolist(), second, labels.tolist(), strict=True)]
    assert got["top5_k"] == 2 and got["top5"] == pytest.approx(np.mean(in_top2))
    assert [c["n_images"] for c in got["per_class"]] == [3, 1, 3]
    assert [c["top1"] for c in got["per_class"]] == pytest.approx([2 / 3, 0, 2 / 3])
    assert got["mean_class_top1"] == pytest.approx(4 / 9)


def test_score_is_perfect_when_every_image_is_its_class_and_top5_caps_at_the_classes():
    classes = F.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    labels = torch.tensor([3, 1, 0, 2, 2, 1])
    got = score(classes[labels], labels, classes)
    assert got["top1"] == got["top5"] == got["mean_class_top1"] == 1.0 and got["top5_k"] == 4
    assert np.array_equal(got["confusion"], np.diag([1, 2, 2, 1]))
    json.dumps(got)  # JSON-ready


def _image(path, colour=(200, 30, 30), size=(24, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_rules(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        find_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds 0 class folder"):
        find_images(tmp_path / "empty")
    _image(tmp_path / "one" / "cat" / "a.jpg")
    with pytest.raises(UserError, match="at least 2"):
        find_images(tmp_path / "one")
    root = tmp_path / "folder"
    _image(root / "golden_retriever" / "b.png")
    _image(root / "golden_retriever" / "nested" / "a.JPG")  # sub-folders and upper-case extensions count
    _image(root / "cat" / "c.jpeg")
    (root / "cat" / "notes.txt").write_text("not an image")
    _image(root / "cat" / ".hidden.jpg")
    _image(root / ".cache" / "x.jpg")  # hidden folders are no class
    found = find_images(root)
    assert found.folders == ["cat", "golden_retriever"] and found.skipped == 1
    assert [p.name for p in found.paths] == ["c.jpeg", "b.png", "a.JPG"] and found.labels.tolist() == [0, 1, 1]
    assert class_names(found.folders) == ["cat", "golden retriever"]
    (tmp_path / "names.txt").write_text("a cat\n\nthe dog\n")
    assert class_names(found.folders, tmp_path / "names.txt") == ["a cat", "the dog"]
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    with pytest.raises(UserError, match="3 names for 2 class folders"):
        class_names(found.folders, tmp_path / "three.txt")
    (root / "dog").mkdir()
    with pytest.raises(UserError, match="dog holds no images"):
        find_images(root)


def test_templates(tmp_path):
    assert read_templates() == list(DEFAULT_TEMPLATES) and all("{}" in t for t in DEFAULT_TEMPLATES)
    (tmp_path / "t.txt").write_text("a {} with {braces}\n\n{}\n")
    assert read_templates(tmp_path / "t.txt") == ["a {} with {braces}", "{}"]
    (tmp_path / "bad.txt").write_text("a photo of {}\na photo\n")
    with pytest.raises(UserError, match="1 of 2 lines lack it, e.g. 'a photo'"):
        read_templates(tmp_path / "bad.txt")
    with pytest.raises(UserError, match="not found"):
        read_templates(tmp_path / "missing.txt")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run dir, an ImageFolder of 3 classes of 3, 2 and 4 plain-colour and noisy images) on a tiny evaluated run."""
    root = tmp_path_factory.mktemp("zeroshot")
    run_dir, _, _ = evaluated_run(root, n_images=3)
    rng = np.random.default_rng(0)
    folder = root / "colours"
    classes = (("red", (220, 30, 30), 3), ("green_leaf", (30, 170, 40), 2), ("blue", (30, 60, 220), 4))
    for name, colour, count in classes:
        (folder / name).mkdir(parents=True)
        for i in range(count):
            pixels = np.clip(np.array(colour) + rng.integers(-40, 41, size=(28 + i, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.jpg")
    return run_dir, folder


def test_command_matches_a_brute_force_computation(run, tmp_path):
    run_dir, folder = run
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na {} thing\n")
    result = CliRunner().invoke(app, ["zeroshot", str(run_dir), "--images", str(folder), "--out",
                                      str(tmp_path / "report.json"), "--templates", str(tmp_path / "templates.txt"),
                                      "--device", "cpu", "--batch-size", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert "top-1" in result.output and "green leaf" in result.output
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["confusion_png"] == str(tmp_path / "report.png")

    # The same logits by hand: the mean of each class's normalised prompt embeddings, against every image.
    model = load(run_dir, device="cpu")
    names = ["blue", "green leaf", "red"]  # sorted folders: blue, green_leaf, red
    prompts = [[f"a photo of a {n}.", f"a {n} thing"] for n in names]
    class_feats = F.normalize(torch.stack([model.encode_texts(p).mean(0) for p in prompts]), dim=-1)
    paths = [p for name in ("blue", "green_leaf", "red") for p in sorted((folder / name).glob("*.jpg"))]
    labels = [0] * 4 + [1] * 2 + [2] * 3
    logits = model.encode_images(paths) @ class_feats.T
    predicted = logits.argmax(1).tolist()
    confusion = np.zeros((3, 3), dtype=int)
    for y, p in zip(labels, predicted, strict=True):
        confusion[y, p] += 1
    assert report["confusion"] == confusion.tolist()
    assert report["top1"] == pytest.approx(np.mean(np.array(predicted) == labels))
    assert report["top5_k"] == 3 and report["top5"] == 1.0  # all 3 classes fit in the top 5

    assert (report["n_images"], report["n_classes"]) == (9, 3) and np.sum(report["confusion"]) == 9
    assert [c["name"] for c in report["classes"]] == names
    assert [c["folder"] for c in report["classes"]] == ["blue", "green_leaf", "red"]
    assert [c["n_images"] for c in report["classes"]] == [4, 2, 3]
    assert [c["correct"] for c in report["classes"]] == np.diag(confusion).tolist()
    assert report["top5"] >= report["top1"]
    assert report["templates"] == ["a photo of a {}.", "a {} thing"] and report["step"] == 7
    assert report["checkpoint"].endswith("step_00000007.pt") and report["skipped_files"] == 0


def test_16_bit_pngs_among_jpegs_classify_as_their_8_bit_versions(run, tmp_path):
    run_dir, _ = run
    rng = np.random.default_rng(1)
    twins = {}  # 16-bit file -> the same picture in 8 bits
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 60, 220))):
        for folder in ("deep", "flat"):
            _image(tmp_path / folder / name / "photo.jpg", colour)
        for kind in ("grey", "rgb"):
            pixels = np.clip(np.array(colour) + rng.integers(-40, 41, size=(26, 30, 3)), 0, 255).astype(np.uint8)
            pixels = pixels[..., 0] if kind == "grey" else pixels
            deep, flat = tmp_path / "deep" / name / f"{kind}.png", tmp_path / "flat" / name / f"{kind}.png"
            deep.write_bytes(png16(pixels.astype(np.uint16) * 257))  # 257: 0..255 onto 0..65535
            Image.fromarray(pixels).save(flat)
            twins[deep] = flat
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n")
    reports = {}
    for folder in ("deep", "flat"):
        result = CliRunner().invoke(app, ["zeroshot", str(run_dir), "--images", str(tmp_path / folder), "--out",
                                          str(tmp_path / f"{folder}.json"), "--templates",
                                          str(tmp_path / "templates.txt"), "--device", "cpu", "--no-progress"])
        assert result.exit_code == 0, result.output
        reports[folder] = json.loads((tmp_path / f"{folder}.json").read_text())
    assert reports["deep"]["n_images"] == 6
    for key in ("top1", "top5", "mean_class_top1", "confusion", "classes"):
        assert reports["deep"][key] == reports["flat"][key], key
    model = load(run_dir, device="cpu")  # the embeddings behind those reports
    torch.testing.assert_close(model.encode_images(list(twins)), model.encode_images(list(twins.values())))


def test_default_report_goes_to_the_run_and_class_names_come_from_a_file(run, tmp_path):
    run_dir, folder = run
    (tmp_path / "names.txt").write_text("navy\nlime\ncrimson\n")
    report = zeroshot(run_dir, images=folder, classes=tmp_path / "names.txt", device="cpu", progress=False)
    saved = json.loads((run_dir / "zeroshot-colours.json").read_text())
    assert saved == report and (run_dir / "zeroshot-colours.png").is_file()
    assert [c["name"] for c in report["classes"]] == ["navy", "lime", "crimson"]
    assert len(report["templates"]) == len(DEFAULT_TEMPLATES) and 0 <= report["top1"] <= report["top5"] == 1.0


def test_command_errors_are_one_line(run, tmp_path):
    run_dir, folder = run
    result = CliRunner().invoke(app, ["zeroshot", str(tmp_path), "--images", str(folder), "--device", "cpu"])
    assert result.exit_code != 0 and isinstance(result.exception, UserError)
    assert "no checkpoint in" in str(result.exception)
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "b").mkdir()
    _image(tmp_path / "bad" / "a" / "x.jpg")
    (tmp_path / "bad" / "b" / "y.jpg").write_text("text, not a JPEG")
    with pytest.raises(UserError, match="y.jpg is not an image"):
        zeroshot(run_dir, images=tmp_path / "bad", out=tmp_path / "r.json", device="cpu", progress=False)


@pytest.mark.parametrize("n", [10, 21, 100])
def test_the_confusion_matrix_keeps_every_label_inside_and_counts_in_view(n):
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from clip.apps.zeroshot import confusion_figure

    rng = np.random.default_rng(n)
    matrix = rng.integers(0, 3, size=(n, n)) + 10 * np.eye(n, dtype=int)
    names = [f"a long class name {i}" for i in range(n)]
    fig = confusion_figure(matrix.tolist(), names, title=f"{n} classes")
    renderer = FigureCanvasAgg(fig).get_renderer()  # what savefig draws the PNG with
    fig.draw(renderer)
    ax = fig.axes[0]
    page = fig.bbox
    labels = [ax.xaxis.label, ax.yaxis.label, ax.title, *ax.get_xticklabels(), *ax.get_yticklabels()]
    assert sum(bool(t.get_text()) for t in labels) == 3 + 2 * n  # every class named on both axes
    for text in labels:
        box = text.get_window_extent(renderer)
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, text.get_text()
    counts = [t for t in ax.texts if t.get_text()]
    assert len(counts) == (int(np.count_nonzero(matrix)) if n <= 50 else 0)  # a colour bar alone at 100 classes
    assert len(fig.axes) == 2  # the matrix and its colour bar
