"""A small storage interface over fsspec: the only code that talks to object storage.

``Storage(url, options)`` roots an fsspec filesystem at a URL (``s3://bucket/prefix``, ``file:///path``,
or any other fsspec protocol) and offers the handful of operations a mirror needs, with keys
relative to that root: ``put_file``, ``put_bytes``, ``get_file``, ``get_bytes``, ``info``,
``exists``, ``size``, ``ls``, ``find``, ``rm``, ``content_hash`` and ``probe``.

Every operation is retried on *transient* errors — connection refused or reset, timeouts, HTTP 5xx,
throttling — with exponential backoff and jitter; anything else (credentials refused, no such bucket,
a missing key) is raised at once. botocore's connection errors are not ``OSError``, and s3fs turns
S3 error codes into ``OSError`` subclasses with the original ``ClientError`` as ``__cause__``, so
``is_transient`` classifies by exception type, by module and type name, by errno, by S3 error code
and HTTP status, following the ``__cause__`` chain. When the retries run out the last error is
raised as ``TransientStorageError`` naming the URL.

S3 credentials and the endpoint come from the standard places (botocore's chain: ``AWS_*``
environment variables, ``~/.aws/credentials`` and ``~/.aws/config``, instance metadata) or from
explicit fsspec storage options. ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` are passed to s3fs
explicitly as well, so they work with botocore versions older than 1.31 that ignore them.

fsspec and s3fs are imported lazily: the core of safepoint needs neither.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import hashing
from .errors import MirrorError, TransientStorageError

log = logging.getLogger("safepoint")
T = TypeVar("T")

_CHUNK = 8 << 20
S3_PROTOCOLS = ("s3", "s3a")
DEFAULT_PART_SIZE = 50 << 20  # s3fs's default multipart chunk size
_MIN_PART_SIZE = 5 << 20  # S3's minimum part size (all parts but the last)

_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.ENETRESET, errno.EAGAIN,
                     errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO)}
# Exception type names that mean "the network or the server hiccuped", from botocore, aiohttp,
# urllib3, requests, http.client and fsspec. Matched on every class of the exception's MRO.
_TRANSIENT_TYPE_NAMES = {
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ConnectionError", "HTTPClientError", "ResponseStreamingError", "IncompleteReadError", "ProxyConnectionError",
    "ClientPayloadError", "ServerDisconnectedError", "ClientConnectorError", "ClientConnectionError",
    "ClientOSError", "ServerTimeoutError", "ConnectionTimeoutError", "SocketTimeoutError",
    "IncompleteRead", "RemoteDisconnected", "ResponseParserError", "FSTimeoutError", "ProtocolError",
    "NewConnectionError", "MaxRetryError", "ReadTimeout", "ConnectTimeout", "Timeout", "TimeoutError",
}
_TRANSIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "http", "fsspec", "s3fs",
                      "socket", "asyncio", "concurrent")
_NEVER_TRANSIENT_NAMES = {"SSLError", "SSLCertVerificationError", "NoCredentialsError", "PartialCredentialsError",
                          "NoRegionError", "ParamValidationError", "InvalidConfigError"}
# S3 (and other AWS) error codes worth retrying.
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "ProvisionedThroughputExceededException", "EC2ThrottledException", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "InternalFailure", "ServiceUnavailable", "ServiceUnavailableException",
    "PriorRequestNotComplete", "OperationAborted", "503", "500", "502", "504", "429",
}


def is_transient(err: BaseException) -> bool:
    """True when ``err`` (or an exception in its ``__cause__``/``__context__`` chain) is worth retrying."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        verdict = _classify_one(current)
        if verdict is not None:
            return verdict
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return False


