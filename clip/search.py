"""`clipcoco search`: look up the eval images of a run with a text query or an image.

Inputs: a run directory with `embeddings-<split>.parquet` (written by `clipcoco eval`), the shard
directory of that split (for the pictures and captions), and a query: a sentence (embedded with the
same frozen text model the run's text cache was made with, loaded here and never in training, then
through the run's text head) or `--image-id N` (that image's embedding).
Outputs: the top-k images (id, file name, score, a caption) printed as a table, and a PNG grid of them
with their scores (default RUN_DIR/search-<split>.png).

    clipcoco search "a dog on a couch" --run runs/coco-karpathy --shards data/shards/karpathy-test --k 8
    clipcoco search --image-id 139 --run runs/coco-karpathy --shards data/shards/karpathy-test
"""

import io
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from clip.api import load
from clip.embeddings import load_image_embeddings
from clip.plot import figure_class
from pipeline.errors import UserError
from pipeline.runtime import resolve_device
from pipeline.shard_reader import SampleIndex, open_shards


@dataclass(frozen=True)
class Hit:
    rank: int  # 1-based
    image_id: int
    score: float  # cosine similarity to the query
    file_name: str
    caption: str  # the image's first caption
    jpeg: bytes


def embeddings_path(run: Path, shards: Path) -> Path:
    return Path(run) / f"embeddings-{Path(shards).resolve().name}.parquet"


def text_query(query: str, *, run: Path, metadata: dict[str, str], device: str) -> torch.Tensor:
    """[E] the query embedded by the checkpoint that made the embeddings (`clip.load`): its frozen text model,
    then its text head."""
    checkpoint = run / metadata["checkpoint"]  # stored relative to the run (an absolute path stays as it is)
    if not checkpoint.is_file():
        raise UserError(f"the checkpoint the saved embeddings were made with ({checkpoint}) is gone: "
                        "rerun `clipcoco eval` with the run's current checkpoint")
    return load(checkpoint, device=device).encode_texts([query])[0]


def rank_images(feats: torch.Tensor, query: torch.Tensor, *, k: int, exclude: int | None = None) -> list[int]:
    """Rows of the k images most similar to `query` (best first), leaving out row `exclude`."""
    scores = feats @ query
    if exclude is not None:
        scores[exclude] = -torch.inf
    k = min(k, feats.shape[0] - (exclude is not None))
    return torch.topk(scores, k).indices.tolist()


def write_grid(hits: list[Hit], *, title: str, out: Path) -> Path:
    """A PNG grid of the hits' images, each titled with its rank, id and score."""
    Figure = figure_class()
    cols = min(4, len(hits))
    rows = -(-len(hits) // cols)
    fig = Figure(figsize=(4 * cols, 3.6 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, hit in zip(axes, hits, strict=False):
        with Image.open(io.BytesIO(hit.jpeg)) as image:
            ax.imshow(np.asarray(image.convert("RGB")))
        ax.set_title(f"#{hit.rank}  id {hit.image_id}  score {hit.score:.3f}\n"
                     + textwrap.shorten(hit.caption, 48, placeholder="..."), fontsize=9)
    fig.suptitle(textwrap.shorten(title, 100, placeholder="..."), fontsize=13)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    return out


def print_hits(hits: list[Hit], title: str, console: Console) -> None:

    table = Table(title=title)
    for column, justify in (("#", "right"), ("image id", "right"), ("file", "left"), ("score", "right"),
                            ("caption", "left")):
        table.add_column(column, justify=justify)
    for hit in hits:
        table.add_row(str(hit.rank), str(hit.image_id), hit.file_name, f"{hit.score:.3f}", hit.caption)
    console.print(table)


def search(query: str | None = None, *, run: Path, shards: Path, image_id: int | None = None, k: int = 8,
           out: Path | None = None, device: str = "auto") -> list[Hit]:
    """The k images of `shards` nearest to a text query or to image `image_id`, best first.

    Prints them, writes the grid PNG (default RUN/search-<split>.png), returns them.
    """
    if (query is None) == (image_id is None):
        raise UserError('pass either a text query ("a dog on a couch") or --image-id N, not both or neither')
    if k < 1:
        raise UserError(f"--k {k}: pass at least 1")
    resolve_device(device)  # checked before any file is read
    figure_class()  # and the plot extra, which draws the grid
    run, shard_set = Path(run), open_shards(Path(shards))
    path = embeddings_path(run, shard_set.root)
    if not path.is_file():
        raise UserError(f"no {path.name} in {run}: run `clipcoco eval {run} --shards {shards} --text ...` first "
                        "(it saves the embeddings search ranks)")
    ids, feats, metadata = load_image_embeddings(path)
    if metadata["shards_fingerprint"] != shard_set.fingerprint:
        raise UserError(f"{path} was computed on other shards than {shard_set.root} (fingerprints differ): "
                        f"rerun `clipcoco eval {run} --shards {shards} --text ...`")
    if image_id is None:
        vector = text_query(query, run=run, metadata=metadata, device=device)
        exclude, title = None, f'"{query}"'
    else:
        matches = np.flatnonzero(ids == image_id)
        if not len(matches):
            raise UserError(f"image id {image_id} is not among the {len(ids)} images of {shard_set.root}: "
                            f"pass one of them (e.g. {ids[0]})")
        exclude = int(matches[0])
        vector, title = feats[exclude], f"images like {image_id}"
    rows = rank_images(feats, vector, k=k, exclude=exclude)
    with SampleIndex.load(shard_set.indexes, tars=shard_set.tars) as index:
        samples = {int(ids[r]): index.sample(int(ids[r])) for r in [*rows, *([] if exclude is None else [exclude])]}
    if exclude is not None:  # name the query image by its caption too
        title += f': "{samples[image_id]["json"]["captions"][0]}"'
    hits = []
    for rank, row in enumerate(rows, 1):
        sample = samples[int(ids[row])]
        hits.append(Hit(rank=rank, image_id=int(ids[row]), score=float(feats[row] @ vector),
                        file_name=sample["json"]["file_name"], caption=sample["json"]["captions"][0],
                        jpeg=sample["jpg"]))
    console = Console()
    print_hits(hits, title, console)
    out = Path(out) if out is not None else run / f"search-{shard_set.root.resolve().name}.png"
    console.print(f"grid: {write_grid(hits, title=title, out=out)}")
    return hits
