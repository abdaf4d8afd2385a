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


def test_a_second_process_is_refused_naming_the_holder_and_a_kill_9_frees_the_lock(tmp_path):
    import os
    import signal

    from conftest import holding_lock

    from pipeline.errors import UserError
    from pipeline.files import locked

    folder = tmp_path / "out"
    with holding_lock(folder, "clipcoco shards", fork=True) as (holder, child):
        with pytest.raises(UserError) as err, locked(folder, "clipcoco train"):
            pass
        message = str(err.value)
        assert len(message.splitlines()) == 1
        assert f"{folder} is in use by pid {holder.pid} on " in message and "(clipcoco shards, since 20" in message
        assert "choose another output folder" in message
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # still running: it closed its copy of the lock at the fork, so it does not hold it
        with locked(folder, "clipcoco train"):
            assert b'"command": "clipcoco train"' in (folder / ".lock").read_bytes()


def test_a_folder_removed_under_its_lock_keeps_the_error_and_releases(tmp_path):
    import shutil

    from pipeline import files

    with pytest.raises(ValueError, match="the command's own error"), files.locked(tmp_path / "run", "clipcoco train"):
        shutil.rmtree(tmp_path / "run")  # `rm -rf` of the run while it runs
        raise ValueError("the command's own error")
    assert not files._held  # the descriptor was closed: the lock is free


def test_a_lock_leaves_nothing_behind(tmp_path):
    from pipeline.errors import UserError
    from pipeline.files import locked

    with locked(tmp_path / "new" / "run", "clipcoco train"):
        assert (tmp_path / "new" / "run" / ".lock").is_file()
    assert not (tmp_path / "new" / "run").exists()  # made for the lock, nothing written: removed again
    with locked(tmp_path / "kept", "clipcoco shards"):
        (tmp_path / "kept" / "manifest.json").write_text("{}")
        with pytest.raises(UserError, match="in use by pid"), locked(tmp_path / "kept", "clipcoco eval"):
            pass  # the same process, another open file: refused too
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["manifest.json"]  # no lock file is left
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"), locked(tmp_path / "file", "clipcoco train"):
        pass
