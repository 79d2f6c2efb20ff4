"""The memory tier: snapshots in shared memory, committed by the supervisor when the trainer dies.

What it promises, each tried here with real processes and real SIGKILLs: a trainer killed between
two disk saves is restarted from its newest memory snapshot, and finishes with weights bitwise
equal to an uninterrupted run; a trainer killed in the middle of a snapshot leaves the previous one
intact and that one is committed, with the exact state of its step; a snapshot is committed only
when it is newer than every checkpoint, while no one holds the run lock, and within the disk
budget; a full tmpfs is a clear error before any copy; a restore discards older snapshots; the
tier's shared memory is removed when the supervisor exits, and stale tiers of killed supervisors
are collected.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TRAIN, train_env
from safepoint import CheckpointManager, InsufficientDiskSpace, SafepointWarning, layout, list_checkpoints, verify
from safepoint.manifest import read_manifest
from safepoint.memtier import ENV_DIR, SOURCE, MemoryTier, default_parent, newest_snapshot, remove_stale

KILLER = ROOT / "examples" / "kill_at_step.py"  # SIGKILLs the script after step KILL_AT, first start only

# A trainer that snapshots every 5 steps and never saves to disk; each step adds 1 to every weight,
# so the weights name their step. After step 10 it asks to be SIGKILLed in the middle of the next
# snapshot: step 15's, which overwrites the slot that held step 5.
TORN = textwrap.dedent("""
    import os, sys, torch
    from safepoint import CheckpointManager
    torch.manual_seed(0)
    model = torch.nn.Linear(128, 128)
    opt = torch.optim.AdamW(model.parameters())
    with CheckpointManager(sys.argv[1], snapshot_every=5) as ckpt:
        ckpt.restore({"model": model, "optimizer": opt})
        for step in range(1, 16):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
            ckpt.step(step, {"model": model, "optimizer": opt})
            if step == 10:
                os.environ["SAFEPOINT_FAULT"] = "during_snapshot:kill"
    print("not killed", flush=True)
""")


def events(run_dir: Path, *kinds: str) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / layout.EVENTS_FILE).read_text().splitlines()]
    return [e for e in lines if not kinds or e["event"] in kinds]


def linear_state(seed: int = 0, size: int = 32) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Linear(size, size)
    return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}


def bump(state: dict) -> None:
    with torch.no_grad():
        for p in state["model"].parameters():
            p.add_(1.0)


@pytest.fixture
def tier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A memory tier for tmp_path/run, in this process's environment as a supervisor would set it."""
    shm = tmp_path / "shm"  # any directory works; the supervised run below uses the real /dev/shm
    shm.mkdir()
    t = MemoryTier.create(tmp_path / "run", shm)
    monkeypatch.setenv(ENV_DIR, str(t.path))
    monkeypatch.delenv("SAFEPOINT_SNAPSHOT_EVERY", raising=False)
    try:
        yield t
    finally:
        t.close()


# ----------------------------------------------------------------------------- real supervised runs


def test_a_trainer_killed_between_disk_saves_resumes_from_its_memory_snapshot(
        tmp_path: Path, reference_weights, same_weights) -> None:
    steps, every, snapshot_every, kill_at = 45, 20, 5, 27
    reference_weights.start(steps)
    run, out, wrapper = tmp_path / "run", tmp_path / "final.safetensors", KILLER
    env = dict(train_env(), KILL_STARTS=str(tmp_path / "starts"), KILL_AT=str(kill_at), KILL_TRAIN=str(TRAIN))
    cmd = [sys.executable, "-m", "safepoint", "run", "--dir", str(run), "--backoff", "0.05s..0.2s",
           "--snapshot-every", str(snapshot_every), "--",  # the default tier: /dev/shm
           sys.executable, str(wrapper), "--dir", str(run), "--steps", str(steps), "--every", str(every),
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)
    context = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-3000:]}"
    assert done.returncode == 0, context
    same_weights(out, reference_weights.path(steps))

    # Killed at step 27: the disk had step 20, memory had step 25; 25 was committed and resumed from.
    (persisted,) = events(run, "snapshot_persisted")
    assert persisted["step"] == 25, context
    assert "committed the memory snapshot of step 25" in done.stderr
    assert [e["signal"] for e in events(run, "child_exit")] == ["SIGKILL", None]
    assert [e["step"] for e in events(run, "restore")] == [0, 25]
    assert [e["resume_step"] for e in events(run, "child_start")] == [None, 25]
    assert read_manifest(run / layout.step_dir_name(25)).extra == {"source": SOURCE}
    verify(run / layout.step_dir_name(25))  # a normal checkpoint: every file hashed in the manifest
    # The shared memory went away with the supervisor.
    (start,) = events(run, "supervisor_start")
    tier_dir = Path(start["memory_tier"])
    assert tier_dir.parent == default_parent() and not tier_dir.exists()


