"""``safepoint run``: the supervisor, with real processes and the real training script.

What it promises, each tried here: a run that crashes at random steps (``os._exit`` or SIGKILL)
is carried to completion with final weights bitwise equal to an uninterrupted run; a script that
crashes before its first checkpoint every time is stopped as a crash loop; SIGTERM reaches the
child, which saves and exits 0, and the supervisor exits 0 without restarting; a supervisor that is
itself SIGKILLed (a container crash) takes its child with it and a new one on the same directory
resumes. Every start, exit and restart is in ``events.jsonl``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TRAIN, train_env
from safepoint import CheckpointManager, layout
from safepoint.cli import app
from safepoint.supervisor import Backoff, Supervisor, exit_status, parse_seconds
from typer.testing import CliRunner

# A wrapper around examples/train.py that dies at a random step on each of its first CRASHY_CRASHES
# starts, half the time by os._exit(1), half by SIGKILL. The crash step is drawn past the attempt's
# next periodic save, so every crashing attempt commits a checkpoint (progress: no crash loop).
# Its RNG is its own; the training RNG streams are untouched.
CRASHY = textwrap.dedent("""
    import os, random, runpy, signal, sys
    starts = os.environ["CRASHY_STARTS"]
    with open(starts, "a") as f:
        f.write("x")
    attempt = os.path.getsize(starts)
    if attempt <= int(os.environ["CRASHY_CRASHES"]):
        from safepoint import CheckpointManager
        rng = random.Random(int(os.environ["CRASHY_SEED"]) * 1000 + attempt)
        every, target = int(os.environ["CRASHY_EVERY"]), {}
        restore, step = CheckpointManager.restore, CheckpointManager.step

        def crashing_restore(self, state, **kw):
            start = restore(self, state, **kw)
            target["step"] = start + rng.randint(every, 3 * every - 1)
            return start

        def crashing_step(self, n, state, **kw):
            saved = step(self, n, state, **kw)
            if n == target.get("step"):
                print(f"crashy: dying at step {n}", flush=True)
                os._exit(1) if rng.random() < 0.5 else os.kill(os.getpid(), signal.SIGKILL)
            return saved

        CheckpointManager.restore, CheckpointManager.step = crashing_restore, crashing_step
    sys.argv = [os.environ["CRASHY_TRAIN"]] + sys.argv[1:]
    runpy.run_path(os.environ["CRASHY_TRAIN"], run_name="__main__")
