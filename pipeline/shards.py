"""`clipcoco shards`: COCO images + captions -> deterministic, crash-safe WebDataset shards.

Inputs: an official COCO captions file (`--annotations`) or Karpathy's `dataset_coco.json`
(`--karpathy --split`), and the images they list (`--images`; other files there are ignored).
Outputs, one directory per split (the "Shard directory" format in docs/contracts.md):
`shard-NNNNNN.tar` (one sample per image: `id`, `jpg`, `json`, `txt`), `shard-NNNNNN.idx` (DALI's
webdataset index), `shard-NNNNNN.json` (the sidecar, written last: it marks the shard complete),
`captions.parquet`, `failures.jsonl` and `manifest.json`.
Command: `clipcoco shards --annotations FILE --images DIR --out DIR` (or `make shards`);
`clipcoco shards --verify DIR` re-reads a directory against its sidecars (pipeline/shard_verify.py).

Every image is decoded here, in worker processes, because DALI cannot skip a bad JPEG during
training. Results come back in input order (ordered `imap`), so the bytes never depend on `--workers`.
Every later stage reads shards through pipeline/shard_reader.py (`open_shards`, `SampleIndex`).
"""

import hashlib
import io
import json
import multiprocessing
import os
import re
import tarfile
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import __version__, defaults
from pipeline.coco import Annotations, ImageRecord, read_coco_captions, read_karpathy
from pipeline.errors import UserError
from pipeline.files import commit, locked, replacing, sha256_file, temporary_name, write_atomic
from pipeline.images import Prepared, Rejected, prepare_image
from pipeline.progress import console, rate_bar
from pipeline.shard_reader import (
    FORMAT_VERSION,
    MAX_IMAGE_ID,
    MEMBERS,
    encode_id,
    fingerprint_of,
    key_of,
    read_json,
    shard_name,
)

COPY_BUFFER = 64 << 20  # tarfile's copy buffer: larger than any JPEG, so each member is one write
SHARD_RE = re.compile(r"^shard-(\d{6})\.(tar|idx|json)(\.tmp)?$")


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=1) + "\n").encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Per-image work (runs in the worker processes: pipeline/images.py)


def _prepare_task(task: tuple[str, int, int]) -> Prepared | Rejected:
    path, resize_shorter, quality = task
    return prepare_image(Path(path), resize_shorter=resize_shorter, quality=quality)


def bounded_imap(pool, func: Callable, tasks: Iterable, *, window: int, chunksize: int = 4) -> Iterator:
    """`pool.imap(func, tasks)` with at most `window` tasks in flight.

    Pool.imap feeds every task at once; when the workers decode faster than this process writes
    (many cores, no resizing), their JPEG bytes would pile up in memory without this limit. Results
    come back in task order, so what is written never depends on the number of workers. Close the
    generator before terminating the pool. A chunk is sent once it is full, so `chunksize` must not exceed
    `window`.
    """
    if chunksize > window:
        raise ValueError(f"chunksize {chunksize} exceeds window {window}: the first chunk would never fill")
    slots, stop = threading.Semaphore(window), threading.Event()

    def throttled():
        for task in tasks:
            # Poll, so that the pool's feeder thread never blocks forever once we stop consuming:
            # Pool.terminate joins that thread.
            while not slots.acquire(timeout=0.05):
                if stop.is_set():
                    return
            yield task

    try:
        for result in pool.imap(func, throttled(), chunksize=chunksize):
            slots.release()
            yield result
    finally:
        stop.set()


# Characters that show nothing: controls, format characters (zero-width spaces and joiners, the BOM, direction
# marks) and separators; a caption made only of these (or of whitespace) says nothing.
INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def is_blank(caption: str) -> bool:
    return all(ch.isspace() or unicodedata.category(ch) in INVISIBLE for ch in caption)


