"""`clipcoco bench ...`: each stage against its peer, and the inputs the benchmarks need; thin wrappers over
clip/apps/bench.py (loader, decode-cost, train), clip/apps/bench_peers.py (shards, embed-text, env) and
clip/apps/bench_data.py (data, text-model). Each command prints one JSON line last.

`make bench` (scripts/bench.py) runs these in alternating rounds and writes docs/benchmarks.md.
"""

import json
from pathlib import Path

import typer

from cli import DEVICE_HELP

app = typer.Typer(help="Measure each stage against its peer; each command prints one JSON line last.",
                  no_args_is_help=True)


@app.command("env")
def env() -> None:
    """The machine (CPU, cores, GPU, OS, load average) and the versions of the libraries the benchmarks use."""
    from clip.apps.bench_peers import environment

    typer.echo(json.dumps(environment()))


@app.command("data", no_args_is_help=True)
def data(
    out: Path = typer.Argument(..., metavar="OUT",
                               help="Folder to write: val2017/*.jpg and annotations/captions_val2017.json."),
    images: int = typer.Option(2048, "--images", help="Generated JPEGs."),
    captions_per_image: int = typer.Option(5, "--captions-per-image", help="Generated captions per image."),
    width: int = typer.Option(640, "--width", help="Image width in pixels (COCO's are about 640 x 480)."),
    height: int = typer.Option(480, "--height", help="Image height in pixels."),
    workers: int = typer.Option(0, "--workers", help="Processes drawing images; 0 = all cores."),
) -> None:
    """COCO-size generated JPEGs (~155 KB, decoding about as costly as COCO's) and captions in the official layout.

    Example: clipcoco bench data gen --images 2048 && clipcoco shards --annotations
    gen/annotations/captions_val2017.json --images gen/val2017 --out gen/shards
    """
    from clip.apps.bench_data import make_coco

    typer.echo(json.dumps(make_coco(out, n_images=images, captions_per_image=captions_per_image, width=width,
                                    height=height, workers=workers)))


@app.command("text-model", no_args_is_help=True)
def text_model(
    out: Path = typer.Argument(..., metavar="OUT", help="Model folder to write (loads offline, like a hub folder)."),
    dim: int = typer.Option(768, "--dim", help="Hidden size (DistilBERT: 768)."),
    layers: int = typer.Option(6, "--layers", help="Transformer layers (DistilBERT: 6)."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="Model folder whose tokenizer to use (default: a "
                                   "word-level one knowing every word of `bench data` captions)."),
) -> None:
    """A randomly initialised DistilBERT-sized text encoder: the real model's cost per caption, nothing downloaded.

    Example: clipcoco bench text-model distilbert-sized && clipcoco embed-text SHARDS --model distilbert-sized
    """
    from clip.apps.bench_data import make_text_model

    typer.echo(json.dumps(make_text_model(out, dim=dim, layers=layers, tokenizer=tokenizer)))


@app.command("shards", no_args_is_help=True)
def shards(
    annotations: Path = typer.Option(..., "--annotations", help="Official COCO captions JSON."),
    images: Path = typer.Option(..., "--images", help="Folder holding the images it lists."),
    peer: str = typer.Option(None, "--peer", help="tar (tar -cf of the listed files) | pil (a PIL decode of each, "
                             "in --workers processes); default: clipcoco shards itself."),
    resize_shorter: int = typer.Option(0, "--resize-shorter", help="As `clipcoco shards` (0 = copy mode)."),
    workers: int = typer.Option(0, "--workers", help="Processes (clipcoco shards and pil); 0 = all cores."),
    out: Path = typer.Option(None, "--out", help="Keep the shards here (a new path; default: a temporary folder)."),
) -> None:
    """Wall time of a fresh `clipcoco shards` build, or of a peer on the same files (a warm page cache for all).

    Example: clipcoco bench shards --annotations coco/annotations/captions_val2017.json --images coco/val2017
    --peer tar
    """
    from clip.apps.bench_peers import bench_shards

    typer.echo(json.dumps(bench_shards(annotations=annotations, images=images, peer=peer,
                                       resize_shorter=resize_shorter, workers=workers, out=out)))


