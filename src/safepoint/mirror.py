"""The object-storage mirror: every committed checkpoint copied off the machine, and back.

The mirror holds the same tree as the run directory (``<url>/step_00001000/model.safetensors``, ...).
Its commit protocol mirrors the local one: a remote checkpoint exists if and only if its
``manifest.json`` is there, and the manifest is uploaded last, after every data file was uploaded
and checked. So a remote listing never shows a half-uploaded checkpoint, whatever fails when.

Uploading one checkpoint (``upload_checkpoint``, used by the background ``Mirror`` and by ``push``):

1. read the local manifest; if the remote manifest is byte-identical and every remote size matches,
   it is already mirrored (nothing is sent). A *different* remote manifest for the step (the step
   was saved again) is deleted first, so the old commit never names new data;
2. each data file, a few at a time: one local read computes its content hash (checked against the
   manifest: a damaged local file is never uploaded) and its S3 ETag; a remote object with the same
   size and ETag is kept (resumable), anything else is uploaded (s3fs uploads big files in parts and
   aborts the multipart upload on failure) and then checked: size, and the ETag where the store
   gives an MD5 one; an ETag that does not match is settled by downloading the object and hashing
   it, so no store is ever wrongly accused and no corruption passes;
3. the manifest, then read back and compared byte for byte: the remote commit;
4. the step is recorded as mirrored in ``run.json`` (only if the local manifest is still the one
   uploaded).

Transient errors are retried with backoff (``storage.RetryPolicy``); a checkpoint whose upload fails
stays unmirrored, is kept locally (retention protects it) and is tried again after the next save and
at ``close``. Remote retention (``mirror_keep``) deletes crash-safely: the remote manifest first, then
the data. ``push``/``pull`` sync committed checkpoints by hand, resumably, with a progress callback.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from . import layout
from .catalog import CheckpointInfo, list_checkpoints, read_run_meta
from .catalog import verify as verify_checkpoint
from .commit import FileRecord, commit_dir, fsync_file, read_hashed, remove_tree, replace_dir
from .errors import CheckpointNotFound, CorruptCheckpoint, MirrorError, SafepointWarning, UnsupportedFormat
from .lock import RunLock
from .manifest import Manifest
from .retention import RetentionPolicy, deletion_order, plan_deletions, with_bases
from .runlog import update_run_meta
from .storage import DEFAULT_PART_SIZE, Cancelled, RemoteFile, RetryPolicy, Storage, file_digest, is_transient

log = logging.getLogger("safepoint")

Verify = Literal["etag", "size", "full"]
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")


# ------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class MirrorConfig:
    """Everything about a mirror. ``CheckpointManager(mirror=...)`` takes a URL or one of these.

    Args:
        url: fsspec URL of the mirror root (``s3://bucket/prefix``, ``file:///path``, ...).
        options: fsspec storage options (for s3fs: ``key``, ``secret``, ``token``, ``endpoint_url``,
            ``profile``, ``client_kwargs``, ...). Without them the standard AWS sources are used.
        keep: remote retention policies (their union is kept, plus the newest, pinned and best remote
            checkpoints); None keeps every remote checkpoint.
        keep_local: once mirrored, keep only the newest ``keep_local`` checkpoints on local disk (plus
            the protected ones): local disk as a cache. None: local retention alone decides.
        close_timeout: seconds ``close()`` waits for uploads in flight; None waits for as long as it
            takes. Checkpoints still unmirrored then are reported (and uploaded on the next start).
        concurrency: files uploaded/downloaded at once.
        retry: backoff for transient errors, per storage operation.
        verify: "etag" (size, plus the MD5 ETag where the store has one), "size", or "full"
            (download every uploaded file again and compare its hash).
        part_size: multipart upload part size in bytes (S3).
        probe: write and delete a tiny object at start-up, so a wrong URL or credentials fail at once.
    """

    url: str
    options: Mapping[str, Any] | None = None
    keep: Sequence[RetentionPolicy] | None = None
    keep_local: int | None = None
    close_timeout: float | None = 600.0
    concurrency: int = 4
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    verify: Verify = "etag"
    part_size: int = DEFAULT_PART_SIZE
    probe: bool = True

    def __post_init__(self) -> None:
        if self.keep_local is not None and (not isinstance(self.keep_local, int) or self.keep_local < 1):
            raise ValueError(f"mirror_keep_local must be a positive int or None, got {self.keep_local!r}")
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ValueError(f"mirror concurrency must be a positive int, got {self.concurrency!r}")
        if self.verify not in ("etag", "size", "full"):
            raise ValueError(f"mirror verify must be 'etag', 'size' or 'full', got {self.verify!r}")
        if self.close_timeout is not None and self.close_timeout < 0:
            raise ValueError(f"mirror close timeout must be >= 0 or None, got {self.close_timeout!r}")
        if self.keep is not None:
            keep = [self.keep] if hasattr(self.keep, "keep") else list(self.keep)
            object.__setattr__(self, "keep", keep)

    @classmethod
    def build(cls, mirror: "str | MirrorConfig", *, options: Mapping[str, Any] | None = None, keep: Any = None,
              keep_local: int | None = None, close_timeout: float | None = 600.0) -> "MirrorConfig":
        """A config from ``CheckpointManager``'s ``mirror*`` arguments."""
        if isinstance(mirror, MirrorConfig):
            if options is not None or keep is not None or keep_local is not None or close_timeout != 600.0:
                raise ValueError("mirror is a MirrorConfig: set options/keep/keep_local/close_timeout on it "
                                 "instead of passing mirror_options/mirror_keep/mirror_keep_local/mirror_timeout")
            return mirror
        if not isinstance(mirror, (str, Path)):
            raise TypeError(f"mirror must be a URL (s3://bucket/prefix, file:///path) or a MirrorConfig, got "
                            f"{type(mirror).__name__}")
        return cls(url=str(mirror), options=options, keep=keep, keep_local=keep_local, close_timeout=close_timeout)


def open_mirror(run_dir: Path, runlog: Any, mirror: "str | MirrorConfig | None", **kwargs: Any) -> "Mirror | None":
    """The manager's mirror (None without one); records its URL in run.json (tools read it there).

    Raises ``MirrorError`` naming the URL when it is unreachable or refuses the credentials.
    """
    config = None if mirror is None else MirrorConfig.build(mirror, **kwargs)
    url = None if config is None else config.url
    if runlog.meta.get("mirror") != url:
        runlog.update_meta(lambda meta: meta.update(mirror=url))
    return None if config is None else Mirror(run_dir, config, runlog)


# ------------------------------------------------------------------------ progress and reports


@dataclass(frozen=True)
class Progress:
    """One progress event of a transfer; callbacks may come from worker threads.

    ``kind``: "plan" (``nbytes`` = total bytes of the transfer, ``name`` = None), "file" (a file
    starts, ``nbytes`` = its size), "bytes" (``nbytes`` more bytes moved; negative when a failed try
    is taken back), "skip" (a file already in place, ``nbytes`` = its size: count it as done),
    "step_done", "step_skipped" (already in place), "step_failed" (``message`` says why).
    """

    kind: str
    step: int | None = None
    name: str | None = None
    nbytes: int = 0
    message: str = ""


ProgressCallback = Callable[[Progress], None]


@dataclass
class UploadResult:
    step: int
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    already: bool = False
    seconds: float = 0.0
    manifest_bytes: bytes = b""


@dataclass
class TransferReport:
    """What a ``push``/``pull`` did: steps transferred, already in place, and failed (step -> why)."""

    done: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        parts = [f"{len(self.done)} transferred", f"{len(self.skipped)} already in place"]
        if self.failed:
            parts.append(f"{len(self.failed)} failed: " + "; ".join(f"step {s}: {m}" for s, m in self.failed.items()))
        return ", ".join(parts)


def _emit(progress: ProgressCallback | None, *args: Any, **kwargs: Any) -> None:
    if progress is not None:
        try:
            progress(Progress(*args, **kwargs))
        except Exception:  # a progress bar must never break a transfer
            log.exception("safepoint: progress callback failed")


# ------------------------------------------------------------------------ remote catalog


@dataclass(frozen=True)
class RemoteCheckpoint:
    """A committed checkpoint on the mirror (its manifest is there and parses)."""

    step: int
    url: str
    manifest: Manifest
    manifest_bytes: bytes

    def info(self, *, pinned: bool = False) -> CheckpointInfo:
        return CheckpointInfo.from_manifest(Path(layout.step_dir_name(self.step)), self.manifest, pinned=pinned,
                                            mirrored=True)


def remote_steps(storage: Storage) -> list[int]:
    """Steps with a ``step_*`` prefix on the mirror, committed or not, oldest first."""
    return sorted(s for s in (layout.parse_step(n) for n in storage.ls()) if s is not None)


def read_remote_manifest(storage: Storage, step: int) -> tuple[Manifest, bytes] | None:
    """The remote manifest of ``step``; None if it has none (never committed, or being deleted).

    Raises ``CorruptCheckpoint``/``UnsupportedFormat`` for a manifest that does not parse.
    """
    key = f"{layout.step_dir_name(step)}/{layout.MANIFEST}"
    data = storage.get_bytes_or_none(key)
    if data is None:
        return None
    where = Path(storage.url_of(key))
    try:
        doc = json.loads(data)
    except ValueError as err:
        raise CorruptCheckpoint(f"mirror object {storage.url_of(key)} is not JSON: {err}") from None
    manifest = Manifest.from_json(doc, where)
    if manifest.step != step:
        raise CorruptCheckpoint(f"mirror object {storage.url_of(key)} says step {manifest.step}")
    _check_names(manifest, storage.url_of(key))
    return manifest, data


def list_remote(storage: Storage, *, on_corrupt: Callable[[int, Exception], None] | None = None
                ) -> list[RemoteCheckpoint]:
    """Committed checkpoints on the mirror, oldest first. Corrupt manifests go to ``on_corrupt``."""
    found = []
    for step in remote_steps(storage):
        try:
            got = read_remote_manifest(storage, step)
        except (CorruptCheckpoint, UnsupportedFormat) as err:
            if on_corrupt is not None:
                on_corrupt(step, err)
            continue
        if got is not None:
            found.append(RemoteCheckpoint(step, storage.url_of(layout.step_dir_name(step)), *got))
    return found


def remote_checkpoints(url: str, options: Mapping[str, Any] | None = None) -> list[RemoteCheckpoint]:
    """Committed checkpoints at a mirror URL, oldest first (for ``safepoint ls`` of a mirror)."""
    storage = Storage(url, options)
    storage.check_readable()
    return list_remote(storage)


def delete_remote_checkpoint(storage: Storage, step: int) -> None:
    """Crash-safe remote delete: the manifest first (the checkpoint is gone from every listing),
    then its data. A crash in between leaves only uncommitted data, which is never listed."""
    name = layout.step_dir_name(step)
    storage.rm(f"{name}/{layout.MANIFEST}")
    storage.rm(name, recursive=True)


def _check_names(manifest: Manifest, where: str) -> None:
    for name in manifest.files:
        if not _SAFE_NAME.match(name) or name == layout.MANIFEST:
            raise CorruptCheckpoint(f"{where} lists a file named {name!r}, which is not a plain file name")


# ------------------------------------------------------------------------ upload


def upload_checkpoint(storage: Storage, run_dir: Path, step: int, *, concurrency: int = 4, verify: Verify = "etag",
                      progress: ProgressCallback | None = None) -> UploadResult:
    """Upload one committed local checkpoint, data first and the manifest last; see the module doc.

    Raises ``CheckpointNotFound`` (no such local checkpoint), ``CorruptCheckpoint`` (a local file does
    not match its manifest: nothing damaged is uploaded), ``TransientStorageError`` (retries ran out)
    or ``MirrorError``/``OSError`` (anything else). A failure never leaves a remote manifest.
    """
    started = time.monotonic()
    name = layout.step_dir_name(step)
    local = run_dir / name
    try:
        manifest_bytes = (local / layout.MANIFEST).read_bytes()
    except FileNotFoundError:
        raise CheckpointNotFound(f"no committed checkpoint for step {step} in {run_dir}") from None
    try:
        manifest = Manifest.from_json(json.loads(manifest_bytes), local / layout.MANIFEST)
    except ValueError as err:
        raise CorruptCheckpoint(f"{local / layout.MANIFEST} cannot be read: {err}") from err
    _check_names(manifest, str(local / layout.MANIFEST))
    result = UploadResult(step, manifest_bytes=manifest_bytes)
    manifest_key = f"{name}/{layout.MANIFEST}"

    remote_manifest = storage.get_bytes_or_none(manifest_key)
    present = storage.find(name)  # one listing: what an earlier (interrupted) upload left
    if remote_manifest == manifest_bytes:
        problems = [n for n, rec in manifest.files.items() if _size_problem(present.get(f"{name}/{n}"), rec)]
        if not problems:
            result.already = True
            result.skipped = list(manifest.files)
            for n, rec in manifest.files.items():
                _emit(progress, "skip", step, n, rec.size)
            result.seconds = time.monotonic() - started
            return result
    if remote_manifest is not None:  # another commit of this step (or a damaged one): un-commit it first
        storage.rm(manifest_key)

    lock = threading.Lock()

    def one(file_name: str, record: FileRecord) -> None:
        path = local / file_name
        key = f"{name}/{file_name}"
        digest = _DIGESTS.submit(file_digest, path, storage.etag_part_size(record.size), like=record.hash)
        found = present.get(key)
        if found is not None and found.size == record.size:  # maybe there from an interrupted upload
            _check_local(path, record, digest.result())
            if _content_ok(storage, key, found, record, digest.result()[2],
                           verify="size" if verify == "size" else "etag", trust_no_etag=False):
                with lock:
                    result.skipped.append(file_name)
                _emit(progress, "skip", step, file_name, record.size)
                return
        # The local hash pass runs beside the upload (both mostly wait on I/O or release the GIL).
        _emit(progress, "file", step, file_name, record.size)
        try:
            storage.put_file(path, key, on_bytes=(lambda n: _emit(progress, "bytes", step, file_name, n)) if progress else None)
            _check_local(path, record, digest.result())
        except CorruptCheckpoint:
            storage.rm(key)  # what went up is not what the manifest promises
            raise
        if not _content_ok(storage, key, storage.info(key), record, digest.result()[2], verify=verify,
                           trust_no_etag=True):
            raise MirrorError(f"{storage.url_of(key)} does not match {path} after the upload (expected {record.size} "
                              f"bytes, hash {record.hash}); the checkpoint is not marked mirrored")
        with lock:
            result.uploaded.append(file_name)
            result.bytes_sent += record.size

    _run_all(one, manifest.files.items(), concurrency)
    storage.put_bytes(manifest_key, manifest_bytes)
    if storage.get_bytes_or_none(manifest_key) != manifest_bytes:
        storage.rm(manifest_key)
        raise MirrorError(f"{storage.url_of(manifest_key)} reads back different from what was uploaded; removed it")
    if any(storage.etag_part_size(rec.size) for rec in manifest.files.values()):
        storage.abort_multipart_uploads(name + "/")  # parts of a failed earlier try, if the server kept any
    result.seconds = time.monotonic() - started
    return result


def _check_local(path: Path, record: FileRecord, digest: tuple[int, str, str]) -> None:
    size, sha, _ = digest
    if size != record.size or sha != record.hash:
        raise CorruptCheckpoint(f"{path} does not match its manifest (size {size} vs {record.size}, hash "
                                f"{sha} vs {record.hash}); the damaged checkpoint is not uploaded")


_DIGESTS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="safepoint-digest")


