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
import json
import mmap
import os
import shutil
import threading
from dataclasses import dataclass
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from . import faults, hashing, layout
from .prefault import Prefaulter

_CHUNK = 8 << 20
_READ_CHUNK = 32 << 20  # larger reads let the kernel keep more of a cold file in flight
# Per priority level, one hashing thread (hash updates stay in order per file, and two cores are
# better spent on one hash stream beside the writer than on many) and one thread that issues
# direct writes (so the thread filling buffers never waits on the disk). They run at the niceness
# of the thread that writes: a background save's helpers yield the CPU to training as it does.
_HELPERS: dict[int, tuple[ThreadPoolExecutor, ThreadPoolExecutor]] = {}
_HELPERS_LOCK = threading.Lock()
_DIRECT_BUFFER = 16 << 20  # large enough for full disk bandwidth, small enough to reuse
_BLOCK = 4096  # O_DIRECT alignment of buffers, offsets and lengths (covers 512-byte devices)
_O_DIRECT = getattr(os, "O_DIRECT", 0)


@dataclass(frozen=True)
class FileRecord:
    """What the manifest says about one file: its size and content hash (see ``hashing``)."""

    size: int
    hash: str


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
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


def _thread_niceness() -> int:
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())  # per thread on Linux
    except (AttributeError, OSError):
        return 0


def _helpers() -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
    """(hasher, io) threads at the calling thread's niceness."""
    nice = _thread_niceness()
    with _HELPERS_LOCK:
        if nice not in _HELPERS:
            def init() -> None:
                try:
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
                except (AttributeError, OSError):
                    pass
            suffix = f"-nice{nice}" if nice else ""
            _HELPERS[nice] = (ThreadPoolExecutor(1, thread_name_prefix=f"safepoint-hash{suffix}", initializer=init),
                              ThreadPoolExecutor(1, thread_name_prefix=f"safepoint-io{suffix}", initializer=init))
        return _HELPERS[nice]


class _BouncePair:
    """Two page-aligned buffers for direct I/O, reused across files (fresh pages are slow to fault in)."""

    _free: list["_BouncePair"] = []
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.maps = [mmap.mmap(-1, _DIRECT_BUFFER), mmap.mmap(-1, _DIRECT_BUFFER)]
        self.arrays = [np.frombuffer(m, dtype=np.uint8) for m in self.maps]

    @classmethod
    def take(cls) -> "_BouncePair":
        with cls._lock:
            return cls._free.pop() if cls._free else cls()

    def give_back(self) -> None:
        with self._lock:
            if len(self._free) < 2:
                self._free.append(self)


