"""`clipcoco embed-text`: every packed caption through the frozen text tower once, into one Parquet file.

Inputs: `SHARDS_DIR/captions.parquet` (written by `clipcoco shards`) and a Hugging Face encoder-only model
(`--model`: a hub name or a local folder; DistilBERT by default).
Output: the text cache (the design's "Text cache" contract), by default
`SHARDS_DIR/text-<model-slug>-<pooling>.parquet`; `pipeline.text_cache.TextCache` reads it.
Command: `clipcoco embed-text SHARDS_DIR [--model NAME_OR_PATH] [--pooling mean|cls]` (or `make embed-text`).

How: the rows, sorted by (image_id, caption_id), are cut into fixed chunks. Each chunk is tokenized once
(fast Rust tokenizer), sorted by token length and batched so there is almost no padding, run under
`torch.inference_mode` (bf16 autocast on CUDA), pooled in float32 (masked mean or CLS), put back in id
order and written as one part file. A finished part is a resume point, so memory never grows with the
number of captions and a killed run picks up where it stopped. The cache is the concatenation of the
parts (one row group each), written to a temporary name and renamed. Under `torchrun`, rank r embeds
chunks r, r + world, ... and rank 0 merges.
"""

import hashlib
import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import getproxies

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import __version__, defaults
from pipeline.errors import UserError
from pipeline.files import replacing, sha256_file
from pipeline.progress import console, rate_bar
from pipeline.runtime import Runtime, barrier, distributed, main_locked, resolve_device
from pipeline.shard_reader import read_captions, read_json
from pipeline.text_cache import LOCATION_KEY, cache_rows, cache_schema, default_cache_path, model_slug, write_cache

POOLINGS = ("mean", "cls")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CHUNK_SIZE = 32768  # captions per part file / row group: ~50 MB of float16 at D=768
# Default captions per forward pass. On a CPU, 64 short captions keep the activations in cache (measured
# 20-30% faster than 256 with all-MiniLM on 2 cores); a GPU wants big batches.
BATCH_SIZE = {"cuda": 256, "cpu": 64}
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")  # what from_pretrained loads, in its order of preference


# ---------------------------------------------------------------------------------------------
# The frozen encoder


class Encoder:
    """A loaded tokenizer + model and the metadata that identifies them (model, weights, tokenizer)."""

    def __init__(self, model: str, *, device: "str | torch.device" = "auto", dtype: str = "auto") -> None:
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        model = str(Path(model).expanduser()) if model.startswith("~") else model  # from_pretrained expands no ~
        self.tokenizer, self.model, folder = _load(model)
        # A portable name (the fingerprint holds it, with the sha256s) and where the model was found.
        self.name, self.path = (model_slug(model), str(folder)) if Path(model).is_dir() else (model, model)
        self.weights_sha256 = _weights_sha256(folder, model)
        self.tokenizer_sha256 = _tokenizer_sha256(self.tokenizer)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self.model.to(self.device).eval().requires_grad_(False)
        self.dim = _check_encoder(self.model, self.tokenizer, model, self.device)

    def encode(self, texts: list[str], *, pooling: str, max_length: int, batch_size: int,
               on_batch=None) -> torch.Tensor:
        """[len(texts), D] float16 on the CPU, in the order of `texts`.

        Batches are cut from the texts sorted by token length (longest first, so an out-of-memory shows at
        once), which keeps padding near zero; padding never changes a caption's vector (the mask hides it).
        """
        input_ids = self.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        lengths = np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids))
        order = np.argsort(-lengths, kind="stable")
        # Results stay on the device until the chunk is done: no host sync per batch, so the GPU runs ahead.
        out = torch.empty((len(texts), self.dim), dtype=torch.float16, device=self.device)
        pad = self.tokenizer.pad_token_id or 0
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with torch.inference_mode(), autocast:
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                mask = np.arange(lengths[rows[0]]) < lengths[rows][:, None]  # [B, L]
                ids = np.full(mask.shape, pad, dtype=np.int64)
                ids[mask] = np.concatenate([input_ids[r] for r in rows])  # row-major: row r's tokens, left-aligned
                ids_t = torch.from_numpy(ids).to(self.device, non_blocking=True)
                # int64 like a tokenizer's own attention_mask: some architectures reject a bool mask
                mask_t = torch.from_numpy(mask.astype(np.int64)).to(self.device, non_blocking=True)
                hidden = self.model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state.float()  # [B, L, D]
                out[torch.from_numpy(rows).to(self.device)] = _pool(hidden, mask_t, pooling).half()
                if on_batch is not None:
                    on_batch(len(rows))
        return out.cpu()


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).float()  # [B, L, 1]; the same masked mean as sentence-transformers
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be auto, {' or '.join(DTYPES)}, not {dtype!r}")
    return DTYPES[dtype]


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be asked (HF_HUB_OFFLINE, or one failed connection), or None. Checked once
    before loading, so an offline machine gets one line at once, not the hub client's retries over half a minute."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlsplit(constants.ENDPOINT)
    if getproxies().get(url.scheme):  # reached through a proxy, which a direct connection would not use
        return None
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as err:
        return f"{url.hostname} cannot be reached ({err.strerror or type(err).__name__})"
    return None