@app.command("embed-text", no_args_is_help=True)
def embed_text(
    shards_dir: Path = typer.Option(..., "--shards", help="Shard directory (its captions.parquet is read)."),
    model: str = typer.Option(..., "--model", help="Hugging Face encoder: a hub name or a local folder."),
    peer: str = typer.Option(None, "--peer", help="sentence-transformers (its `encode` with its defaults); "
                             "default: clipcoco embed-text itself."),
    captions: int = typer.Option(None, "--captions", help="Only the first N captions (default: all)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    out: Path = typer.Option(None, "--out", help="Keep the output here (a new path; default: a temporary file)."),
) -> None:
    """Wall time of `clipcoco embed-text` (model load included), or of a plain sentence-transformers script.

    Example: clipcoco bench embed-text --shards data/shards/val2017 --model sentence-transformers/all-MiniLM-L6-v2
    --peer sentence-transformers
    """
    from clip.apps.bench_peers import bench_embed_text

    typer.echo(json.dumps(bench_embed_text(shards_dir, model=model, peer=peer, captions=captions, device=device,
                                           out=out)))


@app.command("loader", no_args_is_help=True)
def loader(
    shards: Path = typer.Option(..., "--shards", help="Shard directory written by `clipcoco shards`."),
    kind: str = typer.Option("auto", "--loader", help="auto (dali on CUDA, torch on a CPU) | dali | torch."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per batch."),
    batches: int = typer.Option(20, "--batches", help="Batches counted (after 2 warm-up batches)."),
    image_size: int = typer.Option(224, "--image-size", help="Square crop size in pixels."),
    threads: int = typer.Option(2, "--threads", help="Decoding threads (DALI) or DataLoader workers (torch)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Decode + augment throughput (training mode), cycling over the shards.

    Example: clipcoco bench loader --shards data/shards/karpathy-test --loader torch --image-size 64
    """
    from clip.apps.bench import bench_loader

    result = bench_loader(shards, loader=kind, batch_size=batch_size, batches=batches, image_size=image_size,
                          threads=threads, device=device)
    typer.echo(json.dumps(result))


@app.command("decode-cost", no_args_is_help=True)
def decode_cost(
    shards: Path = typer.Option(..., "--shards", help="Shard directory written by `clipcoco shards`."),
    image_size: int = typer.Option(224, "--image-size", help="Square crop size in pixels."),
    images: int = typer.Option(256, "--images", help="Images per step measured."),
) -> None:
    """CPU ms per image of each loader step (DALI and torchvision), one thread each: where the CPU time goes.

    Example: clipcoco bench decode-cost --shards data/shards/karpathy-test --image-size 64
    """
    from clip.apps.bench import decode_cost as measure

    typer.echo(json.dumps(measure(shards, image_size=image_size, images=images)))


@app.command("train", no_args_is_help=True)
def train(
    shards: Path = typer.Option(..., "--shards", help="Shard directory written by `clipcoco shards`."),
    text: Path = typer.Option(..., "--text", help="Its text cache, written by `clipcoco embed-text`."),
    synthetic: bool = typer.Option(False, "--synthetic", help="Only the synthetic block: the compute ceiling."),
    image_model: str = typer.Option("resnet50", "--image-model", help="resnet18 | resnet34 | resnet50 | resnet101."),
    image_size: int = typer.Option(224, "--image-size", help="Square crop size in pixels."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per step."),
    steps: int = typer.Option(10, "--steps", help="Steps counted per block (after 2 warm-up steps)."),
    kind: str = typer.Option("auto", "--loader", help="auto (dali on CUDA, torch on a CPU) | dali | torch."),
    threads: int = typer.Option(2, "--threads", help="Loader decoding threads."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    precision: str = typer.Option("bf16", "--precision", help="bf16 (autocast on CUDA; fp32 on a CPU) | fp32."),
) -> None:
    """Training images/s from the real loader vs the same step on synthetic batches already on the device.

    Prints real and synthetic images/s, their ratio and the data-wait fraction of the real block.

    Example: clipcoco bench train --shards data/shards/karpathy-test --text data/shards/karpathy-test/text.parquet
    --image-model resnet18 --image-size 64 --steps 5
    """
    from clip.apps.bench import bench_train

    result = bench_train(shards, text=text, synthetic=synthetic, image_model=image_model, image_size=image_size,
                         batch_size=batch_size, steps=steps, loader=kind, device=device, precision=precision,
                         threads=threads)
    typer.echo(json.dumps(result))
