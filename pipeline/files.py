"""The one atomic writer every stage uses, and the sha256 of a file (for fingerprints).

A file is written under `<name>.tmp` beside its final name, flushed to disk (fsync), then renamed over the
final name, and the directory entry is synced too: a reader sees the old file or the whole new one, never a
torn one, even after a power loss. An error inside the block removes the temporary file; a process killed
outright leaves it, under a name no reader looks for (the next run of the stage clears it).
"""

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file's bytes, read in 4 MiB pieces (memory stays flat for multi-GB weight files)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def temporary_name(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def commit(tmp: Path, path: Path) -> None:
    """Make the finished file `tmp` become `path`: its bytes reach the disk before the rename makes them visible."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself, so a crash cannot bring the old file back
    finally:
        os.close(dir_fd)


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield the temporary name to write `path` under; it becomes `path` only when the block ends without an
    error, and is removed when the block raises (anything, Ctrl-C included)."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def link_atomic(target: Path, path: Path) -> None:
    """Make `path` a second name of the finished file `target` (a hard link: no second copy of its bytes; a copy
    where the filesystem has no hard links), replacing what `path` was in one rename."""
    tmp = temporary_name(Path(path))
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
    except OSError:
        shutil.copyfile(target, tmp)
    commit(tmp, Path(path))
