"""Preemption signals: SIGTERM / SIGUSR1 / SIGINT mean "save at the next step, then stop".

Subprocess tests drive examples/train.py (``--sleep`` paces it so a signal lands mid-run) and
check the save it commits, its clean exit, and an exact resume. In-process tests check the
handler plumbing: chaining to a user's handler, restoring handlers on ``close()``, and ``step()``
saving once after a signal even when no save is due.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from safepoint import CheckpointManager, list_checkpoints, verify
from safepoint import layout

STEPS = 300   # as in test_crash_kill9, so a session computes the reference weights once
EVERY = 20    # the first periodic save; the next one is EVERY steps (about 0.8 s) later
SLEEP = 0.04  # seconds per step: keeps the child mid-run while it is signalled


def wait_until(cond, run, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert run.proc.poll() is None, f"train.py exited while waiting for {what}\n{run.describe()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{run.describe()}"
        time.sleep(0.005)


def committed(run_dir: Path) -> list[int]:
    """Steps of the listed checkpoints, each re-hashed first (a partial one fails here)."""
    listed = list_checkpoints(run_dir)
    for info in listed:
        verify(info.path)
    return [info.step for info in listed]


def tmp_dirs(run_dir: Path) -> list[str]:
    return [n for n in os.listdir(run_dir) if layout.is_tmp_name(n)]


def events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / layout.EVENTS_FILE).read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


# ------------------------------------------------------------------ subprocess: examples/train.py
#
# Each scenario runs its own child(ren) in its own directory and returns the final weights file.
# The test runs the scenarios at once, so their Python + torch start-ups share the cores.


def signal_then_resume(sig: signal.Signals, run_dir: Path, spawn) -> Path:
    """One signal after the first periodic save: it saves the next step, exits 0, resumes there."""
    out = run_dir.with_suffix(".safetensors")
    run = spawn(run_dir, steps=STEPS, every=EVERY, sleep=SLEEP, out=out)
    assert run.wait_started() == 0, run.describe()
    # Signal right after the first periodic save, so the next periodic one is far away.
    wait_until(lambda: EVERY in committed(run_dir), run, f"the periodic save of step {EVERY}")
    periodic = committed(run_dir)
    run.send(sig)
    rc = run.wait(60)

    assert rc == 0, f"{sig.name} should make train.py save and exit 0\n{run.describe()}"
    m = re.fullmatch(r"preempted: saved step (\d+), exiting", run.lines[-1])
    assert m, run.describe()
    stopped_at = int(m.group(1))
    steps = committed(run_dir)
    assert steps[-1] == stopped_at > max(periodic), \
        f"{sig.name}: the signal's save is missing: committed {steps}, stopped at {stopped_at}, before: {periodic}"
    assert all(s % EVERY == 0 for s in steps[:-1]), steps
    assert not tmp_dirs(run_dir)
    assert not out.exists(), "a preempted run must not write the final weights"
    preempted = events(run_dir, "preempted")
    assert [(e["signal"], e["step"]) for e in preempted] == [(sig.name, stopped_at)]

    # Restart with the same arguments (less the pacing sleep): resumes at the signal's step.
    again = spawn(run_dir, steps=STEPS, every=EVERY, out=out)
    assert again.wait_started() == stopped_at, again.describe()
    assert again.wait(120) == 0 and again.lines[-1] == f"done {STEPS} steps", again.describe()
    return out


def sigint_twice_then_resume(run_dir: Path, spawn) -> Path:
    """A second SIGINT raises KeyboardInterrupt: non-zero exit, no partial checkpoint, resumable."""
    out = run_dir.with_suffix(".safetensors")
    run = spawn(run_dir, steps=STEPS, every=EVERY, sleep=SLEEP, out=out)
    assert run.wait_started() == 0, run.describe()
    wait_until(lambda: EVERY in committed(run_dir), run, f"the periodic save of step {EVERY}")
    # Away from the save's fsyncs, so the child is in its pacing sleep and handles the first
    # SIGINT at once: two signals pending together would be handled as one.
    time.sleep(2.5 * SLEEP)
    run.send(signal.SIGINT)
    # Then the second, well before the first one's save and exit are done (the child sleeps a
    # whole SLEEP after that save before it exits).
    time.sleep(SLEEP / 2)
    run.send(signal.SIGINT)
    rc = run.wait(60)

    assert rc != 0 and "KeyboardInterrupt" in run.stderr(), f"second SIGINT should interrupt\n{run.describe()}"
    assert not any(line.startswith("preempted") for line in run.lines), run.describe()
    steps = committed(run_dir)  # whatever is listed re-hashes clean
    assert EVERY in steps
    assert not tmp_dirs(run_dir), "an interrupted save must remove its tmp directory"
    assert not out.exists()

    again = spawn(run_dir, steps=STEPS, every=EVERY, out=out)
    assert again.wait_started() == steps[-1], again.describe()
    assert again.wait(120) == 0, again.describe()
    return out


def test_signals_to_train_py_save_stop_and_resume_exactly(tmp_path, spawn_train, reference_weights, same_weights):
    reference_weights.start(STEPS)
    scenarios = {sig.name: functools.partial(signal_then_resume, sig, tmp_path / sig.name, spawn_train)
                 for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    scenarios["SIGINT twice"] = functools.partial(sigint_twice_then_resume, tmp_path / "SIGINT-twice", spawn_train)
    with ThreadPoolExecutor(len(scenarios)) as pool:
        futures = {name: pool.submit(fn) for name, fn in scenarios.items()}
    failed = {name: f.exception() for name, f in futures.items() if f.exception() is not None}
    if failed:
        first = next(iter(failed.values()))
        raise AssertionError("\n\n".join(f"[{name}] {type(e).__name__}: {e}" for name, e in failed.items())) from first
    expected = reference_weights.path(STEPS)
    for name, future in futures.items():
        same_weights(future.result(), expected)


# ------------------------------------------------------------------ in-process


HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@pytest.fixture
def handlers():
    """Put back this process's handlers, whatever a test (or a bug) leaves installed."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed from the main thread")
    before = {s: signal.getsignal(s) for s in HANDLED}
    try:
        yield before
    finally:
        for s, h in before.items():
            signal.signal(s, h)


