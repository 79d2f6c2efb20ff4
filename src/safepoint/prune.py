"""Maintenance outside a live manager: prune, garbage-collect, pin. Used by the ``safepoint`` CLI.

Pruning takes the run lock (so it never races a live ``CheckpointManager``), plans with the same
retention functions the manager uses (``plan_deletions``, then ``budget_candidates`` oldest first
until the run fits ``max_disk``), and deletes through ``commit.delete_checkpoint``: one rename into
``.trash/`` takes a checkpoint out of every listing before its bytes go. The protected set
(newest, best, pinned, resumed-from, and Trainer's own best in a Hugging Face output dir) is
never deleted. A budget that cannot be met without touching it is refused before anything is
deleted, as are policies that name a metric no checkpoint has (a typo would otherwise delete the
checkpoints it was meant to keep).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from . import layout
from .catalog import read_run_meta
from .commit import delete_checkpoint, remove_tree
from .disk import format_size, parse_size, tree_size
from .lock import RunLock
from .retention import KeepBest, KeepEvery, KeepLast, KeepWithin, RetentionPolicy, budget_candidates, plan_deletions
from .rundir import RunView, open_run
from .runlog import RunLog

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$", re.I)
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``timedelta`` from ``"90s"``, ``"30m"``, ``"2h"``, ``"3d"``, ``"1w"``."""
    m = _DURATION.match(text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"cannot read {text!r} as a duration; use e.g. 30m, 2h, 3d, 1w")
    return timedelta(seconds=float(m.group(1)) * _SECONDS[m.group(2).lower()])


def parse_keep_best(spec: str) -> KeepBest:
    """``KeepBest(1, ...)`` from ``"eval_loss"``, ``"eval_loss:min"`` or ``"accuracy:max"``."""
    metric, _, mode = spec.partition(":")
    if mode not in ("", "min", "max"):
        raise ValueError(f"--keep-best {spec!r}: the mode after ':' must be min or max")
    return KeepBest(1, metric, mode or "min")  # type: ignore[arg-type]


def policies_from_options(*, keep_last: int | None = None, keep_best: Sequence[str] = (),
                          keep_every: int | None = None, keep_within: str | None = None) -> list[RetentionPolicy]:
    """The retention policies the CLI options name; ValueError for bad or conflicting values."""
    policies: list[RetentionPolicy] = []
    if keep_last is not None:
        policies.append(KeepLast(keep_last))
    best = [parse_keep_best(s) for s in keep_best]
    modes: dict[str, str] = {}
    for b in best:
        if modes.setdefault(b.metric, b.mode) != b.mode:
            raise ValueError(f"--keep-best {b.metric}:min and {b.metric}:max conflict; pick one direction")
    policies += list({(b.metric, b.mode): b for b in best}.values())
    if keep_every is not None:
        policies.append(KeepEvery(keep_every))
    if keep_within is not None:
        policies.append(KeepWithin(parse_duration(keep_within)))
    return policies


@dataclass(frozen=True)
class PlannedDeletion:
    step: int
    path: Path
    size: int
    reason: str


@dataclass
class PrunePlan:
    view: RunView
    policies: list[RetentionPolicy]
    max_disk: int | None
    run_size: int
    deletions: list[PlannedDeletion]
    protected: set[int]

    @property
    def freed(self) -> int:
        return sum(d.size for d in self.deletions)

    @property
    def kept(self) -> list[int]:
        gone = {d.step for d in self.deletions}
        return [c.step for c in self.view.checkpoints if c.step not in gone]


@dataclass
class PruneResult:
    plan: PrunePlan
    dry_run: bool
    confirmed: bool = True
    deleted: list[PlannedDeletion] = field(default_factory=list)
    failed: list[tuple[PlannedDeletion, str]] = field(default_factory=list)


def plan_prune(view: RunView, policies: Sequence[RetentionPolicy], *, max_disk: int | str | None = None) -> PrunePlan:
    """What a prune of ``view`` deletes and why; ValueError when it cannot be done as asked."""
    policies = list(policies)
    budget = _check_request(policies, max_disk)
    names = set(view.metric_names())
    for policy in policies:
        if isinstance(policy, KeepBest) and view.checkpoints and policy.metric not in names:
            raise ValueError(f"no checkpoint in {view.path} has metric {policy.metric!r} "
                             f"(metrics: {', '.join(sorted(names)) or 'none'}); nothing deleted")
    sizes = {c.step: tree_size(c.path) for c in view.checkpoints}
    deletions = [PlannedDeletion(d.step, view.find(d.step).path, sizes[d.step], d.reason)
                 for d in plan_deletions(view.checkpoints, policies, resumed_from=view.resumed_from)]
    protected = view.protected(policies)
    deletions = [d for d in deletions if d.step not in protected]  # Trainer's best, on top of retention's set
    run_size = tree_size(view.path)
    if budget is not None:
        deletions += _budget_deletions(view, policies, budget, run_size, sizes, deletions, protected)
    return PrunePlan(view, policies, budget, run_size, deletions, protected)


def _check_request(policies: Sequence[RetentionPolicy], max_disk: int | str | None) -> int | None:
    budget = None if max_disk is None else parse_size(max_disk, what="--max-disk")
    if not policies and budget is None:
        raise ValueError("nothing to do: give a retention policy (--keep-last, --keep-best, --keep-every, "
                         "--keep-within) and/or --max-disk")
    return budget


