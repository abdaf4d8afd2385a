"""`clipcoco zeroshot`: classify a folder of labelled images with nothing but class names, as CLIP does.

Inputs: a run directory (its `latest` checkpoint) or a checkpoint file, and a folder of class folders in
torchvision's ImageFolder layout (`DIR/<class>/**/<image>`; classes are the sub-folders in sorted order,
files with other extensions and hidden entries are left out). Class names are the folder names with `_`
read as a space, or `--classes FILE`: one name per line, in the sorted order of the folders (the order
class-name lists such as ImageNet's are published in). Prompt templates are DEFAULT_TEMPLATES or
`--templates FILE`: one per line, `{}` where the class name goes.
Outputs: a report JSON (default RUN_DIR/zeroshot-<folder>.json): top-1 and top-5 accuracy (top-5 is
top-min(5, classes)), mean per-class accuracy, per-class counts and accuracies, the confusion matrix (rows:
true class, columns: predicted, top-1), class names, templates, checkpoint; a table on the terminal; and
the confusion matrix as a PNG next to the report (same name, .png).

    clipcoco zeroshot runs/coco-karpathy --images data/my-classes --out my-classes.json

Each class is the prompt ensemble of CLIP: every template filled with its name, embedded by the run's frozen
text encoder and text head (`clip.load`), averaged and L2-normalised; an image's prediction is the class of
highest cosine similarity with its embedding (`encode_images`: upright and 8-bit as `clipcoco shards` packs a
file, then the eval transform, as `clipcoco eval` embeds an image).
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from clip.api import CLIPModel, load
from clip.apps.plot import figure_class
from clip.checkpoint import run_dir_of
from pipeline import __version__
from pipeline.errors import UserError
from pipeline.files import write_atomic
from pipeline.progress import console as make_console
from pipeline.progress import rate_bar
from pipeline.runtime import resolve_device

# CLIP-style prompts; a class name may be a bare noun ("dog") or a noun phrase ("red circle").
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a photo of a small {}.",
    "a {}.",
)
TOP_K = 5
# What torchvision's ImageFolder reads (torchvision.datasets.folder.IMG_EXTENSIONS), compared lower-case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TABLE_ROWS = 50  # more classes than this: the per-class table is left to the report


@dataclass(frozen=True)
class ImageFolder:
    root: Path
    folders: list[str]  # class folders, sorted: class i is folders[i]
    paths: list[Path]  # every image, class by class, sorted within a class
    labels: np.ndarray  # [N] int64 class index of each path
    skipped: int  # files in the class folders that are not images by their extension


def _visible(name: str) -> bool:
    return not name.startswith(".")


def find_images(root: Path) -> ImageFolder:
    """The images and labels of an ImageFolder-layout folder; UserError unless it holds >= 2 non-empty classes."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--images {root}: no such folder; pass a folder of class folders (DIR/<class>/<image>)")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and _visible(e.name))
    if len(folders) < 2:
        raise UserError(f"--images {root} holds {len(folders)} class folder(s): zero-shot classification needs "
                        "at least 2, one sub-folder of images per class (DIR/<class>/<image>)")
    paths, labels, skipped = [], [], 0
    for label, folder in enumerate(folders):
        found = []
        for top, dirs, files in os.walk(root / folder, followlinks=True):
            dirs[:] = [d for d in dirs if _visible(d)]
            for name in filter(_visible, files):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(Path(top) / name)
                else:
                    skipped += 1
        if not found:
            raise UserError(f"class folder {root / folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}): "
                            "add some or remove the folder")
        paths += sorted(found)
        labels += [label] * len(found)
    return ImageFolder(root, folders, paths, np.asarray(labels, dtype=np.int64), skipped)


