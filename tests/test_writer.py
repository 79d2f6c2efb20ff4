"""The durable writer and the hashes: direct I/O buffering, fallbacks, and self-describing records."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
import torch

from safepoint import CheckpointManager, CorruptCheckpoint, commit, hashing
from safepoint.catalog import check_file, verify
from safepoint.commit import HashingWriter, read_hashed
from safepoint.tensors import read_tensors_verified, write_tensors
from conftest import reference_hash

BUF = commit._DIRECT_BUFFER


def _pieces(total: int, seed: int) -> list[bytes]:
    """``total`` random bytes cut at random points (some pieces empty, some larger than a buffer)."""
    rng = random.Random(seed)
    data = rng.randbytes(total)
    cuts = sorted(rng.sample(range(total + 1), k=min(6, total + 1)) + [0, total])
    return [data[a:b] for a, b in zip(cuts, cuts[1:])]


@pytest.mark.parametrize("total", [0, 1, 4095, 4096, 4097, BUF - 1, BUF, BUF + 1, 2 * BUF + 12345])
@pytest.mark.parametrize("direct", [True, False])
def test_bytes_size_and_hash_are_exact(total: int, direct: bool, tmp_path: Path) -> None:
    pieces = _pieces(total, seed=total)
    path = tmp_path / "f.bin"
    writer = HashingWriter(path, direct=direct)
    with writer:
        for piece in pieces:
            writer.write(piece)
    record = writer.close()
    data = b"".join(pieces)
    assert path.read_bytes() == data  # the padding of the last direct block is truncated away
    assert record.size == len(data) == path.stat().st_size
    assert record.hash == reference_hash(data, "blake3:")
    assert read_hashed(path, like=record.hash) == record


def test_direct_io_is_used_where_the_filesystem_has_it(tmp_path: Path) -> None:
    writer = HashingWriter(tmp_path / "f.bin", direct=True)
    try:
        # O_DIRECT works on ext4/xfs/tmpfs (Linux >= 6.6); where it is refused at open, buffers are not taken
        probe = os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0))
        os.close(probe)
        assert writer._bounce is not None
    except OSError:
        assert writer._bounce is None
    finally:
        writer.abort()


def test_fallback_mid_file_when_direct_writes_are_refused(tmp_path: Path) -> None:
    """A filesystem that rejects a direct write (EINVAL) is written through the page cache instead."""
    path = tmp_path / "f.bin"
    data = random.Random(1).randbytes(BUF + 5000)
    writer = HashingWriter(path, direct=True)
    if writer._bounce is None:
        writer.abort()
        pytest.skip("no O_DIRECT here")
    with writer:
        writer.write(data[:BUF])  # one full direct block
        writer._drop_direct()  # what an EINVAL from write() triggers
        writer.write(data[BUF:])
    record = writer.close()
    assert path.read_bytes() == data and record.hash == reference_hash(data, "blake3:")


def test_buffers_are_reused_and_released(tmp_path: Path) -> None:
    for i in range(4):
        write_tensors(tmp_path / f"{i}.safetensors", {"x": torch.randn(1000)})
    assert 1 <= len(commit._BouncePair._free) <= 2


def test_aborted_writer_leaves_buffers_usable(tmp_path: Path) -> None:
    writer = HashingWriter(tmp_path / "a.bin", direct=True)
    writer.write(b"x" * (BUF + 10))
    writer.abort()
    record = write_tensors(tmp_path / "b.safetensors", {"y": torch.arange(10)})
    assert torch.equal(read_tensors_verified(tmp_path / "b.safetensors", record)["y"], torch.arange(10))


def test_sha256_still_written_and_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SAFEPOINT_HASH=sha256 writes bare-hex SHA-256 records (what sha256sum prints), and they verify."""
    monkeypatch.setenv("SAFEPOINT_HASH", "sha256")
    path = tmp_path / "t.safetensors"
    record = write_tensors(path, {"a": torch.randn(300)})
    assert record.hash == hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.delenv("SAFEPOINT_HASH")
    check_file(path, record)  # verified with the record's own algorithm, not today's default
    read_tensors_verified(path, record)


def test_unknown_hash_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEPOINT_HASH", "md5")
    with pytest.raises(ValueError, match="SAFEPOINT_HASH"):
        hashing.default_algorithm()


def test_algorithm_of_records() -> None:
    assert hashing.algorithm_of("blake3:ab12") == "blake3"
    assert hashing.algorithm_of("ab12" * 16) == "sha256"


def test_checkpoints_of_both_algorithms_restore_and_catch_damage(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose older checkpoints are SHA-256 and newer ones BLAKE3 verifies both, and damage to either is caught."""
    model = torch.nn.Linear(8, 8)
    run = tmp_path / "run"
    monkeypatch.setenv("SAFEPOINT_HASH", "sha256")
    with CheckpointManager(run, signals=(), keep=None) as mgr:
        mgr.save(1, {"model": model})
    monkeypatch.delenv("SAFEPOINT_HASH")
    with torch.no_grad():
        model.weight.add_(1)
    with CheckpointManager(run, signals=(), keep=None) as mgr:
        mgr.restore({"model": torch.nn.Linear(8, 8)})
        mgr.save(2, {"model": model})
        infos = {i.step: i for i in mgr.list()}
    hashes = {s: verify(infos[s].path).files["model.safetensors"].hash for s in (1, 2)}  # both verify
    assert not hashes[1].startswith("blake3:") and hashes[2].startswith("blake3:")
    target = infos[2].path / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x10
    target.write_bytes(bytes(data))
    fresh = torch.nn.Linear(8, 8)
    with pytest.warns(Warning, match="skipping checkpoint"):
        with CheckpointManager(run, signals=()) as mgr:
            assert mgr.restore({"model": fresh}) == 1  # the damaged BLAKE3 one is refused
    with pytest.raises(CorruptCheckpoint):
        verify(infos[2].path)
    assert not torch.equal(fresh.weight, model.weight)


def test_helper_threads_run_at_the_writers_priority(tmp_path: Path) -> None:
    """A niced (background) writer's hash and I/O threads are niced too, so they yield to training."""
    import threading

    seen: dict[str, int] = {}

    def background() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 7)
        write_tensors(tmp_path / "bg.safetensors", {"x": torch.randn(100_000)})
        hasher, io = commit._helpers()
        for name, pool in (("hash", hasher), ("io", io)):
            seen[name] = pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()

    thread = threading.Thread(target=background)
    thread.start()
    thread.join()
    assert seen == {"hash": 7, "io": 7}
    assert commit._helpers()[0].submit(
        lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result() == commit._thread_niceness()
