"""What happened to a run over time, from its logs: stitched curves, marks, restarts.

A run that crashed and resumed has logged some steps twice: attempt A logged steps 41..47 and
died, attempt B resumed from the step-40 checkpoint and logged 41..47 again, with the values
that actually led to the final weights. ``metrics.jsonl`` tags each line with the attempt that
wrote it, so the stitched curve takes, for every step, the line of the latest attempt that logged
it. The marks explain the curve: saves, crashes (an attempt that started and never logged
``close``, or a supervisor ``child_exit`` that was not clean), resumes (``restore`` events) and
prunes. Hugging Face output dirs keep no metrics log; their curve is the newest checkpoint's
``trainer_state.json`` ``log_history``, which Trainer already keeps as one history.

Pure reading: torn last lines (a crash mid-write) are skipped, nothing is written.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import hfdir, layout

# Keys of a metrics line (or a log_history entry) that are not metrics.
_NOT_METRICS = {"step", "time", "attempt", "epoch", "total_flos", "train_runtime", "train_samples_per_second",
                "train_steps_per_second", "train_loss", "eval_runtime", "eval_samples_per_second",
                "eval_steps_per_second", "num_input_tokens_seen"}
SUPERVISOR_EVENTS = ("supervisor_start", "child_start", "child_exit", "restart", "crash_loop", "supervisor_exit")


# path -> (inode, bytes parsed, records): the logs are append-only, so a poll parses only what
# was appended since the last one (a long run's metrics.jsonl is not re-read every 3 seconds).
_CACHE: dict[Path, tuple[int, int, list[dict[str, Any]]]] = {}
_CACHE_LOCK = threading.Lock()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every JSON object line of ``path``; torn or foreign lines are skipped."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            with _CACHE_LOCK:
                inode, done, records = _CACHE.get(path, (-1, 0, []))
            if inode != st.st_ino or st.st_size < done:  # replaced or truncated: start over
                done, records = 0, []
            f.seek(done)
            data = f.read()
    except OSError:
        return []
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
    records = records + [r for line in data[:end].splitlines() if isinstance(r := _parse(line), dict)]
    with _CACHE_LOCK:
        _CACHE[path] = (st.st_ino, done + end, records)
    return list(records)


def _parse(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


@dataclass(frozen=True)
class Mark:
    kind: str  # save | crash | resume | prune | preempt
    step: int
    label: str


@dataclass
class Attempt:
    """One process's life in the run, from its ``start`` event."""

    id: str
    pid: int | None
    started: str
    closed: bool = False
    last_step: int | None = None
    resumed_from: int | None = None
    live: bool = False
    exit: str | None = None  # the supervisor's account of how it ended

    @property
    def crashed(self) -> bool:
        return (not self.closed and not self.live) or self.exit is not None