def _lines(path: Path, what: str) -> list[str]:
    if not Path(path).is_file():
        raise UserError(f"{what} file {path} not found: pass a text file, one entry per line")
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def class_names(folders: list[str], names_file: Path | None = None) -> list[str]:
    """The folder names with `_` as a space, or the lines of `names_file` (one per folder, in sorted order)."""
    if names_file is None:
        return [folder.replace("_", " ") for folder in folders]
    names = _lines(names_file, "--classes")
    if len(names) != len(folders):
        raise UserError(f"--classes {names_file} lists {len(names)} names for {len(folders)} class folders: "
                        f"write one name per line, in the sorted order of the folders ({', '.join(folders[:3])}, ...)")
    return names


def read_templates(path: Path | None = None) -> list[str]:
    """DEFAULT_TEMPLATES, or the lines of `path`, each holding `{}` where the class name goes."""
    if path is None:
        return list(DEFAULT_TEMPLATES)
    templates = _lines(path, "--templates")
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise UserError(f"--templates {path}: every line needs {{}} where the class name goes (e.g. "
                        f"'a photo of a {{}}.'); {len(bad)} of {len(templates)} lines lack it"
                        + (f", e.g. {bad[0]!r}" if bad else ""))
    return templates


def class_embeddings(model: CLIPModel, names: list[str], templates: list[str]) -> torch.Tensor:
    """[C, E] L2-normalised: each class's template embeddings, averaged (CLIP's prompt ensembling)."""
    # replace, not str.format: a template may hold other braces
    prompts = [template.replace("{}", name) for name in names for template in templates]
    feats = model.encode_texts(prompts).view(len(names), len(templates), -1)
    return F.normalize(feats.mean(dim=1), dim=-1)


def score(image_feats: torch.Tensor, labels: torch.Tensor, class_feats: torch.Tensor, *, k: int = TOP_K) -> dict:
    """Top-1 / top-k accuracy, per-class accuracies and the top-1 confusion matrix of cosine-similarity predictions.

    image_feats [N, E] and class_feats [C, E] are scored by dot product; labels [N] are class rows. k is
    capped at C. Returns plain numbers and lists (JSON-ready).
    """
    n_classes = class_feats.shape[0]
    labels = torch.as_tensor(labels, dtype=torch.long)
    k = min(k, n_classes)
    top = (image_feats.float() @ class_feats.float().T).topk(k, dim=1).indices  # [N, k], best first
    hit1, hitk = top[:, 0] == labels, (top == labels[:, None]).any(dim=1)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    confusion.index_put_((labels, top[:, 0]), torch.ones_like(labels), accumulate=True)
    counts = torch.bincount(labels, minlength=n_classes)
    correct1 = torch.bincount(labels[hit1], minlength=n_classes)
    correctk = torch.bincount(labels[hitk], minlength=n_classes)
    per_class = [{"n_images": int(n), "correct": int(c1), "top1": float(c1 / n) if n else None,
                  "top5": float(ck / n) if n else None}
                 for n, c1, ck in zip(counts.tolist(), correct1.tolist(), correctk.tolist(), strict=True)]
    present = [c["top1"] for c in per_class if c["n_images"]]
    return {"top1": float(hit1.float().mean()), "top5": float(hitk.float().mean()), "top5_k": k,
            "mean_class_top1": float(np.mean(present)), "n_images": int(labels.numel()), "n_classes": n_classes,
            "per_class": per_class, "confusion": confusion.tolist()}


