"""safepoint: crash-proof, disk-aware checkpoints for PyTorch training.

The public API is re-exported here; everything else is an implementation detail.
"""

__version__ = "0.1.0"

from .async_save import SaveHandle
from .catalog import CheckpointInfo, list_checkpoints, verify
from .data import ResumableLoader, ResumableSampler
from .errors import (CheckpointNotFound, CorruptCheckpoint, DirectoryLocked, IncompatibleState,
                     InsufficientDiskSpace, MirrorError, RunDirectoryError, SafepointError, SafepointWarning,
                     TransientStorageError, UnsupportedFormat)
from .guard import DivergenceError, DivergenceGuard
from .manager import CheckpointManager, RestoreReport
from .mirror import MirrorConfig
from .retention import KeepBest, KeepEvery, KeepLast, KeepWithin
from .stateful import Stateful

__all__ = [
    "CheckpointInfo", "CheckpointManager", "CheckpointNotFound", "CorruptCheckpoint", "DirectoryLocked",
    "DivergenceError", "DivergenceGuard", "MirrorConfig", "MirrorError", "TransientStorageError",
    "IncompatibleState", "InsufficientDiskSpace", "KeepBest", "KeepEvery", "KeepLast", "KeepWithin", "RestoreReport", "ResumableLoader",
    "ResumableSampler", "RunDirectoryError", "SaveHandle", "SafepointError", "SafepointWarning", "Stateful",
    "UnsupportedFormat", "list_checkpoints", "verify",
]
