"""Tests for retention: the pure policies over CheckpointInfo lists, and retention in a manager."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from safepoint import CheckpointManager, CheckpointNotFound, KeepLast
from safepoint.catalog import CheckpointInfo
from safepoint.retention import protected_steps, steps_to_delete


def infos(steps: list[int], *, pinned: tuple[int, ...] = ()) -> list[CheckpointInfo]:
    return [CheckpointInfo(step=s, path=Path(f"/run/step_{s:08d}"), created="2026-01-01T00:00:00+00:00",
                           committed="2026-01-01T00:00:00+00:00", size=100, pinned=s in pinned)
            for s in steps]


# --------------------------------------------------------------------------- pure functions

@pytest.mark.parametrize("steps", [[], [1], [1, 2, 3], list(range(0, 1000, 10))])
def test_no_policies_deletes_nothing(steps: list[int]) -> None:
    assert steps_to_delete(infos(steps), []) == []
    assert steps_to_delete(infos(steps), [], resumed_from=None) == []
    assert steps_to_delete(infos(steps), ()) == []


@pytest.mark.parametrize("n, steps, expected", [
    (1, [], []),
    (1, [5], []),
    (1, [1, 2], [1]),
    (1, [1, 2, 3, 4, 5], [1, 2, 3, 4]),
    (2, [1, 2], []),
    (2, [1, 2, 3], [1]),
    (2, [10, 20, 30, 40, 50], [10, 20, 30]),
    (3, [1, 2, 3], []),
    (3, [1, 2, 3, 4, 5, 6], [1, 2, 3]),
    (3, [0, 100, 200, 300], [0]),
    (3, [7, 8], []),
    (5, [1, 2, 3], []),
    # listings may come in any order; the newest by step count, not by position
    (2, [50, 10, 40, 20, 30], [10, 20, 30]),
    (1, [3, 1, 2], [1, 2]),
    # steps are not contiguous and can be large
    (2, [1, 1000, 10 ** 9, 10 ** 12], [1, 1000]),
])
def test_keep_last(n: int, steps: list[int], expected: list[int]) -> None:
    assert steps_to_delete(infos(steps), [KeepLast(n)]) == expected


@pytest.mark.parametrize("n, steps, pinned, expected", [
    (1, [1, 2, 3, 4], (1,), [2, 3]),
    (1, [1, 2, 3, 4], (2, 3), [1]),
    (2, [1, 2, 3, 4, 5], (1, 3), [2]),
    (1, [1, 2], (1, 2), []),
    (1, [1, 2, 3], (3,), [1, 2]),       # pinning the newest changes nothing
])
def test_pinned_are_kept(n: int, steps: list[int], pinned: tuple[int, ...], expected: list[int]) -> None:
    assert steps_to_delete(infos(steps, pinned=pinned), [KeepLast(n)]) == expected


@pytest.mark.parametrize("n, steps, resumed_from, expected", [
    (1, [1, 2, 3, 4], 2, [1, 3]),
    (1, [1, 2, 3, 4], 1, [2, 3]),
    (2, [1, 2, 3, 4, 5], 1, [2, 3]),
    (1, [1, 2, 3], 3, [1, 2]),
    (1, [1, 2, 3], 99, [1, 2]),          # resumed-from no longer on disk: nothing special
    (1, [1, 2, 3], None, [1, 2]),
    (1, [0, 1, 2], 0, [1]),              # step 0 is a real step, not "no resume"
])
def test_resumed_from_is_kept(n: int, steps: list[int], resumed_from: int | None, expected: list[int]) -> None:
    assert steps_to_delete(infos(steps), [KeepLast(n)], resumed_from=resumed_from) == expected


def test_pinned_and_resumed_from_together() -> None:
    assert steps_to_delete(infos([1, 2, 3, 4, 5, 6], pinned=(2,)), [KeepLast(1)], resumed_from=4) == [1, 3, 5]


class KeepNothing:
    """A policy that wants nothing kept: the protected set must still survive."""

    def keep(self, checkpoints):  # noqa: ANN001
        return set()


class KeepOnly:
    def __init__(self, *steps: int) -> None:
        self.steps = set(steps)

    def keep(self, checkpoints):  # noqa: ANN001
        return {c.step for c in checkpoints if c.step in self.steps}


@pytest.mark.parametrize("steps", [[1], [1, 2], [3, 1, 2], [5, 10, 15, 20]])
def test_newest_always_kept(steps: list[int]) -> None:
    deleted = steps_to_delete(infos(steps), [KeepNothing()])
    assert max(steps) not in deleted
    assert sorted(deleted) == sorted(s for s in steps if s != max(steps))
    assert deleted == sorted(deleted)  # oldest first


def test_policies_union() -> None:
    assert steps_to_delete(infos([1, 2, 3, 4, 5]), [KeepLast(1), KeepOnly(2)]) == [1, 3, 4]
    assert steps_to_delete(infos([1, 2, 3, 4, 5]), [KeepOnly(1), KeepOnly(3)]) == [2, 4]


@pytest.mark.parametrize("steps, pinned, resumed_from, expected", [
    ([], (), None, set()),
    ([], (), 3, {3}),
    ([1, 2, 3], (), None, {3}),
    ([3, 1, 2], (), None, {3}),
    ([1, 2, 3], (1,), None, {1, 3}),
    ([1, 2, 3], (1,), 2, {1, 2, 3}),
    ([1, 2, 3], (), 0, {0, 3}),
])
def test_protected_steps(steps: list[int], pinned: tuple[int, ...], resumed_from: int | None,
                         expected: set[int]) -> None:
    assert protected_steps(infos(steps, pinned=pinned), resumed_from=resumed_from) == expected


def test_protected_is_never_deleted_random() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        steps = rng.sample(range(0, 200), rng.randint(0, 12))
        pinned = tuple(s for s in steps if rng.random() < 0.2)
        resumed = rng.choice(steps + [None]) if steps else None
        n = rng.randint(1, 4)
        cks = infos(steps, pinned=pinned)
        deleted = steps_to_delete(cks, [KeepLast(n)], resumed_from=resumed)
        protected = protected_steps(cks, resumed_from=resumed)
        assert not set(deleted) & protected
        assert not set(deleted) & set(sorted(steps)[-n:])
        kept = set(steps) - set(deleted)
        assert kept == (set(sorted(steps)[-n:]) | protected) & set(steps)
        assert len(deleted) == len(set(deleted))


@pytest.mark.parametrize("bad", [0, -1, -5, 1.0, 2.5, "3", None, True, False])
def test_keep_last_rejects_bad_n(bad: object) -> None:
    with pytest.raises(ValueError, match="KeepLast"):
        KeepLast(bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- with a manager

def _state() -> dict:
    return {"model": torch.nn.Linear(2, 2), "meta": {"x": 1}}


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]


def _on_disk(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("step_"))


def test_manager_keep_last_two(tmp_path: Path) -> None:
    run = tmp_path / "run"
    state = _state()
    with CheckpointManager(run, keep=KeepLast(2), signals=()) as mgr:
        for step in range(1, 6):
            mgr.save(step, state)
            # never fewer than min(step, 2): retention runs after the commit
            assert [c.step for c in mgr.list()] == list(range(max(1, step - 1), step + 1))
        assert [c.step for c in mgr.list()] == [4, 5]
    assert _on_disk(run) == ["step_00000004", "step_00000005"]
    trash = run / ".trash"
    assert not trash.exists() or not any(trash.iterdir())
    pruned = sorted(e["step"] for e in _events(run) if e["event"] == "prune")
    assert pruned == [1, 2, 3]


def test_manager_keeps_resumed_from(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run, signals=()) as mgr:
        mgr.save(1, _state())
        mgr.save(2, _state())
    state = _state()
    with CheckpointManager(run, keep=KeepLast(1), signals=()) as mgr:
        assert mgr.restore(state) == 2
        mgr.save(3, state)
        assert [c.step for c in mgr.list()] == [2, 3]
        mgr.save(4, state)
        assert [c.step for c in mgr.list()] == [2, 4]
    assert _on_disk(run) == ["step_00000002", "step_00000004"]
    # a later run that resumes from 4 no longer protects 2
    with CheckpointManager(run, keep=KeepLast(1), signals=()) as mgr:
        assert mgr.restore(state) == 4
        mgr.save(5, state)
        assert [c.step for c in mgr.list()] == [4, 5]


def test_manager_pin(tmp_path: Path) -> None:
    run = tmp_path / "run"
    state = _state()
    with CheckpointManager(run, keep=KeepLast(1), signals=()) as mgr:
        mgr.save(1, state)
        mgr.pin(1)
        assert [c.pinned for c in mgr.list()] == [True]
        for step in (2, 3, 4):
            mgr.save(step, state)
        assert [c.step for c in mgr.list()] == [1, 4]
        assert [c.step for c in mgr.list() if c.pinned] == [1]
        with pytest.raises(CheckpointNotFound, match="step 3"):
            mgr.pin(3)  # deleted by retention
        with pytest.raises(CheckpointNotFound):
            mgr.pin(12345)
        assert [c.step for c in mgr.list() if c.pinned] == [1]
    # the pin is durable: a new manager still keeps step 1
    with CheckpointManager(run, keep=KeepLast(1), signals=()) as mgr:
        mgr.restore(state)
        mgr.save(5, state)
        assert mgr.restore_report.step == 4
        mgr.save(5, state)
        # 1 is pinned, 4 is resumed-from, 5 is newest
        assert [c.step for c in mgr.list()] == [1, 4, 5]
        mgr.unpin(1)
        mgr.save(6, state)
        assert [c.step for c in mgr.list()] == [4, 6]


def test_manager_without_keep_deletes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run, signals=()) as mgr:
        for step in range(1, 6):
            mgr.save(step, _state())
        assert [c.step for c in mgr.list()] == [1, 2, 3, 4, 5]
    assert not [e for e in _events(run) if e["event"] == "prune"]
