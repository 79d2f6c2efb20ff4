"""Rollback on divergence: a NaN or a loss spike sends training back to the last good checkpoint.

Large runs diverge now and then: a bad batch, a numerically unlucky step. The usual fix is manual
(find a checkpoint before the spike, skip the data that caused it, maybe lower the LR, restart);
``DivergenceGuard`` does it inside ``CheckpointManager.step()``. When the watched metric is
NaN/inf, or exceeds ``spike_factor`` times the median of its last ``window`` accepted values,
the manager restores the newest checkpoint from before the anomaly whose weights are finite,
moves the data position *past* the batches seen since that checkpoint (they are skipped, and the
skip is recorded in the event log, so a rerun can reproduce it), optionally multiplies the LR by
``lr_factor``, and training continues from the checkpoint's step. After ``max_rollbacks`` it stops
with ``DivergenceError``.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from .errors import SafepointError


class DivergenceError(SafepointError, RuntimeError):
    """Training kept diverging after the allowed number of rollbacks, or had nothing to roll back to."""


@dataclass
class DivergenceGuard:
    """Which metric to watch and what counts as an anomaly.

    Args:
        metric: the metric name passed to ``step(metrics=...)``.
        spike_factor: an anomaly when the value exceeds this times the recent median (None: NaN/inf only).
        window: how many accepted values the median covers; spikes are judged once half is filled.
        max_rollbacks: rollbacks allowed before ``DivergenceError``.
        lr_factor: multiply every learning rate by this at each rollback (1.0 keeps it).
    """

    metric: str = "loss"
    spike_factor: float | None = None
    window: int = 50
    max_rollbacks: int = 3
    lr_factor: float = 1.0
    rollbacks: int = field(default=0, init=False)
    _recent: deque = field(default_factory=deque, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.spike_factor is not None and not self.spike_factor > 1:
            raise ValueError(f"spike_factor must be > 1 or None, got {self.spike_factor!r}")
        if self.window < 2 or self.max_rollbacks < 0 or not 0 < self.lr_factor <= 1:
            raise ValueError("DivergenceGuard needs window >= 2, max_rollbacks >= 0 and 0 < lr_factor <= 1")
        self._recent = deque(maxlen=self.window)

    def check(self, value: float | str) -> str | None:
        """The reason ``value`` is an anomaly, or None (and then it joins the recent history)."""
        number = float(value)
        if not math.isfinite(number):
            return f"{self.metric} is {number}"
        if self.spike_factor is not None and len(self._recent) >= self.window // 2:
            median = statistics.median(self._recent)
            if median > 0 and number > self.spike_factor * median:
                return f"{self.metric} {number:.4g} > {self.spike_factor} x recent median {median:.4g}"
        self._recent.append(number)
        return None
