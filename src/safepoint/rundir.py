"""One read-only view of a checkpoint directory: a safepoint run or a Hugging Face output dir.

``open_run`` decides which kind a directory is (or refuses it with ``RunDirectoryError``) and
gathers what listings need: checkpoints, unreadable ones, debris of unfinished saves and
deletions, pins, the step the run last resumed from (the last ``restore`` event in
``events.jsonl``) and, for Trainer output, the checkpoint Trainer itself considers best. The CLI
renders what this module returns (``listing``, ``details``, ``verify_run``), so the table, the
``--json`` output and any other front end agree. Nothing here writes; see ``prune`` for that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import hfdir, layout
from .catalog import CheckpointInfo, leftover_tmp_dirs, list_checkpoints, read_run_meta, scan, verify
from .encoding import describe as describe_encoding, stored_file
from .disk import format_size, parse_size, tree_size
from .errors import CheckpointNotFound, CorruptCheckpoint, RunDirectoryError, UnsupportedFormat
from .manifest import Manifest, read_manifest
from .retention import KeepBest, RetentionPolicy, protected_steps, with_bases

Kind = Literal["safepoint", "hf"]
# Metric names whose direction is clear enough to flag a best checkpoint without being told.
_LOWER_IS_BETTER = re.compile(r"loss|perplexity|ppl|err|wer|cer|mse|mae", re.I)
_HIGHER_IS_BETTER = re.compile(r"acc|f1|bleu|rouge|auc|precision|recall|exact_match|reward", re.I)


@dataclass(frozen=True)
class Debris:
    path: Path
    what: str


@dataclass
class RunView:
    """A checkpoint directory as listings see it; ``checkpoints`` are oldest first."""

    path: Path
    kind: Kind
    checkpoints: list[CheckpointInfo]
    corrupt: dict[Path, str] = field(default_factory=dict)
    debris: list[Debris] = field(default_factory=list)
    resumed_from: int | None = None
    trainer_best: int | None = None
    max_disk: int | None = None

    def find(self, step: int) -> CheckpointInfo:
        for info in self.checkpoints:
            if info.step == step:
                return info
        raise CheckpointNotFound(f"no checkpoint for step {step} in {self.path} (steps: {self.steps_text()})")

    def step_dir(self, step: int) -> Path:
        """The directory of ``step``, committed or with an unreadable manifest."""
        for path in [c.path for c in self.checkpoints] + list(self.corrupt):
            if _step_of(path) == step:
                return path
        raise CheckpointNotFound(f"no checkpoint for step {step} in {self.path} (steps: {self.steps_text()})")

    def steps_text(self) -> str:
        return ", ".join(str(c.step) for c in self.checkpoints) or "none"

    def metric_names(self) -> list[str]:
        return sorted({name for c in self.checkpoints for name in c.metrics})

    def protected(self, policies: Iterable[RetentionPolicy] = ()) -> set[int]:
        """Steps no prune may delete: newest, resumed-from, pinned, best, and Trainer's best."""
        steps = protected_steps(self.checkpoints, resumed_from=self.resumed_from, policies=policies)
        if self.trainer_best is not None and any(c.step == self.trainer_best for c in self.checkpoints):
            steps.add(self.trainer_best)
        return with_bases(steps, self.checkpoints)

    def protection(self, policies: Iterable[RetentionPolicy] = ()) -> dict[int, list[str]]:
        """Why each protected step is protected, for messages (``protected`` is the authority), and
        the base of every delta: deleting a base on its own would orphan its deltas (a prune deletes
        a base only after them)."""
        policies = list(policies)
        protected = self.protected(policies)
        why: dict[int, list[str]] = {}
        if self.checkpoints:
            why.setdefault(max(c.step for c in self.checkpoints), []).append("newest")
        for c in self.checkpoints:
            if c.pinned:
                why.setdefault(c.step, []).append("pinned")
        if self.resumed_from is not None:
            why.setdefault(self.resumed_from, []).append("resumed-from")
        for metric, step in best_steps(self.checkpoints, [p for p in policies if isinstance(p, KeepBest)]).items():
            why.setdefault(step, []).append(f"best({metric})")
        if self.trainer_best in protected:
            why.setdefault(self.trainer_best, []).append("best(trainer)")
        out = {step: reasons for step, reasons in sorted(why.items()) if step in protected}
        present = {c.step for c in self.checkpoints}
        for c in self.checkpoints:
            if c.parent in present:
                out.setdefault(c.parent, []).append(f"base of delta {c.step}")
        return dict(sorted(out.items()))