def usable_captions(record: ImageRecord) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The captions worth packing: blank ones (only whitespace or invisible characters) are dropped, the rest kept
    byte-exact."""
    kept = [(c, i) for c, i in zip(record.captions, record.caption_ids, strict=True) if not is_blank(c)]
    return tuple(c for c, _ in kept), tuple(i for _, i in kept)


def make_sample(record: ImageRecord, prepared: Prepared, captions: tuple[str, ...],
                caption_ids: tuple[int, ...]) -> dict[str, Any]:
    """One WebDataset sample: key = the image id as 12 digits (no dots, ever)."""
    meta = {"image_id": record.image_id, "file_name": record.file_name, "width": prepared.width,
            "height": prepared.height, "captions": list(captions), "caption_ids": list(caption_ids)}
    return {
        "__key__": key_of(record.image_id),
        "id": encode_id(record.image_id),
        "jpg": prepared.jpeg,
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
        "txt": captions[0].encode("utf-8"),
    }


def _failure(record: ImageRecord, rejected: Rejected) -> dict[str, Any]:
    return {"image_id": record.image_id, "file_name": record.file_name, "reason": rejected.reason,
            "detail": rejected.detail}


# ---------------------------------------------------------------------------------------------
# Writing one shard


class _HashingFile:
    """A write-only file that hashes what passes through, so a tar is never read back to hash it."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:  # tarfile asks where the archive starts
        return self.size


