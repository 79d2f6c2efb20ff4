"""The only code that makes things durable.

A checkpoint is written into a tmp directory, every file is fsynced as it is closed, the manifest
is written last and fsynced with its directory, then the directory is renamed to its final name
and the parent is fsynced. ``rename`` is atomic on POSIX filesystems, so a reader sees either no
checkpoint or a complete one. Deletion is the same dance in reverse: rename into ``.trash/``
(atomic, so the checkpoint vanishes from listings at once), fsync, then remove at leisure.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import faults, layout

HASH_ALGORITHM = "sha256"
_CHUNK = 8 << 20
# One process-wide hashing thread: hash updates must stay in order per file, and two cores are
# better spent on one hash stream beside the writer than on many.
_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safepoint-hash")


@dataclass(frozen=True)
class FileRecord:
    """What the manifest says about one file: its size and content hash."""

    size: int
    hash: str


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _explain_os_error(err: OSError, path: Path) -> OSError:
    if err.errno == errno.ENOSPC:
        return OSError(errno.ENOSPC, f"No space left on device while writing {path}; the partial "
                       "save was removed and committed checkpoints are untouched. Free space or "
                       "lower the retention, then save again", str(path))
    return err


class HashingWriter:
    """A file opened for a durable write that hashes exactly the bytes it writes.

    Hashing runs on a helper thread, one chunk behind the write (both release the GIL), so a save
    costs max(write, hash) instead of their sum. ``close()`` fsyncs and returns the file's
    ``FileRecord``. Any ``OSError`` (ENOSPC above all) is re-raised naming the file, because
    ``write`` on a full disk otherwise says little. The caller must keep written buffers
    unchanged until ``close()`` returns.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "xb", buffering=0)
        self._hash = hashlib.new(HASH_ALGORITHM)
        self._size = 0
        self._hashing: Future[None] | None = None

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        try:
            for start in range(0, len(view), _CHUNK):
                chunk = view[start:start + _CHUNK]
                self._write_all(chunk)
                if self._hashing is not None:
                    self._hashing.result()
                self._hashing = _HASHER.submit(self._hash.update, chunk)
        except OSError as err:
            raise _explain_os_error(err, self.path) from err

    def _write_all(self, view: memoryview) -> None:
        while view:
            written = self._file.write(view)
            self._size += written
            view = view[written:]

    def close(self) -> FileRecord:
        try:
            os.fsync(self._file.fileno())
        except OSError as err:
            raise _explain_os_error(err, self.path) from err
        finally:
            self._finish_hash()
            self._file.close()
        return FileRecord(self._size, self._hash.hexdigest())

    def _finish_hash(self) -> None:
        if self._hashing is not None:
            self._hashing.result()
            self._hashing = None

    def abort(self) -> None:
        self._finish_hash()
        self._file.close()

    def __enter__(self) -> "HashingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_bytes(path: Path, data: bytes) -> FileRecord:
    writer = HashingWriter(path)
    with writer:
        writer.write(data)
    return writer.close()


def dump_json(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=False, allow_nan=False).encode()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Replace a small JSON file (run.json) so a crash leaves the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_bytes(tmp, dump_json(obj))
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_hashed(path: Path, into: memoryview | None = None) -> FileRecord:
    """Hash a file in one pass, reading chunk i+1 while chunk i is hashed.

    With ``into`` (a writable buffer of the file's size) the bytes are kept there, so a restore
    reads each file exactly once; without it they are only hashed (``verify``).
    """
    h = hashlib.new(HASH_ALGORITHM)
    size = 0
    pending: Future[None] | None = None
    spare = [bytearray(_CHUNK), bytearray(_CHUNK)] if into is None else []
    with open(path, "rb", buffering=0) as f:
        while True:
            target = memoryview(spare[0]) if into is None else into[size:size + _CHUNK]
            n = f.readinto(target) if len(target) else 0
            if pending is not None:
                pending.result()
            if not n:
                break
            pending = _HASHER.submit(h.update, target[:n])
            size += n
            if into is None:
                spare.reverse()
    if into is not None and size != len(into):
        raise EOFError(f"{path} has {size} bytes, expected {len(into)}")
    return FileRecord(size, h.hexdigest())


def hash_file(path: Path) -> FileRecord:
    return read_hashed(path)


def commit_dir(tmp: Path, final: Path) -> None:
    """Make a fully written tmp directory visible under its final name, durably."""
    fsync_dir(tmp)
    os.rename(tmp, final)
    fsync_dir(final.parent)


def move_to_trash(run_dir: Path, name: str) -> Path:
    """Atomically take ``run_dir/name`` out of every listing; returns where it went."""
    trash = run_dir / layout.TRASH_DIR
    trash.mkdir(exist_ok=True)
    target = trash / layout.trash_name(name)
    os.rename(run_dir / name, target)
    fsync_dir(run_dir)
    return target


def seal(tmp: Path, final: Path, manifest: bytes) -> None:
    """Write the manifest last, then make ``tmp`` visible as ``final`` (replacing a same-step save)."""
    write_bytes(tmp / layout.MANIFEST, manifest)
    faults.reach("before_rename")
    if final.exists():  # an explicit save() of a step already on disk replaces it
        replace_dir(tmp, final)
    else:
        commit_dir(tmp, final)


def delete_checkpoint(run_dir: Path, name: str) -> None:
    """Crash-safe delete: one rename takes it out of every listing, then its bytes are removed.

    A crash in between leaves only ``.trash/`` debris, which the next start removes.
    """
    moved = move_to_trash(run_dir, name)
    faults.reach("during_delete")
    remove_tree(moved)


def remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_dir(tmp: Path, final: Path) -> None:
    """Commit ``tmp`` over an existing committed ``final`` (a step saved again), atomically.

    Linux's ``renameat2(RENAME_EXCHANGE)`` swaps the two names in one step, so a crash leaves
    the old or the new checkpoint, never neither. Where it is missing, fall back to moving the
    old one aside first (a crash in that short window loses only this step's old copy).
    """
    fsync_dir(tmp)
    if _exchange(tmp, final):
        fsync_dir(final.parent)
        remove_tree(tmp)  # now holds the old checkpoint
        return
    remove_tree(move_to_trash(final.parent, final.name))
    commit_dir(tmp, final)


def _exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
