"""The memory tier: snapshots of the training state in shared memory, committed when the trainer dies.

A durable disk save costs seconds to minutes, so it runs every few hundred steps, and a SIGKILL (an
OOM kill, a segfault, a watchdog) loses every step since the last one. A copy of the same state into
memory costs about one memcpy. Under ``safepoint run --dir RUN``, the supervisor owns a directory on a
tmpfs (``/dev/shm``) and names it in ``SAFEPOINT_SNAPSHOT_DIR``; a trainer's
``CheckpointManager(snapshot_every=K)`` copies its encoded state there every K steps. Pages of a
tmpfs file outlive the process that wrote them, so when the trainer dies the supervisor commits the
newest complete snapshot into the run directory as an ordinary checkpoint (files hashed and fsynced,
manifest last, rename) before it restarts the trainer, which resumes from it with a plain ``restore``.

Who calls what, in order:

1. the supervisor: ``MemoryTier.create(run_dir, parent)`` once, and ``env()`` into every child's
   environment;
2. the trainer's manager: ``attach(run_dir, every)`` when it starts, ``SnapshotWriter.write`` every
   K steps (a blocking copy, so a snapshot is the state at one step, never torn), ``discard`` after
   every restore (a rollback must not be undone by an older snapshot of a newer step);
3. the supervisor, after a child exited non-zero: ``MemoryTier.persist_newest()``;
4. the supervisor, on exit: ``MemoryTier.close()`` removes the directory.

A slot file holds one snapshot::

    [0:8)       magic b"SPSNAP01"
    [8:16)      sequence number of the complete snapshot in the slot; 0 while one is being written
    [16:24)     offset of the snapshot's description (JSON) in the slot
    [24:32)     its length
    [4096:...)  the checkpoint's files back to back (each entry's safetensors bytes, then
                state.json), then the description: seq, step, files (name, offset, size), manifest fields

Two slots, written in turn: a snapshot goes into the slot that does not hold the newest complete one;
its sequence number is cleared first and stored last, and a reader checks it against the
description's copy and every file range against the slot's size. A trainer killed mid-copy (fault
point ``during_snapshot``) leaves that slot marked incomplete and the other intact. Only the death of
the writer is covered, which is the point: stores into a shared mapping are in the page cache at
once. A machine crash takes /dev/shm along; that is what disk checkpoints are for. Slots are
preallocated with ``posix_fallocate``, so a full tmpfs is a clear error before the copy, never a
SIGBUS in the middle of one; they grow when the state grows and are otherwise reused.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import shutil
import struct
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import faults, layout
from .catalog import list_checkpoints
from .commit import FileRecord, HashingWriter, dump_json, remove_tree, seal
from .disk import MinFree, check_space, format_size
from .errors import DirectoryLocked, InsufficientDiskSpace, SafepointWarning
from .hashing import default_algorithm
from .lock import RunLock
from .manifest import Manifest, utc_now

if TYPE_CHECKING:
    import torch

ENV_DIR = "SAFEPOINT_SNAPSHOT_DIR"
ENV_EVERY = "SAFEPOINT_SNAPSHOT_EVERY"
DEFAULT_PARENT = Path("/dev/shm")
OWNER_FILE = "owner.json"
SOURCE = "memory snapshot"  # manifest ``extra["source"]`` of a checkpoint persisted from memory
_PREFIX = "safepoint-snapshots-"
_LOCK = ".lock"
_SLOTS = ("slot-0.bin", "slot-1.bin")
_MAGIC = b"SPSNAP01"
_HEADER = struct.Struct("<8sQQQ")
_DATA_START = 4096
_ALIGN = 64
_GRAIN = 1 << 20


# ---------------------------------------------------------------------------------- trainer side


def attach(run_dir: Path, every: int | None, *, distributed: bool = False) -> "SnapshotWriter | None":
    """The manager's writer, or None when snapshots are off or cannot work here (with a warning).

    ``every`` None falls back to ``SAFEPOINT_SNAPSHOT_EVERY`` (``safepoint run --snapshot-every``),
    which applies to the manager of the supervisor's run directory only; other managers in the same
    script (reading another run, say) quietly take no snapshots.
    """
    from_env = every is None and bool(os.environ.get(ENV_EVERY))
    if from_env:
        text = os.environ[ENV_EVERY]
        every = int(text) if text.strip().isdigit() else -1
        if every < 1:
            raise ValueError(f"{ENV_EVERY}={text!r} must be a positive number of steps")
    if every is None:
        return None
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"snapshot_every must be a positive int or None, got {every!r}")
    where = os.environ.get(ENV_DIR)
    if not where:
        return _off("snapshot_every does nothing outside `safepoint run --dir RUN -- ...`: the memory tier "
                    "lives in shared memory owned by the supervisor, which persists it when the trainer dies")
    if distributed:
        return _off("snapshot_every is for single-process runs and is ignored under torch.distributed")
    try:
        owner = json.loads((Path(where) / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return _off(f"{ENV_DIR}={where} is not a safepoint memory tier (no readable {OWNER_FILE}); snapshots are off")
    if Path(owner.get("run_dir", "")).resolve() != run_dir.resolve():
        if from_env:
            return None
        return _off(f"the supervisor's --dir is {owner.get('run_dir')} but this manager writes {run_dir}; "
                    "snapshots are off (give `safepoint run --dir` the manager's directory)")
    return SnapshotWriter(Path(where), every)


def _off(message: str) -> None:
    warnings.warn(f"safepoint: {message}", SafepointWarning, stacklevel=4)
    return None


class SnapshotWriter:
    """Writes snapshots into the two slots of a memory-tier directory, in turn."""

    def __init__(self, directory: Path, every: int) -> None:
        self.directory = directory
        self.every = every
        self.nbytes = 0  # size of the last snapshot
        self._slots = [_Slot(directory / name) for name in _SLOTS]
        seqs = [slot.complete_seq() for slot in self._slots]
        self._seq = max(seqs)  # a restarted trainer continues the numbering
        self._newest = seqs.index(self._seq) if self._seq else 1  # the first write goes to slot 0

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def write(self, step: int, state_doc: Mapping[str, Any], tensor_sets: Mapping[str, Mapping[str, "torch.Tensor"]],
              meta: Mapping[str, Any]) -> int:
        """Copy one encoded state (the same files a checkpoint holds) into the older slot; its size."""
        from .tensors import header_bytes

        plan: list[tuple[str, int, bytes, Mapping[str, torch.Tensor], int]] = []
        offset = _DATA_START
        for entry, tensors in tensor_sets.items():
            if not tensors:
                continue
            head = header_bytes(dict(tensors))
            size = len(head) + sum(t.numel() * t.element_size() for t in tensors.values())
            plan.append((layout.tensor_file_name(entry), offset, head, tensors, size))
            offset = _round_up(offset + size, _ALIGN)
        state_json = dump_json(dict(state_doc))
        plan.append((layout.STATE, offset, state_json, {}, len(state_json)))
        offset = _round_up(offset + len(state_json), _ALIGN)
        seq = self._seq + 1
        description = dump_json({**meta, "seq": seq, "step": step,
                                 "files": [[name, off, size] for name, off, _, _, size in plan]})
        index = 1 - self._newest
        slot = self._slots[index]
        slot.reserve(offset + len(description), step)
        self._seq = seq
        slot.begin()
        for _, off, head, tensors, _ in plan:
            slot.put_bytes(off, head)
            position = off + len(head)
            for t in tensors.values():
                position += slot.put_tensor(position, t)
        faults.reach("during_snapshot")
        slot.put_bytes(offset, description)
        slot.finish(seq, offset, len(description))
        self._newest = index
        self.nbytes = offset + len(description)
        return self.nbytes

    def discard(self) -> None:
        """Mark both slots incomplete: the state they hold is no longer where training goes on."""
        for slot in self._slots:
            slot.invalidate()

    def close(self) -> None:
        for slot in self._slots:
            slot.close()


class _Slot:
    """One preallocated, memory-mapped slot file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._bytes: torch.Tensor | None = None  # a uint8 view of the mapping, for tensor copies

    def complete_seq(self) -> int:
        try:
            with open(self.path, "rb") as f:
                magic, seq, _, _ = _HEADER.unpack(f.read(_HEADER.size))
        except (OSError, struct.error):
            return 0
        return seq if magic == _MAGIC else 0

    def reserve(self, size: int, step: int) -> None:
        """Make the slot at least ``size`` bytes, allocated now (tmpfs pages), or raise."""
        if self._map is not None and len(self._map) >= size:
            return
        capacity = _round_up(size + size // 8, _GRAIN)  # headroom: states grow a little (optimizer warmup)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(self._fd, 0, capacity)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                free = shutil.disk_usage(self.path.parent).free
                raise InsufficientDiskSpace(errno.ENOSPC, (
                    f"no room for the memory snapshot of step {step} in {self.path.parent}: a slot needs "
                    f"{format_size(capacity)}, {format_size(free)} is free there, and the tier keeps two slots. "
                    "Give the machine more shared memory (docker run --shm-size, a Kubernetes emptyDir with "
                    "medium: Memory), point `safepoint run --snapshot-dir` at a larger tmpfs, or snapshot "
                    "less often or not at all (snapshot_every=None)")) from None
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(self._fd, capacity)  # a filesystem without fallocate
        self._unmap()
        self._map = mmap.mmap(self._fd, capacity)
        self._map[:_HEADER.size] = _HEADER.pack(_MAGIC, 0, 0, 0)

    def begin(self) -> None:
        assert self._map is not None
        struct.pack_into("<Q", self._map, 8, 0)  # incomplete from here until finish()

    def put_bytes(self, offset: int, data: bytes) -> None:
        assert self._map is not None
        self._map[offset:offset + len(data)] = data

    def put_tensor(self, offset: int, t: "torch.Tensor") -> int:
        import torch

        nbytes = t.numel() * t.element_size()
        if not nbytes:
            return 0
        if self._bytes is None:
            self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        src = t.detach()
        src = (src if src.is_contiguous() else src.contiguous()).reshape(-1).view(torch.uint8)
        self._bytes[offset:offset + nbytes].copy_(src)  # multi-threaded for large tensors; D2H for GPU ones
        return nbytes

    def finish(self, seq: int, description_offset: int, description_size: int) -> None:
        assert self._map is not None
        struct.pack_into("<QQ", self._map, 16, description_offset, description_size)
        struct.pack_into("<Q", self._map, 8, seq)  # last: the snapshot is complete

    def invalidate(self) -> None:
        if self._map is not None:
            struct.pack_into("<Q", self._map, 8, 0)
        elif self.complete_seq():
            with open(self.path, "r+b") as f:
                f.seek(8)
                f.write(struct.pack("<Q", 0))

    def _unmap(self) -> None:
        self._bytes = None  # releases the mapping's exported buffer
        if self._map is not None:
            self._map.close()
            self._map = None

    def close(self) -> None:
        self._unmap()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------------- reading


@dataclass
class Snapshot:
    """The newest complete snapshot of a tier; ``files`` are views of the mapped slot."""

    seq: int
    step: int
    description: dict[str, Any]
    files: dict[str, memoryview]

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.files.values())


