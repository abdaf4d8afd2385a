"""The one atomic writer (pipeline/files.py): all or nothing, its temporary file removed on error."""

import hashlib

import pytest

import pipeline.files as files
from pipeline.files import replacing, sha256_file, write_atomic


def test_sha256_file_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 40_000  # ~10 MB: several 4 MiB pieces
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_write_replaces_the_whole_file(tmp_path):
    path = tmp_path / "out.json"
    path.write_bytes(b"old")
    write_atomic(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_an_error_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "out.parquet"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer failed"), replacing(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet"]


def test_ctrl_c_removes_the_temporary_too(tmp_path):
    with pytest.raises(KeyboardInterrupt), replacing(tmp_path / "x") as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_bytes_are_synced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = files.os.fsync, files.os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(files.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b)))
    write_atomic(tmp_path / "y", b"data")
    assert events == ["fsync", "replace", "fsync"]  # the file, the rename, the directory entry
