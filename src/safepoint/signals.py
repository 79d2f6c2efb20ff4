"""Preemption signals become "save at the next step boundary, then stop".

A signal handler may run between any two bytecodes, so it does nothing but set a flag; the save
happens in ``CheckpointManager.step()``, where the training state is consistent. Handlers the user
installed before are chained, not replaced. SIGINT is special: the first one asks for a save and
stop, a second one still interrupts (``KeyboardInterrupt``) for the impatient.
"""

from __future__ import annotations

import signal
import threading
import warnings
from types import FrameType
from typing import Any

DEFAULT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class PreemptionWatcher:
    def __init__(self, names: tuple[str, ...] = DEFAULT_SIGNALS) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        self._sigint_count = 0
        self._names = names

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("safepoint: not in the main thread, so preemption signals are not caught; "
                          "call CheckpointManager from the main thread to save on SIGTERM", stacklevel=3)
            return
        for name in self._names:
            signum = getattr(signal, name, None)
            if signum is None:
                raise ValueError(f"unknown signal {name!r}; use names such as 'SIGTERM' or 'SIGUSR1'")
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous.get(signum)
        if signum == signal.SIGINT:
            self._sigint_count += 1
            if self._sigint_count > 1:
                if callable(previous):
                    previous(signum, frame)
                    return
                raise KeyboardInterrupt
            if previous is signal.default_int_handler:
                previous = None
        self.received = self.received or signal.Signals(signum).name
        if callable(previous):
            previous(signum, frame)

    def clear(self) -> None:
        self.received = None
        self._sigint_count = 0
