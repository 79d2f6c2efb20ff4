"""safepoint: crash-proof, disk-aware checkpoints for PyTorch training.

The public API is re-exported here; everything else is an implementation detail. Names are
imported on first use (PEP 562), so ``import safepoint`` and the command line (``safepoint ls``,
``safepoint run``) do not pay for importing torch unless they need it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "async_save": ["SaveHandle"],
    "catalog": ["CheckpointInfo", "list_checkpoints", "verify"],
    "data": ["ResumableLoader", "ResumableSampler"],
    "errors": ["CheckpointNotFound", "CorruptCheckpoint", "DirectoryLocked", "IncompatibleState",
               "InsufficientDiskSpace", "MirrorError", "RunDirectoryError", "SafepointError", "SafepointWarning",
               "TransientStorageError", "UnsupportedFormat"],
    "guard": ["DivergenceError", "DivergenceGuard"],
    "manager": ["CheckpointManager", "RestoreReport"],
    "mirror": ["MirrorConfig"],
    "retention": ["KeepBest", "KeepEvery", "KeepLast", "KeepWithin"],
    "stateful": ["Stateful"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'safepoint' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .async_save import SaveHandle
    from .catalog import CheckpointInfo, list_checkpoints, verify
    from .data import ResumableLoader, ResumableSampler
    from .errors import (CheckpointNotFound, CorruptCheckpoint, DirectoryLocked, IncompatibleState,
                         InsufficientDiskSpace, MirrorError, RunDirectoryError, SafepointError,
                         SafepointWarning, TransientStorageError, UnsupportedFormat)
    from .guard import DivergenceError, DivergenceGuard
    from .manager import CheckpointManager, RestoreReport
    from .mirror import MirrorConfig
    from .retention import KeepBest, KeepEvery, KeepLast, KeepWithin
    from .stateful import Stateful
