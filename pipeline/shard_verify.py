"""`clipcoco shards --verify DIR`: re-read a shard directory and check every byte against what was recorded.

Input: a shard directory written by `clipcoco shards`. Output: a small report (shards, images, fingerprint), or a
`UserError` listing every problem: a tar cut short or altered, a sidecar or manifest that disagrees, a stale
.idx, a sample lacking a member or whose id disagrees with its key, captions.parquet out of step, totals that do not
add up (every listed image packed or in failures.jsonl, once).
"""

import json
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.files import sha256_file
from pipeline.progress import console, rate_bar
from pipeline.shard_reader import MEMBERS, SampleIndex, decode_id, load_manifest, read_json, shard_set
from pipeline.shards import totals_problems, write_index


def _sample_problems(tar: Path, index: SampleIndex) -> list[str]:
    """Every sample of one tar (as `index`, made afresh from the tar, locates them) has its members, and its id
    member and json image_id agree with its key."""
    problems = []
    for row, key in enumerate(index.keys):
        members = sorted(ext for ext in index.members if index.has(ext)[row])
        if tuple(members) != MEMBERS:
            problems.append(f"{tar.name}: sample {key} has members {members}, expected {list(MEMBERS)}")
        elif not _ids_agree(key, index.read(row, "id"), index.read(row, "json")):
            problems.append(f"{tar.name}: sample {key} has an id or json image_id that disagrees with its key")
    return problems


def _ids_agree(key: str, id_member: bytes, json_member: bytes) -> bool:
    try:
        return decode_id(id_member) == json.loads(json_member)["image_id"] == int(key)
    except (ValueError, KeyError, TypeError):  # not digits, not JSON, no image_id
        return False


def _totals_problems(root: Path, manifest: dict, packed_ids: list[int], caption_rows: int | None) -> list[str]:
    """The manifest's totals add up, and match failures.jsonl, the samples read and captions.parquet's rows (None:
    it could not be read, already a problem of its own)."""
    totals = manifest["totals"]
    problems = [f"manifest.json totals do not add up: {p}" for p in totals_problems(totals)]
    try:
        failures = [json.loads(line) for line in (root / "failures.jsonl").read_text(encoding="utf-8").splitlines()]
        left_out = [int(f["image_id"]) for f in failures]
    except (OSError, ValueError, KeyError, TypeError):
        return [*problems, "failures.jsonl is missing or unreadable: rebuild with --overwrite"]
    if len(left_out) != totals["images_left_out"]:
        problems.append(f"failures.jsonl lists {len(left_out)} images, the manifest says {totals['images_left_out']} "
                        "were left out")
    if len(packed_ids) != totals["images_packed"]:
        problems.append(f"the shards hold {len(packed_ids)} images, the manifest says {totals['images_packed']}")
    if len(set(packed_ids) | set(left_out)) != len(packed_ids) + len(left_out):
        problems.append("an image is packed twice, left out twice, or both packed and left out")
    if caption_rows is not None and caption_rows != totals["captions_packed"]:
        problems.append(f"captions.parquet holds {caption_rows} captions, the manifest says "
                        f"{totals['captions_packed']}")
    return problems


def verify_shards(shards_dir: Path, *, progress: bool = True) -> dict:
    """Re-read every shard and check it against its sidecar, its .idx and the manifest.

    Catches a tar cut short at a member boundary (it reads without a tar error: the counts are the
    defence), altered bytes, stale or missing indexes. Raises `UserError` listing every problem;
    returns a small report when all is well.
    """
    root = Path(shards_dir)
    shards = shard_set(root, load_manifest(root))  # not open_shards: report a wrong size, do not stop at it
    problems: list[str] = []
    checked_ids: list[int] = []
    with tempfile.TemporaryDirectory() as tmp, rate_bar("verifying", "shards", enabled=progress) as bar:
        task = bar.add_task("verifying", total=len(shards.tars))
        for entry, tar, idx in zip(shards.manifest["shards"], shards.tars, shards.indexes, strict=True):
            sidecar = read_json(tar.with_suffix(".json")) or {}
            if sha256_file(tar) != sidecar.get("sha256") or tar.stat().st_size != sidecar.get("bytes"):
                problems.append(f"{tar.name}: sha256 or size differs from the sidecar (altered or truncated)")
            manifest_entry = {"bytes": sidecar.get("bytes"), "sha256": sidecar.get("sha256")}
            if manifest_entry != {k: entry[k] for k in manifest_entry}:
                problems.append(f"{tar.name}: its sidecar and manifest.json disagree (mixed runs: rebuild with "
                                "--overwrite)")
            # The samples are read through an index made afresh from the tar, so a stale .idx cannot hide them.
            fresh = Path(tmp) / idx.name
            try:
                write_index(tar, fresh)
            except (ValueError, OSError, tarfile.TarError) as err:  # an empty or unreadable tar has no index
                problems.append(f"{tar.name}: cannot be indexed ({err})")
                keys: list[str] = []
            else:
                if fresh.read_bytes() != idx.read_bytes():
                    problems.append(f"{idx.name}: does not match its tar (stale or damaged index)")
                with SampleIndex.load([fresh], tars=[tar]) as index:
                    keys = index.keys
                    problems += _sample_problems(tar, index)
            if len(keys) != sidecar.get("count") or keys != sidecar.get("keys"):
                problems.append(f"{tar.name}: {len(keys)} samples, its sidecar says {sidecar.get('count')} "
                                "(cut short or altered: rebuild with --overwrite)")
            checked_ids += [int(k) for k in keys]
            bar.advance(task)
    if read_json(root / "sizes.json") != {tar.name: e["count"] for tar, e in zip(shards.tars, shards.manifest["shards"],
                                                                                 strict=True)}:
        problems.append("sizes.json is missing or disagrees with manifest.json: rebuild with --overwrite")
    caption_rows = None
    try:
        parquet_ids = np.unique(shards.image_ids())
    except UserError as err:  # cut short or damaged: one problem among the others, not a stop
        problems.append(str(err))
    else:
        caption_rows = pq.read_metadata(root / "captions.parquet").num_rows
        if not np.array_equal(parquet_ids, np.unique(np.array(checked_ids, np.int64))):
            problems.append("captions.parquet image ids differ from the images in the shards")
    problems += _totals_problems(root, shards.manifest, checked_ids, caption_rows)
    if problems:
        raise UserError(f"{len(problems)} problem(s) in {shards.root}:\n  " + "\n  ".join(problems))
    report = {"shards": len(shards.tars), "images": len(checked_ids), "fingerprint": shards.fingerprint, "ok": True}
    if progress:
        console().print(f"ok: {report['shards']} shards, {report['images']:,} images match their sidecars, "
                        f"indexes and captions.parquet ({shards.root})")
    return report
