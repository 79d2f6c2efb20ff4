"""``/metrics`` in the Prometheus text format, one labelled series per run.

Alerting needs numbers, not pages: "no checkpoint for an hour", "the last save took 10x longer",
"the disk is nearly full", "the run keeps restarting", "the mirror is behind". Every value is read
from the run directory at scrape time (``rundir.listing`` and the event log); nothing is cached,
so a scrape is the truth even across dashboard restarts.
"""

from __future__ import annotations

from typing import Any

from .. import layout
from ..catalog import read_run_meta
from ..rundir import RunView, listing
from .history import read_jsonl

# name, type, help
METRICS = [
    ("safepoint_checkpoints", "gauge", "Committed checkpoints in the run directory."),
    ("safepoint_corrupt_checkpoints", "gauge", "Checkpoints whose manifest cannot be read."),
    ("safepoint_newest_checkpoint_step", "gauge", "Step of the newest committed checkpoint."),
    ("safepoint_newest_checkpoint_timestamp_seconds", "gauge", "Commit time of the newest checkpoint (Unix)."),
    ("safepoint_last_save_duration_seconds", "gauge", "Duration of the last save, from its save event."),
    ("safepoint_last_save_bytes", "gauge", "Size of the last saved checkpoint."),
    ("safepoint_saved_bytes_total", "counter", "Bytes of every checkpoint saved, from the event log."),
    ("safepoint_saves_total", "counter", "Saves recorded in the event log."),
    ("safepoint_save_failures_total", "counter", "Failed saves recorded in the event log."),
    ("safepoint_run_bytes", "gauge", "Bytes the run directory occupies."),
    ("safepoint_max_disk_bytes", "gauge", "The run's disk budget (max_disk), when set."),
    ("safepoint_disk_free_bytes", "gauge", "Free bytes on the run directory's filesystem."),
    ("safepoint_disk_total_bytes", "gauge", "Size of the run directory's filesystem."),
    ("safepoint_attempts_total", "counter", "Processes that opened the run (start events)."),
    ("safepoint_restarts_total", "counter", "Restarts by the supervisor (safepoint run)."),
    ("safepoint_crash_loops_total", "counter", "Crash loops the supervisor stopped."),
    ("safepoint_mirror_pending_checkpoints", "gauge", "Committed checkpoints not yet mirrored (skipped ones aside)."),
    ("safepoint_mirror_lag_steps", "gauge", "Newest checkpoint step minus newest mirrored step."),
]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def run_values(view: RunView) -> dict[str, float]:
    data = listing(view, best_specs=())
    events = read_jsonl(view.path / layout.EVENTS_FILE)
    saves = [e for e in events if e.get("event") == "save"]
    counts: dict[str, int] = {}
    for e in events:
        counts[str(e.get("event"))] = counts.get(str(e.get("event")), 0) + 1
    out: dict[str, float] = {
        "safepoint_checkpoints": len(view.checkpoints),
        "safepoint_corrupt_checkpoints": len(view.corrupt),
        "safepoint_saved_bytes_total": sum(e.get("size") or 0 for e in saves if isinstance(e.get("size"), int)),
        "safepoint_saves_total": len(saves),
        "safepoint_save_failures_total": counts.get("save_failed", 0),
        "safepoint_run_bytes": data["run_size"],
        "safepoint_disk_free_bytes": data["fs_free"],
        "safepoint_disk_total_bytes": data["fs_total"],
        "safepoint_attempts_total": counts.get("start", 0),
        "safepoint_restarts_total": counts.get("restart", 0),
        "safepoint_crash_loops_total": counts.get("crash_loop", 0),
    }
    if view.checkpoints:
        newest = view.checkpoints[-1]
        out["safepoint_newest_checkpoint_step"] = newest.step
        out["safepoint_newest_checkpoint_timestamp_seconds"] = round(newest.committed_at.timestamp(), 3)
    if saves:
        if isinstance(saves[-1].get("seconds"), (int, float)):
            out["safepoint_last_save_duration_seconds"] = saves[-1]["seconds"]
        if isinstance(saves[-1].get("size"), int):
            out["safepoint_last_save_bytes"] = saves[-1]["size"]
    if data["max_disk"] is not None:
        out["safepoint_max_disk_bytes"] = data["max_disk"]
    meta = read_run_meta(view.path)
    if "mirrored" in meta:
        mirrored = {s for s in meta["mirrored"] if isinstance(s, int)}
        skipped = set(meta.get("mirror_skipped", []))  # the mirror will never upload these
        steps = [c.step for c in view.checkpoints if c.step not in skipped]
        out["safepoint_mirror_pending_checkpoints"] = sum(1 for s in steps if s not in mirrored)
        if steps:
            out["safepoint_mirror_lag_steps"] = max(steps) - max((s for s in mirrored), default=0)
    return out


def render(runs: list[tuple[str, RunView]]) -> str:
    values = [(name or ".", run_values(view)) for name, view in runs]
    lines: list[str] = []
    for metric, kind, text in METRICS:
        lines += [f"# HELP {metric} {text}", f"# TYPE {metric} {kind}"]
        for name, got in values:
            if metric in got:
                lines.append(f'{metric}{{run="{_label(name)}"}} {_number(got[metric])}')
    return "\n".join(lines) + "\n"


def _number(value: Any) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
