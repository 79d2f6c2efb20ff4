"""Saving in the background: stage a consistent copy, then write while training goes on.

``save_async`` returns once every tensor has been copied into host staging buffers; from then
on training may change the model and optimizer freely. One background writer does the I/O,
hashing and commit. The rules, in the order things happen:

1. a new save first waits for the one in flight (one save in flight at a time, so staging
   buffers can be reused and retention never sees two writers);
2. staging buffers are allocated on first use and reused by every later save of the same
   shapes (fresh allocations cost several times a copy into touched memory); for tensors on a
   GPU they are pinned, so the device-to-host copy runs at full bus speed;
3. the writer thread runs at a lower CPU priority, so on a machine with few cores the training
   threads win the scheduler and the write fills the gaps;
4. an error in the background is kept in the ``SaveHandle`` and raised by ``handle.result()``,
   or by the manager's next call, ``wait()`` or ``close()``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

WRITER_NICENESS = 10


class StagingBuffers:
    """Host copies of tensors, keyed by (entry, name), allocated once and reused across saves."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def stage(self, tensor_sets: dict[str, dict[str, torch.Tensor]], *,
              only_devices: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """Copy every tensor (or, with ``only_devices``, every non-CPU tensor) into its buffer.

        Returns the same structure with staged tensors in place of the originals. Buffers for
        tensors that are gone are released.
        """
        used: set[tuple[str, str]] = set()
        staged: dict[str, dict[str, torch.Tensor]] = {}
        on_device = False
        for entry, tensors in tensor_sets.items():
            out = staged[entry] = {}
            for name, t in tensors.items():
                t = t.detach()
                if only_devices and t.device.type == "cpu":
                    out[name] = t
                    continue
                key = (entry, name)
                used.add(key)
                buf = self._buffers.get(key)
                if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                    pin = t.device.type == "cuda"
                    buf = self._buffers[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
                buf.copy_(t, non_blocking=t.device.type == "cuda")
                on_device |= t.device.type == "cuda"
                out[name] = buf
        if on_device:
            torch.cuda.synchronize()  # the non-blocking copies must land before we return
        for key in set(self._buffers) - used:
            del self._buffers[key]
        return staged


class SaveHandle:
    """A save in flight. ``result()`` waits and returns the committed ``CheckpointInfo``."""

    def __init__(self, step: int, future: Future[Any]) -> None:
        self.step = step
        self._future = future
        self.observed = False

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the commit; re-raise the background error if the save failed.

        An error seen here is not raised again by the manager's next call.
        """
        try:
            return self._future.result(timeout)
        except BaseException:
            if self._future.done():
                self.observed = True
            raise

    def wait_quietly(self) -> Any:
        """``result()`` for the manager itself: does not count as the caller having seen an error."""
        return self._future.result()

    def __repr__(self) -> str:
        state = "done" if self.done() else "in flight"
        return f"SaveHandle(step={self.step}, {state})"


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
    except (AttributeError, OSError):
        pass  # not Linux, or not permitted: run at normal priority


class BackgroundWriter:
    """One low-priority thread that runs save jobs in submission order."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safepoint-writer",
                                        initializer=_lower_priority)

    def submit(self, step: int, job: Callable[[], Any]) -> SaveHandle:
        return SaveHandle(step, self._pool.submit(job))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
