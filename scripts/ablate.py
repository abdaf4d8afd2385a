"""The ablation of issue 16's training options (docs/recipes.md): the baseline and each option, same steps and seed.

    python scripts/ablate.py demo --out /tmp/ablate --steps 200 --seeds 0 1 2
    python scripts/ablate.py coco-mini --coco-mini ../shared/coco-mini --out /tmp/ablate --steps 200 --seeds 0 1 2
    python scripts/ablate.py cost --batch-size 32 --extra 16384        # the extra negatives' cost per step

Datasets (built once under OUT/<dataset>/, then reused):
- demo: `clipcoco demo`'s generated data (3,000 train images, 250 test images of colour/shape/position compositions
  never seen in training), the demo's preset (ResNet-18 from scratch at 32 px, batch 64), all-MiniLM-L6-v2 captions.
- coco-mini: the 159 annotated real COCO 2017 images of coco-mini, each image's captions split in two (its first
  three by caption id for training, the rest held out); the same images in both splits, so the test measures
  retrieval by unseen captions of seen images (paraphrase generalisation), not generalisation to new images.
  ResNet-18 from scratch at 64 px, batch 32.
Variants: baseline (one caption, in-batch negatives, InfoNCE), each option alone, and the locked trunk on cached
features. No ImageNet weights can be downloaded here, so the locked trunk is a random ResNet-18 (saved to a file,
as a user's pretrained one would be): that row shows the mechanics and the speed, not what pretrained features give.
Each finished row is appended to OUT/results.jsonl (a rerun skips it); the table prints as Markdown.
"""

import argparse
import contextlib
import io
import json
import platform
import shutil
import time
from pathlib import Path

import torch

ONE = {"train.captions": "one"}  # the baseline's caption rule, spelled out: all captions is the default since
VARIANTS = {
    "baseline": ONE,
    "captions all": {"train.captions": "all"},
    "extra negatives": {**ONE, "train.extra_negatives": "EXTRA"},
    "sigmoid": {**ONE, "model.loss": "sigmoid"},
    "all + extra": {"train.captions": "all", "train.extra_negatives": "EXTRA"},
    "lock-image (features)": {**ONE, "model.lock_image": True},
}


def build_demo(root: Path) -> dict:
    from clip.apps.demo import default_text_model
    from pipeline.demo_data import generate_demo_data
    from pipeline.embed_text import embed_text
    from pipeline.shards import build_shards

    data = generate_demo_data(root / "data", n_train=3000, n_test=250, seed=0)
    paths = {}
    for split in ("train", "test"):
        shards = root / "shards" / split
        build_shards(out=shards, images=data.images[split], annotations=data.annotations[split], overwrite=True,
                     progress=False)
        paths[split] = (shards, embed_text(shards, model=str(default_text_model()), device="cpu", progress=False,
                                           out=shards / "text-all-MiniLM-L6-v2-mean.parquet"))
    return {"paths": paths, "config": "demo", "overrides": {"data.loader": "torch", "data.threads": 2},
            "extra": 1024}


def build_coco_mini(root: Path, coco_mini: Path) -> dict:
    from clip.apps.demo import default_text_model
    from pipeline.embed_text import embed_text
    from pipeline.shards import build_shards

    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, captions = [], []
    for split in ("train2017", "val2017"):
        ann = json.loads((coco_mini / "annotations" / f"captions_{split}.json").read_text())
        for image in ann["images"]:
            link = images_dir / image["file_name"]
            if not link.exists():
                link.symlink_to((coco_mini / split / image["file_name"]).resolve())
            images.append(image)
        captions += ann["annotations"]
    by_image: dict[int, list[dict]] = {}
    for caption in sorted(captions, key=lambda c: c["id"]):
        by_image.setdefault(caption["image_id"], []).append(caption)
    paths = {}
    for split, part in (("train", slice(0, 3)), ("test", slice(3, None))):
        chosen = [c for cs in by_image.values() for c in cs[part]]
        ann_file = root / f"captions_{split}.json"
        ann_file.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": chosen}))
        shards = root / "shards" / split
        build_shards(out=shards, images=images_dir, annotations=ann_file, overwrite=True, progress=False)
        paths[split] = (shards, embed_text(shards, model=str(default_text_model()), device="cpu", progress=False,
                                           out=shards / "text-all-MiniLM-L6-v2-mean.parquet"))
    overrides = {"data.loader": "torch", "data.threads": 2, "data.image_size": 64, "train.batch_size": 32,
                 "model.image_model": "resnet18", "model.image_weights": "none", "model.embed_dim": 128,
                 "optim.lr": 1e-3, "optim.warmup_steps": 20, "train.device": "cpu", "train.precision": "fp32"}
    return {"paths": paths, "config": None, "overrides": overrides, "extra": 256}


