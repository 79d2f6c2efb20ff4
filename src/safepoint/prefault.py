"""Fault in a fresh read buffer on another core while the file is being read into it.

A verified restore reads every checkpoint file into newly allocated memory, and that memory
becomes the restored optimizer state, so it cannot be a reused, already-touched buffer. The
first write to each page (4 KiB) of fresh memory is a page fault (allocate, zero, map): about
0.4 s per GB of one core on a cloud VM, which is as much as the disk read itself and, done by
the reading thread, adds to it. ``Prefaulter`` moves part of that work to a helper thread that
populates the buffer from its end while the reader fills it from the front, so the two split
the faults where they meet and, on two cores, the faults overlap the I/O and the hashing.

It uses ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14+): the kernel maps pages writable without
changing a byte of them, so the helper can never overwrite data the reader has already put
there, even when it falls behind. Where the call is not available it does nothing and the
reader faults the pages itself, exactly as without it. Huge pages would cut the faults 512-fold
but are slow to obtain on ballooned VMs (seconds per GB), so plain pages are kept.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

_MADV_POPULATE_WRITE = 23
_PAGE = mmap.PAGESIZE
_STEP = 8 << 20  # populate in 8 MiB steps, so the helper stops soon after meeting the reader
MIN_BYTES = 64 << 20  # below this a helper thread costs more than it saves


def _madvise() -> "ctypes._CFuncPtr | None":
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn  # ctypes releases the GIL for the call


_MADVISE = _madvise()


class Prefaulter:
    """Populate ``buffer`` from its end backwards on ``pool`` until it meets the reader.

    The reader calls ``advance(pos)`` after each read and ``stop()`` when done (also on an
    error); ``stop`` waits for the helper.
    """

    def __init__(self, buffer: memoryview, pool: ThreadPoolExecutor) -> None:
        self._reader = 0
        self._stopped = False
        self._job: Future[None] | None = None
        if _MADVISE is None or len(buffer) < MIN_BYTES or buffer.readonly:
            return
        start = np.frombuffer(buffer, dtype=np.uint8).ctypes.data
        self._job = pool.submit(self._run, start, len(buffer))

    def advance(self, pos: int) -> None:
        self._reader = pos

    def join(self) -> None:
        """Wait until the helper is done on its own (met the reader or reached the front)."""
        if self._job is not None:
            self._job.result()

    def stop(self) -> None:
        self._stopped = True
        if self._job is not None:
            if not self._job.cancel():  # not started yet (the pool was busy): nothing to wait for
                self._job.result()
            self._job = None

    def _run(self, start: int, length: int) -> None:
        # From the back: the reader faults pages from the front as it goes, so the two split the
        # work where they meet instead of faulting the same pages side by side.
        first = -(-start // _PAGE) * _PAGE  # the page-aligned part; the reader faults the edges
        pos = (start + length) // _PAGE * _PAGE
        while pos > first and not self._stopped:
            ahead = -(-(start + self._reader + _STEP) // _PAGE) * _PAGE  # leave the reader a step
            low = max(first, pos - _STEP, ahead)
            if low >= pos or _MADVISE(low, pos - low, _MADV_POPULATE_WRITE) != 0:
                return  # met the reader, an old kernel (EINVAL) or no memory to spare
            pos = low
