"""The disk budget with a real Trainer on a real, small filesystem (a tmpfs mounted for the test).

Also: async saves when the RAM staging area is too small (a tiny tmpfs) go through the output disk.

The pre-save check runs before the Trainer writes a byte: it deletes old unprotected checkpoints
to make room, or refuses with ``InsufficientDiskSpace``; never a full disk mid-save. Both for
synchronous and for async saves.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the hf extra (transformers, accelerate) is not installed")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from test_hf_async import SeeOnSave, assert_no_staging_left, build, train  # noqa: E402

from safepoint import InsufficientDiskSpace, verify  # noqa: E402
from safepoint.disk import tree_size  # noqa: E402
from safepoint.hf import latest_checkpoint  # noqa: E402
from safepoint.integrations import hf_async  # noqa: E402

MODES = [pytest.param(False, id="sync"), pytest.param(True, id="async")]


@pytest.fixture(scope="module")
def checkpoint_size(tmp_path_factory) -> int:
    """What one checkpoint of the example's run occupies on disk (measured, so the test fits any version)."""
    out = tmp_path_factory.mktemp("measure")
    train(out, steps=4, async_save=False)
    return tree_size(out / "checkpoint-4")


@pytest.fixture
def mount_tmpfs(tmp_path):
    """``mount_tmpfs(nbytes)``: a real tmpfs of that size, unmounted after the test (needs root)."""
    mounted: list[Path] = []

    def mount(nbytes: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={nbytes // 1024}k", "tmpfs", str(mnt)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"mount -t tmpfs not permitted here: {done.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("async_save", MODES)
def test_the_budget_deletes_old_checkpoints_to_make_room_on_a_full_disk(mount_tmpfs, checkpoint_size, async_save):
    disk = mount_tmpfs(int(3.5 * checkpoint_size) + (64 << 10))  # room for three checkpoints
    out = disk / "run"
    train(out, steps=24, async_save=async_save)  # six saves, no retention policy: only the budget deletes

    pruned = [e for e in events(out) if e["event"] == "prune"]
    assert pruned and all(e["reason"].startswith("disk budget: ") for e in pruned)
    assert {e["step"] for e in pruned} >= {4, 8, 12}  # oldest first
    left = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert left[-1] == 24 and 4 not in left
    for step in left:
        verify(out / f"checkpoint-{step}")
    assert latest_checkpoint(out) == str(out / "checkpoint-24")
    assert_no_staging_left(out)


def test_async_saves_stage_on_the_output_disk_when_ram_has_no_room(mount_tmpfs, monkeypatch, tmp_path):
    monkeypatch.setattr(hf_async, "RAM_DIR", mount_tmpfs(64 << 10))  # a real tmpfs, far too small
    out = tmp_path / "run"
    seen = SeeOnSave(out)
    train(out, steps=8, callbacks=(seen,))
    # Staged in output_dir/.safepoint-staging (the tmp directory itself), then committed from there.
    assert seen.seen == {4: {"final": False, "staged": True}, 8: {"final": False, "staged": True}}
    assert seen.where == {4: "disk", 8: "disk"}
    for n in (4, 8):
        verify(out / f"checkpoint-{n}")
    assert_no_staging_left(out)


@pytest.mark.parametrize("async_save", MODES)
def test_the_budget_refuses_before_the_trainer_writes_when_nothing_may_go(mount_tmpfs, checkpoint_size, async_save):
    disk = mount_tmpfs(int(1.6 * checkpoint_size) + (64 << 10))  # one checkpoint fits, not two
    out = disk / "run"
    trainer, callback = build(out, steps=12, async_save=async_save)
    try:
        with pytest.raises(InsufficientDiskSpace, match="not saving checkpoint-8 .* after deleting every unprotected"):
            trainer.train()  # checkpoint-4 is the newest committed one: protected, so nothing can be freed
        assert trainer.state.global_step == 8
    finally:
        callback.on_train_end(trainer.args, trainer.state, trainer.control)  # release the lock and signals
    # Refused before the Trainer wrote anything: no checkpoint-8 anywhere, not even a partial one.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert_no_staging_left(out)
    verify(out / "checkpoint-4")
    assert latest_checkpoint(out) == str(out / "checkpoint-4")
