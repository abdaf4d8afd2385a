"""`clipcoco search`: look up the eval images of a run with a text query or an image.

Inputs: a run directory with `embeddings-<split>.parquet` (written by `clipcoco eval`), the shard
directory of that split (for the pictures and captions), and a query: a sentence (embedded with the
same frozen text model the run's text cache was made with, loaded here and never in training, then
through the run's text head) or `--image-id N` (that image's embedding).
Outputs: the top-k images (id, file name, score, a caption) printed as a table, and a PNG grid of them
with their scores and wrapped captions (default RUN_DIR/search-<split>.png); a known correct answer (the
image the query is a caption of, or ids the caller names) is framed in green and its rank printed.

    clipcoco search "a dog on a couch" --run runs/coco-karpathy --shards data/shards/karpathy-test --k 8
    clipcoco search --image-id 139 --run runs/coco-karpathy --shards data/shards/karpathy-test
"""

import io
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from clip.api import load
from clip.apps.plot import figure_class
from clip.embeddings import load_image_embeddings
from pipeline.errors import UserError
from pipeline.progress import console as make_console
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
    correct: bool = False  # a known answer: one of its captions is the query, or the caller named it


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


def rank_of(feats: torch.Tensor, query: torch.Tensor, rows: np.ndarray, *, exclude: int | None = None) -> list[int]:
    """The 1-based rank of each of `rows` among all images (ties counted against them), `exclude` left out."""
    scores = feats @ query
    if exclude is not None:
        scores[exclude] = -torch.inf
    return [int((scores >= scores[r]).sum()) for r in rows.tolist()]


def rank_images(feats: torch.Tensor, query: torch.Tensor, *, k: int, exclude: int | None = None) -> list[int]:
    """Rows of the k images most similar to `query` (best first), leaving out row `exclude`."""
    scores = feats @ query
    if exclude is not None:
        scores[exclude] = -torch.inf
    k = min(k, feats.shape[0] - (exclude is not None))
    return torch.topk(scores, k).indices.tolist()


def images_captioned(shards: Path, query: str) -> set[int]:
    """The images one of whose captions is `query` (case, spacing and a final period aside): its known answers."""
    def normal(text: str) -> str:
        return " ".join(text.casefold().split()).rstrip(".")

    table = pq.read_table(Path(shards) / "captions.parquet", columns=["image_id", "caption"])
    wanted = normal(query)
    return {i for i, c in zip(table.column("image_id").to_pylist(), table.column("caption").to_pylist(), strict=True)
            if normal(c) == wanted}


def grid_figure(hits: list[Hit], *, title: str):
    """The hits' images in a grid, each titled with its rank, id, score and its caption wrapped (not cut); a known
    correct answer framed in green."""
    Figure = figure_class()
    cols = min(4, len(hits))
    rows = -(-len(hits) // cols)
    fig = Figure(figsize=(4 * cols, 4.2 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes[len(hits):]:
        ax.axis("off")
    for ax, hit in zip(axes, hits, strict=False):
        with Image.open(io.BytesIO(hit.jpeg)) as image:
            ax.imshow(np.asarray(image.convert("RGB")))
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():  # a frame only around a correct answer
            spine.set_visible(hit.correct)
            spine.set(edgecolor="tab:green", linewidth=5)
        mark = "  correct" if hit.correct else ""
        ax.set_title(f"#{hit.rank}  id {hit.image_id}  score {hit.score:.3f}{mark}\n"
                     + textwrap.fill(hit.caption, 44, max_lines=5, placeholder=" ..."), fontsize=9,
                     color="tab:green" if hit.correct else "black")
    fig.suptitle(textwrap.fill(title, 110), fontsize=13)
    return fig


def write_grid(hits: list[Hit], *, title: str, out: Path) -> Path:
    """`grid_figure` as a PNG."""
    out.parent.mkdir(parents=True, exist_ok=True)
    grid_figure(hits, title=title).savefig(out, dpi=90)
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
           out: Path | None = None, device: str = "auto", correct: Iterable[int] | None = None) -> list[Hit]:
    """The k images of `shards` nearest to a text query or to image `image_id`, best first.

    `correct`: the image ids known to answer the query (default: for a text query, the images it is a caption
    of); they are marked, and the best one's rank is printed. Prints the hits, writes the grid PNG (default
    RUN/search-<split>.png), returns them.
    """
    if (query is None) == (image_id is None):
        raise UserError('pass either a text query ("a dog on a couch") or --image-id N, not both or neither')
    if query is not None and not query.strip():  # it would rank every image, none for a reason
        raise UserError('the query is empty: pass a sentence ("a dog on a couch") or --image-id N')
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
    known = set(correct) if correct is not None else images_captioned(shard_set.root, query) if query else set()
    hits = []
    for rank, row in enumerate(rows, 1):
        sample = samples[int(ids[row])]
        hits.append(Hit(rank=rank, image_id=int(ids[row]), score=float(feats[row] @ vector),
                        file_name=sample["json"]["file_name"], caption=sample["json"]["captions"][0],
                        jpeg=sample["jpg"], correct=int(ids[row]) in known))
    console = make_console()
    print_hits(hits, title, console)
    if known:
        best = min(rank_of(feats, vector, np.flatnonzero(np.isin(ids, list(known))), exclude=exclude))
        console.print(f"the correct image ({', '.join(map(str, sorted(known)))}) ranks #{best}")
    out = Path(out) if out is not None else run / f"search-{shard_set.root.resolve().name}.png"
    console.print(f"grid: {write_grid(hits, title=title, out=out)}")
    return hits
