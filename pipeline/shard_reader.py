"""The read side of a shard directory (written by `clipcoco shards`; the format is in docs/contracts.md).

Inputs: a shard directory: `manifest.json`, `shard-NNNNNN.tar` with its `.idx` (DALI's webdataset index) and
`.json` sidecar, `sizes.json`, `captions.parquet`. Outputs: a `ShardSet` (the files, the count, the fingerprint), a
`SampleIndex` (every sample's members located by the `.idx` files, read by offset) and the captions (`read_captions`,
the one reader of captions.parquet; embed-text uses it too). The loaders, train, eval,
search, bench and `clipcoco shards --verify` read shards through this module only; the writer is
pipeline/shards.py.

    shards = open_shards(Path("data/shards/val2017"))      # UserError if missing or incomplete
    index = SampleIndex.load(shards.indexes)
    jpeg = index.read(index.row_of(139), "jpg")            # bytes of image 139's JPEG, one pread
"""

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.files import sha256_file

if TYPE_CHECKING:
    import torch

MEMBERS = ("id", "jpg", "json", "txt")  # a sample's members, in the order they are written (sorted, as webdataset does)
# Version 2: the `id` member holds the key's 12 ASCII digits (version 1 held 8 binary bytes, which webdataset's
# default decoders, and so open_clip's loader, could not read). Readers refuse any other version.
FORMAT_VERSION = 2
ID_DIGITS = 12  # every key and `id` member has exactly this many digits: DALI batches only fixed-size members
MAX_IMAGE_ID = 10**ID_DIGITS - 1
TAR_BLOCK = 512  # a tar's header and padding unit


def shard_name(index: int, ext: str) -> str:
    return f"shard-{index:06d}.{ext}"


def key_of(image_id: int) -> str:
    """A sample's `__key__`: the image id as 12 digits (no dots in keys, ever); ids outside [0, 10^12) have none."""
    if not 0 <= image_id <= MAX_IMAGE_ID:
        raise ValueError(f"image id {image_id} is outside 0..{MAX_IMAGE_ID}: it has no 12-digit key")
    return f"{image_id:012d}"


def encode_id(image_id: int) -> bytes:
    """The `id` member: the key's ASCII digits, which webdataset decodes to the int and DALI reads as 12 uint8."""
    return key_of(image_id).encode("ascii")


def decode_id(data: bytes) -> int:
    """The image id an `id` member holds; ValueError unless it is 12 ASCII digits."""
    if len(data) != ID_DIGITS or not data.isdigit():
        raise ValueError(f"an id member holds {ID_DIGITS} ASCII digits, not {bytes(data[:16])!r}")
    return int(data)


def decode_ids(digits: "torch.Tensor") -> "torch.Tensor":
    """[B] int64 image ids from a batch of `id` members as DALI gives them ([B, 12] uint8 ASCII digits)."""
    import torch  # here, not at the top: `clipcoco shards` reads this module and needs no torch (2 s to import)

    powers = 10 ** torch.arange(ID_DIGITS - 1, -1, -1, dtype=torch.int64, device=digits.device)
    return (digits.reshape(-1, ID_DIGITS).to(torch.int64) - ord("0")) @ powers


def fingerprint_of(shard_sha256s: Iterable[str]) -> str:
    """sha256 over the shards' sha256s in order: identifies the packed data exactly."""
    h = hashlib.sha256()
    for digest in shard_sha256s:
        h.update(digest.encode("ascii"))
    return h.hexdigest()


