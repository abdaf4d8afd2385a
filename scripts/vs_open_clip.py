"""clipcoco against open_clip's own trainer (`python -m open_clip_train.main --lock-text`) on the same job (issue 24).

    python scripts/vs_open_clip.py speed --shape coco --rounds 3 --out /tmp/vs     # ResNet-50 224 px, DistilBERT-sized
    python scripts/vs_open_clip.py speed --shape demo --rounds 3 --out /tmp/vs     # ResNet-18 64 px, all-MiniLM-L6-v2
    python scripts/vs_open_clip.py quality --data coco-mini --seeds 0 --out /tmp/vs
    python scripts/vs_open_clip.py quality --data demo --seeds 0 --out /tmp/vs
    python scripts/vs_open_clip.py flops --shape coco                              # FLOPs of one step, each side
    python scripts/vs_open_clip.py side --shape demo --side open_clip-shards       # one measurement (make bench)

Both trainers train the same model from the same weights: a clipcoco model is built as `clipcoco train` builds it
(seeded), written as a step-0 checkpoint and exported with `clipcoco export` into the open_clip folder open_clip starts
from (`--model local-dir:FOLDER`: a timm ResNet with torchvision's keys, the frozen text tower as a Hugging Face BERT,
the same heads and logit scale). Same images (the ablation data sets of scripts/ablate.py), image size, batch size,
steps, AdamW settings, warmup + cosine schedule, gradient clipping, loader threads/workers and seed. The peer gets the
data as its users would give it: clipcoco's shards as they are (open_clip reads `txt`: the first caption of each
image), and the same JPEGs written one sample per caption (the img2dataset way: every caption once per epoch).

What cannot be made equal, and why (docs/benchmarks.md says the same):
- the text: open_clip runs the frozen text tower on every caption of every step, padded to the context length (77),
  in training mode (its HF tower's dropout stays on under --lock-text); clipcoco reads the vectors cached once in eval
  mode. That is the design difference measured here.
- the captions per step: clipcoco's default trains on every caption of each image (`--captions one`: one random
  caption per image per step, the like-for-like row); the peer sees one per sample.
- the sampling: open_clip's webdataset pipeline is run `--dataset-resampled` (shards drawn with replacement, a
  shuffle buffer; its documented mode for a step budget); clipcoco permutes each epoch.
- the augmentation's arithmetic: both take a random resized crop (same scale range, aspect 3/4-4/3) and a bilinear
  antialiased resize, clipcoco of the decoded tensor (torchvision or DALI), open_clip of the PIL image.
Scoring: both trained models are scored by CLIP_benchmark as open_clip folders (clipcoco's run through `clipcoco
export`), the same code and preprocess for both; clipcoco's own `clipcoco eval` of its run is reported beside it.

The peer's environment: open_clip 3.3's training loader needs webdataset <= 0.2.86 (open_clip#935), older than the
project's; it is installed once under OUT/peer-site (`pip install --no-deps --target`) and put on the peer's
PYTHONPATH only. Every row's numbers are appended to OUT/results.jsonl; each command prints its table.
"""

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import ablate  # noqa: E402  (the ablation's data sets: the same images and splits as docs/recipes.md)

BIN = Path(sys.executable).parent
PEER_WEBDATASET = "webdataset==0.2.86"
WORKERS = 2  # clipcoco's loader threads (--threads) = open_clip's --workers, unless --threads says otherwise

