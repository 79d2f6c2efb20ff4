"""One writer per run directory.

Two jobs writing into one directory would delete each other's checkpoints through retention. A
``.lock`` file held with ``flock`` keeps the second one out; the kernel drops the lock when its
holder dies, even by SIGKILL, so a crashed run never leaves a stale lock behind. The file also
holds the holder's PID and host, for the error message.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from . import layout
from .errors import DirectoryLocked


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / layout.LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DirectoryLocked(
                f"{self.path.parent} is in use by another safepoint writer ({holder}); two jobs must "
                "not write one run directory. Stop that process or give this run its own directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