class HashingWriter:
    """A file opened for a durable write that hashes exactly the bytes it writes.

    Hashing runs on a helper thread beside the write (both release the GIL), so a save costs
    max(write, hash) instead of their sum. With ``direct=True`` (large files) bytes are copied into
    two page-aligned buffers that are written with ``O_DIRECT`` from an I/O thread while the other
    fills: the disk streams at its own speed, no page-cache pages are allocated (slow on a fresh or
    ballooned machine) and nothing waits for writeback at ``fsync``. Filesystems without
    ``O_DIRECT`` (tmpfs, some FUSE) fall back to plain writes. ``close()`` fsyncs and returns the
    file's ``FileRecord``. Any ``OSError`` (ENOSPC above all) is re-raised naming the file. In the
    plain mode the caller must keep written buffers unchanged until ``close()`` returns.
    """

    def __init__(self, path: Path, *, direct: bool = False, algorithm: str | None = None) -> None:
        self.path = path
        self.algorithm = algorithm or hashing.default_algorithm()
        self._hash = hashing.new_hasher(self.algorithm)
        self._size = 0
        self._hashing: Future[None] | None = None
        self._hasher, self._io = _helpers()
        self._fd = -1
        self._bounce: _BouncePair | None = None
        if direct and _O_DIRECT:
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_DIRECT, 0o644)
                self._bounce = _BouncePair.take()
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
        if self._fd < 0:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._fill = 0
        self._current = 0
        self._busy: list[list[Future[Any]]] = [[], []]  # per buffer: its pending hash and write
        self._direct_ok = self._bounce is not None

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        try:
            if self._bounce is not None:
                self._write_buffered_direct(view)
                return
            for start in range(0, len(view), _CHUNK):
                chunk = view[start:start + _CHUNK]
                self._write_all(chunk)
                self._size += len(chunk)
                self._hash_next(chunk)
        except OSError as err:
            raise _explain_os_error(err, self.path) from err

    def _hash_next(self, chunk: memoryview) -> Future[None]:
        if self._hashing is not None:
            self._hashing.result()
        self._hashing = self._hasher.submit(self._hash.update, chunk)
        return self._hashing

    def _write_all(self, view: memoryview) -> None:
        while view:
            try:
                written = os.write(self._fd, view)
            except OSError as err:
                if err.errno != errno.EINVAL or not self._direct_ok:
                    raise
                self._drop_direct()  # the filesystem refused an aligned direct write: go buffered
                continue
            view = view[written:]

    def _drop_direct(self) -> None:
        import fcntl

        self._direct_ok = False
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~_O_DIRECT)

    def _write_buffered_direct(self, view: memoryview) -> None:
        assert self._bounce is not None
        source = np.frombuffer(view, dtype=np.uint8) if len(view) else None
        pos = 0
        while pos < len(view):
            target = self._bounce.arrays[self._current]
            take = min(_DIRECT_BUFFER - self._fill, len(view) - pos)
            np.copyto(target[self._fill:self._fill + take], source[pos:pos + take])  # releases the GIL
            self._fill += take
            pos += take
            if self._fill == _DIRECT_BUFFER:
                self._flush(self._fill)

    def _flush(self, length: int) -> None:
        """Hand the current buffer to the hasher and the I/O thread; switch to the other one."""
        assert self._bounce is not None
        index = self._current
        data = memoryview(self._bounce.maps[index])
        padded = -(-length // _BLOCK) * _BLOCK
        if padded != length:
            data[length:padded] = bytes(padded - length)
        self._busy[index] = [self._hash_next(data[:length]), self._io.submit(self._write_all, data[:padded])]
        self._size += length
        self._current ^= 1
        self._fill = 0
        self._wait(self._current)

    def _wait(self, index: int) -> None:
        busy, self._busy[index] = self._busy[index], []
        for future in busy:
            future.result()

    def close(self) -> FileRecord:
        try:
            if self._bounce is not None:
                if self._fill:
                    self._flush(self._fill)
                self._wait(0)
                self._wait(1)
                os.ftruncate(self._fd, self._size)  # drop the padding of the last block
            os.fsync(self._fd)
        except OSError as err:
            raise _explain_os_error(err, self.path) from err
        finally:
            self._release()
        return FileRecord(self._size, hashing.digest_string(self.algorithm, self._hash))

    def _release(self) -> None:
        for index in (0, 1):
            try:
                self._wait(index)
            except Exception:  # noqa: BLE001 - the first error is already being raised
                pass
        if self._hashing is not None:
            try:
                self._hashing.result()
            except Exception:  # noqa: BLE001
                pass
            self._hashing = None
        if self._bounce is not None:
            self._bounce.give_back()
            self._bounce = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        self._release()

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


def read_hashed(path: Path, into: memoryview | None = None, *, like: str | None = None) -> FileRecord:
    """Hash a file in one pass, reading chunk i+1 while chunk i is hashed.

    With ``into`` (a writable buffer of the file's size) the bytes are kept there, so a restore
    reads each file exactly once, while a helper thread faults in the buffer's fresh pages from
    the back (``Prefaulter``); without it they are only hashed (``verify``). ``like`` is the
    hash a record expects: the file is hashed with the same algorithm (default: the one for new files).
    """
    algorithm = hashing.algorithm_of(like) if like is not None else hashing.default_algorithm()
    h = hashing.new_hasher(algorithm)
    hasher, io = _helpers()
    size = 0
    pending: Future[None] | None = None
    with open(path, "rb", buffering=0) as f:
        chunk = min(_READ_CHUNK, os.fstat(f.fileno()).st_size + 1)  # +1: the read that sees the end
        spare = [bytearray(chunk), bytearray(chunk)] if into is None else []
        prefaulter = Prefaulter(into, io) if into is not None else None
        try:
            while True:
                target = memoryview(spare[0]) if into is None else into[size:size + _READ_CHUNK]
                n = f.readinto(target) if len(target) else 0
                if pending is not None:
                    pending.result()
                if not n:
                    break
                pending = hasher.submit(h.update, target[:n])
                size += n
                if prefaulter is None:
                    spare.reverse()
                else:
                    prefaulter.advance(size)
        finally:
            if prefaulter is not None:
                prefaulter.stop()
    if into is not None and size != len(into):
        raise EOFError(f"{path} has {size} bytes, expected {len(into)}")
    return FileRecord(size, hashing.digest_string(algorithm, h))


def hash_file(path: Path, *, like: str | None = None) -> FileRecord:
    return read_hashed(path, like=like)


def sync_and_hash_tree(root: Path, *, skip: Callable[[str], bool] = lambda rel: False) -> dict[str, FileRecord]:
    """Make files someone else wrote under ``root`` durable (each fsynced, then every directory)
    and return their records by relative path; ``skip(rel)`` leaves a file out."""
    records: dict[str, FileRecord] = {}
    for dirpath, _, names in os.walk(root):
        for name in sorted(names):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if skip(rel):
                continue
            fsync_file(path)
            records[rel] = hash_file(path)
        fsync_dir(Path(dirpath))
    return records


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