# The two shapes of the issue. The optimiser settings are clipcoco's for that preset; both sides get them.
SHAPES = {
    "coco": {"model.image_model": "resnet50", "data.image_size": 224, "train.batch_size": 16, "model.head": "mlp",
             "model.embed_dim": 512, "optim.lr": 5e-4, "optim.weight_decay": 0.1, "optim.warmup_steps": 2},
    "demo": {"model.image_model": "resnet18", "data.image_size": 64, "train.batch_size": 64, "model.head": "linear",
             "model.embed_dim": 128, "optim.lr": 2e-3, "optim.weight_decay": 0.05, "optim.warmup_steps": 2},
}
# The quality runs: the ablation's recipes (docs/recipes.md) on its two data sets.
RECIPES = {
    "coco-mini": {"model.image_model": "resnet18", "data.image_size": 64, "train.batch_size": 32,
                  "model.head": "linear", "model.embed_dim": 128, "optim.lr": 1e-3, "optim.weight_decay": 0.1,
                  "optim.warmup_steps": 20, "data.crop_scale_min": 0.9, "steps": 120},
    "demo": {"model.image_model": "resnet18", "data.image_size": 32, "train.batch_size": 64, "model.head": "linear",
             "model.embed_dim": 128, "optim.lr": 2e-3, "optim.weight_decay": 0.05, "optim.warmup_steps": 25,
             "data.crop_scale_min": 0.8, "steps": 150},
}
COMMON = {"model.image_weights": "none", "data.loader": "torch", "data.threads": WORKERS, "train.device": "cpu",
          "train.precision": "fp32", "train.epochs": 0, "train.eval_every": 0, "train.log_every": 1}
ROWS = ("clipcoco", "clipcoco --captions one", "open_clip, clipcoco's shards", "open_clip, one sample per caption")


def sh(cmd: list, *, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stdout[-2000:]}"
                         f"\n{proc.stderr[-4000:]}")
    return proc


def peer_site(out: Path) -> Path:
    site = out / "peer-site"
    if not (site / "webdataset").is_dir():
        sh([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, PEER_WEBDATASET])
    return site


# ---- data ----------------------------------------------------------------------------------------------------------

def datasets(out: Path, name: str, coco_mini: Path) -> dict:
    """scripts/ablate.py's data set (built once under OUT/<name>/), and the peer's one-sample-per-caption shards."""
    root = out / name
    built = root / "built.json"
    if not built.is_file():
        root.mkdir(parents=True, exist_ok=True)
        data = ablate.build_demo(root) if name == "demo" else ablate.build_coco_mini(root, coco_mini)
        paths = {k: [str(p) for p in v] for k, v in data["paths"].items()}
        per_caption = per_caption_shards(Path(paths["train"][0]), root / "per-caption")
        built.write_text(json.dumps({"paths": paths, "per_caption": per_caption}))
    return json.loads(built.read_text())


def tar_urls(folder: Path) -> str:
    """The brace pattern open_clip's --train-data takes for every tar of a folder."""
    tars = sorted(p.name for p in Path(folder).glob("shard-*.tar"))
    first, last = tars[0][6:12], tars[-1][6:12]
    return str(Path(folder) / (tars[0] if first == last else f"shard-{{{first}..{last}}}.tar"))