def _size_problem(found: RemoteFile | None, record: FileRecord) -> bool:
    return found is None or found.size != record.size


def _content_ok(storage: Storage, key: str, found: RemoteFile | None, record: FileRecord, etag: str, *,
                verify: Verify, trust_no_etag: bool) -> bool:
    """Does the remote object hold the file? Size always; then by ``verify``.

    A store without ETags is trusted on size only after our own upload (``trust_no_etag``), never
    to skip an upload, unless ``verify`` is "size". An ETag that does not match ours (another part
    size, server-side encryption, a store whose ETag is no MD5) is settled by downloading.
    """
    if found is None or found.size != record.size:
        return False
    if verify == "size":
        return True
    if verify == "full":
        return storage.content_hash(key, like=record.hash) == (record.size, record.hash)
    if found.etag:
        if found.etag == etag:
            return True
        return storage.content_hash(key, like=record.hash) == (record.size, record.hash)
    if trust_no_etag:
        return True
    if storage.is_local:  # cheap to prove
        return storage.content_hash(key, like=record.hash) == (record.size, record.hash)
    return False


def _run_all(fn: Callable[[str, FileRecord], None], items: Iterable[tuple[str, FileRecord]], concurrency: int) -> None:
    """Run ``fn`` over items a few at a time; on the first failure stop starting new ones and raise it."""
    items = list(items)
    if concurrency <= 1 or len(items) <= 1:
        for item in items:
            fn(*item)
        return
    with ThreadPoolExecutor(max_workers=min(concurrency, len(items)), thread_name_prefix="safepoint-xfer") as pool:
        futures = [pool.submit(fn, *item) for item in items]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        errors = [f.exception() for f in futures if f.done() and f.exception() is not None]
        if errors:
            for f in futures:
                f.cancel()
            wait(futures)
            # A non-transient error says more than a transient one seen beside it.
            errors.sort(key=lambda e: is_transient(e))
            raise errors[0]