def _budget_deletions(view: RunView, policies: list[RetentionPolicy], budget: int, run_size: int,
                      sizes: dict[int, int], planned: list[PlannedDeletion], protected: set[int]) -> list[PlannedDeletion]:
    gone = {d.step for d in planned}
    size = run_size - sum(d.size for d in planned)
    remaining = [c for c in view.checkpoints if c.step not in gone]
    out = []
    for victim in budget_candidates(remaining, policies, resumed_from=view.resumed_from):
        if size <= budget:
            break
        if victim.step in protected:
            continue
        out.append(PlannedDeletion(victim.step, victim.path, sizes[victim.step],
                                   f"disk budget: run uses {format_size(size)} of --max-disk {format_size(budget)}"))
        size -= sizes[victim.step]
    if size > budget:
        why = view.protection(policies)
        kept = "; ".join(f"{step} ({', '.join(reasons)})" for step, reasons in why.items()) or "none"
        raise ValueError(f"--max-disk {format_size(budget)} is smaller than what must be kept: the run still uses "
                         f"{format_size(size)} after deleting every unprotected checkpoint (protected steps: {kept}); "
                         "nothing deleted")
    return out


def prune(directory: str | os.PathLike[str], policies: Sequence[RetentionPolicy], *, max_disk: int | str | None = None,
          dry_run: bool = False, review: Callable[[PrunePlan], bool] = lambda plan: True,
          on_deleted: Callable[[PlannedDeletion], None] | None = None) -> PruneResult:
    """Plan a prune, show it to ``review`` (which may veto it), then carry it out under the run lock.

    A dry run plans without the lock and deletes nothing. Raises ``DirectoryLocked`` when a live
    run holds the lock, ``RunDirectoryError`` / ``ValueError`` for bad input, before any deletion.
    """
    _check_request(policies, max_disk)  # before the lock: a mistake should not wait for one
    if dry_run:
        plan = plan_prune(open_run(directory), policies, max_disk=max_disk)
        review(plan)
        return PruneResult(plan, dry_run=True)
    with run_lock(directory):
        plan = plan_prune(open_run(directory), policies, max_disk=max_disk)
        if not review(plan):
            return PruneResult(plan, dry_run=False, confirmed=False)
        result = PruneResult(plan, dry_run=False)
        with _event_log(plan.view) as log:
            for deletion in plan.deletions:
                try:
                    delete_checkpoint(plan.view.path, deletion.path.name)
                except OSError as err:
                    result.failed.append((deletion, str(err)))
                    continue
                result.deleted.append(deletion)
                if log is not None:
                    log.event("prune", step=deletion.step, reason=deletion.reason, by="cli")
                if on_deleted is not None:
                    on_deleted(deletion)
        _drop_empty_trash(plan.view.path)
        return result


def collect_garbage(directory: str | os.PathLike[str]) -> list[tuple[Path, int]]:
    """Remove unfinished saves (``step_*.tmp-*``) and ``.trash/`` debris under the run lock.

    Returns what was removed with the bytes it held. Raises ``DirectoryLocked`` while a live run
    holds the lock (it removes the same debris itself when it starts).
    """
    with run_lock(directory):
        view = open_run(directory)
        removed = []
        with _event_log(view) as log:
            for item in view.debris:
                size = tree_size(item.path) if item.path.is_dir() else item.path.stat().st_size
                remove_tree(item.path) if item.path.is_dir() else item.path.unlink(missing_ok=True)
                removed.append((item.path, size))
                if log is not None:
                    log.event("gc", removed=item.path.name, reason=item.what, by="cli")
        _drop_empty_trash(view.path)
        return removed


def set_pinned(directory: str | os.PathLike[str], step: int, pinned: bool) -> None:
    """Pin (or unpin) a checkpoint in ``run.json``; safe beside a live run (atomic replace, no lock).

    Pinning needs the checkpoint to exist; unpinning also accepts a step that is only pinned.
    """
    view = open_run(directory)
    if pinned or step not in read_run_meta(view.path).get("pins", []):
        view.find(step)  # CheckpointNotFound for an unknown step
    log = RunLog(view.path)
    try:
        log.set_pinned(step, pinned)
        log.event("pin" if pinned else "unpin", step=step, by="cli")
    finally:
        log.close()


@contextmanager
def run_lock(directory: str | os.PathLike[str]) -> Iterator[None]:
    path = Path(directory)
    open_run(path)  # refuse a directory that is not a run before creating .lock in it
    lock = RunLock(path)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextmanager
def _event_log(view: RunView) -> Iterator[RunLog | None]:
    """The run's event log for a safepoint run; None for Trainer output (it keeps no event log)."""
    if view.kind != "safepoint":
        yield None
        return
    log = RunLog(view.path)
    try:
        yield log
    finally:
        log.close()


def _drop_empty_trash(run_dir: Path) -> None:
    """``.trash/`` only exists for deletions in flight; leave no empty one behind."""
    try:
        (run_dir / layout.TRASH_DIR).rmdir()
    except OSError:  # absent, or not empty
        pass
