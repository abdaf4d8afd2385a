"""Helpers of scripts/gpu_check.sh (the one-call GPU check of issue 9): generated inputs, the probe, the summary.

Inputs: nothing but sizes; everything is generated on the machine that runs it, so nothing large travels.
Outputs: a COCO-layout image folder, a captions.parquet, a random DistilBERT-shaped text model, env.json and
summary.json, and the closing table. Command: `bash scripts/gpu_check.sh` runs these subcommands in order;
each one alone: `python scripts/gpu_check.py {probe,coco,captions,text-model,autotune,summary} --help`.

Images are smooth random fields with shapes and mild grain at COCO size (640x480), so their JPEG size and
decode cost are close to COCO's (~155 KB on average), unlike pure noise (far larger) or flat colour (far smaller).
"""

import argparse
import ctypes
import glob
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

FULL_COCO_CAPTIONS = 616_767  # captions in COCO 2017 train + val: the corpus embed-text must cover in <= 60 s
NVJPEG_BACKEND_HARDWARE = 3  # nvjpegBackend_t in nvjpeg.h
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DISTILBERT_VOCAB = 30522  # the embedding table of distilbert-base-uncased, so the model's size is DistilBERT's

_WORD_LIST = """a an the two three several man woman person people child boy girl player dog dogs cat cats horse
horses cow sheep elephant giraffe zebra bird bear bus train truck car motorcycle bicycle plane boat kite
skateboard surfboard frisbee ball bat umbrella bench table chair couch bed toilet sink kitchen pizza sandwich
cake banana apple orange broccoli donut plate bowl cup laptop phone clock vase book street road field beach
water snow grass sky building city room wall window tree park sidewalk ocean river hill is are sitting
standing riding walking holding eating playing flying looking laying parked on in at with next to near of
under over top front behind while and for its their large small big little white black red blue green yellow
brown young old tall open wooden colorful empty busy"""
WORDS = _WORD_LIST.split()


# ---------------------------------------------------------------------------------------------
# Generated data


def captions(rng: np.random.Generator, n: int) -> list[str]:
    """`n` COCO-like captions (8-15 words, sentence case, a full stop) from WORDS."""
    lengths = rng.integers(8, 16, size=n)
    picks = rng.integers(0, len(WORDS), size=(n, 15))
    out = []
    for row, length in zip(picks, lengths, strict=True):
        text = " ".join(WORDS[i] for i in row[:length])
        out.append(text[0].upper() + text[1:] + ".")
    return out


def _picture(task: tuple[int, int, int, int, str]) -> None:
    from PIL import Image, ImageDraw

    seed, index, width, height, path = task
    rng = np.random.default_rng([seed, index])
    field = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                        Image.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(int(rng.integers(4, 10))):
        x, y = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(20, width // 2), rng.integers(20, height // 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h], fill=colour)
    pixels = np.asarray(field, dtype=np.int16) + rng.integers(-16, 17, size=(height, width, 3), dtype=np.int16)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=95)


