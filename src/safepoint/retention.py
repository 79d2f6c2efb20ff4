"""Which checkpoints to keep: small pure policies over ``CheckpointInfo``; no I/O.

Each policy names the steps it wants kept; the union of all policies is kept, plus a protected
set no policy can release: the newest committed checkpoint, the one the run resumed from, pinned
ones, the best checkpoint by every metric a ``KeepBest`` tracks, and (with a mirror) every one not
yet mirrored. Retention runs only after a
new checkpoint is committed, so a checkpoint still being written is never counted and keeping one
(``KeepLast(1)``) is safe.

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
    return steps


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
    reason = "not kept by " + ", ".join(map(repr, policies))
    plan = {c.step: Deletion(c.step, reason) for c in ordered if c.step not in keep}
    if keep_local is not None:
        newest = {c.step for c in ordered[-keep_local:]}
        for c in ordered:
            if c.mirrored and c.step not in protected and c.step not in newest and c.step not in plan:
                plan[c.step] = Deletion(c.step, f"mirrored; the local cache keeps the newest {keep_local} "
                                                "(mirror_keep_local)")
    return [plan[s] for s in sorted(plan)]


def steps_to_delete(checkpoints: Sequence[CheckpointInfo], policies: Iterable[RetentionPolicy],
                    *, resumed_from: int | None = None, unmirrored: Iterable[int] = ()) -> list[int]:
    return [d.step for d in plan_deletions(checkpoints, policies, resumed_from=resumed_from, unmirrored=unmirrored)]


def budget_candidates(checkpoints: Sequence[CheckpointInfo], policies: Iterable[RetentionPolicy],
                      *, resumed_from: int | None = None, unmirrored: Iterable[int] = ()) -> list[CheckpointInfo]:
    """What the disk budget may delete, in order: oldest first, never the protected set."""
    ordered = sorted(checkpoints, key=lambda c: c.step)
    protected = protected_steps(ordered, resumed_from=resumed_from, policies=policies, unmirrored=unmirrored)
    return [c for c in ordered if c.step not in protected]


def _check_positive_int(what: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} needs a positive int, got {value!r}")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