def test_a_kill_in_the_middle_of_a_snapshot_leaves_the_previous_one_whole(tmp_path: Path, tier: MemoryTier) -> None:
    script = tmp_path / "torn.py"
    script.write_text(TORN)
    env = dict(train_env(), **{ENV_DIR: str(tier.path)})
    done = subprocess.run([sys.executable, str(script), str(tier.run_dir)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    headers = {p.name: int.from_bytes(p.read_bytes()[8:16], "little") for p in tier.path.glob("slot-*.bin")}
    assert headers == {"slot-0.bin": 0, "slot-1.bin": 2}, headers  # step 15 was torn; step 10 is whole

    result = tier.persist_newest()
    assert (result.step, result.snapshot_step) == (10, 10)
    state = linear_state(size=128)
    state["optimizer"] = torch.optim.AdamW(state["model"].parameters())
    expected = linear_state(size=128)
    for _ in range(10):
        bump(expected)
    with CheckpointManager(tier.run_dir) as ckpt:
        assert ckpt.restore(state) == 10
    for got, want in zip(state["model"].parameters(), expected["model"].parameters()):
        assert torch.equal(got, want)  # exactly the state of step 10
    assert state["optimizer"].state_dict()["param_groups"][0]["params"] == [0, 1]


# ----------------------------------------------------------------------------- in one process


def test_only_a_snapshot_newer_than_every_checkpoint_is_committed(tier: MemoryTier) -> None:
    state = linear_state()
    with CheckpointManager(tier.run_dir, every_steps=4, snapshot_every=3) as ckpt:
        ckpt.restore(state)
        for step in range(1, 8):
            bump(state)
            ckpt.step(step, state, metrics={"loss": 1.0 / step})
        # Steps 3 and 6 are in memory, 4 on disk. While the trainer lives, its lock keeps us out.
        locked = tier.persist_newest(lock_timeout=0.2)
        assert locked.step is None and "locked" in locked.reason
    result = tier.persist_newest()
    assert result.step == 6
    info = list_checkpoints(tier.run_dir)
    assert [c.step for c in info] == [4, 6] and info[-1].metrics == {"loss": 1 / 6}
    again = tier.persist_newest()  # the snapshot is no longer ahead of the disk
    assert (again.step, again.snapshot_step, again.reason) == (None, 6, "")


def test_a_snapshot_is_not_committed_beyond_the_disk_budget(tier: MemoryTier) -> None:
    state = linear_state(size=128)  # 66 KB of weights
    with CheckpointManager(tier.run_dir, snapshot_every=2, max_disk="20KB") as ckpt:
        ckpt.restore(state)
        ckpt.step(2, state)
    result = tier.persist_newest()
    assert result.step is None and result.snapshot_step == 2
    assert "disk budget" in result.reason and "max_disk" in result.reason
    assert not list(tier.run_dir.glob("step_*"))


def test_a_restore_discards_older_snapshots(tier: MemoryTier) -> None:
    state = linear_state()
    with CheckpointManager(tier.run_dir, snapshot_every=1) as ckpt:
        ckpt.restore(state)
        ckpt.save(1, state)
        ckpt.step(2, state)
        with newest_snapshot(tier.path) as snap:
            assert snap is not None and snap.step == 2
        ckpt.restore(state, step=1)  # back to step 1 (a rollback, or by hand): step 2 must not come back
        with newest_snapshot(tier.path) as snap:
            assert snap is None


def test_the_slots_grow_with_the_state_and_keep_its_bytes(tier: MemoryTier) -> None:
    state = linear_state(size=16)
    extra: dict = {}
    with CheckpointManager(tier.run_dir, snapshot_every=1) as ckpt:
        ckpt.restore(state)
        ckpt.step(1, state)
        small = (tier.path / "slot-0.bin").stat().st_size
        extra["big"] = torch.arange(600_000, dtype=torch.float32)  # 2.4 MB more
        ckpt.step(2, {**state, "extra": extra})
        ckpt.step(3, {**state, "extra": extra})  # into slot 0 again, which must grow
        assert (tier.path / "slot-0.bin").stat().st_size > small
        with newest_snapshot(tier.path) as snap:
            assert snap is not None and snap.step == 3
            saved = snap.files["extra.safetensors"]
            header = int.from_bytes(saved[:8], "little")
            data = torch.frombuffer(bytearray(saved[8 + header:]), dtype=torch.float32)
            assert torch.equal(data, extra["big"])


def test_no_room_in_shared_memory_is_a_clear_error_before_the_copy(tmp_path: Path, monkeypatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    shm = tmp_path / "small-shm"
    shm.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(shm)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here: {mounted.stderr.strip()}")
    try:
        t = MemoryTier.create(tmp_path / "run", shm)
        monkeypatch.setenv(ENV_DIR, str(t.path))
        state = linear_state(size=1024)  # 4 MB of weights: no slot fits
        with CheckpointManager(tmp_path / "run", snapshot_every=1) as ckpt:
            ckpt.restore(state)
            with pytest.raises(InsufficientDiskSpace, match=r"no room for the memory snapshot of step 1 .*--shm-size"):
                ckpt.step(1, state)
        with CheckpointManager(tmp_path / "run", snapshot_every=1, on_save_error="warn") as ckpt:
            ckpt.restore(state)
            with pytest.warns(SafepointWarning, match="memory snapshot of step 1 failed, training continues"):
                ckpt.step(1, state)
        assert events(tmp_path / "run", "snapshot_failed")[-1]["step"] == 1
        t.close()
    finally:
        subprocess.run(["umount", "-l", str(shm)], check=False)


def test_snapshot_every_outside_the_supervisor_warns_and_does_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(ENV_DIR, raising=False)
    with pytest.warns(SafepointWarning, match=r"does nothing outside `safepoint run --dir"):
        ckpt = CheckpointManager(tmp_path / "run", snapshot_every=2)
    with ckpt, warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt.restore(linear_state())
        ckpt.step(2, linear_state())
    with pytest.raises(ValueError, match="snapshot_every must be a positive int"):
        CheckpointManager(tmp_path / "other", snapshot_every=0)


def test_a_tier_of_another_run_directory_is_not_used(tier: MemoryTier, tmp_path: Path) -> None:
    with pytest.warns(SafepointWarning, match="supervisor's --dir is .* but this manager writes"):
        with CheckpointManager(tmp_path / "elsewhere", snapshot_every=1) as ckpt:
            ckpt.restore(linear_state())
            ckpt.step(1, linear_state())
    assert not list(tier.path.glob("slot-*"))


def test_stale_tiers_of_killed_supervisors_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    parent = tmp_path / "shm"
    parent.mkdir()
    live = MemoryTier.create(tmp_path / "a", parent)
    dead = MemoryTier.create(tmp_path / "b", parent)
    fcntl.flock(dead._lock_fd, fcntl.LOCK_UN)  # as if its supervisor had been SIGKILLed
    assert remove_stale(parent) == [dead.path]
    assert live.path.exists() and not dead.path.exists()
    live.close()
    assert not live.path.exists()


def test_supervisor_options_need_a_run_directory() -> None:
    from typer.testing import CliRunner

    from safepoint.cli import app

    result = CliRunner().invoke(app, ["run", "--snapshot-every", "5", "--", "true"])
    assert result.exit_code == 2 and "need --dir RUN_DIR" in result.output, result.output
    result = CliRunner().invoke(app, ["run", "--dir", "x", "--snapshot-dir", "/no/such/dir", "--", "true"])
    assert result.exit_code == 2 and "is not a directory" in result.output, result.output
