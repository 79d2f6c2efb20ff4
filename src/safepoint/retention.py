"""Which checkpoints to keep: small pure policies over ``CheckpointInfo``; no I/O.

Each policy names the steps it wants kept; the union of all policies is kept, plus a protected
set no policy can release (the newest committed checkpoint, the one the run resumed from, pinned
ones). Retention runs only after a new checkpoint is committed, so a checkpoint still being
written is never counted and keeping one (``KeepLast(1)``) is safe.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

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
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"KeepLast(n) needs n >= 1, got {self.n!r}")

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        return {c.step for c in checkpoints[-self.n:]}


def protected_steps(checkpoints: Sequence[CheckpointInfo], *, resumed_from: int | None) -> set[int]:
    """Steps that no policy may delete."""
    steps = {c.step for c in checkpoints if c.pinned}
    if checkpoints:
        steps.add(checkpoints[-1].step)
    if resumed_from is not None:
        steps.add(resumed_from)
    return steps


def steps_to_delete(checkpoints: Sequence[CheckpointInfo], policies: Iterable[RetentionPolicy],
                    *, resumed_from: int | None = None) -> list[int]:
    """Committed steps that neither a policy nor the protected set keeps, oldest first.

    With no policies everything is kept: safepoint never deletes unless asked to.
    """
    policies = list(policies)
    if not policies:
        return []
    ordered = sorted(checkpoints, key=lambda c: c.step)
    keep = protected_steps(ordered, resumed_from=resumed_from)
    for policy in policies:
        keep |= policy.keep(ordered)
    return [c.step for c in ordered if c.step not in keep]