""")


def supervise(run_dir: Path | None, command: list[str], *options: str, env: dict[str, str] | None = None,
              **popen: object) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "safepoint", "run", *(["--dir", str(run_dir)] if run_dir else []),
            "--backoff", "0.05s..0.2s", *options, "--", *command]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or train_env(), cwd=ROOT, **popen)


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"supervisor did not finish in {timeout}s\nstdout:\n{out}\nstderr:\n{err}")
    return proc.returncode, out, err


def events(run_dir: Path, *kinds: str) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / layout.EVENTS_FILE).read_text().splitlines()]
    return [e for e in lines if not kinds or e["event"] in kinds]


def steps_on_disk(run_dir: Path) -> list[int]:
    if not run_dir.exists():
        return []
    return sorted(s for p in run_dir.iterdir() if (s := layout.parse_step(p.name)) is not None)


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def train_cmd(run_dir: Path, steps: int, every: int, out: Path | None = None, *extra: str) -> list[str]:
    cmd = [sys.executable, str(TRAIN), "--dir", str(run_dir), "--steps", str(steps), "--every", str(every), *extra]
    return cmd + (["--out", str(out)] if out else [])


# ----------------------------------------------------------------------------- pure parts


def test_backoff_doubles_up_to_the_cap_with_jitter_below_it() -> None:
    b = Backoff.parse("1s..10s")
    assert (b.base, b.max) == (1.0, 10.0)
    rng = random.Random(0)
    delays = [b.delay(n, rng) for n in range(1, 7)]
    for n, d in enumerate(delays, 1):
        raw = min(10.0, 2.0 ** (n - 1))
        assert raw * (1 - b.jitter) <= d <= raw, (n, d)
    assert max(delays) <= 10.0
    assert Backoff.parse("500ms") == Backoff(0.5, 60.0)
    assert Backoff.parse("2m").max == 120.0
    with pytest.raises(ValueError, match="smaller than the base"):
        Backoff.parse("10s..1s")
    with pytest.raises(ValueError, match="cannot read"):
        parse_seconds("soon")
    assert parse_seconds("30") == 30.0 and parse_seconds("1.5m") == 90.0
    assert exit_status(-signal.SIGKILL) == 137 and exit_status(3) == 3


def test_bad_options_are_one_line_errors(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", "--backoff", "fast", "--", "true"])
    assert result.exit_code == 2 and "error: --backoff: cannot read 'fast'" in result.output, result.output
    result = CliRunner().invoke(app, ["run", "--dir", str(tmp_path)])
    assert result.exit_code == 2 and "no command to run" in result.output, result.output


def test_without_a_run_dir_only_max_restarts_applies(capfd: pytest.CaptureFixture[str]) -> None:
    messages: list[str] = []
    sup = Supervisor([sys.executable, "-c", "import sys; print('start', flush=True); sys.exit(3)"], max_restarts=2,
                     crash_loop=1, backoff=Backoff(0.01, 0.02), echo=messages.append)
    assert sup.run() == 3  # the child's own status
    assert capfd.readouterr().out.count("start") == 3  # the first start and 2 restarts
    assert "giving up after 2 restarts" in messages[-1], messages  # crash_loop=1 needs a run dir to apply


def test_a_crash_before_the_first_checkpoint_every_time_is_a_crash_loop(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # Dies at once every time, as a script with a bad import or a config error would.
    proc = supervise(run, [sys.executable, "-c", "import sys; sys.exit('bad config')"], "--crash-loop", "3")
    rc, _, err = finish(proc, 60)
    assert rc == 1
    assert err.count("bad config") == 3, err
    assert "crash loop: 3 consecutive crashes without a new committed checkpoint" in err, err
    assert len(events(run, "child_start")) == 3  # stopped there, although --max-restarts allows 10
    (loop,) = events(run, "crash_loop")
    assert loop["crashes"] == 3 and loop["newest_step"] is None
    assert [e["delay"] > 0 for e in events(run, "restart")] == [True, True]
    assert events(run, "supervisor_exit")[-1]["reason"] == "crash_loop"


def test_progress_resets_the_crash_loop_count(tmp_path: Path) -> None:
    """Each crash follows a new committed checkpoint: never a crash loop, however many crashes."""
    source, run = tmp_path / "source", tmp_path / "run"
    model = torch.nn.Linear(2, 2)
    with CheckpointManager(source) as ckpt:  # real committed checkpoints for the child to "write"
        for step in (10, 20, 30, 40):
            ckpt.save(step, {"model": model})
    # Each start commits the next checkpoint (a copy: no torch import in the child) and crashes.
    script = textwrap.dedent(f"""
        import shutil, sys, pathlib
        source, run = pathlib.Path({str(source)!r}), pathlib.Path({str(run)!r})
        have = {{p.name for p in run.glob("step_*")}}
        todo = sorted(p for p in source.glob("step_*") if p.name not in have)
        if not todo:
            sys.exit(0)
        shutil.copytree(todo[0], run / todo[0].name)
        sys.exit(1)
    """)
    sup = Supervisor([sys.executable, "-c", script], run_dir=run, crash_loop=1, backoff=Backoff(0.01, 0.02),
                     echo=lambda _: None)
    assert sup.run() == 0
    exits = events(run, "child_exit")
    assert [e["code"] for e in exits] == [1, 1, 1, 1, 0], exits
    assert [e["progress"] for e in exits] == [True, True, True, True, False]
    assert [e["newest_step"] for e in exits] == [10, 20, 30, 40, 40]
    assert not events(run, "crash_loop")


# ----------------------------------------------------------------------------- real training runs


def test_random_crashes_are_carried_to_completion_bitwise(tmp_path: Path, reference_weights, same_weights) -> None:
    steps, every, crashes = 60, 5, 3
    reference_weights.start(steps)
    run, out = tmp_path / "run", tmp_path / "final.safetensors"
    wrapper = tmp_path / "crashy.py"
    wrapper.write_text(CRASHY)
    seed = random.randrange(10**6)
    env = dict(train_env(), CRASHY_STARTS=str(tmp_path / "starts"), CRASHY_CRASHES=str(crashes),
               CRASHY_SEED=str(seed), CRASHY_EVERY=str(every), CRASHY_TRAIN=str(TRAIN))
    proc = supervise(run, [sys.executable, str(wrapper), "--dir", str(run), "--steps", str(steps), "--every",
                           str(every), "--out", str(out)], env=env)
    rc, stdout, err = finish(proc, 240)
    context = f"seed {seed}\nstdout:\n{stdout}\nstderr:\n{err[-3000:]}"
    assert rc == 0, context
    assert stdout.count("crashy: dying") == crashes, context
    same_weights(out, reference_weights.path(steps))

    exits = events(run, "child_exit")
    assert len(events(run, "child_start")) == crashes + 1, context
    assert len(events(run, "restart")) == crashes, context
    assert all(e["code"] == 1 or e["signal"] == "SIGKILL" for e in exits[:-1]), exits
    assert all(e["progress"] for e in exits), exits  # each attempt committed a new checkpoint
    assert exits[-1]["code"] == 0 and exits[-1]["signal"] is None
    resumed = [e["step"] for e in events(run, "restore")]
    assert resumed[0] == 0 and all(s > 0 for s in resumed[1:]) and resumed == sorted(resumed), resumed
    assert [e["resume_step"] for e in events(run, "child_start")][1:] == resumed[1:]
    assert events(run, "supervisor_exit")[-1]["reason"] == "done"


def test_sigterm_reaches_the_child_which_saves_and_exits_0(tmp_path: Path, reference_weights, same_weights) -> None:
    steps, every = 60, 10
    reference_weights.start(steps)
    run, out = tmp_path / "run", tmp_path / "final.safetensors"
    cmd = train_cmd(run, steps, every, out, "--sleep", "0.05")
    proc = supervise(run, cmd)
    wait_for(lambda: steps_on_disk(run) or proc.poll() is not None, 60, "a periodic checkpoint")
    periodic = max(steps_on_disk(run))
    proc.send_signal(signal.SIGTERM)  # docker stop / compose down / Kubernetes eviction
    rc, stdout, err = finish(proc, 60)
    assert rc == 0, err
    assert "preempted: saved step" in stdout, stdout
    newest = max(steps_on_disk(run))
    assert newest > periodic and newest < steps, (periodic, newest)
    (preempted,) = events(run, "preempted")
    assert preempted["signal"] == "SIGTERM" and preempted["step"] == newest
    assert len(events(run, "child_start")) == 1 and not events(run, "restart")
    assert events(run, "child_exit")[-1]["code"] == 0
    assert events(run, "supervisor_exit")[-1] == {**events(run, "supervisor_exit")[-1], "reason": "signal",
                                                  "signal": "SIGTERM", "code": 0}
    assert not out.exists()

    # `docker compose up` again: the same command on the same directory finishes the run exactly.
    rc, stdout, err = finish(supervise(run, cmd), 120)
    assert rc == 0, err
    assert events(run, "child_start")[-1]["resume_step"] == newest
    same_weights(out, reference_weights.path(steps))


@pytest.mark.slow  # two supervisors and two trainers: ~10 s
def test_a_killed_supervisor_takes_its_child_along_and_a_new_one_resumes(tmp_path: Path, reference_weights,
                                                                         same_weights) -> None:
    steps, every = 60, 10
    reference_weights.start(steps)
    run, out = tmp_path / "run", tmp_path / "final.safetensors"
    cmd = train_cmd(run, steps, every, out, "--sleep", "0.05")
    proc = supervise(run, cmd)
    wait_for(lambda: steps_on_disk(run) or proc.poll() is not None, 60, "a periodic checkpoint")
    child = events(run, "child_start")[-1]["child_pid"]
    proc.kill()  # the container dies: no signal handler runs in the supervisor
    finish(proc, 30)
    wait_for(lambda: not Path(f"/proc/{child}").exists() or _zombie(child), 10, f"child {child} to die with its parent")

    rc, _, err = finish(supervise(run, cmd), 120)  # not refused by the run lock: the old child is gone
    assert rc == 0, err
    assert events(run, "child_start")[-1]["resume_step"] >= every
    same_weights(out, reference_weights.path(steps))


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    run = tmp_path / "run"
    script = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
              "time.sleep(60)")
    proc = supervise(run, [sys.executable, "-c", script], "--grace", "0.5")
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc, _, err = finish(proc, 30)
    assert rc == 128 + signal.SIGKILL, err
    assert 0.4 < time.monotonic() - began < 10
    assert "sending SIGKILL" in err
    (exit_event,) = events(run, "child_exit")
    assert exit_event["signal"] == "SIGKILL" and exit_event["killed_after_grace"] is True
    assert not events(run, "restart")


def test_sigusr1_is_forwarded_too(tmp_path: Path) -> None:
    """SLURM's --signal=USR1@120 reaches the trainer through the supervisor (here in-process)."""
    ready, got = tmp_path / "ready", tmp_path / "got"
    script = textwrap.dedent(f"""
        import pathlib, signal, sys, time
        def stop(signum, frame):
            pathlib.Path({str(got)!r}).write_text(signal.Signals(signum).name)
            sys.exit(0)
        signal.signal(signal.SIGUSR1, stop)
        pathlib.Path({str(ready)!r}).touch()
        time.sleep(30)
    """)
    sup = Supervisor([sys.executable, "-c", script], run_dir=tmp_path / "run", echo=lambda _: None)
    sender = threading.Thread(target=lambda: (wait_for(ready.exists, 30, "the child"),
                                              os.kill(os.getpid(), signal.SIGUSR1)))
    sender.start()
    try:
        assert sup.run() == 0
    finally:
        sender.join()
    assert got.read_text() == "SIGUSR1"
    assert not events(tmp_path / "run", "restart")
    assert events(tmp_path / "run", "supervisor_exit")[-1]["signal"] == "SIGUSR1"