# ------------------------------------------------------------------------ download


def download_checkpoint(storage: Storage, step: int, run_dir: Path, *, concurrency: int = 4,
                        progress: ProgressCallback | None = None,
                        remote: tuple[Manifest, bytes] | None = None) -> tuple[Path, Manifest]:
    """Download a committed remote checkpoint into ``run_dir/step_N``, every file verified.

    Files go into ``step_N.tmp-<rand>/`` (an unfinished one for this step is reused: files already
    there with the right size and hash are kept), each checked against the manifest's hash and
    fsynced; the manifest is written last and the directory renamed into place (replacing a local
    copy of the step, which callers use only when that copy is damaged). Raises ``CheckpointNotFound``
    if the step has no remote manifest and ``CorruptCheckpoint`` naming the remote object that fails.
    """
    name = layout.step_dir_name(step)
    if remote is None:
        remote = read_remote_manifest(storage, step)
        if remote is None:
            raise CheckpointNotFound(f"no committed checkpoint for step {step} at {storage.url} (no manifest)")
    manifest, manifest_bytes = remote
    tmp = _reusable_tmp(run_dir, step) or run_dir / layout.tmp_dir_name(step)
    tmp.mkdir(exist_ok=True)
    try:
        def one(file_name: str, record: FileRecord) -> None:
            dest = tmp / file_name
            if dest.exists() and dest.stat().st_size == record.size and read_hashed(dest, like=record.hash).hash == record.hash:
                _emit(progress, "skip", step, file_name, record.size)
                return
            _emit(progress, "file", step, file_name, record.size)
            part = tmp / f".{file_name}.part"
            key = f"{name}/{file_name}"
            storage.get_file(key, part, on_bytes=(lambda n: _emit(progress, "bytes", step, file_name, n)) if progress else None)
            got = read_hashed(part, like=record.hash)
            if got.size != record.size or got.hash != record.hash:
                part.unlink(missing_ok=True)
                raise CorruptCheckpoint(
                    f"mirror object {storage.url_of(key)} fails its check against the remote manifest: expected "
                    f"{record.size} bytes with hash {record.hash}, got {got.size} bytes with hash {got.hash} "
                    "(the object was modified or damaged on the mirror)")
            fsync_file(part)
            part.replace(dest)

        _run_all(one, manifest.files.items(), concurrency)
        for extra in tmp.iterdir():
            if extra.name not in manifest.files:
                remove_tree(extra)
        (tmp / layout.MANIFEST).write_bytes(manifest_bytes)
        fsync_file(tmp / layout.MANIFEST)
        final = run_dir / name
        if final.exists():
            replace_dir(tmp, final)
        else:
            commit_dir(tmp, final)
    except CorruptCheckpoint:
        remove_tree(tmp)
        raise
    return run_dir / name, manifest