def _load(model: str):
    """(tokenizer, model, local folder holding its files); any failure becomes a UserError naming --model."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import cached_file, logging

    path = Path(model)
    # A hub name is NAME or ORG/NAME; anything else that is not a folder is a path that does not exist.
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        if not path.is_dir():
            raise UserError(f"--model {model}: {'no such folder' if not path.exists() else 'not a folder'}; pass a "
                            "model folder written by save_pretrained or a Hugging Face model name such as "
                            "distilbert-base-uncased")
        offline = None
    else:
        offline = _hub_unreachable()
    logging.disable_progress_bar()  # the stage draws its own bar; a second one per weight file is noise
    local = {"local_files_only": offline is not None}
    try:
        config = AutoConfig.from_pretrained(model, **local)
        if getattr(config, "is_encoder_decoder", False):
            raise UserError(f"--model {model} is an encoder-decoder ({config.model_type}); embed-text needs an "
                            f"encoder-only text model such as distilbert-base-uncased")
        tokenizer = AutoTokenizer.from_pretrained(model, **local)
        encoder = AutoModel.from_pretrained(model, **local)
        folder = path if path.is_dir() else Path(cached_file(model, "config.json", **local)).parent
    except UserError:
        raise
    except (OSError, ValueError, KeyError) as err:
        if offline is not None:
            raise UserError(f"cannot load --model {model!r}: it is not in the Hugging Face cache and {offline}; "
                            "run once with network (HF_HUB_OFFLINE unset) to cache it, or pass a local model "
                            "folder written by save_pretrained") from None
        raise UserError(
            f"cannot load --model {model!r} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            f"Pass a Hugging Face model name or a local folder written by save_pretrained; with HF_HUB_OFFLINE=1 "
            f"(or no network) only models already in the Hugging Face cache load") from err
    if not tokenizer.is_fast:
        raise UserError(f"--model {model} has no fast (Rust) tokenizer: save one (tokenizer.json) next to it")
    return tokenizer, encoder, folder.resolve()


def _check_encoder(model, tokenizer, name: str, device: torch.device) -> int:
    """The hidden size of a bidirectional text encoder; refuses any other model, by asking the model itself.

    A causal (decoder) model's first tokens do not see later ones, so appending tokens leaves their
    hidden states unchanged; in an encoder every position attends to every other and they move.
    """
    ids = torch.tensor([tokenizer("a photo of a dog on a beach")["input_ids"]], device=device)
    try:
        with torch.inference_mode():
            full = model(input_ids=ids, attention_mask=torch.ones_like(ids))
            head = model(input_ids=ids[:, :3], attention_mask=torch.ones_like(ids[:, :3]))
    except (TypeError, ValueError) as err:
        raise UserError(f"--model {name} is not a text encoder (its forward rejects input_ids: {err})") from err
    if getattr(full, "last_hidden_state", None) is None:
        raise UserError(f"--model {name} is not a text encoder: its output has no last_hidden_state")
    if torch.allclose(full.last_hidden_state[:, :3], head.last_hidden_state, rtol=1e-4, atol=1e-5):
        raise UserError(f"--model {name} is a causal (decoder-only) model ({model.config.model_type}): embed-text "
                        f"needs an encoder-only text model such as distilbert-base-uncased")
    return int(full.last_hidden_state.shape[-1])


def _weights_sha256(folder: Path, model: str) -> str:
    """sha256 over the weight files from_pretrained loaded (name and content of each)."""
    for pattern in _WEIGHT_PATTERNS:
        files = sorted(folder.glob(pattern))
        if files:
            h = hashlib.sha256()
            for f in files:
                h.update(f"{f.name} {sha256_file(f)}\n".encode())
            return h.hexdigest()
    raise UserError(f"--model {model}: no weight files ({' or '.join(_WEIGHT_PATTERNS)}) in {folder}")


def _tokenizer_sha256(tokenizer) -> str:
    """sha256 of the fast tokenizer's full definition (vocab, normalizer, special tokens), minus the
    per-call truncation/padding state the library mutates."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["truncation"] = spec["padding"] = None
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Parts, resume and the final file


