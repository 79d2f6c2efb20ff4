"""Which checkpoints to keep: small pure policies over ``CheckpointInfo``; no I/O.

Each policy names the steps it wants kept; the union of all policies is kept, plus a protected
set no policy can release: the newest committed checkpoint, the one the run resumed from, pinned
ones, the best checkpoint by every metric a ``KeepBest`` tracks, and (with a mirror) every one not
yet mirrored. Retention runs only after a
new checkpoint is committed, so a checkpoint still being written is never counted and keeping one
(``KeepLast(1)``) is safe. Whatever is kept keeps its base too: a delta checkpoint (``delta.py``)
is useless without the full checkpoint it was encoded against (``with_bases``), and deletions run
in ``deletion_order``, every delta before its base, so a crash between two deletions never leaves
a delta without its base.

The disk budget (``disk.py``) is a hard cap: it may delete what the soft policies would keep
(oldest first) but never the protected set.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, Protocol

from .catalog import CheckpointInfo


class RetentionPolicy(Protocol):
    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        """The steps this policy wants kept, given committed checkpoints sorted by step."""
        ...


@dataclass(frozen=True)
class KeepLast:
    """Keep the ``n`` newest committed checkpoints."""

    n: int

    def __post_init__(self) -> None:
        _check_positive_int("KeepLast(n)", self.n)

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        return {c.step for c in checkpoints[-self.n:]}


@dataclass(frozen=True)
class KeepBest:
    """Keep the ``n`` best checkpoints by ``metric`` (lowest for ``mode="min"``, highest for "max").

    Checkpoints without the metric, or with a non-finite value, never count as best. The single
    best one is also protected from the disk budget.
    """

    n: int
    metric: str
    mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        _check_positive_int("KeepBest(n, ...)", self.n)
        if self.mode not in ("min", "max"):
            raise ValueError(f"KeepBest mode must be 'min' or 'max', got {self.mode!r}")
        if not self.metric or not isinstance(self.metric, str):
            raise ValueError(f"KeepBest needs a metric name, got {self.metric!r}")

    def ranked(self, checkpoints: Sequence[CheckpointInfo]) -> list[CheckpointInfo]:
        scored = [c for c in checkpoints if _finite(c.metrics.get(self.metric))]
        # Ties go to the newer checkpoint.
        return sorted(scored, key=lambda c: (float(c.metrics[self.metric]) * (1 if self.mode == "min" else -1), -c.step))

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        return {c.step for c in self.ranked(checkpoints)[:self.n]}


@dataclass(frozen=True)
class KeepEvery:
    """Keep milestones: every checkpoint whose step is a multiple of ``steps``."""

    steps: int

    def __post_init__(self) -> None:
        _check_positive_int("KeepEvery(steps)", self.steps)

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        return {c.step for c in checkpoints if c.step % self.steps == 0}


@dataclass(frozen=True)
class KeepWithin:
    """Keep checkpoints committed within ``window`` of the newest one (pure: no wall clock)."""

    window: timedelta

    def __post_init__(self) -> None:
        if not isinstance(self.window, timedelta) or self.window <= timedelta(0):
            raise ValueError(f"KeepWithin needs a positive timedelta, got {self.window!r}")

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        if not checkpoints:
            return set()
        newest = max(c.committed_at for c in checkpoints)
        return {c.step for c in checkpoints if newest - c.committed_at <= self.window}


@dataclass(frozen=True)
class Deletion:
    step: int
    reason: str


def protected_steps(checkpoints: Sequence[CheckpointInfo], *, resumed_from: int | None,
                    policies: Iterable[RetentionPolicy] = (), unmirrored: Iterable[int] = ()) -> set[int]:
    """Steps that no policy and no budget may delete.

    ``unmirrored``: with a mirror, the committed steps not uploaded yet (``mirror.unmirrored_steps``).
    """
    steps = {c.step for c in checkpoints if c.pinned} | (set(unmirrored) & {c.step for c in checkpoints})
    if checkpoints:
        steps.add(max(c.step for c in checkpoints))
    if resumed_from is not None:
        steps.add(resumed_from)
    for policy in policies:
        if isinstance(policy, KeepBest):
            steps |= {c.step for c in policy.ranked(checkpoints)[:1]}
    return with_bases(steps, checkpoints)


def with_bases(steps: Iterable[int], checkpoints: Sequence[CheckpointInfo]) -> set[int]:
    """``steps`` plus the base of every delta among them (and its base, were bases ever deltas)."""
    parent = {c.step: c.parent for c in checkpoints}
    out = set(steps)
    todo = list(out)
    while todo:
        base = parent.get(todo.pop())
        if base is not None and base in parent and base not in out:
            out.add(base)
            todo.append(base)
    return out


def deletion_order(steps: Iterable[int], checkpoints: Sequence[CheckpointInfo]) -> list[int]:
    """``steps`` oldest first, except that every base comes after all of its deltas among them."""
    steps = set(steps)
    children: dict[int, list[int]] = {}
    for c in checkpoints:
        if c.step in steps and c.parent in steps and c.parent != c.step:
            children.setdefault(c.parent, []).append(c.step)
    memo: dict[int, tuple[int, int]] = {}

    def reach(step: int) -> tuple[int, int]:  # (newest step among it and its deltas, height above them)
        if step not in memo:
            memo[step] = (step, 0)  # guards against a cycle in damaged metadata
            below = [reach(child) for child in children.get(step, [])]
            memo[step] = (max([step] + [b[0] for b in below]), 1 + max((b[1] for b in below), default=-1))
        return memo[step]

    return sorted(steps, key=lambda s: (*reach(s), s))


def plan_deletions(checkpoints: Sequence[CheckpointInfo], policies: Iterable[RetentionPolicy],
                   *, resumed_from: int | None = None, unmirrored: Iterable[int] = (),
                   keep_local: int | None = None) -> list[Deletion]:
    """Committed checkpoints that neither a policy nor the protected set keeps, oldest first.

    With no policies everything is kept: safepoint never deletes unless asked to. With a mirror,
    ``unmirrored`` steps are protected, and ``keep_local=N`` (local disk as a cache) also deletes
    mirrored checkpoints (``CheckpointInfo.mirrored``) outside the N newest, unless protected.
    """
    policies = list(policies)
    if not policies and keep_local is None:
        return []
    ordered = sorted(checkpoints, key=lambda c: c.step)
    protected = protected_steps(ordered, resumed_from=resumed_from, policies=policies, unmirrored=unmirrored)
    keep = set(protected)
    for policy in policies:
        keep |= policy.keep(ordered)
    if not policies:
        keep |= {c.step for c in ordered}
    keep = with_bases(keep, ordered)
    reason = "not kept by " + ", ".join(map(repr, policies))
    plan = {c.step: Deletion(c.step, reason) for c in ordered if c.step not in keep}
    if keep_local is not None:
        newest = {c.step for c in ordered[-keep_local:]}
        for c in ordered:
            if c.mirrored and c.step not in protected and c.step not in newest and c.step not in plan:
                plan[c.step] = Deletion(c.step, f"mirrored; the local cache keeps the newest {keep_local} "
                                                "(mirror_keep_local)")
        for step in with_bases({c.step for c in ordered if c.step not in plan}, ordered) & set(plan):
            del plan[step]  # the base of a delta that stays
    return [plan[s] for s in deletion_order(plan, ordered)]


def steps_to_delete(checkpoints: Sequence[CheckpointInfo], policies: Iterable[RetentionPolicy],
                    *, resumed_from: int | None = None, unmirrored: Iterable[int] = ()) -> list[int]:
    return [d.step for d in plan_deletions(checkpoints, policies, resumed_from=resumed_from, unmirrored=unmirrored)]


def budget_candidates(checkpoints: Sequence[CheckpointInfo], policies: Iterable[RetentionPolicy],
                      *, resumed_from: int | None = None, unmirrored: Iterable[int] = ()) -> list[CheckpointInfo]:
    """What the disk budget may delete, in order: oldest first (a base after its deltas), never
    the protected set (which holds the base of every protected delta)."""
    ordered = sorted(checkpoints, key=lambda c: c.step)
    protected = protected_steps(ordered, resumed_from=resumed_from, policies=policies, unmirrored=unmirrored)
    by_step = {c.step: c for c in ordered}
    return [by_step[s] for s in deletion_order((c.step for c in ordered if c.step not in protected), ordered)]


def _check_positive_int(what: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} needs a positive int, got {value!r}")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
