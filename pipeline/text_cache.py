"""The text cache format: its writer (used by `clipcoco embed-text`) and the reader `train`, `eval` and `search` load.

Input: one Parquet file written by `clipcoco embed-text` (see `pipeline/embed_text.py`): rows sorted by
(`image_id`, `caption_id`), an `embedding` column of `fixed_size_list<float16>[D]` holding the raw pooled
vectors of the frozen text tower, and schema metadata recording everything that determines those numbers.
Output: a `TextCache` holding the ids, the `[N, D]` float16 embeddings as one torch tensor, and the
metadata; `sample` draws one caption per image for a training batch without a Python loop per image.

    cache = TextCache.load(Path("data/shards/karpathy-trainval/text-distilbert-base-uncased-mean.parquet"))
    cache.check_matches(shards)                          # made from exactly these shards' captions
    text = cache.sample(batch.image_ids, generator)      # [B, D] float16
"""

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.errors import UserError
from pipeline.files import replacing
from pipeline.shard_reader import ShardSet

# Schema metadata keys written by `embed-text`. FINGERPRINT_KEYS are the ones that determine the numbers a
# trainer and an evaluator must agree on; the compute dtype (the vectors are stored as float16 whatever it was) and
# the tool version only move the last bits.
METADATA_KEYS = ("model", "weights_sha256", "tokenizer_sha256", "pooling", "max_length", "normalization", "dim",
                 "compute_dtype", "captions_sha256", "clipcoco_version")
FINGERPRINT_KEYS = ("model", "weights_sha256", "tokenizer_sha256", "pooling", "max_length", "normalization", "dim")
# Where embed-text found the model (a local folder or the hub name): where `clip.load` loads it again to embed
# queries. Not part of the fingerprint, so a cache or run moved to another machine or venv still matches. Older caches
# lack it: their `model` is that location.
LOCATION_KEY = "model_path"
_INT_KEYS = ("max_length", "dim")
_CHECK_ROWS = 32768  # vectors checked for NaN/Inf at a time: a bool mask of one piece, not of the whole cache


def non_finite_rows(vectors: np.ndarray) -> np.ndarray:
    """Row numbers of the [N, D] `vectors` holding a NaN or an infinity."""
    return np.concatenate([start + np.flatnonzero(~np.isfinite(vectors[start:start + _CHECK_ROWS]).all(axis=1))
                           for start in range(0, len(vectors), _CHECK_ROWS)] or [np.zeros(0, np.int64)])


def default_cache_path(shards_dir: Path, model: str, pooling: str) -> Path:
    """Where `clipcoco embed-text SHARDS_DIR` writes its cache unless told --out."""
    return Path(shards_dir) / f"text-{model_slug(model)}-{pooling}.parquet"


def embed_text_command(shards_dir: Path | str, metadata: dict[str, str]) -> str:
    """The `clipcoco embed-text` command that makes a cache like the one with `metadata` from `shards_dir`."""
    return (f"clipcoco embed-text {shards_dir} --model {metadata['model']} --pooling {metadata['pooling']} "
            f"--max-length {metadata['max_length']}")


def cache_schema(dim: int, metadata: dict[str, str]) -> pa.Schema:
    """The cache's columns, with `metadata` (every METADATA_KEYS entry, as strings) as the schema metadata."""
    return pa.schema([("image_id", pa.int64()), ("caption_id", pa.int64()), ("caption", pa.string()),
                      ("embedding", pa.list_(pa.float16(), dim))], metadata=metadata)


