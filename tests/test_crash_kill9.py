"""Real ``kill -9`` chaos: SIGKILL examples/train.py over and over, restart it, and check that

* it finishes with final weights bitwise equal to a run that was never interrupted;
* after every kill, every checkpoint the library lists re-hashes clean (``verify``), every
  ``step_*`` directory is a listed one, and the newest committed checkpoint never goes backwards;
* every restart resumes from exactly the newest committed step left by the kill (0 if none), so
  the start steps never decrease and it never loads a partial save;
* leftover ``step_*.tmp-*`` directories and ``.trash`` items are gone once the next run started;
* the kills were real (returncode -9) and progress was made across restarts.

Random kills come at seeded random moments: while the child starts up; or, once it runs, after a
random number of new commits, either after a random delay (a save every 3 steps takes about half
of the time, so many of these land inside one) or as soon as the next save is seen in progress.
On top of that, one kill per fault point of ``safepoint.faults`` (``SAFEPOINT_FAULT=<point>:kill``)
lands exactly inside a save. Three independent lanes (run directories) run at once, so the
start-up cost of ~30 child processes is shared by the cores: two with the default synchronous
saves, which together meet every fault point, and one with ``--async-save``, whose commits
happen on a background writer while training goes on.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from safepoint import faults, list_checkpoints, verify
from safepoint import layout

STEPS = 300
EVERY = 3
SLEEP = 0.002  # seconds per step: every step takes at least this long, which bounds a run's progress
MAX_SAVES_BEFORE_KILL = 3
MAX_EXTRA_DELAY = 0.02


@dataclass(frozen=True)
class LanePlan:
    """One run directory killed ``random_kills`` times at random plus once at each fault point."""

    seed: int
    random_kills: int
    points: tuple[str, ...]
    async_save: bool = False  # train.py --async-save: commits happen on a background writer

    @property
    def args(self) -> tuple[str, ...]:
        return ("--async-save",) if self.async_save else ()


LANES = [
    LanePlan(11, 7, ("after_data", "before_rename", "during_delete")),
    LanePlan(23, 7, ("before_manifest", "after_rename")),
    LanePlan(37, 6, ("before_rename", "after_rename"), async_save=True),
]


def test_lanes_cover_every_fault_point():
    assert sorted(p for lane in LANES if not lane.async_save for p in lane.points) == sorted(faults.POINTS)
    assert sum(lane.random_kills for lane in LANES) >= 20


def test_step_budget_outlasts_the_kills():
    # A random kill comes at most MAX_SAVES_BEFORE_KILL commits plus MAX_EXTRA_DELAY (each step
    # sleeps SLEEP) after a start; a fault kill within 4 saves. So, with a margin for slow polling,
    # no lane can finish before its last planned kill, and every planned kill is a real one.
    per_random = (MAX_SAVES_BEFORE_KILL + 1) * EVERY + MAX_EXTRA_DELAY / SLEEP
    per_fault = 4 * EVERY
    worst = max(lane.random_kills * per_random + len(lane.points) * per_fault for lane in LANES)
    assert 1.15 * worst < STEPS


@dataclass
class Snapshot:
    """A run directory right after a kill (no process running)."""

    steps: list[int]
    tmp_dirs: list[Path]
    trash: list[Path]

    @property
    def newest(self) -> int:
        return self.steps[-1] if self.steps else 0


def snapshot(run_dir: Path) -> Snapshot:
    listed = list_checkpoints(run_dir)
    for info in listed:
        verify(info.path)  # re-hashes every file; raises CorruptCheckpoint on a partial checkpoint
    on_disk = sorted(n for n in os.listdir(run_dir) if layout.parse_step(n) is not None)
    assert on_disk == [info.path.name for info in listed], \
        f"step_* directories that are not listed as committed: {on_disk} vs {[i.path.name for i in listed]}"
    tmp_dirs = sorted(run_dir / n for n in os.listdir(run_dir) if layout.is_tmp_name(n))
    trash_dir = run_dir / layout.TRASH_DIR
    trash = sorted(trash_dir.iterdir()) if trash_dir.exists() else []
    return Snapshot([info.step for info in listed], tmp_dirs, trash)


def saves_logged_by(run_dir: Path, pid: int) -> list[int]:
    """Steps whose save the process ``pid`` logged as done (the event is written after the commit)."""
    steps = []
    path = run_dir / layout.EVENTS_FILE
    if not path.exists():
        return steps
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        if event.get("event") == "save" and event.get("pid") == pid:
            steps.append(event["step"])
    return steps


def committed_above(run_dir: Path, step: int) -> int:
    return sum(1 for n in os.listdir(run_dir) if (s := layout.parse_step(n)) is not None and s > step)


def saving_now(run_dir: Path) -> bool:
    return any(layout.is_tmp_name(n) for n in os.listdir(run_dir))


@dataclass
class LaneLog:
    starts: list[int] = field(default_factory=list)
    random_kills: int = 0
    fault_kills: list[str] = field(default_factory=list)
    kills_leaving_tmp: int = 0
    kills_before_start: int = 0
    debris_checked: int = 0
    progress_expected: int = 0
    progress_checked: int = 0


def run_lane(lane: LanePlan, run_dir: Path, out: Path, spawn, stop: threading.Event) -> LaneLog:
    rng = random.Random(lane.seed)
    plan = ["random"] * lane.random_kills + list(lane.points)
    args = dict(steps=STEPS, every=EVERY, sleep=SLEEP, out=out, extra=lane.args)
    rng.shuffle(plan)
    log = LaneLog()
    last = Snapshot([], [], [])          # the directory as the previous kill left it
    must_vanish: list[Path] = []         # debris that the next start must remove
    must_pass: int | None = None         # a start step the next start must be above (progress)

    def check_start(run, start: int | None) -> None:
        nonlocal must_vanish, must_pass
        assert start is not None, f"no 'start step' line\n{run.describe()}"
        assert start == last.newest, (f"restart began at step {start}, but the newest committed checkpoint "
                                      f"after the kill was {last.newest} (committed: {last.steps})")
        assert not log.starts or start >= log.starts[-1], f"start step went backwards: {log.starts} -> {start}"
        if must_pass is not None:
            assert start > must_pass, f"a kill after a new commit made no progress: {log.starts} -> {start}"
            log.progress_checked += 1
            must_pass = None
        leftover = [p for p in must_vanish if p.exists()]
        assert not leftover, f"debris of an unfinished save/delete survived the restart: {leftover}"
        log.debris_checked += len(must_vanish)
        must_vanish = []
        log.starts.append(start)

    def after_kill(run, rc: int) -> Snapshot:
        nonlocal last, must_vanish
        assert rc == -signal.SIGKILL, f"expected death by SIGKILL\n{run.describe()}"
        snap = snapshot(run_dir)
        assert snap.newest >= last.newest, f"newest commit went backwards: {last.steps} -> {snap.steps}"
        logged = saves_logged_by(run_dir, run.pid)
        assert not logged or max(logged) <= snap.newest, \
            f"save of step {max(logged)} was logged as done but is not committed: {snap.steps}"
        must_vanish = sorted(set(must_vanish) | set(snap.tmp_dirs) | set(snap.trash))
        last = snap
        return snap

    for kind in plan:
        if stop.is_set():  # another lane failed
            return log
        if kind == "random":
            run = spawn(run_dir, **args)
            if rng.random() < 0.1:
                # While it starts up, restores, or collects the debris of the previous kill.
                start = run.wait_started(timeout=rng.uniform(0.2, 2.0))
                run.kill()
                if start is None:
                    log.kills_before_start += 1
                else:
                    check_start(run, start)
            else:
                # After a random number of new commits: at a random moment, or as soon as the next
                # save is seen in progress (its tmp dir exists), to land inside it.
                saves, mid_save = rng.randint(0, MAX_SAVES_BEFORE_KILL), rng.random() < 0.5
                delay = rng.uniform(0, 0.005 if mid_save else MAX_EXTRA_DELAY)
                start = run.wait_started()
                check_start(run, start)
                deadline = time.monotonic() + 60
                while committed_above(run_dir, start) < saves or (mid_save and not saving_now(run_dir)):
                    assert run.proc.poll() is None, f"child exited before it was killed\n{run.describe()}"
                    assert time.monotonic() < deadline, f"no {saves} new commits in 60s\n{run.describe()}"
                    time.sleep(0.001)
                time.sleep(delay)
                run.kill()
                if saves:
                    must_pass = start
                    log.progress_expected += 1
            snap = after_kill(run, run.wait())
            log.random_kills += 1
            log.kills_leaving_tmp += bool(snap.tmp_dirs)
        else:
            run = spawn(run_dir, fault=f"{kind}:kill", **args)
            start = run.wait_started()
            check_start(run, start)
            rc = run.wait()
            assert rc != 0, f"fault point {kind!r} was never reached: the run finished\n{run.describe()}"
            snap = after_kill(run, rc)
            log.fault_kills.append(kind)
            saving = start + EVERY  # starts are multiples of EVERY: the first save after it
            if kind in ("after_data", "before_manifest", "before_rename"):
                assert snap.newest == start, f"{kind}: a save was committed: {snap.steps}"
                assert [p.name.split(".tmp-")[0] for p in snap.tmp_dirs] == [layout.step_dir_name(saving)], \
                    f"{kind}: expected the unfinished save of step {saving} left behind, found {snap.tmp_dirs}"
                tmp = snap.tmp_dirs[0]
                has_manifest = (tmp / layout.MANIFEST).exists()
                assert has_manifest == (kind == "before_rename"), f"{kind}: manifest present: {has_manifest}"
                must_pass = None
            elif kind == "after_rename":
                assert snap.newest == saving and not snap.tmp_dirs, f"{kind}: {snap}"
                must_pass = start
                log.progress_expected += 1
            else:  # during_delete: the new save is committed, an old one is half deleted
                assert snap.newest > start and not snap.tmp_dirs, f"{kind}: {snap}"
                assert snap.trash, f"{kind}: killed while deleting, but .trash is empty"
                must_pass = start
                log.progress_expected += 1
    if stop.is_set():
        return log
    final = spawn(run_dir, **args)
    check_start(final, final.wait_started())
    rc = final.wait()
    assert rc == 0 and final.lines[-1:] == [f"done {STEPS} steps"], f"final run failed\n{final.describe()}"
    for info in list_checkpoints(run_dir):
        verify(info.path)
    assert list_checkpoints(run_dir)[-1].step == STEPS
    return log


def test_kill9_at_random_moments_resumes_exactly(tmp_path, spawn_train, reference_weights, same_weights):
    reference_weights.start(STEPS)  # runs in the background meanwhile
    stop = threading.Event()

    def lane(i: int, plan: LanePlan) -> LaneLog:
        try:
            return run_lane(plan, tmp_path / f"run{i}", tmp_path / f"final{i}.safetensors", spawn_train, stop)
        except BaseException:
            stop.set()
            raise

    with ThreadPoolExecutor(len(LANES)) as pool:
        futures = [pool.submit(lane, i, plan) for i, plan in enumerate(LANES)]
        logs = [f.result() for f in futures]

    expected = reference_weights.path(STEPS)
    for i in range(len(LANES)):
        same_weights(tmp_path / f"final{i}.safetensors", expected)

    summary = [f"lane {i}{' (async)' if LANES[i].async_save else ''}: starts {log.starts}, {log.random_kills} random kills ({log.kills_leaving_tmp} left a tmp "
               f"dir, {log.kills_before_start} before start), faults {log.fault_kills}" for i, log in enumerate(logs)]
    print("\n".join(summary))
    assert sum(log.random_kills for log in logs) >= 20, summary
    assert [sorted(log.fault_kills) for log in logs] == [sorted(lane.points) for lane in LANES], summary
    for log in logs:
        # Progress: every kill that came after a new commit was followed by a higher start.
        assert log.progress_checked == log.progress_expected >= 3, summary
        assert log.starts[-1] > log.starts[0] == 0, summary
        assert len(set(log.starts)) >= log.progress_checked + 1, summary
    # The three fault points before the commit each left a tmp dir, which a restart removed.
    assert sum(log.debris_checked for log in logs) >= 3, summary