def make_coco(root: Path, *, n_images: int, width: int, height: int, seed: int, workers: int) -> dict:
    """`root/val2017/*.jpg` and `root/annotations/captions_val2017.json` (the official layout), 5 captions each."""
    images_dir, ann_dir = root / "val2017", root / "annotations"
    images_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tasks = [(seed, i, width, height, str(images_dir / f"{i + 1:012d}.jpg")) for i in range(n_images)]
    with Pool(workers) as pool:
        pool.map(_picture, tasks, chunksize=8)
    rng = np.random.default_rng(seed)
    texts = captions(rng, 5 * n_images)
    images = [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": width, "height": height}
              for i in range(n_images)]
    annotations = [{"id": 10 * (k + 1), "image_id": k // 5 + 1, "caption": t} for k, t in enumerate(texts)]
    (ann_dir / "captions_val2017.json").write_text(json.dumps({"info": {}, "licenses": [], "images": images,
                                                                "annotations": annotations}))
    sizes = [os.path.getsize(t[4]) for t in tasks]
    return {"images": n_images, "width": width, "height": height, "mean_jpeg_kb": round(np.mean(sizes) / 1024, 1),
            "seconds": round(time.perf_counter() - start, 2)}


def make_captions(shards_dir: Path, *, n_captions: int, seed: int) -> dict:
    """A captions.parquet per the shard contract (image_id, caption_id, caption), 5 captions per image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards_dir.mkdir(parents=True, exist_ok=True)
    ids = np.arange(n_captions, dtype=np.int64)
    pq.write_table(pa.table({"image_id": pa.array(ids // 5 + 1), "caption_id": pa.array(ids + 1),
                             "caption": pa.array(captions(np.random.default_rng(seed), n_captions), pa.string())}),
                   shards_dir / "captions.parquet")
    return {"captions": n_captions}


def make_text_model(folder: Path, *, dim: int, layers: int, seed: int) -> dict:
    """A random DistilBERT (`layers` x `dim`, DistilBERT's vocabulary size) with a word-level BERT tokenizer that
    knows every word of WORDS, saved with save_pretrained: loads offline through AutoModel/AutoTokenizer."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import DistilBertConfig, DistilBertModel, PreTrainedTokenizerFast

    vocab = SPECIAL_TOKENS + sorted(set(WORDS)) + ["."]
    vocab += [f"filler{i}" for i in range(DISTILBERT_VOCAB - len(vocab))]  # never in a caption; sizes the table
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=len(vocab), dim=dim, n_layers=layers, n_heads=max(1, dim // 64),
                              hidden_dim=4 * dim, max_position_embeddings=512)
    model = DistilBertModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"dim": dim, "layers": layers, "parameters": sum(p.numel() for p in model.parameters())}


# ---------------------------------------------------------------------------------------------
# What the machine is


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        return f"unavailable ({type(err).__name__})"


def _nvjpeg_hardware() -> dict:
    """Whether nvJPEG can open its hardware (A100/H100 NVJPG) backend here, and with how many engines."""
    found = [glob.glob(os.path.join(root, "nvidia", "**", "libnvjpeg.so*"), recursive=True) for root in sys.path]
    libs = sorted(p for paths in found for p in paths) + glob.glob("/usr/local/cuda*/lib64/libnvjpeg.so*")
    if not libs:
        return {"available": None, "why": "no libnvjpeg found"}
    lib_path = libs[0]
    try:
        lib = ctypes.CDLL(lib_path)
        handle = ctypes.c_void_p()
        status = lib.nvjpegCreateEx(NVJPEG_BACKEND_HARDWARE, None, None, 0, ctypes.byref(handle))
        if status != 0:
            return {"available": False, "lib": lib_path, "why": f"nvjpegCreateEx(HARDWARE) status {status}"}
        engines, cores = ctypes.c_uint(), ctypes.c_uint()
        status = lib.nvjpegGetHardwareDecoderInfo(handle, ctypes.byref(engines), ctypes.byref(cores))
        lib.nvjpegDestroy(handle)
        return {"available": True, "lib": lib_path, "engines": engines.value if status == 0 else None,
                "cores_per_engine": cores.value if status == 0 else None}
    except (OSError, AttributeError) as err:
        return {"available": None, "lib": lib_path, "why": f"{type(err).__name__}: {err}"}


def _version(module: str) -> str:
    try:
        found = __import__(module, fromlist=["__version__"])
    except Exception as err:  # noqa: BLE001 - any import failure is a fact to report, not to raise
        return f"missing ({type(err).__name__}: {str(err)[:80]})"
    try:
        return getattr(found, "__version__", None) or importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return "present, version unknown"


def probe() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(), "cores": len(os.sched_getaffinity(0)),
        # DataLoader workers hand batches over through /dev/shm; a container's default 64 MB is too small.
        "dev_shm_gb": round(shutil.disk_usage("/dev/shm").total / 2**30, 2) if os.path.isdir("/dev/shm") else None,
        "nvidia_smi": _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                            "--format=csv,noheader"]),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "dali": _version("nvidia.dali"), "torchvision": _version("torchvision"),
        "transformers": _version("transformers"), "webdataset": _version("webdataset"),
        "pyarrow": _version("pyarrow"), "rich": _version("rich"), "typer": _version("typer"),
        "yaml": _version("yaml"), "nvjpeg_hardware": _nvjpeg_hardware() if cuda else {"available": None,
                                                                                     "why": "no CUDA"},
    }


