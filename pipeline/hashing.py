"""The sha256 of a file, for the fingerprints every stage records (shards, text cache, runs)."""

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file's bytes, read in 4 MiB pieces (memory stays flat for multi-GB weight files)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