def per_caption_shards(shards: Path, out: Path) -> str:
    """clipcoco's shards rewritten one sample per caption (the same JPEG bytes, `txt` one caption each)."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=1000, verbose=0) as sink:
        for sample in wds.WebDataset(tar_urls(shards), shardshuffle=False):
            for k, caption in enumerate(json.loads(sample["json"])["captions"]):
                sink.write({"__key__": f"{sample['__key__']}-{k}", "jpg": sample["jpg"], "txt": caption})
    return str(out)


def distil_text(out: Path, shards: Path) -> Path:
    """A DistilBERT-sized text cache (random DistilBertConfig() weights, MiniLM's uncased tokenizer) of `shards`."""
    from clip.apps.demo import default_text_model

    model, cache = out / "distilbert-sized", Path(shards) / "text-distilbert-sized-mean.parquet"
    if not model.is_dir():
        sh([BIN / "clipcoco", "bench", "text-model", model, "--tokenizer", default_text_model()])
    if not cache.is_file():
        sh([BIN / "clipcoco", "embed-text", shards, "--model", model, "--device", "cpu", "--out", cache,
            "--no-progress"])
    return cache


# ---- the two trainers ---------------------------------------------------------------------------------------------

def config_sets(settings: dict) -> dict:
    """The `--set` keys of a shape or recipe (less the quality runs' step count) over COMMON."""
    return {**COMMON, **{k: v for k, v in settings.items() if k != "steps"}}


def start_folder(settings: dict, shards: Path, text: Path, seed: int, out: Path) -> Path:
    """The model `clipcoco train` starts from with this seed, as the open_clip folder `clipcoco export` writes."""
    import torch

    from clip.checkpoint import Checkpoint
    from clip.config import load_config
    from clip.export import export
    from clip.model import build_model
    from pipeline.shard_reader import open_shards
    from pipeline.text_cache import TextCache

    folder = out / f"start-{seed}"
    if folder.is_dir():
        return folder
    cfg = load_config(None, {**config_sets(settings), "data.shards": str(shards), "data.text": str(text),
                             "train.seed": seed, "train.steps": 1})
    cache, shard_set = TextCache.load(text), open_shards(shards)
    torch.manual_seed(seed)  # as clip/train.py's build_run: the seed, then the model
    model = build_model(cfg.model, cache.dim)
    run = out / f"start-{seed}-run"
    shutil.rmtree(run, ignore_errors=True)
    Checkpoint(model=model.state_dict(), config=cfg.to_dict(), text_dim=cache.dim, text_fingerprint=cache.fingerprint,
               step=0, shards_fingerprint=shard_set.fingerprint,
               train_image_ids=torch.as_tensor(shard_set.image_ids(), dtype=torch.int64),
               text_model_path=cache.model_path).save(run, keep_last=1)
    export(run, out=folder)
    return folder


def train_ours(settings: dict, *, shards: Path, text: Path, seed: int, steps: int, captions: str, out: Path) -> dict:
    """`clipcoco train`; per-step seconds from metrics.jsonl (log_every 1: each window is one step, data wait in)."""
    sets = {**config_sets(settings), "train.captions": captions, "train.save_every": steps}
    cmd = [BIN / "clipcoco", "train", "--shards", shards, "--text", text, "--out", out, "--steps", steps,
           "--seed", seed, "--overwrite", "--no-progress", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    t0 = time.perf_counter()
    sh(cmd)
    wall = time.perf_counter() - t0
    batch = settings["train.batch_size"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = [batch / r["images_per_s"] for r in lines if r.get("kind") == "train"]
    return {"step_s": step_s, "wall_s": wall, "command": cmd}


PEER_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/.*Batch \(t\): [\d.]+, ([\d.e+]+)/s,")


def train_peer(settings: dict, *, folder: Path, data: str, seed: int, steps: int, out: Path, site: Path) -> dict:
    """open_clip's trainer with --lock-text on the exported folder, every setting it shares with clipcoco taken from
    the config `clipcoco train` runs with; per-step seconds from its log (one line a step: its batch time, data wait
    in)."""
    from clip.config import load_config

    cfg = load_config(None, {**config_sets(settings), "train.steps": steps})
    batch, o = cfg.train.batch_size, cfg.optim
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "open_clip_train.main", "--model", f"local-dir:{folder}", "--lock-text",
           "--lock-text-freeze-layer-norm", "--train-data", data, "--dataset-type", "webdataset",
           "--dataset-resampled", "--train-num-samples", steps * batch, "--epochs", 1, "--batch-size", batch,
           "--lr", o.lr, "--wd", o.weight_decay, "--beta1", o.beta1, "--beta2", o.beta2, "--eps", o.eps,
           "--warmup", o.warmup_steps, "--grad-clip-norm", o.grad_clip,
           "--precision", {"fp32": "fp32", "bf16": "amp_bf16"}[cfg.train.precision], "--device", cfg.train.device,
           "--workers", cfg.data.threads, "--seed", seed, "--log-every-n-steps", 1,
           "--aug-cfg", f"scale=({cfg.data.crop_scale_min}, 1.0)", "--logs", out.parent, "--name", out.name,
           "--report-to", ""]
    t0 = time.perf_counter()
    proc = sh(cmd, env={"PYTHONPATH": str(site)}, cwd=out.parent)
    wall = time.perf_counter() - t0
    step_s = [batch / float(m.group(2)) for m in PEER_LINE.finditer(proc.stdout + proc.stderr)]
    if len(step_s) != steps:
        raise SystemExit(f"open_clip logged {len(step_s)} steps, expected {steps}: see {out}/out.log")
    return {"step_s": step_s, "wall_s": wall, "command": cmd, "checkpoint": out / "checkpoints" / "epoch_1.pt"}


def peer_folder(start: Path, checkpoint: Path, out: Path) -> Path:
    """The start folder with open_clip's trained weights in it: a `local-dir:` model like the export."""
    import torch
    from safetensors.torch import save_file

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(start, out)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    save_file({k.removeprefix("module."): v.contiguous() for k, v in state.items()},
              out / "open_clip_model.safetensors")
    return out


# ---- scoring ------------------------------------------------------------------------------------------------------

def clip_benchmark(folder: Path, images: Path, annotations: Path, work: Path) -> dict:
    """CLIP_benchmark's zero-shot retrieval (the README's command) of an open_clip folder, in %."""
    root = work / "benchmark-root"
    root.mkdir(parents=True, exist_ok=True)
    link = root / "val2014"
    if not link.is_symlink():
        link.symlink_to(Path(images).resolve())
    result = work / "result.json"
    sh([BIN / "clip_benchmark", "eval", "--model", f"local-dir:{folder}", "--pretrained", "none", "--dataset",
        "mscoco_captions", "--dataset_root", root, "--annotation_file", annotations, "--task", "zeroshot_retrieval",
        "--recall_k", 1, 5, 10, "--no_amp", "--num_workers", 0, "--output", result], cwd=work)
    m = json.loads(result.read_text())["metrics"]
    return {f"{d}_r{k}": round(100 * m[f"{key}_recall@{k}"], 2) for d, key in (("t2i", "image_retrieval"),
                                                                             ("i2t", "text_retrieval"))
            for k in (1, 5, 10)}


def clipcoco_eval(run: Path, shards: Path, text: Path) -> dict:
    report = run / "eval-vs.json"
    sh([BIN / "clipcoco", "eval", run, "--shards", shards, "--text", text, "--loader", "torch", "--device", "cpu",
        "--out", report, "--no-progress"])
    r = json.loads(report.read_text())
    return {k: round(100 * r[k], 2) for k in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10")}


# ---- the commands -------------------------------------------------------------------------------------------------

def record(out: Path, row: dict) -> None:
    row = {**row, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def rate(step_s: list[float], batch: int, warmup: int) -> float:
    """Images/s over the steps after the first `warmup` (the workers' start and the first allocations)."""
    counted = step_s[warmup:]
    return batch * len(counted) / sum(counted)


SIDES = {"clipcoco": ROWS[0], "open_clip-shards": ROWS[2], "open_clip-per-caption": ROWS[3]}


def measure(name: str, settings: dict, *, shards: Path, text: Path, per_caption: Path, work: Path, site: Path,
            warmup: int, steps: int) -> dict:
    """One speed measurement of `name` (a key of SIDES): `warmup + steps` steps, rounded up to a multiple of the
    loader workers (open_clip rounds its step count so); images/s over the steps after the warm-up."""
    batch, steps = settings["train.batch_size"], warmup + steps
    steps += -steps % config_sets(settings)["data.threads"]
    if name == "clipcoco":
        result = train_ours(settings, shards=shards, text=text, seed=0, steps=steps, captions="all", out=work / name)
        seen = captions_per_image(shards)
    else:
        result = train_peer(settings, folder=start_folder(settings, shards, text, 0, work), seed=0, steps=steps,
                            data=tar_urls(shards if name == "open_clip-shards" else per_caption), out=work / name,
                            site=site)
        seen = 1.0
    images_per_s = rate(result["step_s"], batch, warmup)
    return {"row": SIDES[name], "images_per_s": round(images_per_s, 3),
            "ms_per_caption_seen": round(1000 / (images_per_s * seen), 2), "step_s": result["step_s"],
            "batch_size": batch, "command": " ".join(map(str, result["command"]))}


def alternate(settings: dict, rounds: int, **where) -> dict[str, list[dict]]:
    """A B C A B C ...: clipcoco, open_clip on clipcoco's shards, open_clip one sample per caption."""
    results: dict[str, list[dict]] = {k: [] for k in SIDES}
    for r in range(rounds):
        for name in SIDES:
            results[name].append(measure(name, settings, **where))
            print(f"round {r + 1}: {SIDES[name]}: {results[name][-1]['images_per_s']:.2f} images/s", file=sys.stderr,
                  flush=True)
    return results


def ratios(results: dict[str, list[dict]]) -> dict[str, float]:
    """clipcoco's images/s over each side's: the median of the per-round ratios."""
    ours = [r["images_per_s"] for r in results["clipcoco"]]
    return {name: statistics.median(a / b["images_per_s"] for a, b in zip(ours, rows, strict=True))
            for name, rows in results.items()}


def speed_data(args: argparse.Namespace) -> dict:
    """Where a speed measurement trains: coco-mini's training split, or `--shards` with its `--text` cache."""
    out = args.out
    if args.shards:
        per_caption = out / f"per-caption-{args.shards.name}"
        if not per_caption.is_dir():
            per_caption_shards(args.shards, per_caption.with_suffix(".tmp"))
            per_caption.with_suffix(".tmp").rename(per_caption)
        return {"shards": args.shards, "text": args.text, "per_caption": per_caption}
    data = datasets(out, "coco-mini", args.coco_mini)
    shards = Path(data["paths"]["train"][0])
    text = distil_text(out, shards) if args.shape == "coco" else Path(data["paths"]["train"][1])
    return {"shards": shards, "text": text, "per_caption": Path(data["per_caption"])}


def shape_settings(args: argparse.Namespace) -> dict:
    settings = {**SHAPES[args.shape], "train.device": args.device, "train.precision": args.precision,
                "data.loader": args.loader, "data.threads": args.threads}
    return {**settings, "train.batch_size": args.batch_size} if args.batch_size else settings


def side(args: argparse.Namespace, name: str) -> dict:
    """One measurement (`make bench` and the GPU check alternate these as processes of their own)."""
    row = {"bench": "speed", "shape": args.shape, "device": args.device,
           **measure(name, shape_settings(args), **speed_data(args), work=args.out / f"speed-{args.shape}",
                     site=peer_site(args.out), warmup=args.warmup, steps=args.steps)}
    record(args.out, row)
    return row


def speed(args: argparse.Namespace) -> None:
    """The three sides alternated for --rounds rounds; medians."""
    settings = shape_settings(args)
    measured = alternate(settings, args.rounds, **speed_data(args), work=args.out / f"speed-{args.shape}",
                         site=peer_site(args.out), warmup=args.warmup, steps=args.steps)
    for rows in measured.values():
        for r, row in enumerate(rows, 1):
            record(args.out, {"bench": "speed", "shape": args.shape, "device": args.device, "round": r, **row})
    print(f"\nspeed, {args.shape} shape ({settings['model.image_model']} {settings['data.image_size']} px, "
          f"batch {settings['train.batch_size']}, {args.steps} steps after {args.warmup}), {args.rounds} rounds, "
          f"{platform.processor() or 'cpu'}:")
    print("| side | images/s (median) | every round | clipcoco / side (median of rounds) | ms per caption seen |")
    print("|---|---|---|---|---|")
    for name, ratio in ratios(measured).items():
        values = [r["images_per_s"] for r in measured[name]]
        print(f"| {SIDES[name]} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} | "
              f"{ratio:.2f} | {statistics.median(r['ms_per_caption_seen'] for r in measured[name]):.1f} |")


def captions_per_image(shards: Path) -> float:
    import pyarrow.parquet as pq

    ids = pq.read_table(Path(shards) / "captions.parquet", columns=["image_id"]).column("image_id").to_pylist()
    return len(ids) / len(set(ids))


def quality(args: argparse.Namespace) -> None:
    """Equal steps: every row trains the recipe's steps. Equal time: open_clip trains as many steps as fit in the time
    clipcoco's default row takes, from the speed ratio of --rounds alternated short runs at the recipe's settings
    (a ratio of medians, not one run's clock: a shared machine's load moves single runs by several times). Rows
    already in OUT/results.jsonl are not rerun."""
    recipe, out, site = RECIPES[args.data], args.out, peer_site(args.out)
    data = datasets(out, args.data, args.coco_mini)
    (shards, text), (test_shards, test_text) = ([Path(p) for p in data["paths"][s]] for s in ("train", "test"))
    per_caption = Path(data["per_caption"])
    steps = args.steps or recipe["steps"]
    images, annotations = held_out_files(out / args.data, args.data)
    work = out / f"quality-{args.data}"
    done = {(r["row"], r["seed"], r["budget"]) for r in results(out) if r["bench"] == "quality" and
            r["data"] == args.data}
    budgets = {"steps": ("equal steps",), "time": ("equal time",), "both": ("equal steps", "equal time")}[args.budget]
    speedup = None
    for seed in args.seeds:
        start = start_folder(recipe, shards, text, seed, work)
        rows = [(name, budget) for name in ROWS for budget in budgets
                if (name, seed, budget) not in done and (budget == "equal steps" or name in ROWS[2:])]
        for name, budget in rows:
            tag = re.sub(r"[^a-z]+", "-", name.lower()).strip("-") + ("-time" if budget == "equal time" else "")
            run, n = work / f"{tag}-s{seed}", steps
            if budget == "equal time":
                if speedup is None:
                    measured = alternate(recipe, args.rounds, shards=shards, text=text, per_caption=per_caption,
                                         work=work / "speed", site=site, warmup=args.warmup, steps=8)
                    speedup = ratios(measured)
                    record(out, {"bench": "quality-speed", "data": args.data, "ratios": speedup,
                                 "images_per_s": {k: [r["images_per_s"] for r in v] for k, v in measured.items()}})
                side_key = "open_clip-shards" if name == ROWS[2] else "open_clip-per-caption"
                n = max(2, 2 * round(steps / speedup[side_key] / 2))
            if name in ROWS[:2]:
                result = train_ours(recipe, shards=shards, text=text, seed=seed, steps=n, out=run,
                                    captions="all" if name == ROWS[0] else "one")
                shutil.rmtree(run / "export", ignore_errors=True)
                sh([BIN / "clipcoco", "export", run, "--out", run / "export"])
                extra = {"clipcoco_eval": clipcoco_eval(run, test_shards, test_text)}
                folder = run / "export"
            else:
                result = train_peer(recipe, folder=start, seed=seed, steps=n, out=run, site=site,
                                    data=tar_urls(shards if name == ROWS[2] else per_caption))
                folder, extra = peer_folder(start, result["checkpoint"], work / f"{tag}-s{seed}-model"), {}
            record(out, {"bench": "quality", "data": args.data, "row": name, "seed": seed, "steps": n,
                         "budget": budget, "train_s": result["wall_s"],
                         "clip_benchmark": clip_benchmark(folder, images, annotations, run), **extra})
    table(out, args.data)


def results(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def held_out_files(root: Path, name: str) -> tuple[Path, Path]:
    """The test split's image folder and COCO captions JSON, as scripts/ablate.py wrote them."""
    if name == "demo":
        return root / "data" / "test", root / "data" / "annotations" / "captions_test.json"
    return root / "images", root / "captions_test.json"


def table(out: Path, data: str) -> None:
    rows = [r for r in results(out) if r["bench"] == "quality" and r["data"] == data]
    print(f"\nquality on {data} (CLIP_benchmark, %, mean over seeds; each seed in brackets):")
    print("| side | budget | steps | seeds | t2i R@1 | t2i R@5 | i2t R@1 | i2t R@5 | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["row"], r["budget"]), []).append(r)
    for (name, budget), rs in groups.items():
        cells = []
        for key in ("t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5"):
            values = [r["clip_benchmark"][key] for r in rs]
            cells.append(f"{statistics.mean(values):.1f} ({'/'.join(f'{v:.1f}' for v in values)})")
        print(f"| {name} | {budget} | {'/'.join(str(r['steps']) for r in rs)} | {len(rs)} | {' | '.join(cells)} "
              f"| {statistics.mean(r['train_s'] for r in rs):.0f} |")


def flops(args: argparse.Namespace) -> None:
    """FLOPs of one training step on each side by part, counted by torch's FlopCounterMode on the two real models
    (forward + backward; the loss is the same symmetric InfoNCE on both, written out here)."""
    import open_clip
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from clip.checkpoint import Checkpoint

    settings, out, where = SHAPES[args.shape], args.out, speed_data(args)
    start = start_folder(settings, where["shards"], where["text"], 0, out / f"speed-{args.shape}")
    batch, size = settings["train.batch_size"], settings["data.image_size"]
    images = torch.randn(batch, 3, size, size)
    ckpt = Checkpoint.load(out / f"speed-{args.shape}" / "start-0-run")
    ours = ckpt.build_model().train()
    peer, _, _ = open_clip.create_model_and_transforms(f"local-dir:{start}")
    peer.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)  # what --lock-text-freeze-layer-norm does
    peer.train()
    tokens = open_clip.get_tokenizer(f"local-dir:{start}")(["a photo"] * batch)

    def loss(img, txt, scale, per_image):  # InfoNCE over B images and B x per_image captions
        logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
        owner = torch.arange(batch).repeat_interleave(per_image)
        return F.cross_entropy(logits.T, owner) + F.cross_entropy(logits[:, ::per_image], torch.arange(batch))

    def count(fn, *inputs, backward: bool = True) -> float:
        """FLOPs of fn(*inputs) and, when trained, of its backward (torch's module attribution of a backward is not
        reliable across parts, so each part is counted on its own)."""
        with FlopCounterMode(display=False) as counter:
            result = fn(*inputs)
            if backward:
                result.sum().backward()
        return counter.get_total_flops()

    def grad(t):
        return t.detach().requires_grad_()

    sides = {}
    with torch.no_grad():
        feats = ours.trunk(images)  # the image head's input
        mask = (tokens != peer.text.config.pad_token_id).long()
    for per_image in (1, args.captions_per_image):
        rows = torch.randn(batch * per_image, ckpt.text_dim)
        embed = ours.embed_dim
        sides[f"clipcoco, {per_image} caption{'s' if per_image > 1 else ''} per image"] = {
            "image trunk": count(ours.trunk, images), "image head": count(ours.image_head, grad(feats)),
            "text tower": 0.0, "text head": count(ours.text_head, rows),
            "logits and loss": count(lambda i, t, k=per_image: loss(i, t, 10.0, k), torch.randn(batch, embed,
                                     requires_grad=True), torch.randn(batch * per_image, embed, requires_grad=True))}
        with FlopCounterMode(display=False) as counter:
            loss(*ours(images, rows)[:3], per_image).backward()
        sides[next(reversed(sides))]["whole step"] = counter.get_total_flops()
    trunk_out = peer.visual.trunk(images).detach()
    with FlopCounterMode(display=False) as counter:
        loss(*peer(images, tokens)[:3], 1).backward()
    with torch.no_grad():
        hidden = peer.text.transformer(input_ids=tokens, attention_mask=mask)
    sides[f"open_clip --lock-text, {tokens.shape[1]} tokens a caption"] = {
        "image trunk": count(peer.visual.trunk, images), "image head": count(peer.visual.head, grad(trunk_out)),
        "text tower": count(lambda: peer.text.transformer(input_ids=tokens, attention_mask=mask).last_hidden_state,
                            backward=False),
        "text head": count(peer.text.proj, grad(peer.text.pooler(hidden, mask))),
        "logits and loss": count(lambda i, t: loss(i, t, 10.0, 1), torch.randn(batch, embed, requires_grad=True),
                                 torch.randn(batch, embed, requires_grad=True)),
        "whole step": counter.get_total_flops()}
    for side in sides.values():
        side["sum of the parts"] = sum(v for k, v in side.items() if k != "whole step")
    parts = list(next(iter(sides.values())))
    print(f"\nFLOPs of one training step, {args.shape} shape ({settings['model.image_model']} "
          f"{size} px, batch {batch}), GFLOPs (forward + backward):")
    print("| part | " + " | ".join(sides) + " |")
    print("|---|" + "---|" * len(sides))
    for part in parts:
        print(f"| {part} | " + " | ".join(f"{side[part] / 1e9:,.2f}" for side in sides.values()) + " |")
    peer_total = list(sides.values())[-1]["whole step"]
    print("| open_clip / this side (whole step) | " + " | ".join(f"{peer_total / side['whole step']:.2f}"
                                                             for side in sides.values()) + " |")
    record(out, {"bench": "flops", "shape": args.shape, "gflops": {k: {p: v / 1e9 for p, v in side.items()}
                                                                   for k, side in sides.items()}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("speed", "side", "quality", "flops"))
    parser.add_argument("--side", choices=tuple(SIDES), default="clipcoco", help="side: the trainer measured")
    parser.add_argument("--out", type=Path, default=Path("vs-open-clip"))
    parser.add_argument("--coco-mini", type=Path, default=Path(os.environ.get("CLIPCOCO_COCO_MINI",
                                                                              "../shared/coco-mini")))
    parser.add_argument("--shape", choices=tuple(SHAPES), default="coco")
    parser.add_argument("--data", choices=tuple(RECIPES), default="coco-mini")
    parser.add_argument("--rounds", type=int, default=3, help="speed, and quality's equal-time ratio: A B C rounds")
    parser.add_argument("--warmup", type=int, default=2, help="speed: steps not counted")
    parser.add_argument("--steps", type=int, default=0, help="speed: steps counted (default 8); quality: the steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--budget", choices=("steps", "time", "both"), default="both", help="quality: which rows")
    parser.add_argument("--shards", type=Path, help="side: training shards (default: coco-mini's training split)")
    parser.add_argument("--text", type=Path, help="side: the text cache of --shards")
    parser.add_argument("--device", default="cpu", help="side/speed: cpu or cuda")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--loader", default="torch", help="side/speed: clipcoco's loader (auto, dali, torch)")
    parser.add_argument("--threads", type=int, default=2, help="clipcoco's loader threads = open_clip's --workers")
    parser.add_argument("--batch-size", type=int, default=0, help="side/speed: instead of the shape's")
    parser.add_argument("--captions-per-image", type=int, default=5, help="flops: clipcoco's caption rows per image")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command in ("speed", "side"):
        args.steps = args.steps or 8
    if args.command == "side":  # one measurement as a JSON line: `make bench` (scripts/bench.py) alternates them
        print(json.dumps({k: v for k, v in side(args, args.side).items() if k != "step_s"}))
        return
    {"speed": speed, "quality": quality, "flops": flops}[args.command](args)


if __name__ == "__main__":
    main()