class Recorder:
    """A user's own handler; installing it first also keeps a broken watcher from killing pytest."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, signum, frame) -> None:
        self.calls.append(signum)


def raise_and_wait(sig: int, done) -> None:
    os.kill(os.getpid(), sig)
    deadline = time.monotonic() + 5
    while not done() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert done(), f"{sig!r} was not handled"


def small_state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}


def test_user_sigterm_handler_is_chained_and_handlers_are_restored_on_close(tmp_path, handlers):
    user = Recorder()
    signal.signal(signal.SIGTERM, user)
    before = {s: signal.getsignal(s) for s in HANDLED}
    mgr = CheckpointManager(tmp_path / "run", every_steps=100)
    try:
        assert all(signal.getsignal(s) is not before[s] for s in HANDLED), "the manager installed no handlers"
        state = small_state()
        mgr.restore(state)
        raise_and_wait(signal.SIGTERM, lambda: user.calls)
        assert user.calls == [signal.SIGTERM], "the user's SIGTERM handler was not chained"
        assert mgr.step(1, state) is True and mgr.should_stop, "the chained signal did not request a save"
    finally:
        mgr.close()
    after = {s: signal.getsignal(s) for s in HANDLED}
    assert after == before, "close() did not put the previous handlers back"
    mgr.close()  # twice is fine
    assert {s: signal.getsignal(s) for s in HANDLED} == before
    raise_and_wait(signal.SIGTERM, lambda: len(user.calls) == 2)  # the user's handler alone again


def test_close_keeps_a_handler_installed_after_the_manager(tmp_path, handlers):
    guard = Recorder()
    signal.signal(signal.SIGUSR1, guard)
    mgr = CheckpointManager(tmp_path / "run")
    later = Recorder()
    signal.signal(signal.SIGUSR1, later)  # the user replaces the manager's handler
    mgr.close()
    assert signal.getsignal(signal.SIGUSR1) is later, "close() clobbered a handler installed after the manager"
    assert signal.getsignal(signal.SIGTERM) is handlers[signal.SIGTERM]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=lambda s: s.name)
def test_step_after_a_signal_saves_once_even_when_not_due(sig, tmp_path, handlers):
    guard = Recorder()
    signal.signal(sig, guard)
    state = small_state()
    run_dir = tmp_path / "run"
    with CheckpointManager(run_dir, every_steps=100) as mgr:
        assert mgr.restore(state) == 0
        assert mgr.step(1, state) is False and not mgr.should_stop and mgr.list() == []
        raise_and_wait(sig, lambda: guard.calls)
        with torch.no_grad():
            state["model"].weight.add_(1.0)
        expected = state["model"].weight.clone()
        assert mgr.step(2, state) is True, "step() after a signal must save although step 2 is not due"
        assert mgr.should_stop
        assert committed(run_dir) == [2]
        assert mgr.step(2, state) is False, "the same step must not be saved twice"
        assert committed(run_dir) == [2]
        assert [e["step"] for e in events(run_dir, "save")] == [2]
    assert signal.getsignal(sig) is guard

    fresh = small_state()
    with CheckpointManager(run_dir, signals=()) as mgr:
        assert mgr.restore(fresh) == 2
    assert torch.equal(fresh["model"].weight, expected)


def test_first_sigint_requests_a_save_second_raises_keyboard_interrupt(tmp_path, handlers):
    state = small_state()
    run_dir = tmp_path / "run"
    with CheckpointManager(run_dir, every_steps=100) as mgr:
        mgr.restore(state)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        except KeyboardInterrupt:
            pytest.fail("the first SIGINT must request a save, not raise KeyboardInterrupt")
        assert mgr.step(1, state) is True and mgr.should_stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(500):
                time.sleep(0.01)
    assert committed(run_dir) == [1]
    assert signal.getsignal(signal.SIGINT) is handlers[signal.SIGINT]


def test_no_handlers_outside_the_main_thread(tmp_path, handlers):
    caught: list = []

    def create() -> None:
        with pytest.warns(UserWarning, match="main thread"):
            mgr = CheckpointManager(tmp_path / "run")
        caught.append({s: signal.getsignal(s) for s in HANDLED})
        mgr.close()

    t = threading.Thread(target=create)
    t.start()
    t.join()
    assert caught == [handlers], "a manager created in a thread must leave the handlers alone"
