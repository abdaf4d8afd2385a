"""The one atomic writer every stage uses, the one lock on an output folder, and the sha256 of a file.

A file is written under `<name>.tmp` beside its final name, flushed to disk (fsync), then renamed over the
final name, and the directory entry is synced too: a reader sees the old file or the whole new one, never a
torn one, even after a power loss. An error inside the block removes the temporary file; a process killed
outright leaves it, under a name no reader looks for (the next run of the stage clears it). A write that fails
on the disk (full, read-only) raises an OSError naming the file, which the CLI turns into one line
(`pipeline.errors.os_error_message`).

Every command that writes into a folder (shards, embed-text, train, eval) holds that folder's lock while it runs
(`locked`): an OS lock (flock) on `<folder>/.lock`, so a second command into the same folder stops at once and
names the holder, and a holder that dies, even by kill -9, lets go with its last file descriptor.
"""

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path

from pipeline.errors import UserError

LOCK_NAME = ".lock"


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
    """Make the finished file `tmp` become `path`: its bytes reach the disk before the rename makes them visible. A
    folder works too (its entries are synced; `path` may be an empty folder it replaces)."""
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
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:  # a failed write() names no file: name the one it was
            err.filename = str(path)
        raise


def write_atomic(path: Path, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


_held: set[int] = set()  # descriptors of the locks this process holds
_fork_hook = []  # non-empty once the at-fork hook is registered (it cannot be removed)


def _drop_held_in_child() -> None:
    # A forked child (a shards worker, a DataLoader worker) shares the lock's open file; closing its copy keeps the
    # lock tied to the process that took it (flock lets go only when every copy is closed), so an orphaned child
    # cannot hold it after its parent was killed.
    for fd in _held:
        os.close(fd)
    _held.clear()


def _describe(holder: bytes) -> str:
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on {info['host']} ({info['command']}, since {info['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process (it has not said which yet)"


def _take(path: Path, what: str) -> int:
    """The descriptor of `path` locked exclusively; `UserError` naming the holder when another process has it."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0)
            os.close(fd)
            raise UserError(f"{path.parent} is in use by {_describe(holder)}: wait for it to end (or stop it) before "
                            f"running {what} there, or choose another output folder") from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file as it let go (its folder held nothing else): lock the new one


@contextmanager
def locked(folder: Path, what: str) -> Iterator[None]:
    """Hold the exclusive lock of `folder` for the block (`what`, e.g. "clipcoco train", says who holds it).

    The folder is made when missing, and removed again at the end if the block wrote nothing into it. The lock file
    records the holder (pid, host, command line, start) for the message another command gets; it exists only while
    the lock is held, so a finished command leaves no file behind (`_take` locks the new file when a process opened
    the old one just before it was removed).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder: choose another output path for this {what}")
    created = not folder.exists()
    path = folder / LOCK_NAME
    fd = _take(path, what)
    if not _fork_hook:
        os.register_at_fork(after_in_child=_drop_held_in_child)
        _fork_hook.append(True)
    _held.add(fd)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": what,
              "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": shlex.join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    try:
        yield
    finally:
        try:
            with suppress(FileNotFoundError):  # the folder removed under the command: nothing to clean up
                path.unlink()  # removed while still held, so no other process can be holding this file
            if created:
                with suppress(OSError):  # a command that wrote nothing leaves no folder behind
                    folder.rmdir()
        finally:
            _held.discard(fd)
            os.close(fd)  # lets go of the lock
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
