"""Small file helpers every stage shares: the sha256 of a file (for fingerprints) and atomic replacement."""

import hashlib
import os
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


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary name beside `path` (`<name>.tmp`) to write to; it becomes `path` only when the block
    ends without an error, so a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    yield tmp
    os.replace(tmp, path)


def write_atomic(path: Path, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)