def _classify_one(err: BaseException) -> bool | None:
    """True/False when this exception alone decides; None to look at its cause."""
    if isinstance(err, TransientStorageError):
        return True
    names = {cls.__name__ for cls in type(err).__mro__}
    if names & _NEVER_TRANSIENT_NAMES:
        return False
    response = getattr(err, "response", None)
    if isinstance(response, Mapping):  # botocore ClientError
        code = str((response.get("Error") or {}).get("Code", ""))
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if code in _TRANSIENT_CODES or (isinstance(status, int) and (status >= 500 or status == 429)):
            return True
        return False
    if isinstance(err, (ConnectionError, TimeoutError, socket.timeout)):
        return True
    if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
        return True
    for cls in type(err).__mro__:
        module = cls.__module__ or ""
        if cls.__name__ in _TRANSIENT_TYPE_NAMES and module.split(".")[0] in _TRANSIENT_MODULES:
            return True
    if isinstance(err, PermissionError | FileNotFoundError | FileExistsError | IsADirectoryError | NotADirectoryError):
        return False
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: the n-th wait is drawn from [cap/2, cap], cap = base * 2**n.

    ``attempts`` counts every try, the first included.
    """

    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 20.0

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be an int >= 1, got {self.attempts!r}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("RetryPolicy delays must be >= 0")

    def delay(self, failed_attempt: int) -> float:
        cap = min(self.max_delay, self.base_delay * (2 ** failed_attempt))
        return cap / 2 + random.uniform(0, cap / 2)


@dataclass(frozen=True)
class RemoteFile:
    """What the store says about one object: its size and, where the store has one, its ETag."""

    size: int
    etag: str | None = None


class Cancelled(TransientStorageError):
    """A retry wait was cut short because the storage was cancelled (a mirror closing)."""


class Storage:
    """An fsspec filesystem rooted at ``url``; keys are POSIX paths relative to the root."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None, *,
                 retry: RetryPolicy | None = None, part_size: int = DEFAULT_PART_SIZE) -> None:
        if not isinstance(url, str) or not url.strip():
            raise ValueError(f"a mirror URL is needed (s3://bucket/prefix, file:///path, ...), got {url!r}")
        if part_size < _MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least 5 MiB (S3's minimum part size), got {part_size}")
        self.url = url.rstrip("/") or url
        self.retry = retry or RetryPolicy()
        self.part_size = part_size
        self._cancel = threading.Event()
        self.fs, self.root = _open_filesystem(self.url, dict(options or {}))
        self.protocol = _first_protocol(self.fs)
        self.is_s3 = self.protocol in S3_PROTOCOLS
        self.is_local = self.protocol in ("file", "local")

    # ------------------------------------------------------------ naming

    def path(self, key: str = "") -> str:
        key = key.strip("/")
        return f"{self.root.rstrip('/')}/{key}" if key else self.root

    def url_of(self, key: str = "") -> str:
        key = key.strip("/")
        return f"{self.url}/{key}" if key else self.url

    @property
    def endpoint(self) -> str:
        """Where requests go, for error messages."""
        if not self.is_s3:
            return self.protocol
        fs: Any = self.fs
        return (getattr(fs, "endpoint_url", None) or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or "the AWS default endpoint")

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    # ------------------------------------------------------------ retry

    def cancel(self) -> None:
        """Make every retry wait (now or later) give up at once with ``Cancelled``."""
        self._cancel.set()

    def call(self, what: str, fn: Callable[[], T], *, retry: RetryPolicy | None = None) -> T:
        """Run ``fn``, retrying transient errors; ``what`` names the operation in the final error."""
        policy = retry or self.retry
        started = time.monotonic()
        last: BaseException | None = None
        for attempt in range(policy.attempts):
            if self._cancel.is_set():
                raise Cancelled(f"{what}: cancelled (the mirror is closing)") from last
            try:
                return fn()
            except Exception as err:
                if not is_transient(err):
                    raise
                last = err
                if attempt + 1 == policy.attempts:
                    break
                pause = policy.delay(attempt)
                log.info("safepoint: %s failed (%s: %s); retry %d/%d in %.2fs", what, type(err).__name__, err,
                         attempt + 1, policy.attempts - 1, pause)
                if self._cancel.wait(pause):
                    raise Cancelled(f"{what}: cancelled (the mirror is closing)") from err
        raise TransientStorageError(
            f"{what}: still failing after {policy.attempts} attempts over {time.monotonic() - started:.1f}s "
            f"({type(last).__name__}: {last}); endpoint {self.endpoint}") from last

    # ------------------------------------------------------------ operations

    def put_file(self, local: str | os.PathLike[str], key: str, *,
                 on_bytes: Callable[[int], None] | None = None) -> None:
        """Upload a local file (s3fs uploads big ones in parts and aborts the upload on failure)."""
        local = str(local)
        size = os.path.getsize(local)

        def attempt() -> None:
            counter = _ByteCounter(on_bytes)
            try:
                if self.is_local:
                    self.fs.makedirs(self.fs._parent(self.path(key)), exist_ok=True)
                    self.fs.put_file(local, self.path(key))
                else:
                    kwargs = {"chunksize": self.chunk_for(size)} if self.is_s3 else {}
                    self.fs.put_file(local, self.path(key), callback=counter.callback(), **kwargs)
            except BaseException:
                counter.rewind()
                raise
            counter.finish(size)

        self.call(f"upload {local} to {self.url_of(key)}", attempt)

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write a small object whole. On a local filesystem, via a temp file and a rename."""
        def attempt() -> None:
            if self.is_local:
                target = self.path(key)
                self.fs.makedirs(self.fs._parent(target), exist_ok=True)
                tmp = f"{target}.tmp-{secrets.token_hex(4)}"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            else:
                self.fs.pipe_file(self.path(key), data)

        self.call(f"write {self.url_of(key)}", attempt)

    def get_file(self, key: str, local: str | os.PathLike[str], *,
                 on_bytes: Callable[[int], None] | None = None) -> None:
        local = str(local)

        def attempt() -> None:
            counter = _ByteCounter(on_bytes)
            try:
                self.fs.get_file(self.path(key), local, callback=counter.callback())
            except BaseException:
                counter.rewind()
                raise
            counter.finish(os.path.getsize(local))

        self.call(f"download {self.url_of(key)}", attempt)

    def get_bytes(self, key: str) -> bytes:
        return self.call(f"read {self.url_of(key)}", lambda: self.fs.cat_file(self.path(key)))

    def get_bytes_or_none(self, key: str) -> bytes | None:
        try:
            return self.get_bytes(key)
        except FileNotFoundError:
            return None

    def info(self, key: str) -> RemoteFile | None:
        """Size and ETag of an object; None if there is no such object."""
        def attempt() -> RemoteFile | None:
            path = self.path(key)
            self.fs.invalidate_cache(path)
            try:
                found = self.fs.info(path)
            except FileNotFoundError:
                return None
            if found.get("type", "file") != "file":
                return None
            etag = found.get("ETag") or found.get("etag")
            return RemoteFile(int(found["size"]), str(etag).strip('"') if etag else None)

        return self.call(f"stat {self.url_of(key)}", attempt)

    def exists(self, key: str) -> bool:
        return self.info(key) is not None

    def size(self, key: str) -> int | None:
        found = self.info(key)
        return None if found is None else found.size

    def ls(self, key: str = "") -> list[str]:
        """Names (not paths) of the objects and "directories" directly under ``key``; [] if none."""
        def attempt() -> list[str]:
            path = self.path(key)
            self.fs.invalidate_cache(path)
            try:
                entries = self.fs.ls(path, detail=False)
            except (FileNotFoundError, NotADirectoryError):
                return []
            base = path.rstrip("/")
            names = []
            for entry in entries:
                entry = str(entry).rstrip("/")
                if entry == base:
                    continue
                names.append(entry.rsplit("/", 1)[-1])
            return sorted(set(names))

        return self.call(f"list {self.url_of(key)}", attempt)

    def find(self, key: str = "") -> dict[str, RemoteFile]:
        """Every object under ``key`` (recursively), by key relative to the root. Empty "directories"
        (some stores keep them after their objects are deleted) are not objects and are left out."""
        def attempt() -> dict[str, RemoteFile]:
            path = self.path(key)
            self.fs.invalidate_cache(path)
            try:
                found = self.fs.find(path, detail=True)
            except FileNotFoundError:
                return {}
            root = self.root.rstrip("/") + "/"
            out = {}
            for name, entry in found.items():
                name = str(name)
                if entry.get("type", "file") != "file" or not name.startswith(root):
                    continue
                etag = entry.get("ETag") or entry.get("etag")
                out[name[len(root):]] = RemoteFile(int(entry.get("size", 0)), str(etag).strip('"') if etag else None)
            return out

        return self.call(f"list {self.url_of(key)}", attempt)

    def rm(self, key: str, *, recursive: bool = False) -> None:
        """Delete an object (or everything under a prefix); a missing one is not an error."""
        def attempt() -> None:
            path = self.path(key)
            try:
                self.fs.rm(path, recursive=recursive)
            except FileNotFoundError:
                pass
            self.fs.invalidate_cache(path)

        self.call(f"delete {self.url_of(key)}", attempt)

    def content_hash(self, key: str, *, like: str | None = None) -> tuple[int, str]:
        """Download an object and return its (size, hash): the full proof of its content.

        The hash uses the algorithm of ``like`` (a manifest record's hash), as ``hashing`` formats it.
        """
        algorithm = hashing.algorithm_of(like) if like is not None else hashing.default_algorithm()

        def attempt() -> tuple[int, str]:
            h = hashing.new_hasher(algorithm)
            size = 0
            with self.fs.open(self.path(key), "rb", block_size=_CHUNK) as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
            return size, hashing.digest_string(algorithm, h)

        return self.call(f"read {self.url_of(key)}", attempt)

    def chunk_for(self, size: int) -> int:
        """The multipart part size for a file of ``size`` bytes: ``part_size``, raised to stay within
        S3's 10,000 parts."""
        return max(self.part_size, -(-size // 10_000))

    def etag_part_size(self, size: int) -> int | None:
        """The part size a file of ``size`` bytes is uploaded with; None for a single-part upload
        (s3fs sends files under two parts in one PUT)."""
        if not self.is_s3:
            return None
        chunk = self.chunk_for(size)
        return None if size < min(5 << 30, 2 * chunk) else chunk

    def abort_multipart_uploads(self, key_prefix: str) -> int:
        """Best effort: abort unfinished multipart uploads under ``key_prefix`` (S3 only)."""
        if not self.is_s3:
            return 0
        fs: Any = self.fs
        bucket, _, prefix = self.path(key_prefix).partition("/")
        aborted = 0
        try:
            listing = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
            for upload in listing.get("Uploads", []) or []:
                fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
        except Exception as err:  # not every S3 server lists uploads; leftovers only cost space
            log.debug("safepoint: could not list/abort multipart uploads under %s: %s", self.url_of(key_prefix), err)
        return aborted

    # ------------------------------------------------------------ start-up check

    def probe(self, *, retry: RetryPolicy | None = None) -> None:
        """Write, read back and delete a tiny object; raise ``MirrorError`` saying what is wrong."""
        key = f".safepoint-probe-{secrets.token_hex(6)}"
        policy = retry or RetryPolicy(attempts=3, base_delay=0.2, max_delay=1.0)
        try:
            if self.is_local:  # a local (or mounted) mirror directory is created, like a run directory
                self.fs.makedirs(self.root, exist_ok=True)
            self.call(f"write {self.url_of(key)}", lambda: self.fs.pipe_file(self.path(key), b"safepoint probe\n"),
                      retry=policy)
            found = self.call(f"stat {self.url_of(key)}", lambda: self.fs.info(self.path(key)), retry=policy)
            if int(found.get("size", -1)) != len(b"safepoint probe\n"):
                raise MirrorError(f"mirror {self.url} answered, but a probe object written there reads back with "
                                  f"{found.get('size')} bytes instead of 16")
            self.call(f"delete {self.url_of(key)}", lambda: self.fs.rm_file(self.path(key)), retry=policy)
        except MirrorError:
            raise
        except Exception as err:
            raise MirrorError(self.explain(err, "cannot write a probe object to")) from err

    def check_readable(self) -> None:
        """List the root (for read-only uses such as pull); raise ``MirrorError`` saying what is wrong."""
        try:
            self.call(f"list {self.url}", lambda: self.fs.ls(self.root, detail=False),
                      retry=RetryPolicy(attempts=3, base_delay=0.2, max_delay=1.0))
        except FileNotFoundError:
            return  # an empty prefix: fine
        except Exception as err:
            raise MirrorError(self.explain(err, "cannot list")) from err

    def explain(self, err: BaseException, doing: str) -> str:
        """A message for a failed start-up check: what failed, where, why, what to do."""
        names = {cls.__name__ for cls in type(err).__mro__}
        cause = f"{type(err).__name__}: {err}"
        where = f"mirror {self.url} (endpoint {self.endpoint})" if self.is_s3 else f"mirror {self.url}"
        if isinstance(err, TransientStorageError) or is_transient(err):
            return (f"{doing} {where}: the store is unreachable ({cause}). Check the URL, the endpoint "
                    "(AWS_ENDPOINT_URL or mirror_options={'endpoint_url': ...}) and the network")
        if "NoCredentialsError" in names or "PartialCredentialsError" in names:
            return (f"{doing} {where}: no credentials found ({cause}). Set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, ~/.aws/credentials), or pass "
                    "mirror_options={'key': ..., 'secret': ...}")
        if isinstance(err, PermissionError):
            return (f"{doing} {where}: access denied — the credentials are wrong or lack write permission "
                    f"({cause}). safepoint uses AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN, "
                    "AWS_PROFILE, ~/.aws/credentials and ~/.aws/config, or mirror_options")
        if isinstance(err, FileNotFoundError):
            bucket = self.root.split("/", 1)[0]
            what = f"the bucket {bucket!r} does not exist" if self.is_s3 else "the location does not exist"
            return f"{doing} {where}: {what} ({cause}). Create it first"
        return f"{doing} {where}: {cause}"


class _ByteCounter:
    """Turns fsspec callbacks into byte deltas for ``on_bytes``; can take back what one failed try reported."""

    def __init__(self, on_bytes: Callable[[int], None] | None) -> None:
        self.on_bytes = on_bytes
        self.reported = 0

    def report(self, delta: int) -> None:
        if self.on_bytes is not None and delta:
            self.reported += delta
            self.on_bytes(delta)

    def callback(self) -> Any:
        from fsspec.callbacks import Callback

        counter = self

        class _Forward(Callback):
            def call(self, *args: Any, **kwargs: Any) -> None:
                value = self.value or 0
                if self.size is not None:
                    value = min(value, self.size)
                counter.report(value - counter.reported)

        return _Forward()

    def finish(self, size: int) -> None:
        self.report(size - self.reported)

    def rewind(self) -> None:
        self.report(-self.reported)


def _first_protocol(fs: Any) -> str:
    protocol = fs.protocol
    return protocol[0] if isinstance(protocol, (tuple, list)) else str(protocol)


def _open_filesystem(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    try:
        import fsspec
        from fsspec.core import url_to_fs
        from fsspec.utils import get_protocol
    except ImportError as err:
        raise MirrorError(f"the mirror {url} needs fsspec (and s3fs for s3://): pip install 'safepoint[s3]'") from err
    protocol = get_protocol(url)
    if protocol in S3_PROTOCOLS:
        _s3_defaults(options)
    try:
        fs, root = url_to_fs(url, **options)
    except ImportError as err:
        if protocol in S3_PROTOCOLS:
            hint = "pip install 'safepoint[s3]' (it installs s3fs)"
        else:
            known = fsspec.registry.known_implementations.get(protocol, {}) if hasattr(fsspec, "registry") else {}
            hint = known.get("err") or f"install the fsspec backend for {protocol}://"
        raise MirrorError(f"the mirror {url} needs a storage backend that is not installed: {hint} ({err})") from err
    except ValueError as err:
        raise MirrorError(f"the mirror URL {url} is not usable: {err}") from err
    return fs, root.rstrip("/") or root


def _s3_defaults(options: dict[str, Any]) -> None:
    """Listings uncached (a mirror reads back what it just wrote), bounded timeouts, few inner retries
    (ours do the backoff), and the endpoint from AWS_ENDPOINT_URL(_S3) whatever botocore's version."""
    options.setdefault("use_listings_cache", False)
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("connect_timeout", 10)
    config.setdefault("read_timeout", 60)
    config.setdefault("retries", {"max_attempts": 3, "mode": "standard"})
    options["config_kwargs"] = config
    client_kwargs = options.get("client_kwargs") or {}
    ignore = os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() in ("1", "true")
    if not options.get("endpoint_url") and not client_kwargs.get("endpoint_url") and not ignore:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint


def file_digest(path: Path | str, part_size: int | None, *, like: str | None = None) -> tuple[int, str, str]:
    """One read of a local file: its (size, content hash like ``like``'s, expected S3 ETag).

    The ETag is the MD5 of the file for a single-part upload, and for a multipart upload with parts
    of ``part_size`` bytes the MD5 of the concatenated part MD5s followed by ``-<parts>``.
    """
    algorithm = hashing.algorithm_of(like) if like is not None else hashing.default_algorithm()
    sha = hashing.new_hasher(algorithm)
    whole = hashlib.md5(usedforsecurity=False)
    part = hashlib.md5(usedforsecurity=False)
    part_digests: list[bytes] = []
    size = in_part = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            want = _CHUNK if part_size is None else min(_CHUNK, part_size - in_part)
            chunk = f.read(want)
            if not chunk:
                break
            sha.update(chunk)
            size += len(chunk)
            if part_size is None:
                whole.update(chunk)
                continue
            part.update(chunk)
            in_part += len(chunk)
            if in_part == part_size:
                part_digests.append(part.digest())
                part = hashlib.md5(usedforsecurity=False)
                in_part = 0
    if part_size is None:
        etag = whole.hexdigest()
    else:
        if in_part:
            part_digests.append(part.digest())
        etag = f"{hashlib.md5(b''.join(part_digests), usedforsecurity=False).hexdigest()}-{len(part_digests)}"
    return size, hashing.digest_string(algorithm, sha), etag
