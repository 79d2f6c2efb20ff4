"""Evaluate each new checkpoint with a command: ``safepoint run --on-commit "python eval.py {path}"``.

A loss on training batches says little about which checkpoint to keep; an evaluation on held-out
data does, but it belongs beside the training loop, not inside it (another process, its own
dependencies, its own failures). The supervisor already watches the run directory, so it runs the
command once for every checkpoint committed while it runs (the trainer's own, and those it persisted
from the memory tier), one at a time, while training goes on:

* the command is split like a shell would (``shlex``) but runs without one; ``{path}``, ``{step}``
  and ``{run_dir}`` in its arguments are replaced, and ``SAFEPOINT_CHECKPOINT`` /
  ``SAFEPOINT_STEP`` are set in its environment;
* its last non-empty line of standard output is the result: a number (stored as the metric
  ``score``) or a JSON object of numbers (``{"eval_loss": 0.41}``);
* the result is stored as metrics of that step in ``run.json``'s metrics overlay, where
  ``safepoint ls``, the dashboard and ``KeepBest`` see it as the checkpoint's own;
* a non-zero exit or a result that cannot be read is an ``on_commit_failed`` event and a message;
  training is never stopped by it.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .runlog import update_run_meta
from .errors import SafepointError

PLACEHOLDERS = ("{path}", "{step}", "{run_dir}")
DEFAULT_METRIC = "score"
_TAIL = 2000  # characters of a failed command's output kept in its event


class CommitHook:
    """Runs ``template`` for each checkpoint that appears in ``run_dir``, on a background thread.

    ``start(skip)`` begins watching (steps in ``skip`` are never evaluated); ``stop(drain=True)``
    looks once more and waits for what is due, ``stop(drain=False)`` stops the running command.
    """

    def __init__(self, template: str, run_dir: Path, *, event: Callable[..., None], echo: Callable[[str], None],
                 poll: float = 1.0, env: dict[str, str] | None = None) -> None:
        try:
            self.argv = shlex.split(template)
        except ValueError as err:
            raise ValueError(f"--on-commit {template!r}: {err}") from None
        if not self.argv:
            raise ValueError("--on-commit needs a command, e.g. --on-commit 'python eval.py {path}'")
        self.run_dir = Path(run_dir)
        self.event = event
        self.echo = echo
        self.poll = poll
        self.env = env
        self._done: set[int] = set()
        self._stop = threading.Event()
        self._drain = False
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def start(self, skip: set[int]) -> None:
        self._done = set(skip)
        self._thread = threading.Thread(target=self._loop, name="safepoint-on-commit", daemon=True)
        self._thread.start()

    def stop(self, *, drain: bool) -> None:
        if self._thread is None:
            return
        self._drain = drain
        self._stop.set()
        proc = self._proc
        if not drain and proc is not None and proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
        self._thread.join()
        self._thread = None

    def _loop(self) -> None:
        while True:
            stopping = self._stop.is_set()
            for step, path in self._new_checkpoints():
                if self._stop.is_set() and not self._drain:
                    return
                self._evaluate(step, path)
            if stopping:
                return
            self._stop.wait(self.poll)

    def _new_checkpoints(self) -> list[tuple[int, Path]]:
        from .rundir import is_committed, open_run

        try:
            view = open_run(self.run_dir)
        except (SafepointError, OSError):
            return []
        return [(c.step, c.path) for c in view.checkpoints if is_committed(c) and c.step not in self._done]

    def _evaluate(self, step: int, path: Path) -> None:
        self._done.add(step)
        if not path.exists():  # retention deleted it while earlier ones were evaluated
            return
        argv = [_fill(arg, path=path, step=step, run_dir=self.run_dir) for arg in self.argv]
        env = dict(self.env if self.env is not None else os.environ,
                   SAFEPOINT_CHECKPOINT=str(path), SAFEPOINT_STEP=str(step))
        started = time.monotonic()
        try:
            self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                          start_new_session=True)  # stopped as a group, with what it starts
            out, err = self._proc.communicate()
            code = self._proc.returncode
        except OSError as error:
            self._failed(step, f"cannot start {argv[0]!r}: {error}", code=None, output="")
            return
        finally:
            self._proc = None
        seconds = round(time.monotonic() - started, 3)
        if code != 0:
            self._failed(step, f"exited with code {code}", code=code, output=(err or out)[-_TAIL:])
            return
        try:
            metrics = parse_result(out)
        except ValueError as error:
            self._failed(step, str(error), code=0, output=out[-_TAIL:])
            return
        stored = record_metrics(self.run_dir, step, metrics)
        self.event("on_commit", step=step, metrics=metrics, seconds=seconds, stored=stored)
        self.echo(f"--on-commit for step {step}: {json.dumps(metrics)}")

    def _failed(self, step: int, reason: str, *, code: int | None, output: str) -> None:
        self.event("on_commit_failed", step=step, code=code, reason=reason, output=output)
        self.echo(f"--on-commit for step {step} failed: {reason}" + (f"\n{output.rstrip()}" if output.strip() else ""))


def _signal_group(proc: subprocess.Popen[str], signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _fill(arg: str, *, path: Path, step: int, run_dir: Path) -> str:
    return arg.replace("{path}", str(path)).replace("{step}", str(step)).replace("{run_dir}", str(run_dir))


def parse_result(stdout: str) -> dict[str, float]:
    """The metrics on the last non-empty line: a number, or a JSON object of numbers."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ValueError("printed nothing; its last line of output must be a number or a JSON object of numbers")
    last = lines[-1]
    try:
        value: Any = json.loads(last)
    except ValueError:
        raise ValueError(f"its last line {last[:200]!r} is neither a number nor a JSON object") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = {DEFAULT_METRIC: value}
    if not isinstance(value, dict) or not value:
        raise ValueError(f"its last line {last[:200]!r} is neither a number nor a JSON object of numbers")
    metrics = {}
    for key, number in value.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ValueError(f"metric {key!r} in its last line is {number!r}, not a finite number")
        metrics[str(key)] = float(number)
    return metrics


def record_metrics(run_dir: Path, step: int, values: dict[str, float]) -> bool:
    """Merge ``values`` into ``run.json``'s metrics for ``step`` (the overlay ``list_checkpoints``
    applies); False when the directory has no safepoint ``run.json`` to hold them.

    The trainer rewrites run.json too (pins, mirror state), from another process; both go through
    ``update_run_meta``'s lock, so neither update is lost.
    """
    def change(meta: dict[str, Any]) -> None:
        if "run_id" in meta:
            meta.setdefault("metrics", {}).setdefault(str(step), {}).update(values)

    meta = update_run_meta(run_dir, change, create=False)
    return meta is not None and "run_id" in meta
