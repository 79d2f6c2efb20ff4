"""The disk budget, the pre-save space check, and a real ENOSPC on a real small filesystem."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from safepoint import (CheckpointManager, InsufficientDiskSpace, KeepBest, KeepLast, SafepointWarning,
                       list_checkpoints, verify)
from safepoint.disk import MinFree, parse_size

MB = 1_000_000


@pytest.mark.parametrize("text, expected", [
    (1234, 1234), ("1234", 1234), ("50GB", 50 * 10**9), ("1.5GiB", int(1.5 * 2**30)), ("200 mb", 200 * MB),
    ("3K", 3000), ("2TiB", 2 * 2**40), (0, 0),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GB", "12XB", "-5", "1.2.3GB", -1, True])
def test_parse_size_rejects_garbage_with_a_hint(bad):
    with pytest.raises(ValueError, match="size|>= 0"):
        parse_size(bad)


def test_min_free_percentage_and_bytes():
    assert MinFree.parse("10%").resolve(1000) == 100
    assert MinFree.parse("1MB").resolve(10**12) == MB
    with pytest.raises(ValueError):
        MinFree.parse("120%")


def blob(n_bytes: int) -> dict:
    """A state whose checkpoint is about ``n_bytes`` (one float32 tensor)."""
    return {"w": {"t": torch.zeros(n_bytes // 4)}}


def steps(path: Path) -> list[int]:
    return [c.step for c in list_checkpoints(path)]


def test_budget_deletes_oldest_unprotected_first_and_logs_why(tmp_path):
    state = blob(2 * MB)
    with CheckpointManager(tmp_path, max_disk="7MB", keep=[KeepLast(100)]) as ckpt:
        ckpt.restore(state)
        for s in (1, 2, 3):
            ckpt.save(s, state)
        ckpt.pin(1)
        ckpt.save(4, state)  # 4 x 2 MB > 7 MB: the oldest unpinned one (2) goes
        assert steps(tmp_path) == [1, 3, 4]
    events = (tmp_path / "events.jsonl").read_text()
    assert '"prune"' in events and "disk budget" in events


def test_budget_never_deletes_best_newest_or_resumed_from(tmp_path):
    state = blob(2 * MB)
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.restore(state)
        for s, loss in [(1, 5.0), (2, 1.0), (3, 4.0)]:
            ckpt.save(s, state, metrics={"loss": loss})
    with CheckpointManager(tmp_path, max_disk="7MB", keep=[KeepBest(1, "loss")]) as ckpt:
        assert ckpt.restore(state, step=1) == 1
        with pytest.raises(InsufficientDiskSpace) as err:
            ckpt.save(4, state)  # 1 = resumed-from, 2 = best, 3 = newest: nothing may go
        assert err.value.errno == errno.ENOSPC
        assert "max_disk" in str(err.value) and "Nothing was written" in str(err.value)
    assert steps(tmp_path) == [1, 2, 3]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_save_that_cannot_fit_writes_nothing_and_warn_mode_keeps_training(tmp_path):
    state = blob(3 * MB)
    with CheckpointManager(tmp_path, max_disk="2MB", every_steps=1, on_save_error="warn") as ckpt:
        ckpt.restore(state)
        with pytest.warns(SafepointWarning, match="training continues"):
            assert ckpt.step(1, state) is False
        assert list(tmp_path.glob("step_*")) == []
        with pytest.raises(InsufficientDiskSpace):
            ckpt.save(2, state)  # an explicit save always raises


@pytest.fixture
def small_fs():
    """A real 24 MB tmpfs, mounted for the test (needs root and mount permission)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = Path(f"/tmp/safepoint-tmpfs-{uuid.uuid4().hex[:8]}")
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24M", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"mount -t tmpfs not permitted here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()


def test_free_space_precheck_on_a_real_small_filesystem(small_fs):
    run = small_fs / "run"
    state = blob(9 * MB)
    with CheckpointManager(run, keep=[KeepLast(100)], disk_warn_at=1.01) as ckpt:
        ckpt.restore(state)
        ckpt.save(1, state)
        ckpt.save(2, state)
        ckpt.save(3, state)  # only ~7 MB free: step 1 is deleted first to make room
        assert steps(run) == [2, 3]
        ckpt.pin(2)
        with pytest.raises(InsufficientDiskSpace, match="filesystem has"):
            ckpt.save(4, state)  # 2 is pinned, 3 is newest: no room, and nothing written
    assert steps(run) == [2, 3]
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]
    for c in list_checkpoints(run):
        verify(c.path)


def test_real_enospc_mid_write_cleans_up_and_later_save_succeeds(small_fs):
    run = small_fs / "run"
    filler = small_fs / "filler"
    state = blob(6 * MB)
    with CheckpointManager(run, disk_warn_at=1.01) as ckpt:
        ckpt.restore(state)
        ckpt.save(1, state)
        real_write = ckpt._write

        def write_after_someone_filled_the_disk(*args, **kwargs):
            # Another process takes the space between the pre-check and the write.
            free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
            with open(filler, "wb") as f:
                f.write(b"\0" * (free - 2 * MB))
            return real_write(*args, **kwargs)

        ckpt._write = write_after_someone_filled_the_disk
        with pytest.raises(OSError) as err:
            ckpt.save(2, state)
        assert err.value.errno == errno.ENOSPC
        assert "No space left" in str(err.value) and "w.safetensors" in str(err.value)
        assert steps(run) == [1]
        assert not [p for p in run.iterdir() if ".tmp-" in p.name]
        verify(run / "step_00000001")

        filler.unlink()
        ckpt._write = real_write
        ckpt.save(2, state)
    assert steps(run) == [1, 2]
    verify(run / "step_00000002")


def test_warns_when_the_filesystem_is_nearly_full(small_fs):
    state = blob(10 * MB)
    with CheckpointManager(small_fs / "run", disk_warn_at=0.3) as ckpt:
        ckpt.restore(state)
        with pytest.warns(SafepointWarning, match="full"):
            ckpt.save(1, state)


def test_kill_during_prune_leaves_no_half_deleted_checkpoint(tmp_path):
    script = textwrap.dedent(f"""
        import torch
        from safepoint import CheckpointManager, KeepLast
        state = {{"w": {{"t": torch.arange(100_000.0)}}}}
        with CheckpointManager({str(tmp_path)!r}, keep=[KeepLast(1)]) as ckpt:
            ckpt.restore(state)
            for s in (1, 2, 3):
                ckpt.save(s, state)
    """)
    env = {**os.environ, "SAFEPOINT_FAULT": "during_delete:kill", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    # Killed after step 1 was moved into .trash/ but before its bytes were removed.
    assert steps(tmp_path) == [2]
    verify(tmp_path / "step_00000002")
    assert any((tmp_path / ".trash").iterdir())
    with CheckpointManager(tmp_path) as ckpt:
        assert not any((tmp_path / ".trash").iterdir())
        assert [c.step for c in ckpt.list()] == [2]