def _reusable_tmp(run_dir: Path, step: int) -> Path | None:
    prefix = layout.step_dir_name(step) + ".tmp-"
    try:
        found = sorted(p for p in run_dir.iterdir() if p.name.startswith(prefix) and layout.is_tmp_name(p.name))
    except FileNotFoundError:
        return None
    return found[0] if found else None


# ------------------------------------------------------------------------ run.json bookkeeping


def mirror_state(meta: Mapping[str, Any]) -> tuple[set[int], set[int]]:
    """(mirrored, skipped) steps from run.json: skipped = the mirror will not upload them (its
    retention removed them, or the local copy is damaged), so they are not protected for it."""
    return set(meta.get("mirrored", [])), set(meta.get("mirror_skipped", []))


def unmirrored_steps(run_dir: Path | str, checkpoints: Sequence[CheckpointInfo] | None = None) -> set[int]:
    """Committed local steps that a run with a mirror has not uploaded yet (retention must keep them).

    Empty when the run directory's ``run.json`` names no mirror. For the CLI's ``gc``/``prune``.
    """
    run_dir = Path(run_dir)
    meta = read_run_meta(run_dir)
    if not meta.get("mirror"):
        return set()
    mirrored, skipped = mirror_state(meta)
    infos = list_checkpoints(run_dir) if checkpoints is None else checkpoints
    return {c.step for c in infos if c.step not in mirrored and c.step not in skipped}


