"""Shared fixtures: tiny generated COCO-layout data, the bundled coco-mini, the gpu marker."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.shard_reader import open_shards
from pipeline.shards import build_shards
from pipeline.text_cache import cache_rows, cache_schema, write_cache

# coco-mini: 159 real COCO 2017 images with their official caption JSONs, laid out like the download. The tests that
# need it skip without it; .ci/run points CLIPCOCO_COCO_MINI at CI's copy.
COCO_MINI = Path(os.environ.get("CLIPCOCO_COCO_MINI", "")).resolve() if os.environ.get("CLIPCOCO_COCO_MINI") else None


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not a keyword: a test id may say "gpu"
            item.add_marker(skip)


def write_coco(root: Path, n_images: int = 12, *, captions_per_image: int = 5, size=(64, 48), seed: int = 0,
               first_id: int = 1) -> tuple[Path, Path]:
    """Write `n_images` random JPEGs and an official-layout captions JSON; returns (annotations, images)."""
    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = 1000
    for i in range(n_images):
        image_id = first_id + i
        name = f"{image_id:012d}.jpg"
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images_dir / name, quality=90)
        images.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
        for c in range(captions_per_image):
            annotations.append({"id": ann_id, "image_id": image_id, "caption": f"image {image_id} caption {c}"})
            ann_id += 1
    ann_file = root / "captions.json"
    ann_file.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations}))
    return ann_file, images_dir


@pytest.fixture
def tiny_coco(tmp_path):
    """(annotations JSON, images dir) of 12 random 64x48 JPEGs with 5 captions each."""
    return write_coco(tmp_path / "coco")


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    """The 159-image COCO 2017 subset at $CLIPCOCO_COCO_MINI; skips when absent."""
    if COCO_MINI is None or not (COCO_MINI / "annotations" / "captions_val2017.json").is_file():
        pytest.skip(f"coco-mini not found (CLIPCOCO_COCO_MINI={COCO_MINI}): point it at a coco-mini folder")
    return COCO_MINI


def cache_metadata(dim: int, **overrides: str) -> dict[str, str]:
    """Text-cache metadata as `embed-text` records it, for a made-up model (tests fill caches with random vectors)."""
    return {"model": "tiny-random", "weights_sha256": "w" * 64, "tokenizer_sha256": "t" * 64, "pooling": "mean",
            "max_length": "77", "normalization": "none", "dim": str(dim), "compute_dtype": "float32",
            "captions_sha256": "c" * 64, "clipcoco_version": "0.1.0", **overrides}


def write_random_text_cache(shards: Path, path: Path, *, dim: int, seed: int = 0, drop_images: int = 0,
                            metadata: dict[str, str] | None = None) -> Path:
    """A text cache in the format `embed-text` writes over every caption of `shards/captions.parquet` (but the
    first `drop_images` images'), holding seeded random vectors instead of a model's."""
    captions = pq.read_table(shards / "captions.parquet").sort_by([("image_id", "ascending"),
                                                                     ("caption_id", "ascending")])
    keep = np.isin(captions.column("image_id").to_numpy(), np.unique(captions.column("image_id"))[drop_images:])
    captions = captions.filter(pa.array(keep))
    vectors = np.random.default_rng(seed).standard_normal((len(captions), dim))
    schema = cache_schema(dim, metadata or cache_metadata(dim))
    return write_cache(path, [cache_rows(captions, vectors, schema)], schema)


def edit_captions(annotations: Path, n: int) -> None:
    """Change the text of the first `n` captions of an official-layout captions JSON (ids kept)."""
    data = json.loads(annotations.read_text())
    for a in data["annotations"][:n]:
        a["caption"] = f"edited: {a['caption']}"
    annotations.write_text(json.dumps(data))


def clipcoco(*args: str) -> tuple[int, str]:
    """(exit code, stderr) of `clipcoco ARGS` through the CLI's entry point (`cli.main.main`), in this process."""
    from cli.main import main

    stderr, argv = io.StringIO(), sys.argv
    sys.argv = ["clipcoco", *args]
    try:
        with contextlib.redirect_stderr(stderr):
            main()
        code = 0
    except SystemExit as exit:
        code = exit.code
    finally:
        sys.argv = argv
    return code, stderr.getvalue()


def take(loader, n: int) -> list:
    """The next `n` batches, crossing into following epochs as needed."""
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


@pytest.fixture(scope="module")
def mini(coco_mini, tmp_path_factory):
    """coco-mini val2017 (79 annotated images) in 3 shards."""
    out = tmp_path_factory.mktemp("mini") / "shards"
    build_shards(out=out, images=coco_mini / "val2017", annotations=coco_mini / "annotations" / "captions_val2017.json",
                 samples_per_shard=30, progress=False)
    return open_shards(out)


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 240) -> tuple[int, str]:
    """(exit code, stderr) of `torchrun --standalone --nproc_per_node nproc script args...` on the CPU (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # Own session, so a hang can be ended with the launcher's processes too.
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(nproc), str(script), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            for pid in [proc.pid, *children(proc.pid)]:  # torchrun starts each rank in a session of its own
                os.killpg(pid, signal.SIGKILL)
    return proc.returncode, stderr


def children(pid: int) -> list[int]:
    """The processes `pid` started (Linux)."""
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


_HOLD = """
import os, sys, time
from pathlib import Path
from pipeline.files import locked
with locked(Path(sys.argv[1]), sys.argv[2]):
    ready, started = os.pipe()
    child = os.fork() if sys.argv[3] == "fork" else 0  # a worker that outlives its parent, as after a kill -9
    if child == 0 and sys.argv[3] == "fork":
        os.write(started, b"1")  # past the fork hooks: what the child closed is closed
        time.sleep(120)
        os._exit(0)
    if child:
        os.read(ready, 1)
    print(child, flush=True)
    time.sleep(120)
"""


@contextlib.contextmanager
def holding_lock(folder: Path, what: str, *, fork: bool = False):
    """Another process holding `folder`'s lock (as `what`) for the block: yields (its Popen, its forked child's pid
    or 0); both are killed at the end."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder), what, "fork" if fork else "-"],
                            stdout=subprocess.PIPE, text=True, env=env)
    child = 0
    try:
        child = int(proc.stdout.readline())  # printed once the lock is held
        yield proc, child
    finally:
        for pid in (proc.pid, child):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        proc.wait()