@contextmanager
def newest_snapshot(directory: Path) -> Iterator[Snapshot | None]:
    """The complete snapshot with the highest sequence number in ``directory``, mapped read-only."""
    found: list[tuple[int, mmap.mmap, dict[str, Any]]] = []
    maps: list[mmap.mmap] = []
    views: list[memoryview] = []
    try:
        for name in _SLOTS:
            mapped = _map_complete(directory / name)
            if mapped is not None:
                maps.append(mapped[1])
                found.append(mapped)
        if not found:
            yield None
            return
        seq, mapped, description = max(found, key=lambda f: f[0])
        files = {}
        for name, offset, size in description["files"]:
            view = memoryview(mapped)[offset:offset + size]
            views.append(view)
            files[name] = view
        yield Snapshot(seq, int(description["step"]), description, files)
    finally:
        for view in views:
            view.release()
        for mapped in maps:
            mapped.close()


def _map_complete(path: Path) -> tuple[int, mmap.mmap, dict[str, Any]] | None:
    """Map a slot read-only if it holds a complete, self-consistent snapshot."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _DATA_START:
                return None
            mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    except OSError:
        return None
    try:
        magic, seq, offset, length = _HEADER.unpack_from(mapped, 0)
        if magic != _MAGIC or not seq or offset + length > size:
            raise ValueError("incomplete")
        description = json.loads(mapped[offset:offset + length])
        if description.get("seq") != seq or not isinstance(description.get("step"), int):
            raise ValueError("inconsistent")
        for name, start, size in description["files"]:
            if not _is_checkpoint_file(name) or not (_DATA_START <= start and start + size <= offset):
                raise ValueError(f"bad file entry {name!r}")
    except (ValueError, TypeError, KeyError, struct.error):
        mapped.close()
        return None
    return seq, mapped, description


def _is_checkpoint_file(name: object) -> bool:
    """Only names a checkpoint holds (state.json, ``<entry>.safetensors``): none can leave the
    directory it is written into."""
    if name == layout.STATE:
        return True
    return (isinstance(name, str) and name.endswith(layout.TENSOR_SUFFIX) and "/" not in name
            and "\\" not in name and not name.startswith("."))


# ---------------------------------------------------------------------------------- supervisor side


@dataclass(frozen=True)
class PersistResult:
    """What ``persist_newest`` did: committed ``step``, or left the snapshot at ``snapshot_step`` alone."""

    step: int | None = None
    snapshot_step: int | None = None
    size: int = 0
    seconds: float = 0.0
    reason: str = ""  # why a snapshot newer than every checkpoint was not committed


class MemoryTier:
    """The supervisor's side: the shared-memory directory, committing from it, and its removal."""

    def __init__(self, path: Path, run_dir: Path, lock_fd: int) -> None:
        self.path = path
        self.run_dir = run_dir
        self._lock_fd: int | None = lock_fd

    @classmethod
    def create(cls, run_dir: Path, parent: Path | None = None) -> "MemoryTier":
        """A fresh tier directory under ``parent`` (default ``/dev/shm``), held by a lock while we live."""
        parent = parent if parent is not None else default_parent()
        check_parent(parent)
        remove_stale(parent)
        path = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=parent))
        # Locked before it gets its name, so remove_stale never sees it unlocked.
        fd = os.open(path / (_LOCK + ".new"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(path / (_LOCK + ".new"), path / _LOCK)
        run_dir = Path(run_dir).resolve()
        (path / OWNER_FILE).write_text(json.dumps({"run_dir": str(run_dir), "supervisor_pid": os.getpid()}))
        return cls(path, run_dir, fd)

    def env(self) -> dict[str, str]:
        return {ENV_DIR: str(self.path)}

    def persist_newest(self, *, lock_timeout: float = 10.0) -> PersistResult:
        """Commit the newest complete snapshot into the run directory if it is newer than every
        committed checkpoint. Call when the trainer has exited: the run lock is taken before a slot
        is read, so a process that still holds it (and could still write) is never read from."""
        if not any((self.path / name).exists() for name in _SLOTS):
            return PersistResult()
        lock = RunLock(self.run_dir)
        if not _acquire(lock, lock_timeout):
            return PersistResult(reason=f"{self.run_dir} is locked by another writer")
        try:
            with newest_snapshot(self.path) as snap:
                if snap is None:
                    return PersistResult()
                committed = list_checkpoints(self.run_dir)
                if committed and committed[-1].step >= snap.step:
                    return PersistResult(snapshot_step=snap.step)
                if Path(snap.description.get("run_dir", "")) != self.run_dir:
                    return PersistResult(snapshot_step=snap.step, reason="the snapshot is of another run "
                                                                         f"directory ({snap.description.get('run_dir')})")
                return self._commit(snap)
        finally:
            lock.release()

    def _commit(self, snap: Snapshot) -> PersistResult:
        d = snap.description
        min_free = MinFree(*d.get("min_free", (0, 0.0)))
        space = check_space(self.run_dir, snap.size, max_disk=d.get("max_disk"), min_free=min_free)
        if space.shortfall:
            return PersistResult(snapshot_step=snap.step, reason=f"the disk budget: it {space.describe()}")
        started = time.monotonic()
        tmp = self.run_dir / layout.tmp_dir_name(snap.step)
        final = self.run_dir / layout.step_dir_name(snap.step)
        tmp.mkdir()
        try:
            files = {name: _write_file(tmp / name, view) for name, view in snap.files.items()}
            manifest = Manifest(step=snap.step, run_id=str(d.get("run_id", "")), files=files,
                                hash_algorithm=default_algorithm(), created=str(d.get("created", "")),
                                committed=utc_now(), metrics=dict(d.get("metrics", {})),
                                entries=list(d.get("entries", [])), versions=dict(d.get("versions", {})),
                                extra={"source": SOURCE})
            seal(tmp, final, dump_json(manifest.to_json()))
        except BaseException:
            remove_tree(tmp)
            raise
        return PersistResult(step=snap.step, snapshot_step=snap.step, size=manifest.total_size,
                             seconds=time.monotonic() - started)

    def close(self) -> None:
        """Remove the tier (its shared memory is freed with its files) and drop the lock."""
        remove_tree(self.path)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _write_file(path: Path, data: memoryview) -> FileRecord:
    """One file of the checkpoint, hashed and fsynced; tensor files the way ``write_tensors`` writes them."""
    writer = HashingWriter(path, direct=path.name.endswith(layout.TENSOR_SUFFIX))
    with writer:
        writer.write(data)
    return writer.close()


def default_parent() -> Path:
    """``/dev/shm`` (a tmpfs on Linux); the temp directory where there is none."""
    return DEFAULT_PARENT if DEFAULT_PARENT.is_dir() else Path(tempfile.gettempdir())


def check_parent(parent: Path) -> None:
    if not parent.is_dir():
        raise ValueError(f"--snapshot-dir {parent} is not a directory; give a tmpfs such as /dev/shm")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--snapshot-dir {parent} is not writable by this user")


def remove_stale(parent: Path) -> list[Path]:
    """Remove tier directories left by supervisors that were killed: their lock is free."""
    removed = []
    for path in parent.glob(_PREFIX + "*"):
        try:
            fd = os.open(path / _LOCK, os.O_RDONLY)
        except OSError:
            continue  # being created, or not ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live supervisor holds it
        finally:
            os.close(fd)
        remove_tree(path)
        removed.append(path)
    return removed


def _acquire(lock: RunLock, timeout: float) -> bool:
    """The run lock, waiting a little for processes the dead trainer left behind (its data loader
    workers inherit the lock's descriptor and exit soon after it)."""
    end = time.monotonic() + timeout
    while True:
        try:
            lock.acquire()
            return True
        except DirectoryLocked:
            if time.monotonic() >= end:
                return False
            time.sleep(0.1)


def snapshot_meta(*, run_dir: Path, run_id: str, metrics: Mapping[str, float], entries: list[str],
                  versions: Mapping[str, str], max_disk: int | None, min_free: MinFree) -> dict[str, Any]:
    """The manifest fields and budget a snapshot carries, so the supervisor can commit it alone."""
    return {"run_dir": str(run_dir.resolve()), "run_id": run_id, "created": utc_now(), "metrics": dict(metrics),
            "entries": entries, "versions": dict(versions), "max_disk": max_disk,
            "min_free": [min_free.bytes, min_free.fraction]}
