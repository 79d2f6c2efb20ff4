"""The run's own records beside its checkpoints.

``run.json`` holds the run id and the durable, mutable facts about checkpoints (pins; with a
mirror: its URL, the steps mirrored and the steps the mirror skips; metrics learnt after a commit).
Several processes change it (the trainer, the supervisor's evaluation hook, the CLI's pin and
push), so every change is a read-modify-write under an ``flock`` on ``.run.json.lock``, and the
file is replaced atomically. ``events.jsonl`` is an append-only log of what happened
(start, save, restore, skip, prune, signal); ``metrics.jsonl`` is the metric log that
``step(metrics=...)`` feeds, one line per step with the attempt that logged it, so a curve can be
stitched across restarts. Log lines are flushed, not fsynced: losing the last few lines in a crash
costs nothing, while fsyncing every step would cost throughput.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from . import layout
from .catalog import read_run_meta
from .commit import write_json_atomic
from .manifest import utc_now

log = logging.getLogger("safepoint")


@contextmanager
def _run_json_locked(run_dir: Path) -> Iterator[None]:
    fd = os.open(run_dir / layout.RUN_JSON_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def update_run_meta(run_dir: Path, change: Callable[[dict[str, Any]], None], *,
                    create: bool = True) -> dict[str, Any] | None:
    """Apply ``change`` to the current run.json under the cross-process lock; return the new content.

    With ``create=False`` a directory without a run.json is left alone (returns None).
    """
    if not create and not (run_dir / layout.RUN_FILE).exists():
        return None
    with _run_json_locked(run_dir):
        meta = read_run_meta(run_dir)
        if not meta and not create:
            return None
        change(meta)
        write_json_atomic(run_dir / layout.RUN_FILE, meta)
        return meta


class RunLog:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.meta = read_run_meta(run_dir)
        if "run_id" not in self.meta:
            self.meta = {"run_id": secrets.token_hex(8), "created": utc_now(), "pins": []}
            self.write_meta()
        self.attempt = secrets.token_hex(4)
        self._lock = threading.Lock()
        self._meta_lock = threading.Lock()
        self._events: TextIO = open(run_dir / layout.EVENTS_FILE, "a", encoding="utf-8")
        self._metrics: TextIO = open(run_dir / layout.METRICS_FILE, "a", encoding="utf-8")

    @property
    def run_id(self) -> str:
        return self.meta["run_id"]

    def write_meta(self) -> None:
        write_json_atomic(self.run_dir / layout.RUN_FILE, self.meta)

    def set_pinned(self, step: int, pinned: bool) -> None:
        def change(meta: dict[str, Any]) -> None:
            pins = set(meta.get("pins", []))
            pins.add(step) if pinned else pins.discard(step)
            meta["pins"] = sorted(pins)

        self.update_meta(change)

    def set_mirrored(self, step: int, mirrored: bool, *, skipped: bool = False) -> None:
        """Record whether ``step`` is on the mirror ("mirrored"). ``skipped`` (with ``mirrored=False``)
        records that the mirror will not upload it ("mirror_skipped": its retention removed it, or
        the local copy is damaged), so it is not kept locally for the mirror's sake."""
        def change(meta: dict[str, Any]) -> None:
            done, skip = set(meta.get("mirrored", [])), set(meta.get("mirror_skipped", []))
            done.add(step) if mirrored else done.discard(step)
            skip.add(step) if skipped and not mirrored else skip.discard(step)
            meta["mirrored"], meta["mirror_skipped"] = sorted(done), sorted(skip)

        self.update_meta(change)

    def add_metrics(self, step: int, values: dict[str, float]) -> None:
        """Metrics learnt after a commit (an evaluation hook), merged into the checkpoint's own."""
        self.update_meta(lambda meta: meta.setdefault("metrics", {}).setdefault(str(step), {}).update(values))

    def update_meta(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Read-modify-write of run.json: re-read first (the CLI may pin while a run is live)."""
        fallback = self.meta

        def apply(meta: dict[str, Any]) -> None:
            if not meta:
                meta.update(fallback)
            change(meta)

        with self._meta_lock:
            self.meta = update_run_meta(self.run_dir, apply) or self.meta

    def event(self, kind: str, **fields: Any) -> None:
        record = {"time": utc_now(), "event": kind, "attempt": self.attempt, "pid": os.getpid(), **fields}
        try:
            with self._lock:  # the background writer logs too
                self._events.write(json.dumps(record, default=str) + "\n")
                self._events.flush()
        except OSError as err:  # a full disk must not stop training over a log line
            log.warning("safepoint: could not append to %s: %s", self._events.name, err)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        record = {"step": step, "time": time.time(), "attempt": self.attempt, **values}
        try:
            with self._lock:
                self._metrics.write(json.dumps(record, default=float) + "\n")
        except OSError as err:
            log.warning("safepoint: could not append to %s: %s", self._metrics.name, err)

    def flush(self) -> None:
        try:
            with self._lock:
                self._metrics.flush()
        except OSError as err:
            log.warning("safepoint: could not flush %s: %s", self._metrics.name, err)

    def close(self) -> None:
        for f in (self._events, self._metrics):
            try:
                f.close()
            except OSError as err:
                log.warning("safepoint: could not close %s: %s", f.name, err)