def _read_captions(shards_dir: Path) -> pa.Table:
    path = shards_dir / "captions.parquet"
    table = read_captions(shards_dir)
    if table.num_rows == 0:
        raise UserError(f"{path} holds no captions: rebuild the shards with `clipcoco shards`")
    image_ids, caption_ids = (table.column(c).to_numpy() for c in ("image_id", "caption_id"))
    if ((np.diff(image_ids) == 0) & (np.diff(caption_ids) == 0)).any():
        raise UserError(f"{path} lists a caption twice (same image_id and caption_id): rebuild the shards with "
                        f"`clipcoco shards`")
    return table


def _chunks(n_rows: int, chunk_size: int, rank: int, world: int) -> Iterator[tuple[int, int, int]]:
    """(part index, first row, end row) of the chunks this rank embeds."""
    for index, start in enumerate(range(0, n_rows, chunk_size)):
        if index % world == rank:
            yield index, start, min(start + chunk_size, n_rows)


def _part_done(path: Path, rows: int) -> bool:
    """Whether the part file of `rows` captions is there and whole; a damaged one is removed, to be embedded again."""
    if not path.is_file():
        return False
    try:
        if pq.read_metadata(path).num_rows == rows:
            return True
    except (pa.ArrowException, OSError):
        pass
    path.unlink()
    return False


def _up_to_date(out: Path, schema: pa.Schema) -> bool:
    """Whether `out` is a readable cache made with exactly this metadata; an unreadable one is to be replaced."""
    if not out.is_file():
        return False
    try:
        return pq.read_schema(out).metadata == schema.metadata
    except (pa.ArrowException, OSError) as err:
        _say(f"{out} cannot be read ({type(err).__name__}): embedding the captions again to replace it")
        return False


def _write_part(path: Path, table: pa.Table) -> None:
    with replacing(path) as tmp:
        pq.write_table(table, tmp, compression="none")  # parts live minutes; the final file is compressed


def _prepare_parts(parts: Path, plan: dict, rank: int) -> None:
    """Keep parts from an interrupted run with the same plan; anything else there is stale."""
    if rank != 0:
        return
    plan_file = parts / "plan.json"
    if parts.is_dir() and read_json(plan_file) != plan:  # None when missing or damaged: stale too
        shutil.rmtree(parts)
    if not parts.is_dir():
        parts.mkdir(parents=True)
        plan_file.write_text(json.dumps(plan, sort_keys=True))


def _say(message: str) -> None:
    console(stderr=True, highlight=False).print(message)


# ---------------------------------------------------------------------------------------------
# The stage


