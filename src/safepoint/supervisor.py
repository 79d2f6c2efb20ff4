"""Keep a training command running until it finishes: ``safepoint run -- python train.py ...``.

A checkpointing library makes a crash cheap, but something still has to start the script again.
Container restart policies and schedulers do it bluntly: no backoff that resets once the run moves
on, no idea whether a restart made progress, and a signal from the platform (SIGTERM from
``docker stop`` or Kubernetes, SIGUSR1 from SLURM) must reach the trainer, not the wrapper. The
``Supervisor``:

* starts the command and restarts it when it dies (non-zero exit, a signal, an OOM kill) after an
  exponential backoff with jitter, reset whenever a restart made progress;
* forwards SIGTERM / SIGINT / SIGUSR1 to the child, waits ``grace`` seconds for it to save and
  exit (then SIGKILLs its process group) and exits with the child's status, never restarting;
* stops a crash loop: ``crash_loop`` consecutive crashes without a new committed checkpoint in
  ``run_dir`` (without a run directory only ``max_restarts`` applies);
* appends every start, exit (code or signal), restart and stop to the run's ``events.jsonl`` in
  the same JSON-lines form as ``RunLog``, so ``safepoint serve`` shows the restart history;
* with a run directory, owns the memory tier (``memtier``): shared memory the trainer snapshots
  its state into every few steps; when the trainer dies, the newest snapshot is committed as a
  checkpoint before the restart, so a SIGKILL costs a few steps instead of everything since the
  last disk save;
* with ``on_commit``, evaluates every new checkpoint with a command (``commit_hook``) and stores
  the result as that checkpoint's metrics, for ``KeepBest``.

The child needs nothing but ``CheckpointManager.restore`` to resume. It runs in its own session
(a terminal's Ctrl-C reaches it once, through the supervisor) and, on Linux, dies with the
supervisor (``PR_SET_PDEATHSIG``) so a killed supervisor never leaves a writer holding the run lock.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from . import layout, memtier
from .commit_hook import CommitHook
from .errors import SafepointError
from .manifest import utc_now

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.I)
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_seconds(text: str | float, *, what: str = "duration") -> float:
    """Seconds from ``30``, ``"30s"``, ``"500ms"``, ``"2m"``, ``"1h"``."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = _DURATION.match(text)
        if not m:
            raise ValueError(f"{what}: cannot read {text!r} as a duration; use e.g. 500ms, 30s, 2m")
        value = float(m.group(1)) * _UNIT[(m.group(2) or "s").lower()]
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {text!r}")
    return value


@dataclass(frozen=True)
class Backoff:
    """Delay before restart n (1-based) after consecutive failures: ``base * 2**(n-1)``, capped.

    Jitter takes up to ``jitter`` (a fraction) off each delay, so many jobs that crashed together
    (a node failure) do not restart in lockstep; ``max`` stays a true cap.
    """

    base: float = 1.0
    max: float = 60.0
    jitter: float = 0.2

    @classmethod
    def parse(cls, text: str) -> "Backoff":
        """``"1s..60s"`` (base..max) or ``"5s"`` (base; max stays 60 s or the base if larger)."""
        first, sep, last = text.partition("..")
        base = parse_seconds(first, what="--backoff")
        top = parse_seconds(last, what="--backoff") if sep else max(base, cls.max)
        if top < base:
            raise ValueError(f"--backoff {text!r}: the maximum is smaller than the base")
        return cls(base, top)

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        raw = min(self.max, self.base * 2 ** max(0, failures - 1))
        return raw * (1 - self.jitter * (rng or random).random())


def exit_status(returncode: int) -> int:
    """A shell's view of a child's status: its code, or 128 + the signal that killed it."""
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}" + (" (an OOM kill looks like this)" if returncode == -signal.SIGKILL else "")
    return f"exited with code {returncode}"


