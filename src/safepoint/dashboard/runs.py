"""Which runs a served directory holds, and how a request's path maps onto one, safely.

A request names a run by its path relative to the served directory. That path comes from the
network, so it is resolved (symlinks and ``..`` included) and must stay inside the served
directory and be a run that ``rundir.open_run`` accepts; anything else is ``NotFound`` (404),
never a different error that would tell a prober what exists outside. The data a page shows is
``rundir.listing`` — exactly what ``safepoint ls --json`` prints — plus the protection reasons,
the mirrored state from ``run.json`` and the history from ``history.read_history``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import hfdir, layout
from ..catalog import read_run_meta
from ..errors import SafepointError
from ..rundir import RunView, default_best_specs, listing, open_run
from .history import History, Mark, read_history, restart_rows

MAX_DEPTH = 3
MAX_RUNS = 500


class NotFound(LookupError):
    """No run at that path (or a path outside the served directory): always answered with 404."""


def resolve(root: Path, rel: str) -> Path:
    """The directory ``rel`` names inside ``root``; NotFound when it escapes or does not exist."""
    base = root.resolve()
    if "\x00" in rel or Path(rel).is_absolute():
        raise NotFound(rel)
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise NotFound(rel)
    if not target.is_dir():
        raise NotFound(rel)
    return target


def open_served(root: Path, rel: str) -> tuple[RunView, str]:
    """The run at ``rel`` and its canonical relative name ('' for the served directory itself)."""
    path = resolve(root, rel)
    try:
        view = open_run(path)
    except (SafepointError, OSError):
        raise NotFound(rel) from None
    name = path.relative_to(root.resolve()).as_posix()
    return view, "" if name == "." else name


def _skip(name: str) -> bool:
    return (name.startswith(".") or layout.parse_step(name) is not None or layout.is_tmp_name(name)
            or hfdir.parse_checkpoint_step(name) is not None)


def find_runs(root: Path) -> list[tuple[str, RunView]]:
    """Runs under ``root`` (itself, or directories up to ``MAX_DEPTH`` below it), by name."""
    base = root.resolve()
    found: list[tuple[str, RunView]] = []
    frontier = [base]
    for _ in range(MAX_DEPTH + 1):
        following: list[Path] = []
        for directory in frontier:
            try:
                view = open_run(directory)
            except (SafepointError, OSError):
                try:
                    entries = sorted(os.scandir(directory), key=lambda e: e.name)
                except OSError:
                    continue
                following += [Path(e.path) for e in entries
                              if e.is_dir(follow_symlinks=False) and not _skip(e.name)]
                continue
            name = directory.relative_to(base).as_posix()
            found.append(("" if name == "." else name, view))
            if len(found) >= MAX_RUNS:
                return found
        frontier = following
    return found


def run_overview(name: str, view: RunView) -> dict[str, Any]:
    """One line of the run index."""
    newest = view.checkpoints[-1] if view.checkpoints else None
    return {"name": name or ".", "path": name, "kind": view.kind, "checkpoints": len(view.checkpoints),
            "newest_step": newest.step if newest else None, "newest_time": (newest.committed or newest.created)
            if newest else None, "size": sum(c.size for c in view.checkpoints), "corrupt": len(view.corrupt)}


def summarize(view: RunView, verified: dict[int, tuple[bool, str]] | None = None) -> dict[str, Any]:
    """``listing`` plus per-checkpoint protection reasons, mirrored and verification state."""
    data = listing(view)
    meta = read_run_meta(view.path)
    mirrored = {s for s in meta.get("mirrored", []) if isinstance(s, int)}
    protection = view.protection(default_best_specs(view))
    verified = verified or {}
    for c in data["checkpoints"]:
        flags = list(c["flags"])
        if c["step"] in mirrored and "mirrored" not in flags:
            flags.append("mirrored")
        if c["step"] in verified and not verified[c["step"]][0] and "corrupt" not in flags:
            flags.append("verify failed")
        c["flags"] = flags
        c["protected"] = protection.get(c["step"], [])
        c["verified"] = verified.get(c["step"])
    data["has_mirror"] = "mirrored" in meta
    data["mirrored"] = sorted(mirrored)
    return data


def run_state(name: str, view: RunView, verified: dict[int, tuple[bool, str]] | None = None) -> dict[str, Any]:
    """Everything a run page and its live updates show, JSON-ready."""
    history: History = read_history(view.path)
    if not any(m.kind == "save" for m in history.marks):  # no event log (Trainer output): the checkpoints
        history.marks += [Mark("save", c.step, f"checkpoint at step {c.step}") for c in view.checkpoints]
    return {
        "run": name, "listing": summarize(view, verified),
        "curves": {k: [[s, v] for s, v in pts] for k, pts in history.curves.items()},
        "marks": [{"kind": m.kind, "step": m.step, "label": m.label} for m in history.marks],
        "attempts": [{"id": a.id, "pid": a.pid, "started": a.started, "closed": a.closed, "live": a.live,
                      "crashed": a.crashed, "last_step": a.last_step, "resumed_from": a.resumed_from, "exit": a.exit}
                     for a in history.attempts],
        "restarts": restart_rows(history),
        "live": bool(history.attempts and history.attempts[-1].live),
    }
