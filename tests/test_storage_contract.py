"""One contract for ``safepoint.storage.Storage``, run over the local filesystem (file://) and a real
S3 server (SeaweedFS); plus the transient-error classification and the retry loop."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
from pathlib import Path

import pytest

pytest_plugins = ["s3_server"]

from safepoint.errors import MirrorError, TransientStorageError  # noqa: E402
from safepoint.storage import RetryPolicy, Storage, file_digest, is_transient  # noqa: E402
from conftest import reference_hash  # noqa: E402

FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "file":
        return Storage(f"file://{tmp_path / 'remote'}", retry=FAST)
    request.getfixturevalue("s3_server")
    return Storage(request.getfixturevalue("s3_url"), retry=FAST, part_size=5 << 20)


def random_file(path: Path, size: int, seed: int = 0) -> Path:
    path.write_bytes(os.urandom(size) if seed is None else hashlib.sha256(str(seed).encode()).digest() * (size // 32)
                     + b"x" * (size % 32))
    return path


# --------------------------------------------------------------------------- the contract


def test_put_get_round_trip_and_info(store: Storage, tmp_path: Path) -> None:
    src = random_file(tmp_path / "src.bin", 100_003, seed=1)
    reported: list[int] = []
    store.put_file(src, "a/b/data.bin", on_bytes=reported.append)
    assert sum(reported) == src.stat().st_size
    info = store.info("a/b/data.bin")
    assert info is not None and info.size == src.stat().st_size
    if store.is_s3:  # a single-part upload's ETag is the MD5 of the content
        assert info.etag == hashlib.md5(src.read_bytes()).hexdigest()
    got = tmp_path / "got.bin"
    store.get_file("a/b/data.bin", got)
    assert got.read_bytes() == src.read_bytes()
    assert store.content_hash("a/b/data.bin", like="0") == (src.stat().st_size, hashlib.sha256(src.read_bytes()).hexdigest())


def test_bytes_exists_size_overwrite(store: Storage) -> None:
    assert store.info("x/m.json") is None and not store.exists("x/m.json") and store.size("x/m.json") is None
    assert store.get_bytes_or_none("x/m.json") is None
    with pytest.raises(FileNotFoundError):
        store.get_bytes("x/m.json")
    store.put_bytes("x/m.json", b'{"a": 1}')
    assert store.exists("x/m.json") and store.size("x/m.json") == 8
    store.put_bytes("x/m.json", b"{}")
    assert store.get_bytes("x/m.json") == b"{}"


def test_ls_lists_children_by_name(store: Storage) -> None:
    assert store.ls() == [] or all(not n.startswith("step_") for n in store.ls())
    assert store.ls("nothing/here") == []
    store.put_bytes("step_00000001/manifest.json", b"1")
    store.put_bytes("step_00000001/model.safetensors", b"22")
    store.put_bytes("step_00000002/state.json", b"3")
    store.put_bytes("top.txt", b"4")
    assert {"step_00000001", "step_00000002", "top.txt"} <= set(store.ls())
    assert store.ls("step_00000001") == ["manifest.json", "model.safetensors"]


def test_rm_file_and_prefix_and_missing(store: Storage) -> None:
    store.put_bytes("d/one", b"1")
    store.put_bytes("d/sub/two", b"2")
    store.put_bytes("keep", b"3")
    store.rm("d/one")
    assert not store.exists("d/one") and store.exists("d/sub/two")
    assert set(store.find("d")) == {"d/sub/two"}
    store.rm("d", recursive=True)
    # (SeaweedFS, unlike AWS, may keep an empty "directory": no object is left under it)
    assert not store.exists("d/sub/two") and store.find("d") == {} and store.exists("keep")
    assert set(store.find()) >= {"keep"} and "d/one" not in store.find()
    store.rm("never/was")  # no error
    store.rm("never", recursive=True)


def test_multipart_upload_etag_matches_local_computation(store: Storage, tmp_path: Path) -> None:
    size = 11 * (1 << 20) + 12345  # three parts of 5 MiB on S3
    src = random_file(tmp_path / "big.bin", size, seed=2)
    part = store.etag_part_size(size)
    reported: list[int] = []
    store.put_file(src, "big/blob.bin", on_bytes=reported.append)
    assert sum(reported) == size
    info = store.info("big/blob.bin")
    assert info is not None and info.size == size
    local_size, sha, etag = file_digest(src, part, like="0")  # bare hex: sha256
    assert (local_size, sha) == (size, hashlib.sha256(src.read_bytes()).hexdigest())
    _, b3, _ = file_digest(src, part, like="blake3:")
    assert b3 == reference_hash(src.read_bytes(), "blake3:")
    if store.is_s3:
        assert part == 5 << 20 and etag.endswith("-3")
        assert info.etag == etag, "the multipart ETag computed locally must equal the server's"
    else:
        assert part is None and info.etag is None
    got = tmp_path / "big.out"
    store.get_file("big/blob.bin", got)
    assert got.read_bytes() == src.read_bytes()


def test_probe_writes_and_deletes(store: Storage) -> None:
    store.probe()
    assert not [n for n in store.ls() if n.startswith(".safepoint-probe")]


# --------------------------------------------------------------------------- S3-specific failures


def test_wrong_credentials_fail_probe_naming_url(s3_server, s3_url: str) -> None:
    bad = Storage(s3_url, s3_server.options(secret="wrong-secret"), retry=FAST)
    with pytest.raises(MirrorError) as info:
        bad.probe()
    msg = str(info.value)
    assert s3_url in msg and "access denied" in msg and s3_server.endpoint in msg


def test_missing_bucket_is_explained(s3_server, s3_url: str) -> None:
    # SeaweedFS creates buckets on first write, so the error AWS gives is built here as s3fs raises it.
    from s3fs.errors import translate_boto_error

    store = Storage("s3://no-such-bucket/p", retry=FAST)
    msg = store.explain(translate_boto_error(_client_error("NoSuchBucket", 404)), "cannot write to")
    assert "s3://no-such-bucket/p" in msg and "the bucket 'no-such-bucket' does not exist" in msg


def test_unreachable_endpoint_is_transient_and_named(s3_server, s3_url: str) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = Storage(s3_url, s3_server.options(endpoint_url=f"http://127.0.0.1:{port}",
                                              config_kwargs={"retries": {"max_attempts": 1}}), retry=FAST)
    with pytest.raises(TransientStorageError) as info:
        store.get_bytes("x")
    assert f"127.0.0.1:{port}" in str(info.value) and "3 attempts" in str(info.value)
    assert type(info.value.__cause__).__module__.startswith("botocore")  # not an OSError: classified by type
    with pytest.raises(MirrorError, match="unreachable"):
        store.probe(retry=FAST)


def test_endpoint_comes_from_AWS_ENDPOINT_URL(s3_server, s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Storage(s3_url)  # no options: environment only
    assert store.endpoint == s3_server.endpoint
    store.probe()
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    Storage(s3_url, s3_server.options()).probe()  # explicit storage options alone are enough


def test_missing_s3fs_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import fsspec.registry  # noqa: F401  (makes sure the module is loaded)

    registry = sys.modules["fsspec.registry"]._registry
    monkeypatch.setitem(sys.modules, "s3fs", None)  # import s3fs -> ImportError
    for protocol in ("s3", "s3a"):  # forget the class fsspec already imported
        monkeypatch.delitem(registry, protocol, raising=False)
    with pytest.raises(MirrorError, match=r"safepoint\[s3\]"):
        Storage("s3://bucket/prefix")


# --------------------------------------------------------------------------- classification and retry


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


def test_transient_classification() -> None:
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError
    from s3fs.errors import translate_boto_error

    transient = [
        EndpointConnectionError(endpoint_url="http://x"), ReadTimeoutError(endpoint_url="http://x"),
        ConnectTimeoutError(endpoint_url="http://x"), ConnectionRefusedError(), ConnectionResetError(), TimeoutError(),
        OSError(errno.ECONNREFUSED, "refused"), _client_error("SlowDown", 503), _client_error("InternalError", 500),
        _client_error("Whatever", 502), _client_error("TooManyRequestsException", 429),
        translate_boto_error(_client_error("SlowDown", 503)), translate_boto_error(_client_error("ServiceUnavailable", 503)),
        translate_boto_error(_client_error("Weird", 504)), TransientStorageError("gave up"),
    ]
    permanent = [
        _client_error("AccessDenied", 403), _client_error("NoSuchBucket", 404), _client_error("SignatureDoesNotMatch", 403),
        translate_boto_error(_client_error("AccessDenied", 403)), translate_boto_error(_client_error("NoSuchKey", 404)),
        PermissionError("no"), FileNotFoundError("x"), ValueError("bad"), NoCredentialsError(),
        OSError(errno.ENOSPC, "full"),
    ]
    assert [e for e in transient if not is_transient(e)] == []
    assert [e for e in permanent if is_transient(e)] == []


def test_retry_backs_off_then_succeeds_or_gives_up(tmp_path: Path) -> None:
    store = Storage(f"file://{tmp_path}", retry=RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.02))
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert store.call("op", flaky) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(TransientStorageError, match="still failing after 4 attempts"):
        store.call("op", lambda: calls.append(1) or (_ for _ in ()).throw(TimeoutError("slow")))
    assert len(calls) == 4
    calls.clear()
    with pytest.raises(PermissionError):  # not transient: no retry
        store.call("op", lambda: calls.append(1) or (_ for _ in ()).throw(PermissionError("denied")))
    assert len(calls) == 1
    delays = [RetryPolicy(base_delay=1, max_delay=8).delay(n) for n in range(6)]
    assert all(0.5 * min(8, 2 ** n) <= d <= min(8, 2 ** n) for n, d in enumerate(delays))