def is_committed(info: CheckpointInfo) -> bool:
    """Committed by safepoint (has a manifest): always for ``step_N``, maybe for ``checkpoint-N``."""
    return bool(info.committed)


def open_run(directory: str | os.PathLike[str]) -> RunView:
    """Read ``directory`` as a safepoint run (``step_*`` dirs or ``run.json``) or a Trainer output dir."""
    path = Path(directory)
    if not path.exists():
        raise RunDirectoryError(f"{path} does not exist")
    if not path.is_dir():
        raise RunDirectoryError(f"{path} is not a directory")
    names = os.listdir(path)
    has_steps = any(layout.parse_step(n) is not None or layout.is_tmp_name(n) for n in names)
    meta = read_run_meta(path)
    if has_steps or (meta and not hfdir.is_output_dir(path)):
        view = RunView(path, "safepoint", list_checkpoints(path),
                       corrupt={p: str(m) for p, m in scan(path) if not isinstance(m, Manifest)},
                       debris=[Debris(p, "unfinished save") for p in leftover_tmp_dirs(path)])
    elif hfdir.is_output_dir(path):
        checkpoints = hfdir.list_checkpoints(path)
        corrupt = {c.path: str(m) for c in checkpoints
                   if isinstance(m := hfdir.manifest_of(c.path), (CorruptCheckpoint, UnsupportedFormat))}
        view = RunView(path, "hf", checkpoints, corrupt=corrupt, trainer_best=hfdir.trainer_best_step(checkpoints))
    else:
        nested = sorted(n for n in names if hfdir.is_output_dir(path / n))[:3]  # ms-swift: output/v0-<time>/
        hint = f"; did you mean {', '.join(str(path / n) for n in nested)}?" if nested else ""
        raise RunDirectoryError(f"{path} is neither a safepoint run (no step_* directories or run.json) nor a "
                                f"Hugging Face output directory (no checkpoint-N directories){hint}")
    trash = path / layout.TRASH_DIR
    if trash.is_dir():
        view.debris += [Debris(p, "deletion in progress") for p in sorted(trash.iterdir())]
    view.resumed_from = last_restore(path)
    try:
        view.max_disk = parse_size(meta["max_disk"]) if meta.get("max_disk") is not None else None
    except ValueError:
        view.max_disk = None
    return view


def last_restore(run_dir: Path) -> int | None:
    """The step the run last resumed from: the last ``restore`` event that loaded a checkpoint."""
    try:
        lines = (run_dir / layout.EVENTS_FILE).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            event = json.loads(line)
        except ValueError:  # a line torn by a crash
            continue
        if isinstance(event, dict) and event.get("event") == "restore":
            return int(event["step"]) if event.get("checkpoint") and isinstance(event.get("step"), int) else None
    return None


def guess_mode(metric: str) -> Literal["min", "max"] | None:
    """min for loss-like names, max for accuracy-like ones, None when the name does not say."""
    if _HIGHER_IS_BETTER.search(metric):
        return "max"
    if _LOWER_IS_BETTER.search(metric):
        return "min"
    return None


def default_best_specs(view: RunView) -> list[KeepBest]:
    return [KeepBest(1, name, mode) for name in view.metric_names() if (mode := guess_mode(name))]


def best_steps(checkpoints: list[CheckpointInfo], specs: Iterable[KeepBest]) -> dict[str, int]:
    """``{metric: step}`` of the best checkpoint by each spec (ranked as retention ranks them)."""
    out = {}
    for spec in specs:
        ranked = spec.ranked(checkpoints)
        if ranked:
            out[spec.metric] = ranked[0].step
    return out


def flags(view: RunView, info: CheckpointInfo, best: dict[str, int]) -> list[str]:
    out = ["committed"] if is_committed(info) else []
    out += [f"best({metric})" for metric, step in best.items() if step == info.step]
    if info.step == view.trainer_best:
        out.append("best(trainer)")
    if info.pinned:
        out.append("pinned")
    if info.step == view.resumed_from:
        out.append("resumed-from")
    if info.path in view.corrupt:
        out.append("corrupt")
    if info.parent is not None:
        out.append(f"delta(of {info.parent})")
    return out