def confusion_figure(confusion: list[list[int]], names: list[str], *, title: str):
    """The confusion matrix as a figure: each true class's row as fractions of its images (the colour bar), class
    names on both axes up to 100 classes and the counts written in up to 50, fonts shrinking with the class count."""
    matrix = np.asarray(confusion, dtype=np.float64)
    fractions = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    n = len(names)
    side = min(4 + 0.3 * n, 32)  # about 0.3 inch a class up to 100 classes; a thousand stay a sane file
    fontsize = max(5.0, min(8.0, 200 / max(n, 1)))
    fig = figure_class()(figsize=(side + 2.5, side + 1.5), layout="constrained")
    ax = fig.subplots()
    shown = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(shown, ax=ax, shrink=0.8, label="fraction of the true class's images")
    if n <= 100:  # beyond that, labels overlap into a black band
        ax.set_xticks(range(n), names, rotation=60, ha="right", rotation_mode="anchor", fontsize=fontsize)
        ax.set_yticks(range(n), names, fontsize=fontsize)
    if n <= 50:
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(j, i, f"{int(count)}", ha="center", va="center", fontsize=fontsize,
                        color="white" if fractions[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    return fig


def write_confusion(confusion: list[list[int]], names: list[str], *, title: str, out: Path) -> Path:
    """`confusion_figure` as a PNG."""
    out.parent.mkdir(parents=True, exist_ok=True)
    confusion_figure(confusion, names, title=title).savefig(out, dpi=100)
    return out


def print_report(report: dict, console: Console) -> None:
    classes = report["classes"]
    table = Table(title=f"zero-shot on {report['images']}: {report['n_images']:,} images, {report['n_classes']} "
                        f"classes, {len(report['templates'])} templates (step {report['step']})",
                  caption=f"top-1 {100 * report['top1']:.2f}%   top-{report['top5_k']} {100 * report['top5']:.2f}%   "
                          f"mean per-class top-1 {100 * report['mean_class_top1']:.2f}%")
    for column, justify in (("class", "left"), ("folder", "left"), ("images", "right"), ("top-1 %", "right"),
                            (f"top-{report['top5_k']} %", "right")):
        table.add_column(column, justify=justify)
    for c in classes[:TABLE_ROWS]:
        table.add_row(c["name"], c["folder"], str(c["n_images"]), f"{100 * c['top1']:.1f}", f"{100 * c['top5']:.1f}")
    if len(classes) > TABLE_ROWS:
        table.add_row(f"... {len(classes) - TABLE_ROWS} more classes in the report", "", "", "", "", style="dim")
    console.print(table)


def zeroshot(run_or_ckpt: Path, *, images: Path, out: Path | None = None, classes: Path | None = None,
             templates: Path | None = None, device: str = "auto", batch_size: int | None = None,
             progress: bool = True) -> dict:
    """Classify every image under `images` (class folders) by its nearest class prompt; see the module docstring.

    Writes the report JSON and the confusion PNG next to it, prints a table, returns the report.
    """
    resolve_device(device)  # checked before any file is read
    figure_class()  # and the plot extra, which draws the confusion matrix
    folder = find_images(Path(images))
    names = class_names(folder.folders, classes)
    prompts = read_templates(templates)
    model = load(run_or_ckpt, device=device, batch_size=batch_size)
    class_feats = class_embeddings(model, names, prompts)
    feats = []
    with rate_bar("zero-shot", "images", enabled=progress) as bar:
        task = bar.add_task("images", total=len(folder.paths))
        for start in range(0, len(folder.paths), model.batch_size):  # one forward pass per step of the bar
            feats.append(model.encode_images(folder.paths[start:start + model.batch_size]))
            bar.advance(task, len(feats[-1]))
    scores = score(torch.cat(feats), torch.from_numpy(folder.labels), class_feats)
    per_class = scores.pop("per_class")
    out = Path(out) if out is not None else run_dir_of(model.checkpoint) / f"zeroshot-{folder.root.resolve().name}.json"
    png = out.with_suffix(".png")
    report = {
        **scores,
        "classes": [{"name": name, "folder": f, **c} for name, f, c in zip(names, folder.folders, per_class,
                                                                           strict=True)],
        "templates": prompts,
        "images": str(folder.root),
        "skipped_files": folder.skipped,
        "checkpoint": str(model.checkpoint),
        "step": model.step,
        "image_size": model.image_size,
        "text_model": model.text_fingerprint["model"],
        "confusion_png": str(png),
        "clipcoco_version": __version__,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, (json.dumps(report, indent=2) + "\n").encode())
    write_confusion(report["confusion"], names, out=png, title=f"zero-shot confusion, {folder.root.name} "
                    f"(top-1 {100 * report['top1']:.1f}%)")
    console = make_console()
    print_report(report, console)
    if folder.skipped:
        console.print(f"[dim]left out {folder.skipped} file(s) without an image extension[/]")
    console.print(f"report: {out}\nconfusion matrix: {png}")
    return report
