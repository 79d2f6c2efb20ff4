"""`safepoint push` / `pull` through the real entry point, against a file:// mirror."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from safepoint import CheckpointManager, list_checkpoints, verify

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "safepoint", *args], env=env, capture_output=True, text=True)


def test_push_then_pull_round_trip_is_resumable_and_detects_a_damaged_object(tmp_path):
    run, remote, copy = tmp_path / "run", tmp_path / "remote", tmp_path / "copy"
    state = {"w": {"t": torch.arange(1000.0)}}
    with CheckpointManager(run) as ckpt:
        ckpt.restore(state)
        for step in (1, 2):
            ckpt.save(step, state)
    url = remote.as_uri()
    pushed = cli("push", str(run), url)
    assert pushed.returncode == 0, pushed.stderr
    assert "2 transferred" in pushed.stdout
    assert "0 transferred, 2 already in place" in cli("push", str(run), url).stdout

    pulled = cli("pull", url, str(copy), "--step", "2")
    assert pulled.returncode == 0, pulled.stderr
    assert [c.step for c in list_checkpoints(copy)] == [2]
    verify(copy / "step_00000002")

    damaged = next((remote / "step_00000001").glob("w.safetensors"))
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    failed = cli("pull", url, str(copy))
    assert failed.returncode == 1
    assert "step 1" in failed.stdout and "failed" in failed.stdout
    assert [c.step for c in list_checkpoints(copy)] == [2]  # nothing of the damaged step committed
    assert cli("pull", url, str(copy), "--latest", "--step", "1").returncode == 2
