"""The errors safepoint raises.

A small hierarchy that also subclasses the matching builtins, so callers can catch either
``SafepointError`` or the builtin they already handle (``FileNotFoundError``, ``OSError``...).
Messages follow one rule: what failed, where (path, step, key), expected vs. got, what to do.
"""

from __future__ import annotations


class SafepointError(Exception):
    """Base class of every error raised by safepoint."""


class CheckpointNotFound(SafepointError, FileNotFoundError):
    """No committed checkpoint matches the request."""


class CorruptCheckpoint(SafepointError, ValueError):
    """A committed checkpoint failed verification (missing file, wrong size or hash, bad manifest)."""


class IncompatibleState(SafepointError, ValueError):
    """A checkpoint does not fit the state it is restored into (keys, shapes, dtypes, layout)."""


class UnsupportedFormat(SafepointError, ValueError):
    """A manifest or state file was written by a format version this safepoint cannot read."""


class DirectoryLocked(SafepointError, RuntimeError):
    """Another live process holds the run directory's lock."""


class InsufficientDiskSpace(SafepointError, OSError):
    """A save would exceed free space or the configured disk budget; raised before writing."""


class RunDirectoryError(SafepointError, OSError):
    """The run directory cannot be used (it is a file, not writable, or holds another run)."""


class MirrorError(SafepointError, OSError):
    """The object-storage mirror cannot be used: unreachable, credentials refused, no such bucket,
    a missing fsspec backend, or an upload/download that failed for good."""


class TransientStorageError(MirrorError, ConnectionError):
    """A storage operation kept failing with transient errors (connection refused or reset,
    timeouts, 5xx, throttling) until its retries ran out. Trying again later may succeed."""


class SafepointWarning(UserWarning):
    """Something was skipped or could not be restored; training goes on."""