def _mark_in_run_json(run_dir: Path, url: str, steps: Iterable[int]) -> None:
    """push/pull: record steps as mirrored in run.json when it names this very mirror."""
    steps = set(steps)

    def change(meta: dict[str, Any]) -> None:
        if meta.get("mirror") == url:
            meta["mirrored"] = sorted(set(meta.get("mirrored", [])) | steps)
            meta["mirror_skipped"] = sorted(set(meta.get("mirror_skipped", [])) - steps)

    if steps:
        update_run_meta(run_dir, change, create=False)


# ------------------------------------------------------------------------ the background mirror


class Mirror:
    """A run's mirror: uploads committed checkpoints in the background; lists, prunes and fetches.

    ``schedule(step)`` after each commit returns at once; one uploader thread works through every
    committed local checkpoint not yet mirrored (newest first), so a failed upload is retried on
    the next pass. It never raises into training: failures are a ``SafepointWarning``, an
    ``upload_failed`` event, and the step staying unmirrored (and so kept locally).
    """

    def __init__(self, run_dir: Path, config: MirrorConfig, runlog: Any) -> None:
        self.run_dir = Path(run_dir)
        self.config = config
        self.url = config.url
        self._log = runlog
        self.storage = Storage(config.url, config.options, retry=config.retry, part_size=config.part_size)
        if config.probe:
            self.storage.probe()
        self.failures: dict[int, str] = {}
        self._queue: queue.Queue[object] = queue.Queue()
        self._cond = threading.Condition()
        self._outstanding = 0
        self._stop = False
        self._closed = False
        # Remote manifests are immutable and this run is the prefix's only writer, so what it has read
        # stays true until it writes there itself: committed checkpoints by step, and steps whose
        # remote "directory" holds nothing (some stores keep empty ones after a delete). Each pass then
        # costs one listing plus what is new, not one request per remote checkpoint.
        self._known: dict[int, RemoteCheckpoint] = {}
        self._empty: set[int] = set()
        self._thread = threading.Thread(target=self._run, name="safepoint-mirror", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ state

    def state(self) -> tuple[set[int], set[int]]:
        return mirror_state(self._log.meta)

    def unmirrored(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        """Steps among ``checkpoints`` the mirror still has to upload (retention must keep them)."""
        mirrored, skipped = self.state()
        return {c.step for c in checkpoints if c.step not in mirrored and c.step not in skipped}

    # ------------------------------------------------------------ scheduling

    def schedule(self, step: int) -> None:
        """A checkpoint for ``step`` was just committed: forget any older mirroring of that step
        (a step saved again is new content), and wake the uploader. Never blocks on the network."""
        mirrored, skipped = self.state()
        if step in mirrored or step in skipped:
            self._log.set_mirrored(step, False)
        self._put(step)

    def kick(self) -> None:
        """Wake the uploader to upload whatever is unmirrored (after a restore, at close)."""
        self._put(None)

    def _put(self, item: object) -> None:
        with self._cond:
            if self._stop:
                return
            self._outstanding += 1
        self._queue.put(item)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every scheduled pass is done; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._outstanding:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float | None = None) -> set[int]:
        """One last pass, waited for up to ``timeout``; then stop. Returns the steps left unmirrored."""
        if self._thread.is_alive():
            self.kick()
            if not self.wait(timeout):
                self.storage.cancel()  # retry waits end at once; an upload in flight is abandoned
                self.wait(1.0)
        with self._cond:
            self._stop = True
            self._closed = True  # an abandoned upload that finishes later records nothing
        self._queue.put(_STOP)
        self._thread.join(1.0)
        return self.unmirrored(list_checkpoints(self.run_dir))

    def finish(self) -> bool:
        """``close`` for the manager: wait up to ``close_timeout``, then warn about (and log) the
        steps left unmirrored. Never raises; True when retention may run once more."""
        try:
            left = self.close(self.config.close_timeout)
        except Exception as err:
            log.warning("safepoint: closing the mirror %s failed: %s", self.url, err)
            return False
        if left:
            why = "; ".join(f"step {s}: {self.failures[s]}" for s in sorted(left) if s in self.failures)
            self._log.event("mirror_incomplete", steps=sorted(left), url=self.url, errors=why or None)
            warnings.warn(f"safepoint: {len(left)} checkpoint(s) not mirrored to {self.url} at close (steps "
                          f"{sorted(left)}{'; ' + why if why else ''}). They stay on local disk and are uploaded "
                          "when a manager with this mirror next opens the directory, or with `safepoint push`",
                          SafepointWarning, stacklevel=3)
        return True

    # ------------------------------------------------------------ the uploader thread

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = _STOP in batch
            work = [b for b in batch if b is not _STOP]
            try:
                if work:
                    self._pass()
            except Exception:  # never let the uploader die
                log.exception("safepoint: the mirror uploader failed unexpectedly")
            finally:
                with self._cond:
                    self._outstanding -= len(work)
                    self._cond.notify_all()
            if stop:
                return

    def _pass(self) -> None:
        local = list_checkpoints(self.run_dir)
        # Newest first, but a delta's base before the delta, so the mirror never holds a delta without it.
        todo = deletion_order(self.unmirrored(local), local)[::-1]
        if todo and self.config.keep:
            todo = self._drop_unwanted(local, todo)
        for step in todo:
            if self._closed or not self._upload(step):
                break  # a transient failure: the store is down; the next pass tries again
        if self.config.keep and not self._closed:
            try:
                self.apply_retention()
            except Exception as err:
                log.warning("safepoint: remote retention on %s failed: %s (will retry after the next upload)",
                            self.url, err)

    def _remote(self) -> list[RemoteCheckpoint]:
        """Committed remote checkpoints, oldest first, read through the caches."""
        found = []
        for step in remote_steps(self.storage):
            if step in self._empty:
                continue
            if step not in self._known:
                try:
                    got = read_remote_manifest(self.storage, step)
                except (CorruptCheckpoint, UnsupportedFormat) as err:
                    log.warning("safepoint: %s has an unreadable manifest for step %d: %s", self.url, step, err)
                    continue
                if got is None:
                    continue
                self._known[step] = RemoteCheckpoint(step, self.storage.url_of(layout.step_dir_name(step)), *got)
            found.append(self._known[step])
        return found

    def _upload(self, step: int) -> bool:
        """Upload one step; False when a transient failure says to stop this pass."""
        self._known.pop(step, None)
        self._empty.discard(step)
        try:
            result = upload_checkpoint(self.storage, self.run_dir, step, concurrency=self.config.concurrency,
                                       verify=self.config.verify)
        except CheckpointNotFound:
            return True  # deleted meanwhile (it was mirrored, or never needed)
        except CorruptCheckpoint as err:
            self._fail(step, err, transient=False)
            self._log.set_mirrored(step, False, skipped=True)  # nothing sound to upload; do not pin it locally
            return True
        except Exception as err:
            transient = is_transient(err)
            if isinstance(err, Cancelled):
                if not self._closed:
                    self._log.event("upload_failed", step=step, error=str(err), transient=True, url=self.url)
                return False
            self._fail(step, err, transient=transient)
            return not transient
        # Mark it only if the local checkpoint is still the one that was uploaded.
        try:
            still = (self.run_dir / layout.step_dir_name(step) / layout.MANIFEST).read_bytes()
        except FileNotFoundError:
            still = None
        if still != result.manifest_bytes or self._closed:
            return True  # saved again (or deleted) meanwhile, or closed: the next pass sees the new state
        self._log.set_mirrored(step, True)
        self.failures.pop(step, None)
        self._log.event("upload", step=step, url=self.storage.url_of(layout.step_dir_name(step)),
                        files=len(result.uploaded), skipped_files=len(result.skipped), bytes=result.bytes_sent,
                        seconds=round(result.seconds, 4), already=result.already)
        log.info("safepoint: mirrored step %d to %s (%d files, %d bytes in %.2fs)", step, self.url,
                 len(result.uploaded), result.bytes_sent, result.seconds)
        return True

    def _fail(self, step: int, err: BaseException, *, transient: bool) -> None:
        self.failures[step] = f"{type(err).__name__}: {err}"
        if self._closed:
            return
        self._log.event("upload_failed", step=step, error=str(err), error_type=type(err).__name__,
                        transient=transient, url=self.url)
        again = ("the local copy is kept and the upload is tried again after the next save and at close"
                 if transient or not isinstance(err, CorruptCheckpoint) else "it will not be mirrored")
        warnings.warn(f"safepoint: upload of step {step} to {self.url} failed: {type(err).__name__}: {err}; {again}",
                      SafepointWarning, stacklevel=2)

    def _drop_unwanted(self, local: list[CheckpointInfo], todo: list[int]) -> list[int]:
        """Skip uploading what remote retention would delete right away (catching up on old steps)."""
        try:
            remote = self._remote()
        except Exception as err:
            log.info("safepoint: could not list %s before uploading (%s); uploading everything", self.url, err)
            return todo
        pins = set(self._log.meta.get("pins", []))
        by_step = {r.step: r.info(pinned=r.step in pins) for r in remote}
        for c in local:
            if c.step in todo:
                by_step[c.step] = replace(c, pinned=c.step in pins)
        drop = {d.step for d in plan_deletions(sorted(by_step.values(), key=lambda c: c.step), self.config.keep or [])}
        keep = []
        for step in todo:
            if step in drop and step not in {r.step for r in remote}:
                self._log.set_mirrored(step, False, skipped=True)
                self._log.event("mirror_skip", step=step, reason="not kept by the mirror's retention")
            else:
                keep.append(step)
        return keep

    def apply_retention(self) -> list[int]:
        """Delete remote checkpoints that no ``keep`` policy keeps (never the newest, pinned or best);
        also remove uncommitted remote leftovers of steps this run is not uploading. Returns deleted steps."""
        if not self.config.keep:
            return []
        pins = set(self._log.meta.get("pins", []))
        remote = self._remote()
        infos = [r.info(pinned=r.step in pins) for r in remote]
        deleted = []
        for d in plan_deletions(infos, self.config.keep):
            self._known.pop(d.step, None)
            delete_remote_checkpoint(self.storage, d.step)
            self._empty.add(d.step)
            self._log.set_mirrored(d.step, False, skipped=True)
            self._log.event("mirror_prune", step=d.step, reason=d.reason, url=self.url)
            log.info("safepoint: deleted step %d from %s (%s)", d.step, self.url, d.reason)
            deleted.append(d.step)
        committed = {r.step for r in remote}
        pending = self.unmirrored(list_checkpoints(self.run_dir))
        for step in remote_steps(self.storage):
            if step in committed or step in pending or step in self._empty or step in deleted:
                continue
            if read_remote_manifest(self.storage, step) is not None:
                continue
            leftovers = self.storage.find(layout.step_dir_name(step))
            if leftovers:  # (an empty "directory" some stores keep is nothing to remove)
                self.storage.rm(layout.step_dir_name(step), recursive=True)
                self._log.event("mirror_gc", step=step, files=sorted(leftovers), reason="uncommitted upload",
                                url=self.url)
            self._empty.add(step)
        return deleted

    # ------------------------------------------------------------ restore

    def restore_candidates(self, local: list[tuple[Path, Any]], *, step: int | None = None
                           ) -> Iterator[tuple[Path, Any]]:
        """Candidates for ``restore``, newest first: each local checkpoint, and right after it (if
        the consumer asks for more, i.e. the local copy failed) the mirror's copy of that step; remote
        steps missing locally in their place by step. Remote ones are downloaded (and verified) only
        when reached. Yields ``(path, Manifest | CorruptCheckpoint)`` like ``catalog.scan``."""
        has_good_local = any(isinstance(m, Manifest) for _, m in local)
        try:
            remote = set(remote_steps(self.storage))
        except Exception as err:
            if not has_good_local:
                raise MirrorError(f"cannot list the mirror {self.url} to look for checkpoints to restore "
                                  f"({type(err).__name__}: {err}); not starting from scratch over a mirror that "
                                  "may hold this run. Fix the mirror, or restore without it") from err
            warnings.warn(f"safepoint: cannot list the mirror {self.url} ({err}); restoring from local "
                          "checkpoints only", SafepointWarning, stacklevel=3)
            yield from local
            return
        if step is not None:
            remote &= {step}
        local_by_step: dict[int, tuple[Path, Any]] = {}
        for path, m in local:
            s = layout.parse_step(path.name)
            if s is not None:
                local_by_step[s] = (path, m)
        for s in sorted(set(local_by_step) | remote, reverse=True):
            if s in local_by_step:
                yield local_by_step[s]
            if s in remote:
                fetched = self._fetch(s)
                if fetched is not None:
                    yield fetched

    def fetch_base(self, step: int) -> None:
        """Download ``step``, the base of a delta being restored, when only the mirror has it.

        Failures are logged and left to the restore, which then refuses the delta and falls back."""
        if not (self.run_dir / layout.step_dir_name(step) / layout.MANIFEST).exists():
            self._fetch(step)

    def _fetch(self, step: int) -> tuple[Path, Any] | None:
        dest = self.run_dir / layout.step_dir_name(step)
        try:
            got = read_remote_manifest(self.storage, step)
            if got is None:
                return None  # not committed remotely
            path, manifest = download_checkpoint(self.storage, step, self.run_dir, concurrency=self.config.concurrency,
                                                 remote=got)
        except (CorruptCheckpoint, UnsupportedFormat) as err:
            self._log.event("download_failed", step=step, error=str(err), url=self.url)
            return dest, err
        except Exception as err:
            self._log.event("download_failed", step=step, error=str(err), url=self.url)
            return dest, CorruptCheckpoint(f"its mirror copy at {self.storage.url_of(dest.name)} could not be "
                                           f"downloaded ({type(err).__name__}: {err})")
        self._log.set_mirrored(step, True)
        self._log.event("download", step=step, url=self.storage.url_of(dest.name), size=manifest.total_size)
        log.info("safepoint: downloaded step %d from %s", step, self.url)
        return path, manifest


_STOP = object()


# ------------------------------------------------------------------------ push / pull by hand


def push(local_dir: str | Path, url: str, *, steps: Iterable[int] | None = None,
         options: Mapping[str, Any] | None = None, progress: ProgressCallback | None = None,
         concurrency: int = 4, verify: Verify = "etag", retry: RetryPolicy | None = None,
         part_size: int = DEFAULT_PART_SIZE) -> TransferReport:
    """Upload committed checkpoints of ``local_dir`` (all, or ``steps``; a delta with its base) to the mirror at ``url``.

    Resumable: files already on the mirror with the right size and hash are not sent again, and a
    checkpoint whose remote manifest matches is skipped. Each checkpoint is committed remotely by
    its manifest, uploaded last. Per-step failures are collected in the report (``report.ok``);
    an unusable mirror raises ``MirrorError`` before anything is sent. When ``run.json`` names this
    mirror, pushed steps are recorded as mirrored.
    """
    local_dir = Path(local_dir)
    infos = list_checkpoints(local_dir)
    if steps is not None:
        wanted = set(steps)
        missing = wanted - {c.step for c in infos}
        if missing:
            have = ", ".join(str(c.step) for c in infos) or "none"
            raise CheckpointNotFound(f"no committed checkpoint for step(s) {sorted(missing)} in {local_dir} "
                                     f"(committed: {have})")
        wanted = with_bases(wanted, infos)  # a delta is pushed with its base
        infos = [c for c in infos if c.step in wanted]
    storage = Storage(url, options, retry=retry, part_size=part_size)
    storage.probe()
    report = TransferReport()
    _emit(progress, "plan", None, None, sum(c.size for c in infos))
    for c in infos:
        try:
            result = upload_checkpoint(storage, local_dir, c.step, concurrency=concurrency, verify=verify,
                                       progress=progress)
        except Exception as err:
            report.failed[c.step] = f"{type(err).__name__}: {err}"
            _emit(progress, "step_failed", c.step, None, 0, report.failed[c.step])
            continue
        report.bytes += result.bytes_sent
        (report.skipped if result.already else report.done).append(c.step)
        _emit(progress, "step_skipped" if result.already else "step_done", c.step)
    _mark_in_run_json(local_dir, url, report.done + report.skipped)
    return report


def pull(url: str, local_dir: str | Path, *, steps: Iterable[int] | None = None, latest: bool = False,
         options: Mapping[str, Any] | None = None, progress: ProgressCallback | None = None,
         concurrency: int = 4, retry: RetryPolicy | None = None) -> TransferReport:
    """Download committed checkpoints from the mirror at ``url`` into ``local_dir``.

    All of them, ``steps``, or only the newest (``latest=True``); a delta comes with its base. Every file is verified against
    the remote manifest's hashes before the checkpoint is committed locally (tmp dir, then rename);
    a remote object that fails is reported (``report.failed``) and nothing of that step is
    committed. Resumable: local checkpoints identical to the remote ones are skipped (after
    verifying them), and files of an interrupted pull are reused when their hash matches. Takes the
    run directory's lock, so it refuses to write into a directory a live run is using.
    """
    local_dir = Path(local_dir)
    storage = Storage(url, options, retry=retry)
    storage.check_readable()
    report = TransferReport()

    def corrupt(step: int, err: Exception) -> None:
        report.failed[step] = str(err)

    remote = list_remote(storage, on_corrupt=corrupt)
    if steps is not None:
        wanted = set(steps)
        missing = wanted - {r.step for r in remote} - set(report.failed)
        if missing:
            have = ", ".join(str(r.step) for r in remote) or "none"
            raise CheckpointNotFound(f"no committed checkpoint for step(s) {sorted(missing)} at {url} "
                                     f"(committed there: {have})")
        wanted = with_bases(wanted, [r.info() for r in remote])  # a delta is pulled with its base
        remote = [r for r in remote if r.step in wanted]
        report.failed = {s: m for s, m in report.failed.items() if s in wanted}
    elif latest:
        wanted = with_bases({remote[-1].step}, [r.info() for r in remote]) if remote else set()
        remote = [r for r in remote if r.step in wanted]
        report.failed = {}
    local_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(local_dir)
    lock.acquire()
    try:
        _emit(progress, "plan", None, None, sum(r.manifest.total_size for r in remote))
        for r in remote:
            final = local_dir / layout.step_dir_name(r.step)
            try:
                if _local_copy_matches(final, r):
                    report.skipped.append(r.step)
                    for n, rec in r.manifest.files.items():
                        _emit(progress, "skip", r.step, n, rec.size)
                    _emit(progress, "step_skipped", r.step)
                    continue
                if _valid_local(final):
                    raise MirrorError(f"{final} is a valid checkpoint that differs from the mirror's step {r.step} "
                                      "(saved again after it was mirrored?); not overwriting it. Move it away to "
                                      "pull the mirror's copy")
                download_checkpoint(storage, r.step, local_dir, concurrency=concurrency, progress=progress,
                                    remote=(r.manifest, r.manifest_bytes))
            except Exception as err:
                report.failed[r.step] = f"{type(err).__name__}: {err}"
                _emit(progress, "step_failed", r.step, None, 0, report.failed[r.step])
                continue
            report.done.append(r.step)
            report.bytes += r.manifest.total_size
            _emit(progress, "step_done", r.step)
        _mark_in_run_json(local_dir, url, report.done + report.skipped)
    finally:
        lock.release()
    for step, why in report.failed.items():
        warnings.warn(f"safepoint: pull of step {step} from {url} failed: {why}", SafepointWarning, stacklevel=2)
    return report


def _valid_local(final: Path) -> bool:
    if not final.exists():
        return False
    try:
        verify_checkpoint(final)
    except (CorruptCheckpoint, UnsupportedFormat):
        return False
    return True


def _local_copy_matches(final: Path, remote: RemoteCheckpoint) -> bool:
    try:
        if (final / layout.MANIFEST).read_bytes() != remote.manifest_bytes:
            return False
    except (FileNotFoundError, NotADirectoryError):
        return False
    for name, rec in remote.manifest.files.items():
        path = final / name
        try:
            if path.stat().st_size != rec.size or read_hashed(path, like=rec.hash).hash != rec.hash:
                return False
        except FileNotFoundError:
            return False
    return True
