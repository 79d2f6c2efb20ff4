"""The dashboard's write actions, through the same library code the CLI uses.

Pin/unpin go through ``prune.set_pinned`` (atomic ``run.json`` replace; fine beside a live run).
Delete takes the run lock like ``safepoint prune`` (refused while a writer is live), refuses every
protected checkpoint with the reasons ``RunView.protection`` gives (newest, pinned, resumed-from,
best by a metric, Trainer's best — what ``safepoint ls`` flags), and deletes crash-safely through
``.trash/``. Verify re-hashes like ``safepoint verify``. Export writes weights-only safetensors
into ``<run>/exports/`` — inside the served directory, never a path taken from the request.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..commit import delete_checkpoint
from ..errors import SafepointError
from ..prune import run_lock, set_pinned
from ..rundir import RunView, default_best_specs, open_run, verify_run, verify_targets
from ..runlog import RunLog

EXPORT_DIR = "exports"
_DTYPES = ("bf16", "fp16", "fp32")


class Refused(SafepointError):
    """An action the dashboard will not do (a protected checkpoint, a missing confirmation)."""


def pin(view: RunView, step: int, pinned: bool) -> str:
    set_pinned(view.path, step, pinned)
    return f"{'pinned' if pinned else 'unpinned'} step {step}"


def delete(view: RunView, step: int, confirm: Any) -> str:
    if confirm != step:
        raise Refused(f"deleting step {step} needs confirmation: send confirm={step}")
    with run_lock(view.path):  # DirectoryLocked while a live run writes here
        view = open_run(view.path)
        path = view.step_dir(step)  # CheckpointNotFound for an unknown step
        reasons = view.protection(default_best_specs(view)).get(step)
        if reasons:
            raise Refused(f"step {step} is protected ({', '.join(reasons)}); unpin it, or let a newer or better "
                          "checkpoint take its place, before deleting it")
        delete_checkpoint(view.path, path.name)
        if view.kind == "safepoint":
            log = RunLog(view.path)
            try:
                log.event("prune", step=step, reason="deleted from the dashboard", by="dashboard")
            finally:
                log.close()
    return f"deleted step {step}"


def verify(view: RunView, step: int | None) -> tuple[str, list[dict[str, Any]]]:
    results = verify_run(view, verify_targets(view, step))
    failed = [r for r in results if not r.ok]
    rows = [{"step": r.step, "ok": r.ok, "detail": r.detail} for r in results]
    if not results:
        return "no checkpoints to verify", rows
    if failed:
        return (f"{len(failed)} of {len(results)} failed verification: "
                + "; ".join(f"step {r.step}: {r.detail}" for r in failed)), rows
    return f"{len(results)} checkpoint{'s' if len(results) != 1 else ''} verified", rows


def export(view: RunView, step: int, dtype: str | None) -> tuple[str, Path]:
    from ..export import export as export_checkpoint

    if dtype is not None and dtype not in _DTYPES:
        raise Refused(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    source = view.find(step).path
    out = view.path / EXPORT_DIR / (source.name + (f"-{dtype}" if dtype else ""))
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", out.name):
        raise Refused(f"cannot export {source.name}: unexpected directory name")
    out.parent.mkdir(exist_ok=True)
    files = export_checkpoint(source, out, dtype=dtype)
    return f"exported step {step} to {out} ({len(files)} weight file{'s' if len(files) != 1 else ''})", out
