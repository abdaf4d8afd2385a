"""Benchmarks of the stages that have an outside peer, and the machine they ran on.

`clipcoco shards` against `tar -cf` of the same files and against a plain PIL decode pool; `clipcoco embed-text`
against a plain sentence-transformers `encode`. Each call measures one side and returns a dict, which
`clipcoco bench shards|embed-text` print as a JSON line; `make bench` (scripts/bench.py) alternates the sides.

    clipcoco bench shards --annotations coco/captions.json --images coco/images --peer tar
    clipcoco bench embed-text --shards data/shards/val2017 --model $MINILM --peer sentence-transformers

Every side starts from the same state: the files read once (a warm page cache) and a new output. A side's
clock includes importing the libraries it uses beyond torch, since a user's process pays for them; the
Python start-up both share is not counted.
"""

import importlib.metadata
import os
import platform
import subprocess
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

from pipeline.coco import read_coco_captions
from pipeline.errors import UserError, require_extra

SHARD_PEERS = ("tar", "pil")
EMBED_PEERS = ("sentence-transformers",)
VERSIONS = ("torch", "torchvision", "nvidia-dali-cuda130", "nvidia-dali-cuda120", "transformers",
            "sentence-transformers", "webdataset", "pillow", "pyarrow", "numpy")


def environment() -> dict:
    """The machine (CPU, cores, GPU, OS, load average now) and the versions of what the benchmarks use."""
    import torch

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux: the platform module's name is all there is
        lines = []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor() or platform.machine())
    versions = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"bench": "env", "cpu": cpu, "cores": len(os.sched_getaffinity(0)),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "cuda": torch.version.cuda, "os": platform.platform(),
            "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()), "versions": versions}


def _check_new(out: Path | None) -> None:
    # A benchmark times a build from scratch: an existing output would be resumed or found up to date.
    if out is not None and Path(out).exists():
        raise UserError(f"--out {out} exists: remove it or pass a new path (a benchmark always starts from scratch)")


def _pil_decode(path: str) -> int:
    from PIL import Image

    with Image.open(path) as image:
        image.load()  # the full decode; `open` alone reads only the header
        return image.size[0]


def bench_shards(*, annotations: Path, images: Path, peer: str | None = None, resize_shorter: int = 0,
                 workers: int = 0, out: Path | None = None, progress: bool = True) -> dict:
    """Wall time of `clipcoco shards` (a fresh build, into `out` or a temporary folder), or of a peer on the
    files the annotations list: `tar` archives them, `pil` decodes each fully in `workers` processes."""
    if peer not in (None, *SHARD_PEERS):
        raise UserError(f"--peer {peer!r}: use one of {', '.join(SHARD_PEERS)} (or none for clipcoco shards)")
    _check_new(out)
    if workers < 0:
        raise UserError(f"--workers must be >= 0 (0 = all cores), got {workers}")
    workers = workers or len(os.sched_getaffinity(0))
    files = [r.path for r in read_coco_captions(Path(annotations), Path(images)).records]
    for path in files:
        if not path.is_file():
            raise UserError(f"{path} is listed in {annotations} but missing: check --images")
        path.read_bytes()
    with tempfile.TemporaryDirectory(prefix="clipcoco-bench-") as tmp:
        listing = Path(tmp) / "files.txt"
        listing.write_text("".join(f"{p.relative_to(images)}\n" for p in files))
        start = time.perf_counter()
        if peer is None:
            from pipeline.shards import build_shards

            build_shards(out=Path(out or Path(tmp) / "shards"), images=Path(images), annotations=Path(annotations),
                         resize_shorter=resize_shorter, workers=workers, progress=progress)
        elif peer == "tar":
            subprocess.run(["tar", "-cf", str(Path(tmp) / "same-files.tar"), "-C", str(images), "-T", str(listing)],
                           check=True)
        else:
            with get_context("fork").Pool(workers) as pool:
                for _ in pool.imap(_pil_decode, [str(p) for p in files], chunksize=4):
                    pass
        seconds = time.perf_counter() - start
    side = {None: "clipcoco shards", "tar": "tar -cf", "pil": "PIL decode"}[peer]
    return {"bench": "shards", "side": side, "images": len(files), "seconds": round(seconds, 4),
            "images_per_s": round(len(files) / seconds, 2), "workers": workers, "resize_shorter": resize_shorter}


def _sentence_transformers(captions: Path, model: str, device: str, out: Path, progress: bool) -> None:
    """What a user writes without clipcoco: load, `encode` with the library's defaults, save what embed-text saves
    (the captions plus a fixed_size_list<float16> embedding)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    SentenceTransformer = require_extra("sentence_transformers", "dev", "--peer sentence-transformers",
                                        otherwise=" (or pip install sentence-transformers)").SentenceTransformer
    table = pq.read_table(captions).sort_by([("image_id", "ascending"), ("caption_id", "ascending")])
    encoder = SentenceTransformer(model, device=device)
    vectors = encoder.encode(table.column("caption").to_pylist(), show_progress_bar=progress).astype("float16")
    values = pa.array(vectors.reshape(-1), type=pa.float16())
    pq.write_table(table.append_column("embedding", pa.FixedSizeListArray.from_arrays(values, vectors.shape[1])), out)


def bench_embed_text(shards_dir: Path, *, model: str, peer: str | None = None, captions: int | None = None,
                     device: str = "auto", out: Path | None = None, progress: bool = True) -> dict:
    """Wall time of `clipcoco embed-text` on the shards' captions (or their first `captions`), into `out` or a
    temporary file, or of the sentence-transformers peer on the same captions; each side with its defaults."""
    import pyarrow.parquet as pq

    from pipeline.runtime import resolve_device  # imports torch, before the clock: both sides need it

    if peer not in (None, *EMBED_PEERS):
        raise UserError(f"--peer {peer!r}: use one of {', '.join(EMBED_PEERS)} (or none for clipcoco embed-text)")
    _check_new(out)
    dev = resolve_device(device)
    source = Path(shards_dir) / "captions.parquet"
    if not source.is_file():
        raise UserError(f"no captions.parquet in {shards_dir}: pass a shard directory written by `clipcoco shards`")
    n = pq.read_metadata(source).num_rows
    if captions is not None and not 1 <= captions <= n:
        raise UserError(f"--captions {captions}: pass 1 to {n} (the captions in {source})")
    with tempfile.TemporaryDirectory(prefix="clipcoco-bench-") as tmp:
        if captions is not None:  # a shard directory of the first captions only (sorted as embed-text reads them)
            table = pq.read_table(source).sort_by([("image_id", "ascending"), ("caption_id", "ascending")])
            pq.write_table(table.slice(0, captions), Path(tmp) / "captions.parquet")
            shards_dir, n = Path(tmp), captions
        target = Path(out or Path(tmp) / "text.parquet")
        start = time.perf_counter()
        if peer is None:
            from pipeline.embed_text import embed_text

            embed_text(Path(shards_dir), model=model, device=device, out=target, progress=progress)
        else:
            _sentence_transformers(Path(shards_dir) / "captions.parquet", model, str(dev), target, progress)
        seconds = time.perf_counter() - start
    side = "clipcoco embed-text" if peer is None else peer
    return {"bench": "embed-text", "side": side, "model": model, "captions": n, "seconds": round(seconds, 4),
            "captions_per_s": round(n / seconds, 2), "device": dev.type}