class Supervisor:
    """Run ``command`` until it exits 0, restarting it on crashes; see the module docstring.

    Args:
        command: the training command (argv list); started without a shell.
        run_dir: the run directory the command checkpoints into: progress (a new committed
            checkpoint) is measured there and events are appended to its ``events.jsonl``.
        max_restarts: restarts allowed in all; 0 never restarts, None has no limit.
        backoff: delays between restarts.
        grace: seconds the child gets to save and exit after a forwarded signal, then SIGKILL.
        crash_loop: stop after this many consecutive crashes without a new checkpoint (needs run_dir).
        env: the child's environment (default: this process's).
        echo: where messages go (default: stderr, prefixed ``safepoint run:``).
        snapshot_dir: where the memory tier lives (needs run_dir): a tmpfs, default ``/dev/shm``.
        snapshot_every: exported to the child as ``SAFEPOINT_SNAPSHOT_EVERY``, the default of its
            ``CheckpointManager(snapshot_every=...)``; None leaves it to the script.
        on_commit: a command run for each new checkpoint (``{path}``, ``{step}``, ``{run_dir}``
            replaced); its last line of output is stored as that checkpoint's metrics.
    """

    def __init__(self, command: Sequence[str], *, run_dir: str | os.PathLike[str] | None = None,
                 max_restarts: int | None = 10, backoff: Backoff = Backoff(), grace: float = 30.0,
                 crash_loop: int = 3, env: dict[str, str] | None = None,
                 echo: Callable[[str], None] | None = None, rng: random.Random | None = None,
                 snapshot_dir: str | os.PathLike[str] | None = None, snapshot_every: int | None = None,
                 on_commit: str | None = None) -> None:
        if not command:
            raise ValueError("no command to run: give it after '--', e.g. safepoint run -- python train.py")
        if max_restarts is not None and max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0 or None, got {max_restarts}")
        if crash_loop < 1:
            raise ValueError(f"crash_loop must be >= 1, got {crash_loop}")
        if run_dir is None and (snapshot_every is not None or snapshot_dir is not None or on_commit):
            raise ValueError("--snapshot-every, --snapshot-dir and --on-commit need --dir RUN_DIR: the run "
                             "directory the command checkpoints into")
        if snapshot_every is not None and snapshot_every < 1:
            raise ValueError(f"--snapshot-every must be >= 1, got {snapshot_every}")
        if snapshot_dir is not None:
            memtier.check_parent(Path(snapshot_dir))
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else memtier.default_parent()
        self.snapshot_every = snapshot_every
        self.command = [str(c) for c in command]
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.max_restarts = max_restarts
        self.backoff = backoff
        self.grace = grace
        self.crash_loop = crash_loop
        self.env = env
        self.echo = echo or (lambda msg: print(f"safepoint run: {msg}", file=sys.stderr, flush=True))
        self.rng = rng or random.Random()
        self._proc: subprocess.Popen[bytes] | None = None
        self._signal: int | None = None
        self._deadline: float | None = None
        self._tier: memtier.MemoryTier | None = None
        self._hook = None if not on_commit else CommitHook(on_commit, self.run_dir, event=self.event,
                                                           echo=self.echo, env=env)

    # ---------------------------------------------------------------- events and progress

    def event(self, kind: str, **fields: Any) -> None:
        """Append one RunLog-style line to ``events.jsonl``: one ``write`` on an O_APPEND fd, so it
        never interleaves with the child's own lines."""
        if self.run_dir is None:
            return
        record = {"time": utc_now(), "event": kind, "pid": os.getpid(), "source": "supervisor", **fields}
        line = (json.dumps(record, default=str) + "\n").encode()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir / layout.EVENTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as err:  # a full disk must not stop the supervisor over a log line
            self.echo(f"could not append to {self.run_dir / layout.EVENTS_FILE}: {err}")

    def checkpoints(self) -> set[tuple[int, str]]:
        """(step, commit time) of every checkpoint in ``run_dir``: a new element is progress."""
        if self.run_dir is None or not self.run_dir.is_dir():
            return set()
        from .rundir import open_run  # the run's own reader: safepoint runs and HF output dirs

        try:
            view = open_run(self.run_dir)
        except (SafepointError, OSError):
            return set()
        return {(c.step, c.committed or c.created) for c in view.checkpoints}

    # ---------------------------------------------------------------- signals

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        first = self._signal is None
        self._signal = self._signal or signum
        if first:
            self._deadline = time.monotonic() + self.grace
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signum)  # the child itself (torchrun forwards to its workers)
            except ProcessLookupError:
                pass

    def _install(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            self.echo("not in the main thread: signals are not forwarded to the child")
            return {}
        return {s: signal.signal(s, self._on_signal) for s in FORWARDED}

    # ---------------------------------------------------------------- running

    def _spawn(self) -> subprocess.Popen[bytes]:
        parent = os.getpid()
        env = dict(self.env if self.env is not None else os.environ)
        if self._tier is not None:
            env.update(self._tier.env())
        if self.snapshot_every is not None:
            env[memtier.ENV_EVERY] = str(self.snapshot_every)
        return subprocess.Popen(self.command, env=env, start_new_session=True,
                                preexec_fn=(lambda: _die_with_parent(parent)) if sys.platform == "linux" else None)

    def _wait(self, proc: subprocess.Popen[bytes]) -> tuple[int, bool]:
        """The child's return code, and whether it had to be SIGKILLed after the grace period."""
        killed = False
        while True:
            try:
                return proc.wait(timeout=0.1), killed
            except subprocess.TimeoutExpired:
                pass
            if self._deadline is not None and not killed and time.monotonic() >= self._deadline:
                self.echo(f"child (pid {proc.pid}) still running {self.grace:g}s after "
                          f"{signal.Signals(self._signal or signal.SIGTERM).name}; sending SIGKILL")
                _kill_group(proc)
                killed = True

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless a signal arrives; True when it did."""
        end = time.monotonic() + seconds
        while self._signal is None and time.monotonic() < end:
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
        return self._signal is not None

    def run(self) -> int:
        """Supervise until done; return the exit status for the supervisor itself."""
        previous = self._install()
        try:
            if self.run_dir is not None:
                self._open_tier()
            return self._run()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            proc = self._proc
            if proc is not None and proc.poll() is None:  # an exception in here: leave no orphan
                _kill_group(proc)
                proc.wait()
            if self._hook is not None:
                self._hook.stop(drain=False)
            if self._tier is not None:
                self._tier.close()
                self._tier = None

    def _open_tier(self) -> None:
        assert self.run_dir is not None
        try:
            self._tier = memtier.MemoryTier.create(self.run_dir, self.snapshot_dir)
        except (OSError, ValueError) as err:  # training still works, with disk checkpoints only
            self.echo(f"no memory tier (snapshots are off): cannot create it in {self.snapshot_dir}: {err}")

    def _persist_snapshot(self) -> None:
        """After a crash: commit the dead child's newest memory snapshot if it is ahead of the disk."""
        if self._tier is None:
            return
        try:
            result = self._tier.persist_newest()
        except (OSError, SafepointError) as err:
            self.echo(f"could not commit the memory snapshot: {err}")
            self.event("snapshot_not_persisted", reason=str(err))
            return
        if result.step is not None:
            self.echo(f"committed the memory snapshot of step {result.step} ({result.size / 1e6:.1f} MB in "
                      f"{result.seconds:.2f}s)")
            self.event("snapshot_persisted", step=result.step, size=result.size, seconds=round(result.seconds, 3))
        elif result.reason:
            what = "" if result.snapshot_step is None else f" of step {result.snapshot_step}"
            self.echo(f"memory snapshot{what} not committed: {result.reason}")
            self.event("snapshot_not_persisted", step=result.snapshot_step, reason=result.reason)

    def _exit(self, code: int, reason: str, **fields: Any) -> int:
        """Finish the evaluations that are due (not after a signal), log the exit, return ``code``."""
        if self._hook is not None:
            self._hook.stop(drain=reason != "signal")
        self.event("supervisor_exit", code=code, reason=reason, **fields)
        return code

    def _run(self) -> int:
        seen = self.checkpoints()
        self.event("supervisor_start", command=self.command, max_restarts=self.max_restarts,
                   crash_loop=self.crash_loop if self.run_dir else None, grace=self.grace,
                   backoff=[self.backoff.base, self.backoff.max], newest_step=_newest(seen),
                   memory_tier=str(self._tier.path) if self._tier else None,
                   snapshot_every=self.snapshot_every, on_commit=self._hook.argv if self._hook else None)
        if self._hook is not None:
            self._hook.start(skip=_evaluated(self.run_dir))
        starts = failures = stalls = 0
        while True:
            starts += 1
            resume = _newest(seen)
            try:
                proc = self._proc = self._spawn()
            except OSError as err:
                self.echo(f"cannot start {self.command[0]!r}: {err}")
                return self._exit(127, "cannot start", error=str(err))
            if self._signal is not None:  # arrived while the child was being created
                self._on_signal(self._signal, None)
            self.event("child_start", n=starts, child_pid=proc.pid, resume_step=resume)
            self.echo(f"started child {starts} (pid {proc.pid})"
                      + (f", newest checkpoint: step {resume}" if resume is not None else ""))
            began = time.monotonic()
            rc, killed = self._wait(proc)
            if rc != 0:
                self._persist_snapshot()  # before anything reads the run: it is a checkpoint like the others
            now = self.checkpoints()
            progress = bool(now - seen)
            seen = now
            sig = signal.Signals(-rc).name if rc < 0 and -rc in signal.valid_signals() else None
            self.event("child_exit", n=starts, child_pid=proc.pid, code=rc if rc >= 0 else None, signal=sig,
                       seconds=round(time.monotonic() - began, 3), newest_step=_newest(now),
                       progress=progress, killed_after_grace=killed)
            status = exit_status(rc)
            if self._signal is not None:
                name = signal.Signals(self._signal).name
                self.echo(f"child {describe_exit(rc)} after {name}; not restarting")
                return self._exit(status, "signal", signal=name)
            if rc == 0:
                self.echo(f"child exited 0 after {starts} start{'s' if starts > 1 else ''}; done")
                return self._exit(0, "done")
            failures = 1 if progress else failures + 1
            stalls = 0 if progress else stalls + 1
            what = f"child {starts} (pid {proc.pid}) {describe_exit(rc)}"
            if self.run_dir is not None and stalls >= self.crash_loop:
                msg = (f"crash loop: {stalls} consecutive crashes without a new committed checkpoint in "
                       f"{self.run_dir} (newest: {_step_text(now)}); giving up. The last {what}. Fix the "
                       "cause (see the child's output above) and start again")
                self.echo(msg)
                self.event("crash_loop", crashes=stalls, newest_step=_newest(now), message=msg)
                return self._exit(status or 1, "crash_loop")
            if self.max_restarts is not None and starts > self.max_restarts:
                self.echo(f"{what}; giving up after {self.max_restarts} restart"
                          f"{'s' if self.max_restarts != 1 else ''} (--max-restarts)")
                return self._exit(status or 1, "max_restarts")
            delay = self.backoff.delay(failures, self.rng)
            limit = f" of {self.max_restarts}" if self.max_restarts is not None else ""
            self.echo(f"{what}; restart {starts}{limit} in {delay:.3g}s"
                      + ("" if progress or self.run_dir is None else
                         f" (no new checkpoint: {stalls} of {self.crash_loop} before a crash loop)"))
            self.event("restart", n=starts + 1, delay=round(delay, 3), after_code=rc if rc >= 0 else None,
                       after_signal=sig)
            if self._sleep(delay):
                name = signal.Signals(self._signal).name
                self.echo(f"{name} while waiting to restart; stopping")
                return self._exit(128 + self._signal, "signal", signal=name)


def _evaluated(run_dir: Path | None) -> set[int]:
    """Steps that already have metrics stored after their commit (an earlier evaluation)."""
    from .catalog import read_run_meta

    if run_dir is None:
        return set()
    later = read_run_meta(run_dir).get("metrics", {})
    return {int(step) for step in later if str(step).isdigit()} if isinstance(later, dict) else set()


def _newest(checkpoints: set[tuple[int, str]]) -> int | None:
    return max((step for step, _ in checkpoints), default=None)


def _step_text(checkpoints: set[tuple[int, str]]) -> str:
    newest = _newest(checkpoints)
    return "none" if newest is None else f"step {newest}"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child and whatever it started (data loader workers): it leads its own group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except ProcessLookupError:
            pass


def _die_with_parent(parent: int) -> None:
    """In the child before exec: get SIGKILL when the supervisor dies (Linux prctl)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)
