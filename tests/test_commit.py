"""Tests for the commit protocol: fault points, debris collection, the lock, the manifest, scheduling.

In-process and fast. Faults are injected through ``SAFEPOINT_FAULT=<point>`` (raising
``InjectedFault``); the SIGKILL variants live in the crash tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import safepoint
import safepoint.manager as manager_module
from safepoint import CheckpointManager, DirectoryLocked, KeepLast, RunDirectoryError
from safepoint import faults
from safepoint.catalog import verify
from safepoint.faults import InjectedFault
from conftest import reference_hash  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"


def make_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt, "meta": {"seed": seed}}


def weights(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state["model"].state_dict().items()}


def bump(state: dict, value: float) -> None:
    with torch.no_grad():
        for p in state["model"].parameters():
            p.fill_(value)


def open_manager(path: Path, **kw) -> CheckpointManager:
    kw.setdefault("signals", ())
    return CheckpointManager(path, **kw)


def tmp_dirs(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if ".tmp-" in p.name)


def step_dirs(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("step_"))


def trash_items(run: Path) -> list[Path]:
    trash = run / ".trash"
    return sorted(trash.iterdir()) if trash.exists() else []


def restored_weights(run: Path, step: int | None = None) -> tuple[int, dict[str, torch.Tensor]]:
    state = make_state(seed=99)
    with open_manager(run) as mgr:
        got = mgr.restore(state, step=step)
    return got, weights(state)


def assert_weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- fault points

def test_fault_points_are_the_documented_ones() -> None:
    assert faults.POINTS == ("after_data", "before_manifest", "before_rename", "after_rename", "during_delete")


@pytest.mark.parametrize("point", ["after_data", "before_manifest", "before_rename"])
def test_fault_before_commit_keeps_old_set(point: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    state = make_state()
    with open_manager(run) as mgr:
        mgr.save(1, state)
        w1 = weights(state)
        before = sorted(os.listdir(run / "step_00000001"))
        bump(state, 2.0)
        monkeypatch.setenv(faults.ENV, point)
        with pytest.raises(InjectedFault, match=point):
            mgr.save(2, state)
        assert mgr.latest().step == 1
        assert [c.step for c in mgr.list()] == [1]
        assert tmp_dirs(run) == []
        assert step_dirs(run) == ["step_00000001"]
        assert sorted(os.listdir(run / "step_00000001")) == before
        verify(run / "step_00000001")
        # the manager goes on working once the fault is gone
        monkeypatch.delenv(faults.ENV)
        bump(state, 3.0)
        mgr.save(2, state)
        assert [c.step for c in mgr.list()] == [1, 2]
        w2 = weights(state)
    step, got = restored_weights(run, 1)
    assert step == 1
    assert_weights_equal(got, w1)
    step, got = restored_weights(run)
    assert step == 2
    assert_weights_equal(got, w2)


def test_fault_before_commit_first_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    monkeypatch.setenv(faults.ENV, "before_rename")
    with open_manager(run) as mgr:
        with pytest.raises(InjectedFault):
            mgr.save(1, make_state())
        assert mgr.latest() is None and mgr.list() == []
    assert tmp_dirs(run) == [] and step_dirs(run) == []
    monkeypatch.delenv(faults.ENV)
    assert restored_weights(run)[0] == 0


def test_fault_after_rename_is_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    state = make_state()
    with open_manager(run) as mgr:
        mgr.save(1, state)
        bump(state, 2.0)
        monkeypatch.setenv(faults.ENV, "after_rename")
        with pytest.raises(InjectedFault, match="after_rename"):
            mgr.save(2, state)
        assert [c.step for c in mgr.list()] == [1, 2]
        assert mgr.latest().step == 2
        assert tmp_dirs(run) == []
        verify(run / "step_00000002")
    monkeypatch.delenv(faults.ENV)
    step, got = restored_weights(run)
    assert step == 2
    assert_weights_equal(got, weights(state))


def test_fault_during_delete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    state = make_state()
    with open_manager(run, keep=KeepLast(1)) as mgr:
        mgr.save(1, state)
        step1_files = {p.name: p.read_bytes() for p in (run / "step_00000001").iterdir()}
        bump(state, 2.0)
        monkeypatch.setenv(faults.ENV, "during_delete")
        with pytest.raises(InjectedFault, match="during_delete"):
            mgr.save(2, state)
        # committed, and the deleted one is out of every listing at once
        assert [c.step for c in mgr.list()] == [2]
        assert mgr.latest().step == 2
        assert step_dirs(run) == ["step_00000002"]
        assert tmp_dirs(run) == []
        # ... but its bytes are still in .trash/
        items = trash_items(run)
        assert len(items) == 1 and items[0].name.startswith("step_00000001.")
        assert {p.name: p.read_bytes() for p in items[0].iterdir()} == step1_files
    monkeypatch.delenv(faults.ENV)
    with open_manager(run, keep=KeepLast(1)) as mgr:
        assert trash_items(run) == []
        assert [c.step for c in mgr.list()] == [2]
    step, got = restored_weights(run)
    assert step == 2
    assert_weights_equal(got, weights(state))


@pytest.mark.parametrize("point", faults.POINTS)
def test_every_point_is_reached_and_no_tmp_left(point: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    state = make_state()
    with open_manager(run, keep=KeepLast(1)) as mgr:
        mgr.save(1, state)
        monkeypatch.setenv(faults.ENV, point)
        with pytest.raises(InjectedFault):
            mgr.save(2, state)
        assert tmp_dirs(run) == []
        # before the rename: the old set; after_rename: committed, retention not yet run;
        # during_delete: committed and step 1 already out of the listings
        expected = {"after_rename": [1, 2], "during_delete": [2]}.get(point, [1])
        assert [c.step for c in mgr.list()] == expected
        for c in mgr.list():
            verify(c.path)


def test_unknown_fault_name_and_other_points_do_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    monkeypatch.setenv(faults.ENV, "no_such_point")
    with open_manager(run) as mgr:
        mgr.save(1, make_state())
        assert [c.step for c in mgr.list()] == [1]
    # during_delete is not reached when nothing is deleted
    monkeypatch.setenv(faults.ENV, "during_delete")
    with open_manager(run) as mgr:
        mgr.restore(make_state())
        mgr.save(2, make_state())
        assert [c.step for c in mgr.list()] == [1, 2]


# --------------------------------------------------------------------------- debris

def test_hand_made_debris_is_ignored_then_collected(tmp_path: Path) -> None:
    run = tmp_path / "run"
    state = make_state()
    mgr = open_manager(run)
    mgr.save(1, state)
    w1 = weights(state)
    # a leftover tmp dir that even holds a complete, valid-looking checkpoint of a later step
    leftover = run / "step_00000005.tmp-deadbeef"
    leftover.mkdir()
    for p in (run / "step_00000001").iterdir():
        (leftover / p.name).write_bytes(p.read_bytes())
    manifest = json.loads((leftover / "manifest.json").read_text())
    manifest["step"] = 5
    (leftover / "manifest.json").write_text(json.dumps(manifest))
    empty_tmp = run / "step_00000006.tmp-0a1b2c3d"
    empty_tmp.mkdir()
    # trash leftovers of an interrupted delete
    (run / ".trash").mkdir(exist_ok=True)
    trashed = run / ".trash" / "step_00000000.12345678"
    trashed.mkdir()
    (trashed / "model.safetensors").write_bytes(b"x" * 100)
    # things that are not ours are left alone
    (run / "notes.txt").write_text("mine")
    (run / "step_12_old").mkdir()
    (run / "step_00000007.tmp-notours").mkdir()  # not a hex suffix: not a safepoint tmp name

    assert [c.step for c in mgr.list()] == [1]
    assert mgr.latest().step == 1
    mgr.close()
    step, got = restored_weights(run)  # opening a manager collects the debris
    assert step == 1
    assert_weights_equal(got, w1)
    assert not leftover.exists() and not empty_tmp.exists()
    assert trash_items(run) == []
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "step_12_old").is_dir()
    assert (run / "step_00000007.tmp-notours").is_dir()
    verify(run / "step_00000001")
    gc = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert {e["removed"] for e in gc if e["event"] == "gc"} >= {leftover.name, empty_tmp.name}


def test_debris_ignored_by_restore_while_open(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with open_manager(run) as mgr:
        mgr.save(1, make_state())
        (run / "step_00000002.tmp-abcdef01").mkdir()
        (run / "step_00000002.tmp-abcdef01" / "manifest.json").write_text("{}")
        assert mgr.restore(make_state()) == 1
        assert mgr.restore_report.skipped == []


# --------------------------------------------------------------------------- the lock

def test_second_manager_in_same_process_is_locked_out(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = open_manager(run)
    try:
        with pytest.raises(DirectoryLocked) as info:
            open_manager(run)
        msg = str(info.value)
        assert f"pid {os.getpid()}" in msg
        assert str(run) in msg
        # the failed attempt did not release the holder's lock (flock, not fcntl record locks)
        with pytest.raises(DirectoryLocked):
            open_manager(run)
        first.save(1, make_state())
        assert [c.step for c in first.list()] == [1]
    finally:
        first.close()
    with open_manager(run) as again:  # released on close()
        assert [c.step for c in again.list()] == [1]
    first.close()  # closing twice is harmless


def test_directory_locked_is_catchable_as_runtime_error(tmp_path: Path) -> None:
    with open_manager(tmp_path / "run"):
        with pytest.raises(RuntimeError):
            open_manager(tmp_path / "run")
        with pytest.raises(safepoint.SafepointError):
            open_manager(tmp_path / "run")


def test_closed_manager_refuses_work(tmp_path: Path) -> None:
    mgr = open_manager(tmp_path / "run")
    mgr.close()
    with pytest.raises(safepoint.SafepointError, match="closed"):
        mgr.save(1, make_state())
    with pytest.raises(safepoint.SafepointError, match="closed"):
        mgr.restore(make_state())


def test_lock_held_by_another_process(tmp_path: Path) -> None:
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys
        from safepoint import CheckpointManager
        mgr = CheckpointManager({str(run)!r}, signals=())
        print("ready", flush=True)
        sys.stdin.readline()
        mgr.close()
        print("closed", flush=True)
        sys.stdin.readline()
    """)
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop(faults.ENV, None)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(DirectoryLocked) as info:
            open_manager(run)
        assert f"pid {proc.pid}" in str(info.value)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "closed"
        with open_manager(run):  # released by close(), process still alive
            assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_lock_released_when_holder_is_killed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys
        from safepoint import CheckpointManager
        mgr = CheckpointManager({str(run)!r}, signals=())
        print("ready", flush=True)
        sys.stdin.readline()
    """)
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(DirectoryLocked, match=f"pid {proc.pid}"):
            open_manager(run)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with open_manager(run) as mgr:  # a dead holder leaves no stale lock
        mgr.save(1, make_state())


# --------------------------------------------------------------------------- the manifest

def test_manifest_content(tmp_path: Path) -> None:
    run = tmp_path / "run"
    state = make_state()
    with open_manager(run) as mgr:
        mgr.save(1, state, metrics={"loss": 0.5, "acc": torch.tensor(0.25)})
        mgr.save(2, state)
        run_id = mgr.run_id
    assert run_id and run_id == json.loads((run / "run.json").read_text())["run_id"]
    manifests = []
    for step in (1, 2):
        ck = run / f"step_{step:08d}"
        m = json.loads((ck / "manifest.json").read_text())
        manifests.append(m)
        assert m["format"] == "safepoint.checkpoint"
        assert m["format_version"] == 1
        assert m["step"] == step
        assert m["run_id"] == run_id
        assert m["world_size"] == 1
        assert m["hash_algorithm"] == "blake3"
        assert m["versions"]["torch"] == torch.__version__
        assert m["versions"]["safepoint"] == safepoint.__version__
        assert m["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
        assert set(m["entries"]) == {"model", "optimizer", "meta"}
        assert m["created"] <= m["committed"]
        # every file but the manifest is listed, with its true size and hash
        on_disk = {p.name for p in ck.iterdir()}
        assert on_disk == set(m["files"]) | {"manifest.json"}
        assert {"model.safetensors", "optimizer.safetensors", "state.json"} <= set(m["files"])
        for name, rec in m["files"].items():
            data = (ck / name).read_bytes()
            assert rec["size"] == len(data), name
            assert rec["hash"] == reference_hash(data, "blake3:"), name
    assert manifests[0]["metrics"] == {"loss": 0.5, "acc": 0.25}
    assert manifests[1]["metrics"] == {}
    assert manifests[0]["run_id"] == manifests[1]["run_id"]


def test_run_id_stable_across_managers(tmp_path: Path) -> None:
    run = tmp_path / "run"
    state = make_state()
    with open_manager(run) as mgr:
        mgr.save(1, state)
        first = mgr.run_id
    with open_manager(run) as mgr:
        mgr.restore(state)
        mgr.save(2, state)
        assert mgr.run_id == first
        assert [c.run_id for c in mgr.list()] == [first, first]
    with open_manager(tmp_path / "other") as mgr:
        assert mgr.run_id != first


def test_tensor_files_are_plain_safetensors(tmp_path: Path) -> None:
    run = tmp_path / "run"
    state = make_state()
    with open_manager(run) as mgr:
        mgr.save(1, state)
    loaded = load_file(str(run / "step_00000001" / "model.safetensors"))
    assert_weights_equal(loaded, weights(state))
    opt = load_file(str(run / "step_00000001" / "optimizer.safetensors"))
    exp_avgs = sorted((v for k, v in opt.items() if "exp_avg" in k and "sq" not in k), key=lambda t: t.numel())
    expected = sorted((s["exp_avg"] for s in state["optimizer"].state.values()), key=lambda t: t.numel())
    assert len(exp_avgs) == len(expected) == 2
    for a, b in zip(exp_avgs, expected):
        assert torch.equal(a, b)
    # state.json is plain JSON and names no pickles
    doc = json.loads((run / "step_00000001" / "state.json").read_text())
    assert doc["format_version"] == 1 and doc["step"] == 1
    assert doc["entries"]["meta"] == {"seed": 0}


def test_saving_same_step_twice_replaces_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    state = make_state()
    with open_manager(run) as mgr:
        mgr.save(1, state)
        mgr.save(2, state)
        bump(state, 7.0)
        mgr.save(2, state)
        assert [c.step for c in mgr.list()] == [1, 2]
        assert step_dirs(run) == ["step_00000001", "step_00000002"]
        assert tmp_dirs(run) == []
        assert trash_items(run) == []
        verify(run / "step_00000002")
    step, got = restored_weights(run)
    assert step == 2
    assert_weights_equal(got, weights(state))


def test_encoding_failure_writes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    state = make_state()
    with open_manager(run) as mgr:
        mgr.save(1, state)
        w1 = weights(state)
        files = {p.name: p.read_bytes() for p in (run / "step_00000001").iterdir()}
        bump(state, 5.0)
        bad = {**state, "cfg": {"fn": lambda: 0}}
        with pytest.raises(TypeError, match=r"state\['cfg'\]\['fn'\]"):
            mgr.save(2, bad)
        assert tmp_dirs(run) == [] and step_dirs(run) == ["step_00000001"]
        assert [c.step for c in mgr.list()] == [1]
        assert {p.name: p.read_bytes() for p in (run / "step_00000001").iterdir()} == files
        # an entry whose state_dict holds something unsupported
        odd = {"model": _WeirdModule(), "optimizer": state["optimizer"]}
        with pytest.raises(TypeError, match=r"state\['model'\]\['extra'\]\[0\]"):
            mgr.save(2, odd)
        assert tmp_dirs(run) == [] and [c.step for c in mgr.list()] == [1]
    step, got = restored_weights(run)
    assert step == 1
    assert_weights_equal(got, w1)


class _WeirdModule:
    def state_dict(self) -> dict:
        return {"w": torch.ones(2), "extra": [object()]}

    def load_state_dict(self, sd: dict) -> None:
        pass


def test_failure_while_writing_tensors_removes_tmp(tmp_path: Path) -> None:
    """A value refused only by the tensor writer (complex dtype) fails after the tmp dir exists."""
    run = tmp_path / "run"
    state = make_state()
    with open_manager(run) as mgr:
        mgr.save(1, state)
        bad = {**state, "extra": {"z": torch.ones(3, dtype=torch.complex64)}}
        with pytest.raises(TypeError, match="complex"):
            mgr.save(2, bad)
        assert tmp_dirs(run) == []
        assert [c.step for c in mgr.list()] == [1]
        verify(run / "step_00000001")


def test_state_dict_raising_writes_nothing(tmp_path: Path) -> None:
    class Boom:
        def state_dict(self):
            raise RuntimeError("boom")

        def load_state_dict(self, sd):
            pass

    run = tmp_path / "run"
    with open_manager(run) as mgr:
        with pytest.raises(RuntimeError, match="boom"):
            mgr.save(1, {"b": Boom()})
        assert os.listdir(run) and tmp_dirs(run) == [] and step_dirs(run) == []


@pytest.mark.parametrize("step", [-1, 1.5, "3", None])
def test_bad_step_is_refused(step: object, tmp_path: Path) -> None:
    with open_manager(tmp_path / "run") as mgr:
        with pytest.raises(ValueError, match="step"):
            mgr.save(step, make_state())  # type: ignore[arg-type]
        assert step_dirs(tmp_path / "run") == []


# --------------------------------------------------------------------------- scheduling

def test_every_steps(tmp_path: Path) -> None:
    run = tmp_path / "run"
    state = make_state()
    with open_manager(run, every_steps=3) as mgr:
        results = [mgr.step(s, state) for s in range(1, 8)]
        assert results == [False, False, True, False, False, True, False]
        assert [c.step for c in mgr.list()] == [3, 6]
        assert mgr.step(6, state) is False  # already committed
        assert [c.step for c in mgr.list()] == [3, 6]


def test_no_schedule_never_saves(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with open_manager(run) as mgr:
        assert [mgr.step(s, make_state(), metrics={"loss": 1.0}) for s in range(1, 5)] == [False] * 4
        assert mgr.list() == []
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def fake_time(clock: FakeClock) -> types.SimpleNamespace:
    """The ``time`` module as safepoint.manager sees it, with a monotonic clock the test drives."""
    import time

    ns = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    ns.monotonic = clock.monotonic
    return ns


def test_every_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(manager_module, "time", fake_time(clock))
    run = tmp_path / "run"
    state = make_state()
    with open_manager(run, every_seconds=10) as mgr:
        assert mgr.step(1, state) is False
        clock.now += 5
        assert mgr.step(2, state) is False
        clock.now += 5
        assert mgr.step(3, state) is True       # 10 s since the manager started
        assert mgr.step(4, state) is False
        clock.now += 9.9
        assert mgr.step(5, state) is False
        clock.now += 0.2
        assert mgr.step(6, state) is True       # 10.1 s since the last save
        clock.now += 100
        assert mgr.step(6, state) is False      # due, but step 6 is already committed
        assert mgr.step(7, state) is True
        assert [c.step for c in mgr.list()] == [3, 6, 7]


def test_every_seconds_counts_from_explicit_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(manager_module, "time", fake_time(clock))
    state = make_state()
    with open_manager(tmp_path / "run", every_seconds=10) as mgr:
        clock.now += 8
        mgr.save(1, state)
        clock.now += 8
        assert mgr.step(2, state) is False
        clock.now += 2
        assert mgr.step(3, state) is True


def test_every_seconds_real_clock(tmp_path: Path) -> None:
    import time

    state = make_state()
    started = time.monotonic()
    with open_manager(tmp_path / "run", every_seconds=0.3) as mgr:
        first = mgr.step(1, state)
        if time.monotonic() - started < 0.3:  # unless this machine stalled for 0.3 s
            assert first is False
        time.sleep(0.35)
        assert mgr.step(2, state) is True
        assert 2 in [c.step for c in mgr.list()]


def test_every_steps_or_every_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(manager_module, "time", fake_time(clock))
    state = make_state()
    with open_manager(tmp_path / "run", every_steps=100, every_seconds=10) as mgr:
        assert mgr.step(1, state) is False
        clock.now += 11
        assert mgr.step(2, state) is True
        assert mgr.step(100, state) is True
        assert mgr.step(101, state) is False
        assert [c.step for c in mgr.list()] == [2, 100]


@pytest.mark.parametrize("kw", [{"every_steps": 0}, {"every_steps": -1}, {"every_steps": 2.5},
                                {"every_seconds": 0}, {"every_seconds": -1.0}])
def test_bad_schedule_is_refused(kw: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        open_manager(tmp_path / "run", **kw)
    # the refused manager took no lock
    with open_manager(tmp_path / "run"):
        pass


def test_foreign_save_refused_by_step_too(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with open_manager(run) as mgr:
        mgr.save(1, make_state())
    with open_manager(run, every_steps=1) as mgr:
        with pytest.raises(RunDirectoryError):
            mgr.step(5, make_state())
        assert [c.step for c in mgr.list()] == [1]