def listing(view: RunView, best_specs: Iterable[KeepBest] | None = None) -> dict[str, Any]:
    """Everything ``ls`` shows, JSON-ready (sizes in bytes, times ISO 8601 UTC)."""
    best = best_steps(view.checkpoints, default_best_specs(view) if best_specs is None else best_specs)
    usage = shutil.disk_usage(view.path)
    listed = {c.path for c in view.checkpoints}
    return {
        "directory": str(view.path), "kind": view.kind,
        "checkpoints": [{"step": c.step, "path": str(c.path), "time": c.committed or c.created,
                         "committed": is_committed(c), "size": c.size, "metrics": c.metrics,
                         "flags": flags(view, c, best)} for c in view.checkpoints],
        "corrupt": [{"step": _step_of(p), "path": str(p), "reason": r, "listed": p in listed}
                    for p, r in view.corrupt.items()],
        "debris": [{"path": str(d.path), "what": d.what, "size": tree_size(d.path)} for d in view.debris],
        "metrics": view.metric_names(), "best": best, "resumed_from": view.resumed_from,
        "pinned": [c.step for c in view.checkpoints if c.pinned],
        "run_size": tree_size(view.path), "fs_free": usage.free, "fs_total": usage.total,
        "max_disk": view.max_disk,
    }


def details(view: RunView, step: int) -> dict[str, Any]:
    """Everything ``show`` shows about one checkpoint; ``problem`` is set when it is unreadable."""
    path = view.step_dir(step)
    out: dict[str, Any] = {"step": step, "path": str(path), "kind": view.kind, "problem": view.corrupt.get(path),
                           "flags": [], "metrics": {}, "manifest": None, "entries": [], "files": []}
    manifest = None if out["problem"] or not (path / layout.MANIFEST).exists() else read_manifest(path)
    if view.kind == "safepoint" and out["problem"]:
        out["flags"] = ["corrupt"]
        return out
    info = view.find(step)
    out["flags"] = flags(view, info, best_steps(view.checkpoints, default_best_specs(view)))
    out["metrics"] = info.metrics
    if manifest is not None:
        doc = manifest.to_json()
        doc.pop("files")
        out["manifest"] = doc
        out["files"] = [{"name": n, "size": r.size, "hash": r.hash} for n, r in manifest.files.items()]
        out["entries"] = [{"name": e, "file": stored_file(manifest, e)} for e in manifest.entries]
        out["encoding"] = describe_encoding(manifest)
    if view.kind == "hf":
        if manifest is None:
            out["files"] = [{"name": str(p.relative_to(path)), "size": p.stat().st_size, "hash": None}
                            for p in sorted(path.rglob("*")) if p.is_file()]
        complete = hfdir.check_complete(path)
        out["completeness"] = {"present": complete.present, "problems": complete.problems}
    return out


# ------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class VerifyResult:
    step: int
    path: Path
    ok: bool
    detail: str


def verify_targets(view: RunView, step: int | None = None) -> list[Path]:
    """The directories ``verify_run`` checks: every checkpoint (corrupt ones too) or one step."""
    if step is not None:
        return [view.step_dir(step)]
    return sorted({c.path for c in view.checkpoints} | set(view.corrupt), key=lambda p: _step_of(p) or 0)


def bytes_to_hash(paths: Iterable[Path]) -> int:
    """What ``verify_run`` will re-hash, by the manifests (for a progress bar's total)."""
    total = 0
    for path in paths:
        try:
            total += read_manifest(path).total_size
        except (CorruptCheckpoint, UnsupportedFormat):
            pass
    return total


def verify_run(view: RunView, paths: Iterable[Path], *, on_result: Callable[[VerifyResult], None] | None = None,
               on_bytes: Callable[[int], None] | None = None) -> list[VerifyResult]:
    """Re-hash every checkpoint that has a manifest; check HF ones without one for completeness."""
    results = []
    for path in paths:
        result = _verify_one(view, path, on_bytes)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _verify_one(view: RunView, path: Path, on_bytes: Callable[[int], None] | None) -> VerifyResult:
    step = _step_of(path) or 0
    if view.kind == "hf" and not (path / layout.MANIFEST).exists():
        complete = hfdir.check_complete(path)
        state = (f"complete ({', '.join(complete.present)})" if complete.ok
                 else "INCOMPLETE: " + "; ".join(complete.problems))
        return VerifyResult(step, path, complete.ok, f"no manifest (not committed by safepoint); {state}")
    try:
        manifest = verify(path, on_file=(lambda _name, size: on_bytes(size)) if on_bytes else None)
    except (CorruptCheckpoint, UnsupportedFormat) as err:
        return VerifyResult(step, path, False, str(err))
    return VerifyResult(step, path, True, f"ok: {len(manifest.files)} files, {format_size(manifest.total_size)}, "
                                          f"{manifest.hash_algorithm} verified")


def _step_of(path: Path) -> int | None:
    step = layout.parse_step(path.name)
    return step if step is not None else hfdir.parse_checkpoint_step(path.name)
