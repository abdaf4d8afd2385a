"""The text cache format: its writer (used by `clipcoco embed-text`) and the reader `train`, `eval` and `search` load.

Input: one Parquet file written by `clipcoco embed-text` (see `pipeline/embed_text.py`): rows sorted by
(`image_id`, `caption_id`), an `embedding` column of `fixed_size_list<float16>[D]` holding the raw pooled
vectors of the frozen text tower, and schema metadata recording everything that determines those numbers.
Output: a `TextCache` holding the ids, the `[N, D]` float16 embeddings as one torch tensor, and the
metadata; `sample` draws one caption per image for a training batch without a Python loop per image.

    cache = TextCache.load(Path("data/shards/karpathy-trainval/text-distilbert-base-uncased-mean.parquet"))
    cache.check_covers(shards.image_ids())
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

# Schema metadata keys written by `embed-text`. FINGERPRINT_KEYS are the ones that determine the numbers a
# trainer and an evaluator must agree on; the compute dtype and the tool version only move the last bits.
METADATA_KEYS = ("model", "weights_sha256", "tokenizer_sha256", "pooling", "max_length", "normalization", "dim",
                 "dtype", "captions_sha256", "clipcoco_version")
FINGERPRINT_KEYS = ("model", "weights_sha256", "tokenizer_sha256", "pooling", "max_length", "normalization", "dim")
# Where embed-text found the model (a local folder or the hub name): where `clip.load` loads it again to embed
# queries. Not part of the fingerprint, so a cache or run moved to another machine or venv still matches. Older caches
# lack it: their `model` is that location.
LOCATION_KEY = "model_path"
_INT_KEYS = ("max_length", "dim")


def cache_schema(dim: int, metadata: dict[str, str]) -> pa.Schema:
    """The cache's columns, with `metadata` (every METADATA_KEYS entry, as strings) as the schema metadata."""
    return pa.schema([("image_id", pa.int64()), ("caption_id", pa.int64()), ("caption", pa.string()),
                      ("embedding", pa.list_(pa.float16(), dim))], metadata=metadata)


def cache_rows(captions: pa.Table, embeddings: np.ndarray, schema: pa.Schema) -> pa.Table:
    """Rows of a cache: `captions` (image_id, caption_id, caption) with their [N, D] vectors, cast to `schema`."""
    dim = schema.field("embedding").type.list_size
    values = pa.array(np.asarray(embeddings, dtype=np.float16).reshape(-1), type=pa.float16())
    table = captions.select(["image_id", "caption_id", "caption"])
    return table.append_column("embedding", pa.FixedSizeListArray.from_arrays(values, dim)).cast(schema)


def write_cache(path: Path, parts: Iterable[pa.Table], schema: pa.Schema) -> Path:
    """Write the cache atomically, one row group per part (parts in (image_id, caption_id) order)."""
    # zstd for ids and text; float16 noise does not compress, so the embeddings are stored plain.
    compression = {"image_id": "zstd", "caption_id": "zstd", "caption": "zstd", "embedding": "none"}
    with replacing(path) as tmp, pq.ParquetWriter(tmp, schema, compression=compression, use_dictionary=False,
                                                  write_statistics=["image_id", "caption_id"]) as writer:
        for part in parts:
            writer.write_table(part.replace_schema_metadata(schema.metadata), row_group_size=max(1, part.num_rows))
    return path


def schema_metadata(schema: pa.Schema) -> dict[str, str]:
    """A Parquet file's own key/value metadata, decoded (Arrow's private ARROW:* entries left out)."""
    return {k.decode(): v.decode() for k, v in (schema.metadata or {}).items() if not k.startswith(b"ARROW:")}


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
        hint = "did you run `clipcoco embed-text`?"
        if not path.is_file():
            raise UserError(f"no text cache at {path}: {hint}")
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise UserError(f"cannot read the text cache {path} ({err}): rerun `clipcoco embed-text`") from err
        metadata = schema_metadata(table.schema)
        missing = [k for k in METADATA_KEYS if k not in metadata]
        columns = ("image_id", "caption_id", "caption", "embedding")
        if missing or any(c not in table.column_names for c in columns):
            raise UserError(f"{path} is not a clipcoco text cache (missing metadata {missing or 'none'}, columns "
                            f"{table.column_names}): {hint}")
        embedding = table.column("embedding").combine_chunks()
        dim = int(metadata["dim"])
        if not (pa.types.is_fixed_size_list(embedding.type) and embedding.type.list_size == dim
                and pa.types.is_float16(embedding.type.value_type)):
            raise UserError(f"{path}: embedding column is {embedding.type}, expected fixed_size_list<float16>[{dim}]: "
                            f"rerun `clipcoco embed-text`")
        # Own, writable copies (a few MB): callers may hand them to torch.from_numpy.
        image_ids = np.array(table.column("image_id").to_numpy(), dtype=np.int64)
        caption_ids = np.array(table.column("caption_id").to_numpy(), dtype=np.int64)
        # Lexicographic (image_id, caption_id) order is what makes each image's captions one run of rows.
        step_ok = (np.diff(image_ids) > 0) | ((np.diff(image_ids) == 0) & (np.diff(caption_ids) > 0))
        if not step_ok.all():
            raise UserError(f"{path}: rows are not sorted by (image_id, caption_id): rerun `clipcoco embed-text`")
        values = embedding.flatten().to_numpy(zero_copy_only=False)
        if not values.flags.writeable:  # a zero-copy view of Arrow memory; torch tensors must own writable memory
            values = values.copy()
        embeddings = torch.from_numpy(values.reshape(len(image_ids), dim))
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

    def sample(self, image_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """[B, D] float16: for each image id, one of its captions' embeddings, uniformly, drawn with `generator`."""
        ids = image_ids.to("cpu", torch.int64)
        pos = torch.searchsorted(self._unique_ids, ids).clamp_(max=len(self._unique_ids) - 1)
        absent = self._unique_ids[pos] != ids
        if absent.any():
            self.check_covers(ids[absent].numpy())
        counts = self._counts[pos]
        # float64 uniforms scaled by each image's caption count: uniform over its captions; the clamp only
        # guards the (measure-zero) rounding of u * count up to count.
        u = torch.rand(len(ids), generator=generator, dtype=torch.float64)
        offset = torch.minimum((u * counts).long(), counts - 1)
        return self.embeddings[self._starts[pos] + offset]