def cache_rows(captions: pa.Table, embeddings: np.ndarray, schema: pa.Schema) -> pa.Table:
    """Rows of a cache: `captions` (image_id, caption_id, caption) with their [N, D] vectors, cast to `schema`."""
    dim = schema.field("embedding").type.list_size
    with np.errstate(over="ignore"):  # a value beyond float16's range becomes inf, refused just below
        vectors = np.asarray(embeddings, dtype=np.float16).reshape(-1, dim)
    bad = non_finite_rows(vectors)
    if len(bad):  # a NaN scores as a perfect match downstream: never write one
        first = int(bad[0])
        raise UserError(f"{len(bad):,} of {len(vectors):,} caption vectors are not finite in float16 storage (first: "
                        f"image {captions.column('image_id')[first]} caption {captions.column('caption_id')[first]}): "
                        "the text model's outputs overflow float16 or hold NaN, and nothing was written for them; "
                        "try --dtype float32, or check the model's weights")
    values = pa.array(vectors.reshape(-1), type=pa.float16())
    table = captions.select(["image_id", "caption_id", "caption"])
    return table.append_column("embedding", pa.FixedSizeListArray.from_arrays(values, dim)).cast(schema)


def write_cache(path: Path, parts: Iterable[pa.Table], schema: pa.Schema) -> Path:
    """Write a cache atomically, one row group per part (parts in id order). Also the writer of the image-feature
    cache (clip/image_features.py): any schema with an `embedding` column and id columns."""
    # zstd for ids and text; float16 noise does not compress, so the embeddings are stored plain.
    compression = {name: "none" if name == "embedding" else "zstd" for name in schema.names}
    ids = [name for name in ("image_id", "caption_id") if name in schema.names]
    with replacing(path) as tmp, pq.ParquetWriter(tmp, schema, compression=compression, use_dictionary=False,
                                                  write_statistics=ids) as writer:
        for part in parts:
            writer.write_table(part.replace_schema_metadata(schema.metadata), row_group_size=max(1, part.num_rows))
    return path


def schema_metadata(schema: pa.Schema) -> dict[str, str]:
    """A Parquet file's own key/value metadata, decoded (Arrow's private ARROW:* entries left out)."""
    return {k.decode(): v.decode() for k, v in (schema.metadata or {}).items() if not k.startswith(b"ARROW:")}