def trunk_weights(root: Path) -> Path:
    """A fixed random ResNet-18 trunk as a state-dict file (no download possible here)."""
    import torchvision

    path = root / "resnet18-random-trunk.pt"
    if not path.is_file():
        torch.manual_seed(1234)
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def run_variant(root: Path, data: dict, name: str, seed: int, steps: int) -> dict:
    from clip.config import load_config
    from clip.evaluate import evaluate
    from clip.image_features import embed_shards
    from clip.train import train

    (train_shards, train_text), (test_shards, test_text) = data["paths"]["train"], data["paths"]["test"]
    overrides = {**data["overrides"], "train.seed": seed, "train.steps": steps, "train.epochs": 0,
                 "train.save_every": steps, "train.eval_every": 0, "train.log_every": 10,
                 "data.shards": str(train_shards), "data.text": str(train_text)}
    for key, value in VARIANTS[name].items():
        overrides[key] = data["extra"] if value == "EXTRA" else value
    seconds_features = 0.0
    if name.startswith("lock-image"):
        weights = trunk_weights(root)
        base = load_config(data["config"], overrides)
        features = root / f"features-{base.model.image_model}-{base.data.image_size}.parquet"
        if not features.is_file():
            t0 = time.perf_counter()
            embed_shards(train_shards, out=features, image_model=base.model.image_model, image_weights=str(weights),
                         image_size=base.data.image_size, device="cpu", loader="torch", batch_size=64, threads=2,
                         progress=False)
            seconds_features = time.perf_counter() - t0
        overrides.update({"model.image_weights": str(weights), "data.image_features": str(features)})
    cfg = load_config(data["config"], overrides)
    out = root / "runs" / f"{name.replace(' ', '-').replace('(', '').replace(')', '').replace('+', 'and')}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    train(cfg, out=out, overwrite=True, progress=False)
    seconds = time.perf_counter() - t0
    with contextlib.redirect_stdout(io.StringIO()):  # eval's own report table: the row below says it
        report = evaluate(out, shards=test_shards, text=test_text, loader="torch", device="cpu", threads=2,
                          progress=False)
    return {"variant": name, "seed": seed, "steps": steps, "train_s": round(seconds, 1),
            "features_s": round(seconds_features, 1), **{k: report[k] for k in
                                                          ("t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5", "n_images")}}


def cost(batch_size: int, extra: int, image_size: int, text_dim: int, embed_dim: int, repeats: int) -> None:
    """Time one ResNet-50 train step and the extra negatives' part of a step (text head + their logits), on this CPU;
    and the same as FLOPs."""
    import torchvision

    torch.manual_seed(0)
    trunk = torchvision.models.resnet50(weights=None)
    trunk.fc = torch.nn.Identity()
    head_i, head_t = torch.nn.Linear(2048, embed_dim), torch.nn.Linear(text_dim, embed_dim)
    images = torch.randn(batch_size, 3, image_size, image_size)
    rows = torch.randn(extra, text_dim)

    def resnet_step():
        trunk(images).sum().backward()

    def extras_step():
        img = torch.nn.functional.normalize(head_i(torch.randn(batch_size, 2048)), dim=-1)
        txt = torch.nn.functional.normalize(head_t(rows), dim=-1)
        torch.logsumexp(10 * img @ txt.T, dim=1).sum().backward()

    def timed(fn):
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats

    r, x = timed(resnet_step), timed(extras_step)
    # ResNet-50 forward: 4.1 G multiply-adds (8.2 GFLOPs) per 224 px image; backward about twice the forward.
    resnet_flops = 3 * 8.2e9 * batch_size * (image_size / 224) ** 2
    extra_flops = 3 * 2 * extra * (text_dim * embed_dim + batch_size * embed_dim)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"batch {batch_size} at {image_size} px: ResNet-50 fwd+bwd {r * 1000:.0f} ms; {extra} extra negatives "
          f"(text head {text_dim}->{embed_dim} + logits, fwd+bwd) {x * 1000:.1f} ms = {100 * x / r:.1f}% "
          f"(FLOPs: {100 * extra_flops / resnet_flops:.1f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=("demo", "coco-mini", "cost"))
    parser.add_argument("--out", type=Path, default=Path("ablate-out"))
    parser.add_argument("--coco-mini", type=Path, default=Path("../shared/coco-mini"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--extra", type=int, default=16384)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.dataset == "cost":
        cost(args.batch_size, args.extra, args.image_size, 768, 512, args.repeats)
        return
    root = args.out / args.dataset
    root.mkdir(parents=True, exist_ok=True)
    built = root / "built.json"
    if built.is_file():
        data = json.loads(built.read_text())
        data["paths"] = {k: tuple(Path(p) for p in v) for k, v in data["paths"].items()}
    else:
        data = build_demo(root) if args.dataset == "demo" else build_coco_mini(root, args.coco_mini)
        built.write_text(json.dumps({**data, "paths": {k: [str(p) for p in v] for k, v in data["paths"].items()}}))
    results_file = args.out / "results.jsonl"
    done = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.is_file() else []
    for seed in args.seeds:
        for name in args.variants:
            key = (args.dataset, name, seed, args.steps)
            if any((r["dataset"], r["variant"], r["seed"], r["steps"]) == key for r in done):
                continue
            row = {"dataset": args.dataset, **run_variant(root, data, name, seed, args.steps)}
            print(json.dumps(row), flush=True)
            with results_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done.append(row)
    print_table([r for r in done if r["dataset"] == args.dataset])


def print_table(rows: list[dict]) -> None:
    """Markdown: per variant, the mean over seeds of each recall (in %), each seed's value in brackets."""
    keys = ("t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5")
    print("\n| variant | seeds | steps | t2i R@1 | t2i R@5 | i2t R@1 | i2t R@5 | train s (mean) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in VARIANTS:
        mine = [r for r in rows if r["variant"] == name]
        if not mine:
            continue
        cells = []
        for k in keys:
            values = [100 * r[k] for r in mine]
            each = "/".join(f"{v:.1f}" for v in values)
            cells.append(f"**{sum(values) / len(values):.1f}** ({each})" if len(values) > 1 else f"{values[0]:.1f}")
        seconds = sum(r["train_s"] for r in mine) / len(mine)
        print(f"| {name} | {len(mine)} | {mine[0]['steps']} | {' | '.join(cells)} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