def read_json(path: Path) -> dict[str, Any] | None:
    """A sidecar or manifest, or None when it is missing or unparsable (a killed writer's leftover)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_and_rebuild(folder: Path) -> str:
    """What to do about damage found in a shard folder (the end of every such message)."""
    return (f"check the folder with `clipcoco shards --verify {folder}` and rebuild it with "
            "`clipcoco shards ... --overwrite`")


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else ""


CAPTIONS_SCHEMA = pa.schema([("image_id", pa.int64()), ("caption_id", pa.int64()), ("caption", pa.string())])


def read_captions(root: Path, columns: list[str] | None = None) -> pa.Table:
    """`root/captions.parquet` (all columns, or `columns`), sorted by (image_id, caption_id); `UserError` when it is
    missing or cannot be read (cut short, damaged)."""
    path = Path(root) / "captions.parquet"
    if not path.is_file():
        raise UserError(f"no captions.parquet in {root}: did you run `clipcoco shards`?")
    names = columns or CAPTIONS_SCHEMA.names
    try:
        table = pq.read_table(path, columns=names).cast(pa.schema([CAPTIONS_SCHEMA.field(n) for n in names]))
    except (pa.ArrowException, OSError) as err:  # cut short, not Parquet, columns missing or of another type
        if isinstance(err, OSError) and err.errno is not None:  # the file system's (no permission...): the CLI says it
            raise
        raise UserError(f"{path} cannot be read ({type(err).__name__}: {_first_line(err)}): it is damaged; rerun "
                        f"the `clipcoco shards` command that wrote {root} (same options: it "
                        "rewrites captions.parquet)") from None
    return table.sort_by([(c, "ascending") for c in ("image_id", "caption_id") if c in names])


@dataclass(frozen=True)
class ShardSet:
    root: Path
    tars: list[Path]  # shard-NNNNNN.tar in order
    indexes: list[Path]  # the .idx beside each tar
    manifest: dict
    n_images: int
    fingerprint: str  # sha256 over the shards' sha256s (identifies the data exactly)

    def image_ids(self) -> np.ndarray:
        """Sorted int64 ids of every packed image (from captions.parquet)."""
        return np.unique(read_captions(self.root, ["image_id"]).column("image_id").to_numpy()).astype(np.int64)

    def captions(self) -> pa.Table:
        """Every packed caption (image_id, caption_id, caption), sorted by (image_id, caption_id)."""
        return read_captions(self.root)


def load_manifest(root: Path) -> dict:
    """manifest.json of a finished directory, after checking that every file it names is there."""
    if not (root / "manifest.json").is_file():
        raise UserError(f"no manifest.json in {root}: did you run `clipcoco shards --out {root}`? "
                        "(an interrupted run leaves none: rerun the same command to finish it)")
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except ValueError as err:  # cut short, zeroed or not UTF-8
        raise UserError(f"{root / 'manifest.json'} is damaged ({type(err).__name__}: {_first_line(err)}): rerun the "
                        f"`clipcoco shards` command that wrote {root} (same options: it rewrites manifest.json), then "
                        f"check the folder with `clipcoco shards --verify {root}`") from None
    version = manifest.get("format_version", 1)  # version 1 recorded none
    if version != FORMAT_VERSION:
        raise UserError(f"{root} holds shards of format version {version}; this clipcoco reads version "
                        f"{FORMAT_VERSION}: rebuild them with `clipcoco shards ... --out {root} --overwrite`")
    for entry in manifest["shards"]:
        tar = root / entry["tar"]
        if not tar.is_file() or not (root / entry["idx"]).is_file() or not tar.with_suffix(".json").is_file():
            raise UserError(f"{root} is incomplete ({entry['tar']} or its .idx/.json is missing): "
                            "rerun `clipcoco shards` with the same options to finish it")
    if not (root / "captions.parquet").is_file():
        raise UserError(f"no captions.parquet in {root}: rerun `clipcoco shards` with the same options")
    return manifest


def shard_set(root: Path, manifest: dict) -> ShardSet:
    return ShardSet(root=root, tars=[root / e["tar"] for e in manifest["shards"]],
                    indexes=[root / e["idx"] for e in manifest["shards"]], manifest=manifest,
                    n_images=manifest["totals"]["images_packed"],
                    fingerprint=fingerprint_of(e["sha256"] for e in manifest["shards"]))


def open_shards(shards_dir: Path) -> ShardSet:
    """The complete shard directory `clipcoco shards` wrote; `UserError` if it is missing or incomplete.

    Cheap checks only (files present, sizes as recorded); `clipcoco shards --verify` reads every byte.
    """
    root = Path(shards_dir)
    shards = shard_set(root, load_manifest(root))
    for tar, entry in zip(shards.tars, shards.manifest["shards"], strict=True):
        if tar.stat().st_size != entry["bytes"]:
            raise UserError(f"{tar} has {tar.stat().st_size} bytes, the manifest says {entry['bytes']}: "
                            "check it with `clipcoco shards --verify`, rebuild it with `--overwrite`")
    return shards


# Shards this process has hashed and found intact, as they were then: a train run's periodic eval makes a loader over
# the same eval shards each time, and hashes them once.
_HASHED: set[tuple] = set()


class ShardCheck:
    """The sha256 of some of a folder's shards against their manifest, computed on a thread of its own.

    `open_shards` compares only sizes, and damage of the same size (bit rot, a member overwritten) decodes as
    another image. Hashing reads each shard once more, on this thread (hashlib and file reads release the GIL), while
    the loader's first pass reads the samples; a loader polls it at every batch and waits for it at the end of the
    pass (or, for a run whose target falls inside that pass, before its final checkpoint): damage stops the run at
    the next batch once found, and no result is reported from unchecked bytes, though batches read before the hash
    ends are trained on.
    """

    def __init__(self, shards: ShardSet, which: Iterable[int]) -> None:
        self.problem: str | None = None  # set once a shard disagrees: the one line to stop with
        self._thread = threading.Thread(target=self._hash, args=(shards, list(which)), name="shard-check",
                                        daemon=True)  # never holds up an exit (it only reads)
        self._thread.start()

    def _hash(self, shards: ShardSet, which: list[int]) -> None:
        for i in which:
            tar, entry = shards.tars[i], shards.manifest["shards"][i]
            try:
                stat = tar.stat()
                seen = (str(tar), stat.st_ino, stat.st_size, stat.st_mtime_ns, entry["sha256"])
                if seen in _HASHED:
                    continue
                damaged = sha256_file(tar) != entry["sha256"]
            except OSError as err:
                self.problem = f"{tar} cannot be read ({err.strerror}): {check_and_rebuild(shards.root)}"
                return
            except Exception as err:  # a manifest entry edited by hand, say: never reported as intact
                self.problem = (f"{tar} cannot be checked ({type(err).__name__}: {err}): "
                                f"{check_and_rebuild(shards.root)}")
                return
            if damaged:
                self.problem = (f"{tar} is damaged: its bytes are not the ones `clipcoco shards` wrote (sha256 differs "
                                f"from its manifest entry): {check_and_rebuild(shards.root)}")
                return
            _HASHED.add(seen)

    def raise_if_damaged(self) -> None:
        if self.problem is not None:
            raise UserError(self.problem)

    def wait(self) -> None:
        """Block until every shard is hashed; `UserError` naming a damaged one."""
        self._thread.join()
        self.raise_if_damaged()


class SampleIndex:
    """Every sample of a list of tars, located by their DALI .idx files, read by offset (no tar is scanned).

    The .idx format (DALI's wds2idx, v1.2): a header `v1.2 <count>`, then one line per sample of
    `<ext> <offset> <size> <member name>` groups. Rows are samples in file order. Picklable: each process
    (a DataLoader worker, say) opens the tars for itself on first read.
    """

    def __init__(self, tars: list[Path], keys: list[str], tar_of: np.ndarray, members: dict[str, np.ndarray], *,
                 indexes: list[Path]):
        self.tars = [str(t) for t in tars]
        self.indexes = [str(i) for i in indexes]  # the .idx each tar was located by
        self.keys = keys  # [N] each sample's __key__
        self.tar_of = tar_of  # [N] int64: which tar holds the sample
        self.members = members  # ext -> [N, 2] int64 (offset, size); (-1, -1) where the sample lacks that member
        self._rows = {key: row for row, key in enumerate(keys)}
        self._fds: dict[int, int] = {}

    @classmethod
    def load(cls, indexes: list[Path], tars: list[Path] | None = None) -> "SampleIndex":
        """Parse `indexes` (the tar of each is the .idx path with .tar, unless `tars` names them)."""
        tars = [Path(i).with_suffix(".tar") for i in indexes] if tars is None else tars
        keys, tar_of, located = [], [], []
        for t, index in enumerate(indexes):
            try:
                lines = Path(index).read_text().splitlines()
            except UnicodeDecodeError:
                lines = []
            if not lines or not lines[0].startswith("v1.2 "):
                raise UserError(f"{index} is not a DALI webdataset index (v1.2): rebuild with `clipcoco shards`")
            for number, line in enumerate(lines[1:], start=2):
                fields = line.split()
                try:
                    if not fields or len(fields) % 4:
                        raise ValueError("not groups of 4 fields")
                    members = {fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)}
                except ValueError:
                    raise UserError(f"{index} is damaged (line {number}: {line[:60]!r}): "
                                    f"{check_and_rebuild(Path(index).parent)}") from None
                keys.append(fields[3].partition(".")[0])
                tar_of.append(t)
                located.append(members)
        exts = sorted({ext for m in located for ext in m})
        table = {ext: np.array([m.get(ext, (-1, -1)) for m in located], dtype=np.int64).reshape(-1, 2)
                 for ext in exts}
        return cls(tars, keys, np.asarray(tar_of, dtype=np.int64), table, indexes=indexes)

    def __len__(self) -> int:
        return len(self.keys)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "SampleIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}  # descriptors belong to the process that opened them

    def has(self, ext: str) -> np.ndarray:
        """[N] bool: which samples hold member `ext`."""
        return self.members[ext][:, 0] >= 0 if ext in self.members else np.zeros(len(self), bool)

    def require(self, *exts: str) -> None:
        """Stop unless every sample holds every member in `exts`."""
        for ext in exts:
            lacking = np.flatnonzero(~self.has(ext))
            if len(lacking):
                row = int(lacking[0])
                raise UserError(f"sample {self.keys[row]} in {self.tars[self.tar_of[row]]} lacks its {ext} member: "
                                "rebuild with `clipcoco shards --overwrite`")

    def check_layout(self) -> None:
        """Stop unless every member lies where a tar of `clipcoco shards` holds it: back to back from the first
        header, each after its own 512-byte header and padded to 512 bytes, the last inside the tar. Call it after
        `require`. Arithmetic on the .idx alone: a size or offset it got wrong (a digit lost) would otherwise be read
        as a cut JPEG deep into a run."""
        present = [(ext, np.flatnonzero(self.has(ext))) for ext in self.members]
        if not present:
            return
        rows = np.concatenate([r for _, r in present])
        exts = np.concatenate([np.full(len(r), ext) for ext, r in present])
        offset, size = np.concatenate([self.members[ext][r] for ext, r in present]).T
        order = np.lexsort((offset, self.tar_of[rows]))
        rows, exts, offset, size = rows[order], exts[order], offset[order], size[order]
        tar = self.tar_of[rows]
        end = offset + -(-size // TAR_BLOCK) * TAR_BLOCK  # where the member's padded data ends
        first, last = np.r_[True, tar[1:] != tar[:-1]], np.r_[tar[1:] != tar[:-1], True]
        starts_wrong = offset != np.where(first, 0, np.r_[0, end[:-1]]) + TAR_BLOCK
        # A member that does not start where the one before it ends: the size of that one or this offset is wrong.
        wrong = np.flatnonzero(starts_wrong & ~first) - 1
        # Nothing follows a tar's last member to check its size against: its own header says it (one read per tar).
        last_wrong = [k for k in np.flatnonzero(last) if not self._header_agrees(int(tar[k]), f"{self.keys[rows[k]]}."
                                                                                 f"{exts[k]}", offset[k], size[k])]
        wrong = np.r_[wrong, np.flatnonzero((starts_wrong & first) | (size < 0)), last_wrong]
        if len(wrong):
            k = int(wrong.min())
            index = Path(self.indexes[tar[k]])
            raise UserError(f"{index} does not match its tar at sample {self.keys[rows[k]]}'s {exts[k]} member "
                            f"(offset {offset[k]}, size {size[k]}, or the next one's offset): "
                            f"{check_and_rebuild(index.parent)}")

    def _header_agrees(self, tar: int, name: str, offset: int, size: int) -> bool:
        """Whether the ustar header before `offset` in tar `tar` names `name` and `size`."""
        if offset < TAR_BLOCK:
            return False
        with open(self.tars[tar], "rb") as f:
            header = os.pread(f.fileno(), TAR_BLOCK, offset - TAR_BLOCK)
        return (len(header) == TAR_BLOCK and header[:100].rstrip(b"\0") == name.encode()
                and header[124:136].rstrip(b"\0 ") == b"%011o" % size)

    def row_of(self, image_id: int) -> int:
        row = self._rows.get(key_of(image_id))
        if row is None:
            raise UserError(f"image id {image_id} is not in these shards")
        return row

    def read(self, row: int, ext: str) -> bytes:
        """The bytes of member `ext` of sample `row`."""
        offset, size = (int(v) for v in self.members[ext][row])
        tar = int(self.tar_of[row])
        if tar not in self._fds:
            self._fds[tar] = os.open(self.tars[tar], os.O_RDONLY)
        return os.pread(self._fds[tar], size, offset)

    def image_id(self, row: int) -> int:
        """The image id of sample `row` (its `id` member, which must be its key's digits: a damaged shard is named
        as such, never taken for an image the text cache lacks)."""
        data = self.read(row, "id")
        if data != self.keys[row].encode("ascii", "replace") or not data.isdigit():
            tar = Path(self.tars[self.tar_of[row]])
            raise UserError(f"sample {self.keys[row]} in {tar} has a damaged id member ({bytes(data[:16])!r}, not its "
                            f"key): {check_and_rebuild(tar.parent)}")
        return decode_id(data)

    def sample(self, image_id: int) -> dict:
        """{"json": the sample's metadata, "jpg": its JPEG bytes} of one image."""
        row = self.row_of(image_id)
        return {"json": json.loads(self.read(row, "json")), "jpg": self.read(row, "jpg")}