def read_cache(path: Path, what: str, *, keys: Iterable[str], columns: Iterable[str], hint: str,
               rerun: str, renamed: dict[str, str] | None = None) -> tuple[pa.Table, dict[str, str]]:
    """(table, metadata) of a cache file (`what`: "text cache", "image-feature cache"), after checking it exists,
    reads, and has every metadata key and column; each failure a one-line UserError. `renamed` maps an older
    file's metadata keys to today's names."""
    if not path.is_file():
        raise UserError(f"no {what} at {path}: {hint}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"cannot read the {what} {path} ({err}): rerun `{rerun}`") from err
    metadata = {(renamed or {}).get(key, key): value for key, value in schema_metadata(table.schema).items()}
    missing = [k for k in keys if k not in metadata]
    if missing or any(c not in table.column_names for c in columns):
        raise UserError(f"{path} is not a clipcoco {what} (missing metadata {missing or 'none'}, columns "
                        f"{table.column_names}): {hint}")
    return table, metadata


def read_vectors(table: pa.Table, dim: int, path: Path, *, rerun: str) -> torch.Tensor:
    """The `embedding` column (fixed_size_list<float16>[dim]) of a cache as one [N, dim] float16 tensor."""
    embedding = table.column("embedding").combine_chunks()
    if not (pa.types.is_fixed_size_list(embedding.type) and embedding.type.list_size == dim
            and pa.types.is_float16(embedding.type.value_type)):
        raise UserError(f"{path}: embedding column is {embedding.type}, expected fixed_size_list<float16>[{dim}]: "
                        f"rerun `{rerun}`")
    values = embedding.flatten().to_numpy(zero_copy_only=False)
    if not values.flags.writeable:  # a zero-copy view of Arrow memory; torch tensors must own writable memory
        values = values.copy()
    return torch.from_numpy(values.reshape(len(table), dim))


def model_slug(model: str) -> str:
    """A file-name-safe, portable name for a model, the one rule for it (the Makefile's TEXT_SLUG mirrors it,
    tests/test_cli.py checks): hub names with "/" -> "--"; a local folder -> its name, or its parent's name when
    it is called "model" (as a package or `save_pretrained("model")` ships one); a folder of the Hugging Face
    cache (models--org--name/snapshots/<revision>) -> "org--name", not the revision hash."""
    path = Path(model)
    if path.is_dir():
        path = path.resolve()
        if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
            return path.parent.parent.name.removeprefix("models--")
        return path.parent.name if path.name == "model" and path.parent.name else path.name
    return model.replace("/", "--")


class TextCache:
    """One text cache in memory. Rows are sorted by (image_id, caption_id); embeddings are not normalised."""

    def __init__(self, path: Path, metadata: dict[str, str], image_ids: np.ndarray, caption_ids: np.ndarray,
                 captions: pa.ChunkedArray, embeddings: torch.Tensor) -> None:
        self.path = path
        self.metadata = metadata
        self.image_ids = image_ids  # [N] int64
        self.caption_ids = caption_ids  # [N] int64
        self._captions = captions  # kept as Arrow strings: a Python list of 600k strings costs ~60 MB
        self.embeddings = embeddings  # [N, D] float16
        self.dim = int(embeddings.shape[1])
        self.fingerprint = {k: int(metadata[k]) if k in _INT_KEYS else metadata[k] for k in FINGERPRINT_KEYS}
        self.model_path = metadata.get(LOCATION_KEY, metadata["model"])
        # Each image's captions are one contiguous run of rows: its start and length make `sample` one gather.
        unique, starts, counts = np.unique(image_ids, return_index=True, return_counts=True)
        self._unique_ids = torch.from_numpy(unique)
        self._starts = torch.from_numpy(starts.astype(np.int64))
        self._counts = torch.from_numpy(counts.astype(np.int64))

    @classmethod
    def load(cls, path: Path) -> "TextCache":
        path = Path(path)
        table, metadata = read_cache(path, "text cache", keys=METADATA_KEYS,
                                     columns=("image_id", "caption_id", "caption", "embedding"),
                                     hint="did you run `clipcoco embed-text`?", rerun="clipcoco embed-text",
                                     renamed={"dtype": "compute_dtype"})  # clipcoco 0.2.0's name
        embeddings = read_vectors(table, int(metadata["dim"]), path, rerun="clipcoco embed-text")
        # Own, writable copies (a few MB): callers may hand them to torch.from_numpy.
        image_ids = np.array(table.column("image_id").to_numpy(), dtype=np.int64)
        caption_ids = np.array(table.column("caption_id").to_numpy(), dtype=np.int64)
        # Lexicographic (image_id, caption_id) order is what makes each image's captions one run of rows.
        step_ok = (np.diff(image_ids) > 0) | ((np.diff(image_ids) == 0) & (np.diff(caption_ids) > 0))
        if not step_ok.all():
            raise UserError(f"{path}: rows are not sorted by (image_id, caption_id): rerun `clipcoco embed-text`")
        values = embeddings.numpy()
        bad = non_finite_rows(values)
        if len(bad):  # every comparison with a NaN is false: it would rank as a perfect match
            first = int(bad[0])
            raise UserError(f"the text cache {path} holds {int((~np.isfinite(values[bad])).sum()):,} NaN/Inf values in "
                            f"{len(bad):,} of its {len(values):,} caption vectors (first: image {image_ids[first]} "
                            f"caption {caption_ids[first]}): it is damaged; make it again with "
                            f"`{embed_text_command('SHARDS_DIR', metadata)} --out {path}` (SHARDS_DIR: the shards it "
                            "was made from)")
        return cls(path, metadata, image_ids, caption_ids, table.column("caption"), embeddings)

    def __len__(self) -> int:
        return len(self.image_ids)

    def captions(self) -> list[str]:
        return self._captions.to_pylist()

    def check_covers(self, image_ids: np.ndarray) -> None:
        """Stop unless every id in `image_ids` has at least one caption here."""
        wanted = np.unique(np.asarray(image_ids, dtype=np.int64))
        missing = np.setdiff1d(wanted, self._unique_ids.numpy(), assume_unique=True)
        if len(missing):
            raise UserError(
                f"{len(missing)} of {len(wanted)} image ids have no caption in the text cache {self.path} "
                f"(first: {missing[:5].tolist()}): the cache was made from other shards; run "
                f"`clipcoco embed-text SHARDS_DIR` on the shard directory you are using")

    def check_matches(self, shards: ShardSet) -> None:
        """Stop unless this cache holds exactly the captions of `shards` (image ids, caption ids and text, as its
        captions.parquet lists them) for every image of them: a cache made before the shards were rebuilt from
        edited annotations would train or score captions the shards no longer hold. Rows of other images are
        allowed (a cache of a bigger split)."""
        captions = shards.captions()
        image_ids = captions.column("image_id").to_numpy()
        self.check_covers(image_ids)
        keep = np.isin(self.image_ids, image_ids)
        mine = self._captions if keep.all() else self._captions.filter(pa.array(keep))
        if (keep.sum() == len(image_ids) and np.array_equal(self.image_ids[keep], image_ids)
                and np.array_equal(self.caption_ids[keep], captions.column("caption_id").to_numpy())
                and mine.equals(captions.column("caption"))):
            return
        theirs = set(zip(image_ids.tolist(), captions.column("caption_id").to_pylist(),
                         captions.column("caption").to_pylist(), strict=True))
        ours = set(zip(self.image_ids[keep].tolist(), self.caption_ids[keep].tolist(), mine.to_pylist(), strict=True))
        missing, extra = theirs - ours, ours - theirs
        first = min(missing or extra, default=None)  # None: the same rows, one of them listed twice
        example = f"first: image {first[0]} caption {first[1]}" if first else "a caption is listed twice"
        default = default_cache_path(shards.root, self.metadata["model"], self.metadata["pooling"])
        then = "" if self.path.resolve() == default.resolve() else f", and pass the {default} it writes"
        raise UserError(
            f"the text cache {self.path} was made from other captions than {shards.root}/captions.parquet holds "
            f"({len(missing):,} of its {len(theirs):,} captions are not in the cache as they are, {len(extra):,} "
            f"cached captions of its images are not in it; {example}): the shards were rebuilt since, or the cache "
            f"is of other shards; rerun `{embed_text_command(shards.root, self.metadata)}`{then}")

    @property
    def max_captions(self) -> int:
        """The most captions any one image has (COCO: 7)."""
        return int(self._counts.max())

    def _runs(self, image_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(first row, caption count) of each image id's run of rows; stops on an id the cache lacks."""
        ids = image_ids.to("cpu", torch.int64)
        pos = torch.searchsorted(self._unique_ids, ids).clamp_(max=len(self._unique_ids) - 1)
        absent = self._unique_ids[pos] != ids
        if absent.any():
            self.check_covers(ids[absent].numpy())
        return self._starts[pos], self._counts[pos]

    def sample(self, image_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """[B, D] float16: for each image id, one of its captions' embeddings, uniformly, drawn with `generator`."""
        starts, counts = self._runs(image_ids)
        # float64 uniforms scaled by each image's caption count: uniform over its captions; the clamp only
        # guards the (measure-zero) rounding of u * count up to count.
        u = torch.rand(len(starts), generator=generator, dtype=torch.float64)
        offset = torch.minimum((u * counts).long(), counts - 1)
        return self.embeddings[starts + offset]

    def all_captions(self, image_ids: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every caption of each image: ([B x slots, D] float16, row i x slots + k = caption k of image i; [B, slots]
        bool, which slots hold a caption). `slots` >= max_captions; unused slots repeat a caption, masked out."""
        starts, counts = self._runs(image_ids)
        k = torch.arange(slots)
        valid = k[None, :] < counts[:, None]
        rows = starts[:, None] + torch.minimum(k[None, :], counts[:, None] - 1)
        return self.embeddings[rows.reshape(-1)], valid

    def rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([R, D] float16 embeddings, [R] int64 image ids) of cache rows `rows`."""
        return self.embeddings[rows], torch.from_numpy(self.image_ids)[rows]