def embed_text(shards_dir: Path, *, model: str = defaults.TEXT_MODEL, pooling: str = defaults.POOLING,
               max_length: int = defaults.MAX_LENGTH, batch_size: int | None = None, device: str = "auto",
               dtype: str = "auto", out: Path | None = None, progress: bool = True,
               chunk_size: int = CHUNK_SIZE) -> Path:
    """Write the text cache of `shards_dir`'s captions and return its path (see the module docstring)."""
    shards_dir = Path(shards_dir)
    if pooling not in POOLINGS:
        raise UserError(f"--pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    if max_length < 2 or (batch_size is not None and batch_size < 1) or chunk_size < 1:
        raise UserError("--max-length must be >= 2 and --batch-size >= 1")
    captions_path = shards_dir / "captions.parquet"
    table = _read_captions(shards_dir)
    out = Path(out) if out is not None else default_cache_path(shards_dir, model, pooling)
    if out.is_dir():  # checked before any work, not when the file is written
        raise UserError(f"--out {out} is a folder: pass the cache's file name, e.g. "
                        f"{out / default_cache_path(shards_dir, model, pooling).name}")
    out.parent.mkdir(parents=True, exist_ok=True)  # a read-only or impossible place fails here, before the model loads

    with main_locked(out.parent, "clipcoco embed-text"), distributed(device) as rt:
        return _embed(table, captions_path, out, rt, model=model, pooling=pooling, max_length=max_length,
                      batch_size=batch_size, dtype=dtype, progress=progress, chunk_size=chunk_size)


def _embed(table: pa.Table, captions_path: Path, out: Path, rt: Runtime, *, model: str, pooling: str,
           max_length: int, batch_size: int | None, dtype: str, progress: bool, chunk_size: int) -> Path:
    rank, world = rt.rank, rt.world_size
    encoder = Encoder(model, device=rt.device, dtype=dtype)
    batch_size = batch_size or BATCH_SIZE[encoder.device.type]
    if encoder.max_positions is not None and max_length > encoder.max_positions:
        raise UserError(f"--max-length {max_length} exceeds what --model {model} can read "
                        f"({encoder.max_positions} positions): pass --max-length {encoder.max_positions} or less")
    metadata = {
        "model": encoder.name, LOCATION_KEY: encoder.path, "weights_sha256": encoder.weights_sha256,
        "tokenizer_sha256": encoder.tokenizer_sha256,
        "pooling": pooling, "max_length": str(max_length),
        "normalization": "none",  # raw pooled vectors: normalising is the consumer's choice
        "dim": str(encoder.dim), "compute_dtype": str(encoder.dtype).removeprefix("torch."),
        "captions_sha256": sha256_file(captions_path), "clipcoco_version": __version__,
    }
    schema = cache_schema(encoder.dim, metadata)
    if _up_to_date(out, schema):
        _say(f"up to date: {out} already holds these {table.num_rows:,} captions embedded with these options; "
             f"nothing to do")
        return out

    parts_dir = out.with_name(f".{out.name}.parts")
    _prepare_parts(parts_dir, {"metadata": metadata, "chunk_size": chunk_size, "rows": table.num_rows}, rank)
    barrier()
    n_parts = -(-table.num_rows // chunk_size)
    part_paths = [parts_dir / f"part-{i:06d}.parquet" for i in range(n_parts)]
    todo = [(index, start, end) for index, start, end in _chunks(table.num_rows, chunk_size, rank, world)
            if not _part_done(part_paths[index], end - start)]
    mine = len(list(_chunks(table.num_rows, chunk_size, rank, world)))
    if len(todo) < mine and rank == 0:
        _say(f"resuming: {mine - len(todo)} of {mine} parts already embedded in {parts_dir}")
    with rate_bar("embedding", "captions", enabled=progress and rank == 0) as bar:
        task = bar.add_task("embed", total=sum(end - start for _, start, end in todo))
        for index, start, end in todo:
            rows = table.slice(start, end - start)
            vectors = encoder.encode(rows.column("caption").to_pylist(), pooling=pooling, max_length=max_length,
                                     batch_size=batch_size, on_batch=lambda n: bar.advance(task, n))
            _write_part(part_paths[index], cache_rows(rows, vectors.numpy(), schema))
    barrier()
    if rank == 0:
        write_cache(out, (pq.read_table(part) for part in part_paths), schema)
        shutil.rmtree(parts_dir)
        _say(f"wrote {out}: {table.num_rows:,} captions x {encoder.dim} ({model}, {pooling} pooling)")
    barrier()
    return out


def query_encoder(metadata: dict, *, device: "str | torch.device" = "auto", location: str | None = None) -> Encoder:
    """The frozen encoder a cache with this `metadata` (or a run's text fingerprint) was made with, loaded once
    to embed any number of queries from `location` (default: where the cache says embed-text found it); stops
    when the model found there is not that one."""
    location = location or metadata.get(LOCATION_KEY) or metadata["model"]
    encoder = Encoder(location, device=device)
    if encoder.weights_sha256 != metadata["weights_sha256"] or encoder.tokenizer_sha256 != metadata["tokenizer_sha256"]:
        raise UserError(f"the model at {location} is not {metadata['model']}, the one this text cache was made with "
                        "(weights or tokenizer differ): restore that model or rerun `clipcoco embed-text`")
    return encoder


def encode_queries(texts: list[str], metadata: dict, *, device: "str | torch.device" = "auto",
                   encoder: Encoder | None = None, batch_size: int | None = None) -> torch.Tensor:
    """[N, D] float32 vectors of `texts` made exactly as a cache with this `metadata` was (model, pooling,
    max_length): with `encoder` (from `query_encoder(metadata)`, kept between calls) or one loaded here."""
    encoder = encoder or query_encoder(metadata, device=device)
    vectors = encoder.encode(list(texts), pooling=metadata["pooling"], max_length=int(metadata["max_length"]),
                             batch_size=batch_size or BATCH_SIZE[encoder.device.type])
    return vectors.float()