def write_index(tar: Path, idx: Path) -> None:
    """DALI's webdataset index for `tar` (wds2idx's format v1.2), written without DALI.

    `v1.2 <samples>`, then one line per sample: `<ext> <data offset> <size> <member name>` for each of its
    members. As in DALI's `wds2idx`: regular files only, in tar order; a sample is a run of consecutive members
    whose names agree up to the first dot of the last path component; names starting with a dot are skipped.
    Byte for byte what `wds2idx` writes (tests/test_shards.py); `ValueError` for a tar without one sample.
    """
    samples: list[list[str]] = []
    last = None
    with tarfile.open(tar, mode="r:") as archive:
        for member in archive:
            if not member.isreg():
                continue
            dot = member.name.find(".", member.name.rfind("/") + 1)  # wds2idx's split, its no-dot case included
            basename, ext = member.name[:dot], member.name[dot + 1:]
            if not basename or basename.endswith("/"):
                continue
            entry = f"{ext} {member.offset_data} {member.size} {member.name}"
            if basename == last:
                samples[-1].append(entry)
            else:
                samples.append([entry])
                last = basename
    if not samples:
        raise ValueError(f"{tar} holds no sample to index")
    Path(idx).write_text(f"v1.2 {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples), encoding="utf-8")


class ShardWriter:
    """Writes shard-NNNNNN.tar under a temporary name, then its .idx, then the sidecar (last).

    The tar is the one `webdataset.TarWriter(user="", group="", mode=0o444, mtime=0)` writes, byte for byte
    (ustar headers, members in sorted order; tests/test_shards.py checks it), written with the standard
    library's `tarfile` directly: importing webdataset imports torch, which would cost every `clipcoco shards`
    a second or more, and a large copy buffer moves each JPEG in one write and one hash update.
    """

    def __init__(self, out: Path, index: int, build_id: str):
        self.out, self.index, self.build_id = out, index, build_id
        self.tar = out / shard_name(index, "tar")
        self.tmp = temporary_name(self.tar)  # an error removes it (abort), a kill leaves it: complete_prefix clears it
        self.file = self.tmp.open("wb")
        self.hashing = _HashingFile(self.file)
        self.writer = tarfile.TarFile(fileobj=self.hashing, mode="w", format=tarfile.USTAR_FORMAT,
                                      copybufsize=COPY_BUFFER)
        self.keys: list[str] = []
        self.reencoded = 0

    def add(self, sample: dict[str, Any], reencoded: bool) -> None:
        key = sample["__key__"]
        for ext in MEMBERS:
            data = sample[ext]
            # Fixed mtime, owner and mode make the tar bytes a function of the samples alone.
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
            self.writer.addfile(info, io.BytesIO(data))
        self.keys.append(key)
        self.reencoded += reencoded

    def close(self, left_out: list[dict[str, Any]]) -> dict[str, Any]:
        self.writer.close()
        self.file.close()
        commit(self.tmp, self.tar)
        with replacing(self.out / shard_name(self.index, "idx")) as idx_tmp:
            write_index(self.tar, idx_tmp)
        sidecar = {"shard": self.tar.name, "count": len(self.keys), "bytes": self.hashing.size,
                   "sha256": self.hashing.sha256.hexdigest(), "build_id": self.build_id,
                   "reencoded": self.reencoded, "keys": self.keys, "left_out": left_out}
        write_atomic(self.out / shard_name(self.index, "json"), _json_bytes(sidecar))
        return sidecar

    def abort(self) -> None:
        """Remove what this shard wrote so far (its temporary tar, or a tar and .idx without their sidecar): an error
        here is often a full disk, which a half-written shard would only fill further."""
        with suppress(OSError):  # closing flushes the buffered tail, which a full disk refuses again
            self.file.close()
        for path in (self.tmp, self.tar, self.out / shard_name(self.index, "idx")):
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Resuming and refusing


def _shard_files(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if SHARD_RE.match(p.name))


def _check_same_build(out: Path, build_id: str, identity: dict[str, Any]) -> None:
    """Refuse to mix shards built from other inputs or options into `out`."""
    manifest = read_json(out / "manifest.json")
    if manifest is not None and manifest.get("build_id") != build_id:
        old = manifest.get("identity", {})
        changed = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        raise UserError(f"{out} already holds shards built with different inputs or options ({', '.join(changed)}): "
                        "pass --overwrite to replace them, or choose another --out")
    for path in out.glob("shard-*.json"):
        sidecar = read_json(path)
        if sidecar is not None and sidecar.get("build_id") != build_id:
            raise UserError(f"{out} holds {path.name} from a run with different inputs or options: "
                            "pass --overwrite to replace it, or choose another --out")


def _clear(out: Path) -> None:
    """--overwrite: remove what an earlier run wrote (only our own files: a text cache may live here too)."""
    # The manifest first: there is never one naming shards that are gone.
    for name in ("manifest.json", "sizes.json", "captions.parquet", "failures.jsonl"):
        (out / name).unlink(missing_ok=True)
    for path in _shard_files(out):
        path.unlink()


def complete_prefix(out: Path, build_id: str, samples_per_shard: int) -> list[dict[str, Any]]:
    """Sidecars of the shards a previous run finished (0, 1, ... up to the first gap); removes the rest.

    A shard is complete when its sidecar parses, names this build, and the tar and .idx beside it
    exist with the sidecar's size. Everything after the first incomplete shard, and every temporary
    file, is a leftover of an interrupted run.
    """
    done: list[dict[str, Any]] = []
    while True:
        index = len(done)
        sidecar = read_json(out / shard_name(index, "json"))
        tar, idx = out / shard_name(index, "tar"), out / shard_name(index, "idx")
        if (sidecar is None or sidecar.get("build_id") != build_id or not idx.is_file() or not tar.is_file()
                or tar.stat().st_size != sidecar.get("bytes")):
            break
        done.append(sidecar)
        if sidecar["count"] < samples_per_shard:  # only the last shard is short
            break
    _remove_shards_from(out, len(done))
    return done


def _remove_shards_from(out: Path, index: int) -> None:
    """Remove shard `index` and every later one, and every temporary shard file."""
    for path in _shard_files(out):
        match = SHARD_RE.match(path.name)
        if match.group(3) or int(match.group(1)) >= index:
            path.unlink()


def still_left_out(out: Path, done: list[dict[str, Any]], records: dict[int, ImageRecord],
                   prepare: Callable[[ImageRecord], Prepared | Rejected]) -> list[dict[str, Any]]:
    """The kept shards up to the first one whose left-out images now come out otherwise; removes the rest.

    So "fix the inputs and rerun" packs a repaired or restored image: the shard it belongs in (the one whose sidecar
    lists it) and every later one are rebuilt, and the result is what a fresh build of the fixed inputs gives.
    """
    for index, sidecar in enumerate(done):
        for failure in sidecar["left_out"]:
            record = records[failure["image_id"]]
            if next(checked([(record, prepare(record))])) != failure:
                for name in ("manifest.json", "sizes.json"):  # first: never a manifest naming shards that are gone
                    (out / name).unlink(missing_ok=True)
                _remove_shards_from(out, index)
                return done[:index]
    return done


# ---------------------------------------------------------------------------------------------
# The stage


def _check_options(*, out: Path, images: Path, annotations: Path | None, karpathy: Path | None,
                   split: str | None, resize_shorter: int, quality: int, samples_per_shard: int, workers: int,
                   max_failure_rate: float) -> None:
    if (annotations is None) == (karpathy is None):
        raise UserError("pass exactly one of --annotations FILE (official COCO captions) or --karpathy FILE --split S")
    if karpathy is not None and split is None:
        raise UserError("--karpathy needs --split (train, restval, val, test or trainval)")
    if annotations is not None and split is not None:
        raise UserError("--split goes with --karpathy; an official COCO captions file is already one split")
    if not images.is_dir():
        raise UserError(f"--images {images}: no such folder; point it at the folder holding the images "
                        "(for --karpathy, the COCO root holding train2014/ and val2014/)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a directory")
    if resize_shorter < 0:
        raise UserError("--resize-shorter must be >= 0 (0 keeps the original size)")
    if not 1 <= quality <= 100:
        raise UserError("--quality must be between 1 and 100")
    if samples_per_shard < 1:
        raise UserError("--samples-per-shard must be >= 1")
    if workers < 0:
        raise UserError("--workers must be >= 0 (0 = all cores)")
    if not 0 <= max_failure_rate <= 1:
        raise UserError("--max-failure-rate must be between 0 and 1")


def _write_captions(out: Path, records: dict[int, ImageRecord], packed_ids: list[int]) -> int:
    image_ids, caption_ids, captions = [], [], []
    for image_id in sorted(packed_ids):
        caps, ids = usable_captions(records[image_id])
        order = sorted(range(len(ids)), key=ids.__getitem__)
        image_ids += [image_id] * len(ids)
        caption_ids += [ids[i] for i in order]
        captions += [caps[i] for i in order]
    table = pa.table({"image_id": pa.array(image_ids, pa.int64()), "caption_id": pa.array(caption_ids, pa.int64()),
                      "caption": pa.array(captions, pa.string())})
    with replacing(out / "captions.parquet") as tmp:
        pq.write_table(table, tmp)
    return len(captions)


def _advancing(items: Iterable, advance: Callable[[], None]) -> Iterator:
    for item in items:
        advance()
        yield item


def checked(results: Iterable[tuple[ImageRecord, Prepared | Rejected]]) -> Iterator[tuple[dict, bool] | dict]:
    """In input order: (sample, reencoded) for each image to pack, a failure dict for each one left out."""
    for record, result in results:
        captions, caption_ids = usable_captions(record)
        if not 0 <= record.image_id <= MAX_IMAGE_ID:
            result = Rejected("bad_id", f"image id outside 0..{MAX_IMAGE_ID}: a sample key holds 12 digits")
        elif isinstance(result, Prepared) and not captions:
            result = Rejected("no_caption", "every caption is blank (empty, whitespace or invisible characters)")
        if isinstance(result, Rejected):
            yield _failure(record, result)
        else:
            yield make_sample(record, result, captions, caption_ids), result.reencoded


def write_shards(items: Iterable[tuple[dict, bool] | dict], *, out: Path, build_id: str, first_index: int,
                 samples_per_shard: int) -> tuple[list[dict], list[dict]]:
    """Fill shards first_index, first_index + 1, ... in order; returns (their sidecars, failures after the last).

    Each sidecar carries the failures met since the previous shard, so a rerun that skips complete
    shards still knows every failure.
    """
    sidecars: list[dict] = []
    failures: list[dict] = []
    writer: ShardWriter | None = None
    try:
        for item in items:
            if isinstance(item, dict):
                failures.append(item)
                continue
            if writer is None:
                writer = ShardWriter(out, first_index + len(sidecars), build_id)
            writer.add(*item)
            if len(writer.keys) == samples_per_shard:
                sidecars.append(writer.close(failures))
                writer, failures = None, []
        if writer is not None:
            sidecars.append(writer.close(failures))
            writer, failures = None, []
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return sidecars, failures


def totals_problems(totals: dict[str, Any]) -> list[str]:
    """What does not add up in a manifest's totals: every listed image is packed or left out, every listed caption
    packed or counted under one reason (the caption counts are checked where the manifest records them)."""
    problems = []
    images = totals["images_packed"] + totals["images_left_out"]
    if totals["images_listed"] != images:
        problems.append(f"{totals['images_listed']} images listed but {totals['images_packed']} packed + "
                        f"{totals['images_left_out']} left out = {images}")
    if sum(totals["left_out_by_reason"].values()) != totals["images_left_out"]:
        problems.append(f"left_out_by_reason adds up to {sum(totals['left_out_by_reason'].values())}, not "
                        f"images_left_out {totals['images_left_out']}")
    if "captions_listed" in totals:  # recorded after clipcoco 0.2.0, in the same shard format
        parts = ("captions_packed", "captions_dropped", "captions_left_out", "captions_without_image")
        if totals["captions_listed"] != sum(totals[k] for k in parts):
            problems.append(f"{totals['captions_listed']} captions listed but " + " + ".join(
                f"{totals[k]} {k.removeprefix('captions_')}" for k in parts) + f" = {sum(totals[k] for k in parts)}")
    return problems


def _check_accounted(records: list[ImageRecord], packed_ids: list[int], failures: list[dict], totals: dict) -> None:
    """Refuse to write a manifest in which an image vanished or appears twice: a bug here, not a user's mistake."""
    accounted = sorted(packed_ids + [f["image_id"] for f in failures])
    problems = totals_problems(totals)
    if accounted != [r.image_id for r in records]:
        missing = sorted({r.image_id for r in records} - set(accounted))[:5]
        problems.append(f"packed and left-out images are not the listed ones (e.g. unaccounted: {missing})")
    if problems:
        raise RuntimeError("internal error, manifest.json not written: " + "; ".join(problems))


def build_shards(*, out: Path, images: Path, annotations: Path | None = None, karpathy: Path | None = None,
                 split: str | None = None, resize_shorter: int = defaults.RESIZE_SHORTER,
                 quality: int = defaults.QUALITY, samples_per_shard: int = defaults.SAMPLES_PER_SHARD,
                 workers: int = defaults.WORKERS, max_failure_rate: float = defaults.MAX_FAILURE_RATE,
                 overwrite: bool = False, allow_outside_images: bool = False, progress: bool = True) -> dict:
    """Pack the listed images into shards under `out`; returns the manifest.

    Rerunning the same command after a crash keeps the complete shards and redoes the rest; the
    result is byte-identical to an uninterrupted run. A rerun also retries the images left out, and rebuilds from
    the first shard where one of them now packs (or fails otherwise). Raises `UserError` after writing everything
    when more than `max_failure_rate` of the listed images had to be left out. `out` is locked while it is written.
    """
    started = time.perf_counter()
    out, images = Path(out), Path(images)
    _check_options(out=out, images=images, annotations=annotations, karpathy=karpathy, split=split,
                   resize_shorter=resize_shorter, quality=quality, samples_per_shard=samples_per_shard,
                   workers=workers, max_failure_rate=max_failure_rate)
    source = Path(annotations if annotations is not None else karpathy)
    listing = (read_coco_captions(source, images, allow_outside_images=allow_outside_images)
               if annotations is not None else
               read_karpathy(source, images, split, allow_outside_images=allow_outside_images))
    if not listing.records:
        raise UserError(f"{source} lists no images" + (f" in split {split!r}" if split else ""))

    # Everything that determines the bytes, and nothing else (not --workers, not paths).
    identity = {"source": "coco" if annotations is not None else "karpathy", "source_sha256": sha256_file(source),
                "split": split, "resize_shorter": resize_shorter, "quality": quality,
                "samples_per_shard": samples_per_shard, "version": __version__, "format_version": FORMAT_VERSION}
    with locked(out, "clipcoco shards"):
        manifest = _write_directory(out, images, source, listing, identity, workers=workers,
                                    max_failure_rate=max_failure_rate, overwrite=overwrite, progress=progress,
                                    started=started)
    totals = manifest["totals"]
    if progress:
        console().print(f"packed {totals['images_packed']:,} images ({totals['images_left_out']:,} left out) into "
                        f"{totals['shards']} shards, {totals['bytes'] / 1e6:,.1f} MB, {manifest['seconds']:.1f} s "
                        f"-> {out}")
    reasons = Counter(totals["left_out_by_reason"])
    if not totals["images_packed"]:
        raise UserError(f"no image could be packed ({_top_reasons(reasons)}); see {out / 'failures.jsonl'}, fix "
                        "the inputs and rerun the same command")
    if totals["images_left_out"] > max_failure_rate * totals["images_listed"]:
        raise UserError(
            f"{totals['images_left_out']:,} of {totals['images_listed']:,} listed images "
            f"({totals['images_left_out'] / totals['images_listed']:.1%}) were left out ({_top_reasons(reasons)}), "
            f"more than --max-failure-rate {max_failure_rate}. Everything was written; see {out / 'failures.jsonl'}: "
            "fix the inputs and rerun the same command (it retries them), or rerun with a higher --max-failure-rate")
    return manifest


def _write_directory(out: Path, images: Path, source: Path, listing: Annotations, identity: dict[str, Any], *,
                     workers: int, max_failure_rate: float, overwrite: bool, progress: bool, started: float) -> dict:
    """The shards, captions.parquet, failures.jsonl, sizes.json and (last) manifest.json of `out`, which is locked."""
    records = listing.records
    resize_shorter, quality, samples_per_shard = (identity[k] for k in ("resize_shorter", "quality",
                                                                        "samples_per_shard"))
    build_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    if overwrite:
        _clear(out)
    else:
        _check_same_build(out, build_id, identity)
    by_id = {r.image_id: r for r in records}
    done = still_left_out(out, complete_prefix(out, build_id, samples_per_shard), by_id,
                          lambda r: _prepare_task((str(r.path), resize_shorter, quality)))
    # Records are in id order and each sidecar carries the failures met before it: resume after the last key.
    todo = [r for r in records if r.image_id > int(done[-1]["keys"][-1])] if done else records

    workers = workers or len(os.sched_getaffinity(0))
    tasks = ((str(r.path), resize_shorter, quality) for r in todo)
    # The pool starts before the progress bar's refresh thread, so no lock is held across the fork.
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 and len(todo) > 1 else None
    # Chunks of 16 keep the parent's per-message work (its result thread) small: it shares the cores with the workers.
    prepared = (bounded_imap(pool, _prepare_task, tasks, window=64 * workers, chunksize=16) if pool
                else map(_prepare_task, tasks))
    try:
        with rate_bar("packing", "images", enabled=progress) as bar:
            task = bar.add_task("packing", total=len(records), completed=len(records) - len(todo))
            results = _advancing(zip(todo, prepared, strict=True), lambda: bar.advance(task))
            new, trailing = write_shards(checked(results), out=out, build_id=build_id, first_index=len(done),
                                         samples_per_shard=samples_per_shard)
    finally:
        if pool is not None:
            prepared.close()  # stops the pool's feeder thread, which terminate() waits for
            pool.terminate()
    sidecars = done + new

    failures = [f for s in sidecars for f in s["left_out"]] + trailing
    packed_ids = [int(k) for s in sidecars for k in s["keys"]]
    packed = set(packed_ids)
    reasons = Counter(f["reason"] for f in failures)
    totals = {"images_listed": len(records), "images_packed": len(packed_ids), "images_left_out": len(failures),
              "left_out_by_reason": dict(sorted(reasons.items())),
              "images_reencoded": sum(s["reencoded"] for s in sidecars),
              "captions_listed": listing.captions_listed,
              "captions_packed": sum(len(usable_captions(by_id[i])[0]) for i in packed_ids),
              "captions_dropped": sum(len(r.captions) - len(usable_captions(r)[0]) for r in records),
              "captions_left_out": sum(len(usable_captions(r)[0]) for r in records if r.image_id not in packed),
              "captions_without_image": listing.captions_without_image,
              "bytes": sum(s["bytes"] for s in sidecars), "shards": len(sidecars)}
    _check_accounted(records, packed_ids, failures, totals)
    write_atomic(out / "failures.jsonl", "".join(json.dumps(f, ensure_ascii=False) + "\n"
                                                  for f in failures).encode("utf-8"))
    if _write_captions(out, by_id, packed_ids) != totals["captions_packed"]:
        raise RuntimeError("internal error, manifest.json not written: captions.parquet disagrees with the totals")
    options = {k: identity[k] for k in ("resize_shorter", "quality", "samples_per_shard")}
    manifest = {
        "tool": "clipcoco shards", "version": __version__, "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": {identity["source"]: {"path": str(source.resolve()), "sha256": identity["source_sha256"]},
                   "images": str(images.resolve()), "split": identity["split"]},
        "options": {**options, "workers": workers, "max_failure_rate": max_failure_rate},
        "identity": identity, "build_id": build_id, "totals": totals,
        "shards": [{"tar": s["shard"], "idx": s["shard"][:-4] + ".idx", "count": s["count"], "bytes": s["bytes"],
                    "sha256": s["sha256"], "first_key": s["keys"][0], "last_key": s["keys"][-1]} for s in sidecars],
        "fingerprint": fingerprint_of(s["sha256"] for s in sidecars),
        "seconds": round(time.perf_counter() - started, 3),
    }
    # open_clip's dataset-size file, so `--train-data 'DIR/shard-{000000..N}.tar'` needs no --train-num-samples.
    write_atomic(out / "sizes.json", _json_bytes({s["shard"]: s["count"] for s in sidecars}))
    write_atomic(out / "manifest.json", _json_bytes(manifest))  # last: it marks the directory complete
    return manifest


def _top_reasons(reasons: Counter) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in reasons.most_common(3))