@dataclass
class History:
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    marks: list[Mark] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    supervisor: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def stitch(lines: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` by step, each step from the latest attempt that logged it."""
    order: dict[Any, int] = {}
    chosen: dict[int, tuple[int, dict[str, Any]]] = {}
    for line in lines:
        step = line.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        rank = order.setdefault(line.get("attempt"), len(order))  # attempts append in the order they ran
        if step not in chosen or rank >= chosen[step][0]:
            chosen[step] = (rank, line)
    curves: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(chosen):
        for key, value in chosen[step][1].items():
            if key not in _NOT_METRICS and (number := _number(value)) is not None:
                curves.setdefault(key, []).append((step, number))
    return dict(sorted(curves.items(), key=lambda kv: (kv[0] != "loss", kv[0])))


def _hf_log_history(run_dir: Path) -> list[dict[str, Any]]:
    for _, path in reversed(hfdir.checkpoint_dirs(run_dir)):
        history = hfdir.read_trainer_state(path).get("log_history")
        if isinstance(history, list):
            return [dict(e, attempt=None) for e in history if isinstance(e, dict)]
    return []


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exit_text(event: dict[str, Any]) -> str:
    if event.get("signal"):
        return f"killed by {event['signal']}"
    return f"exit code {event.get('code')}"


def read_history(run_dir: Path) -> History:
    """Curves, marks, attempts and the supervisor's records of ``run_dir``."""
    events = read_jsonl(run_dir / layout.EVENTS_FILE)
    metric_lines = read_jsonl(run_dir / layout.METRICS_FILE) or _hf_log_history(run_dir)
    history = History(curves=stitch(metric_lines), events=events)
    last_logged: dict[Any, int] = {}
    for line in metric_lines:
        if isinstance(line.get("step"), int):
            last_logged[line.get("attempt")] = max(last_logged.get(line.get("attempt"), 0), line["step"])

    attempts: dict[str, Attempt] = {}
    newest_step: int | None = None
    for e in events:
        kind, step = e.get("event"), e.get("step")
        step = step if isinstance(step, int) and not isinstance(step, bool) else None
        if e.get("source") == "supervisor" or kind in SUPERVISOR_EVENTS:
            history.supervisor.append(e)
            continue
        attempt = attempts.get(e.get("attempt")) if e.get("attempt") else None
        if kind == "start" and e.get("attempt"):
            attempt = attempts[e["attempt"]] = Attempt(e["attempt"], e.get("pid"), str(e.get("time", "")))
        if attempt is not None and step is not None:
            attempt.last_step = max(attempt.last_step or 0, step)
        if kind == "close" and attempt is not None:
            attempt.closed = True
        elif kind == "save" and step is not None:
            history.marks.append(Mark("save", step, f"saved step {step}"))
            newest_step = max(newest_step or 0, step)
        elif kind == "restore" and step is not None and e.get("checkpoint"):
            history.marks.append(Mark("resume", step, f"resumed from step {step}"))
            if attempt is not None:
                attempt.resumed_from = step
        elif kind == "prune" and step is not None:
            history.marks.append(Mark("prune", step, f"pruned step {step}: {e.get('reason', '')}".rstrip(": ")))
        elif kind == "preempted" and step is not None:
            history.marks.append(Mark("preempt", step, f"{e.get('signal', 'signal')} at step {step}: saved and stopped"))

    ordered = list(attempts.values())
    if ordered and not ordered[-1].closed:
        ordered[-1].live = _alive(ordered[-1].pid)
    by_pid = {a.pid: a for a in ordered if a.pid is not None}
    for e in history.supervisor:
        if e.get("event") == "child_exit" and (e.get("code") != 0 or e.get("signal")):
            attempt = by_pid.get(e.get("child_pid"))
            if attempt is not None:
                attempt.exit = _exit_text(e)
            else:  # died before it opened the run (an import error, an OOM while loading)
                step = e.get("newest_step") if isinstance(e.get("newest_step"), int) else 0
                history.marks.append(Mark("crash", step, f"child {e.get('n')} {_exit_text(e)} before opening the run"))
    for a in ordered:
        a.last_step = max(a.last_step or 0, last_logged.get(a.id, 0)) or a.last_step
        if a.crashed:
            where = a.last_step if a.last_step is not None else (a.resumed_from or 0)
            history.marks.append(Mark("crash", where, f"attempt {a.id} (pid {a.pid}) ended without closing "
                                                      f"after step {where}" + (f": {a.exit}" if a.exit else "")))
    history.attempts = ordered
    history.marks.sort(key=lambda m: (m.step, m.kind))
    return history


def restart_rows(history: History) -> list[dict[str, Any]]:
    """The supervisor's records as table rows: time, event, child number, what happened."""
    rows = []
    for e in history.supervisor:
        kind = e.get("event", "")
        if kind == "supervisor_start":
            what = "supervisor started: " + " ".join(map(str, e.get("command") or []))
        elif kind == "child_start":
            resume = e.get("resume_step")
            what = f"pid {e.get('child_pid')}" + (f", newest checkpoint step {resume}" if resume is not None else "")
        elif kind == "child_exit":
            what = (("clean exit" if e.get("code") == 0 and not e.get("signal") else _exit_text(e))
                    + f" after {e.get('seconds', '?')}s; newest step {e.get('newest_step')}"
                    + ("" if e.get("progress") else "; no new checkpoint"))
        elif kind == "restart":
            what = f"restarting in {e.get('delay')}s"
        elif kind == "crash_loop":
            what = str(e.get("message", "crash loop"))
        elif kind == "supervisor_exit":
            what = f"supervisor exited {e.get('code')} ({e.get('reason')})"
        else:
            what = ""
        rows.append({"time": e.get("time", ""), "event": kind, "n": e.get("n"), "what": what})
    return rows