def synthetic_autotuned(*, image_model: str, image_size: int, batch_size: int, steps: int, device: str) -> dict:
    """`clipcoco bench train --synthetic` with cuDNN's autotuner on (the project leaves it off): whether choosing
    convolution kernels by timing them would raise the compute ceiling. Needs no shards or cache on disk."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from clip.bench import bench_train

    torch.backends.cudnn.benchmark = True
    ids = np.arange(1, 65, dtype=np.int64)
    vectors = np.random.default_rng(0).standard_normal((64, 768)).astype(np.float16)
    metadata = {"model": "random", "weights_sha256": "0" * 64, "tokenizer_sha256": "0" * 64, "pooling": "mean",
                "max_length": "77", "normalization": "none", "dim": "768", "dtype": "float32",
                "captions_sha256": "0" * 64, "clipcoco_version": "0"}
    text = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu-check-autotune-{os.getpid()}.parquet"
    pq.write_table(pa.table({"image_id": ids, "caption_id": ids, "caption": [str(i) for i in ids],
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 768)})
                   .replace_schema_metadata(metadata), text)
    try:
        result = bench_train(Path("unused"), text=text, synthetic=True, image_model=image_model,
                             image_size=image_size, batch_size=batch_size, steps=steps, device=device,
                             progress=False)
    finally:
        text.unlink()
    return {**result, "cudnn_benchmark": True}


# ---------------------------------------------------------------------------------------------
# The summary


def _json(path: Path) -> dict | None:
    """The last JSON object line of a file (the bench commands print theirs last), or None."""
    if not path.is_file():
        return None
    for line in reversed(path.read_text().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def _jpeg_utilisation(dmon_log: Path) -> int | None:
    """Peak `jpg` utilisation (%) in an `nvidia-smi dmon -s u` log; None when the driver has no such column."""
    if not dmon_log.is_file():
        return None
    column, peak = None, None
    for line in dmon_log.read_text().splitlines():
        fields = line.lstrip("#").split()
        if line.startswith("#") and "jpg" in fields:
            column = fields.index("jpg")
        elif column is not None and not line.startswith("#") and len(fields) > column:
            value = fields[column]
            if value.isdigit():
                peak = max(peak or 0, int(value))
    return peak


def _pytest_counts(log: Path) -> dict:
    text = log.read_text() if log.is_file() else ""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text)}
    return counts or {"status": "did not run" if not text else "no summary line (timed out? see pytest.txt)"}


def _embed_rates(embed: dict, small_cache: Path, small_seconds: float | None) -> dict:
    """Captions/s end to end, and the projection for all of COCO. Start-up (imports, model load, first CUDA
    kernels) is paid once per run, so the projection uses the steady rate between the small run (the shards'
    captions, the text-cache step) and the large one, plus the start-up that rate leaves for the small run."""
    import pyarrow.parquet as pq

    out = {**embed, "captions_per_s": round(embed["captions"] / embed["seconds"], 1)}
    small = pq.read_metadata(small_cache).num_rows if small_cache.is_file() else None
    if small_seconds is None or small is None or small >= embed["captions"] or small_seconds >= embed["seconds"]:
        return {**out, "projected_full_coco_s": round(FULL_COCO_CAPTIONS / out["captions_per_s"], 1)}
    steady = (embed["captions"] - small) / (embed["seconds"] - small_seconds)
    startup = max(small_seconds - small / steady, 0.0)
    return {**out, "steady_captions_per_s": round(steady, 1), "startup_s": round(startup, 1),
            "projected_full_coco_s": round(startup + FULL_COCO_CAPTIONS / steady, 1)}


def _fmt(value, spec: str = ",.0f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def summary(work: Path, out: Path) -> dict:
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").is_file() else {}
    dali, torch_loader = _json(out / "loader-dali.json"), _json(out / "loader-torch.json")
    train, embed = _json(out / "train.json"), _json(out / "embed-text.json")
    steps = [dict(zip(("step", "rc", "seconds"), line.split("\t"), strict=True))
             for line in (work / "steps.tsv").read_text().splitlines()] if (work / "steps.tsv").is_file() else []
    seconds = {x["step"]: float(x["seconds"]) for x in steps if x["rc"] == "0"}
    # A reused work dir may hold a step's output from an earlier run: only this run's successful steps count.
    autotuned = _json(work / "autotune.out") if "autotune" in seconds else None
    result = {
        "card": env.get("gpu") or "none (cpu dry run)", "nvidia_smi": env.get("nvidia_smi"),
        "torch": env.get("torch"), "dali": env.get("dali"),
        "nvjpeg_hardware": env.get("nvjpeg_hardware"),
        "jpg_engine_peak_utilisation": _jpeg_utilisation(work / "dmon.log") if "loader-dali" in seconds else None,
        "dali_images_per_s": dali and dali["images_per_s"], "dali_device": dali and dali["device"],
        "torch_loader_images_per_s": torch_loader and torch_loader["images_per_s"],
        "train": train,
        "synthetic_autotuned_images_per_s": autotuned and autotuned["synthetic_images_per_s"],
        "embed_text": embed and _embed_rates(embed, work / "text.parquet", seconds.get("text-cache")),
        "pytest": _pytest_counts(out / "pytest.txt"), "steps": steps,
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    return result


def print_table(s: dict) -> None:
    hw = s["nvjpeg_hardware"] or {}
    hw_text = {True: f"yes ({hw.get('engines')} engines)", False: "no", None: "unknown"}[hw.get("available")]
    peak = s["jpg_engine_peak_utilisation"]
    used = "n/a (no jpg column)" if peak is None else f"{'yes' if peak > 0 else 'no'} (peak jpg engine {peak}%)"
    t, e = s["train"] or {}, s["embed_text"] or {}
    rows = [
        ("card", f"{s['card']} | torch {s['torch']} | DALI {s['dali']}"),
        ("DALI loader", f"{_fmt(s['dali_images_per_s'])} images/s on {s['dali_device'] or 'n/a'}"),
        ("nvJPEG hardware decoder", f"available: {hw_text}; used: {used}"),
        ("torch loader", f"{_fmt(s['torch_loader_images_per_s'])} images/s"),
        ("train real (DALI)", f"{_fmt(t.get('real_images_per_s'))} images/s "
                              f"({t.get('image_model')} {t.get('image_size')} px, {t.get('precision')}, "
                              f"batch {t.get('batch_size')}; target >= 3,000, 4,000 aimed)"),
        ("train synthetic", f"{_fmt(t.get('synthetic_images_per_s'))} images/s"),
        ("synthetic, cudnn.benchmark", f"{_fmt(s['synthetic_autotuned_images_per_s'])} images/s "
                                       "(the project leaves the autotuner off)"),
        ("real / synthetic", f"{_fmt(t.get('ratio'), '.3f')} (target >= 0.95); data wait "
                             f"{_fmt(t.get('data_wait_fraction'), '.1%')}"),
        ("embed-text", f"{_fmt(e.get('captions_per_s'))} captions/s over {_fmt(e.get('captions'))} end to end; "
                       f"steady {_fmt(e.get('steady_captions_per_s'))}/s, start-up {_fmt(e.get('startup_s'), '.1f')} s "
                       f"(batch {e.get('batch_size')}, {e.get('layers')} x {e.get('dim')})"),
        ("616,767 captions", f"{_fmt(e.get('projected_full_coco_s'), '.1f', ' s')} projected, start-up included "
                             "(target <= 60 s)"),
        ("pytest -m gpu", s["pytest"].get("status") or ", ".join(f"{v} {k}" for k, v in s["pytest"].items())),
        ("steps failed", ", ".join(f"{x['step']} (rc {x['rc']}{': timed out' if x['rc'] == '124' else ''})"
                                   for x in s["steps"] if x["rc"].isdigit() and x["rc"] != "0") or "none"),
        ("steps cut by the budget", ", ".join(x["step"] for x in s["steps"] if x["rc"] == "budget") or "none"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n== GPU check ==")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("probe", help="print env.json: the card, versions, nvJPEG hardware decoder")
    p = sub.add_parser("coco", help="generated JPEGs + captions in the COCO layout")
    p.add_argument("root", type=Path)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("captions", help="a shards dir holding only a generated captions.parquet")
    p.add_argument("shards_dir", type=Path)
    p.add_argument("--captions", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=1)
    p = sub.add_parser("text-model", help="a random DistilBERT-shaped model folder")
    p.add_argument("folder", type=Path)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("autotune", help="bench train --synthetic with cudnn.benchmark on")
    p.add_argument("--image-model", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--device", default="cuda")
    p = sub.add_parser("summary", help="summary.json from the step outputs, and the closing table")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    if args.cmd == "probe":
        result = probe()
    elif args.cmd == "coco":
        result = make_coco(args.root, n_images=args.images, width=args.width, height=args.height, seed=args.seed,
                           workers=args.workers)
    elif args.cmd == "captions":
        result = make_captions(args.shards_dir, n_captions=args.captions, seed=args.seed)
    elif args.cmd == "autotune":
        result = synthetic_autotuned(image_model=args.image_model, image_size=args.image_size,
                                     batch_size=args.batch_size, steps=args.steps, device=args.device)
    elif args.cmd == "text-model":
        result = make_text_model(args.folder, dim=args.dim, layers=args.layers, seed=args.seed)
    else:
        print_table(summary(args.work, args.out))
        return
    print(json.dumps(result))


if __name__ == "__main__":
    main()
