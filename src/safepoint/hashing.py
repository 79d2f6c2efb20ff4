"""Content hashes for manifests: which algorithm, and how a record says which one it used.

Every byte of a checkpoint is hashed as it is written and again as it is read, so the hash must
keep up with the disk. SHA-256 runs at 1.3-2 GB/s on one core even with SHA-NI, slower than a
modern NVMe drive; BLAKE3 is also a cryptographic hash and runs at about 7 GB/s on one core here,
so hashing stops being what a save or a verified restore waits for. New checkpoints use BLAKE3
when the ``blake3`` package is importable (a core dependency) and SHA-256 otherwise, or whatever
``SAFEPOINT_HASH`` names.

A record's hash string names its algorithm: ``blake3:<hex>`` for BLAKE3, bare hex for SHA-256
(the format's first algorithm, and what ``sha256sum`` prints). So a reader verifies any file
from its record alone, checkpoints written by older versions keep verifying, and one manifest
could even mix both.
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol

SHA256 = "sha256"
BLAKE3 = "blake3"
ALGORITHMS = (SHA256, BLAKE3)
_PREFIX = {BLAKE3: "blake3:"}

try:
    import blake3 as _blake3
except ImportError:  # pragma: no cover - blake3 is a core dependency; a broken install still works
    _blake3 = None


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


def default_algorithm() -> str:
    """The algorithm for new files: ``SAFEPOINT_HASH`` if set, else BLAKE3 when importable."""
    chosen = os.environ.get("SAFEPOINT_HASH", "").strip().lower()
    if chosen:
        if chosen not in ALGORITHMS:
            raise ValueError(f"SAFEPOINT_HASH={chosen!r} is not a known hash; use one of {', '.join(ALGORITHMS)}")
        return chosen
    return BLAKE3 if _blake3 is not None else SHA256


def new_hasher(algorithm: str) -> Hasher:
    if algorithm == SHA256:
        return hashlib.sha256()
    if algorithm == BLAKE3:
        if _blake3 is None:
            raise RuntimeError("this checkpoint is hashed with BLAKE3 but the 'blake3' package is not "
                               "installed: pip install blake3")
        return _blake3.blake3()
    raise ValueError(f"unknown hash algorithm {algorithm!r}; this safepoint knows {', '.join(ALGORITHMS)}")


def algorithm_of(digest: str) -> str:
    """The algorithm a record's hash string was made with."""
    for algorithm, prefix in _PREFIX.items():
        if digest.startswith(prefix):
            return algorithm
    return SHA256


def digest_string(algorithm: str, hasher: Hasher) -> str:
    """The hash as a record stores it (prefixed unless SHA-256)."""
    return _PREFIX.get(algorithm, "") + hasher.hexdigest()
