"""Reading a run directory: which checkpoints are committed, and are they intact.

Valid means committed: only ``step_NNNNNNNN`` directories whose manifest parses count, for
``latest``, ``list``, ``restore`` and retention. Listing reads manifests only (cheap); ``verify``
re-hashes every file (the full proof, used before a restore trusts a checkpoint). The CLI and the
dashboard use these same functions, so they never disagree with the library.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from . import layout
from .commit import FileRecord, hash_file
from .delta import check_base
from .errors import CorruptCheckpoint, UnsupportedFormat
from .manifest import Manifest, read_manifest


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint as listings show it."""

    step: int
    path: Path
    created: str
    committed: str
    size: int
    metrics: dict[str, float] = field(default_factory=dict)
    pinned: bool = False
    mirrored: bool = False
    run_id: str = ""
    world_size: int = 1
    parent: int | None = None  # the base step of a delta checkpoint (retention keeps it while this exists)

    @property
    def committed_at(self) -> datetime:
        return datetime.fromisoformat(self.committed or self.created)

    @classmethod
    def from_manifest(cls, path: Path, m: Manifest, *, pinned: bool = False, mirrored: bool = False) -> "CheckpointInfo":
        return cls(step=m.step, path=path, created=m.created, committed=m.committed, size=m.total_size,
                   metrics=dict(m.metrics), pinned=pinned, mirrored=mirrored, run_id=m.run_id,
                   world_size=m.world_size, parent=m.parent)


def read_run_meta(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / layout.RUN_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def scan(run_dir: Path) -> list[tuple[Path, Manifest | CorruptCheckpoint | UnsupportedFormat]]:
    """Every ``step_*`` directory, oldest first, with its manifest or the reason it has none."""
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        step = layout.parse_step(name)
        if step is None:
            continue
        try:
            found.append((step, run_dir / name, read_manifest(run_dir / name)))
        except (CorruptCheckpoint, UnsupportedFormat) as err:
            found.append((step, run_dir / name, err))
    return [(path, m) for _, path, m in sorted(found, key=lambda f: f[0])]


def list_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """Committed checkpoints of ``run_dir``, oldest first. Unreadable manifests are left out."""
    run_dir = Path(run_dir)
    meta = read_run_meta(run_dir)
    pins = set(meta.get("pins", []))
    mirrored = set(meta.get("mirrored", []))
    later = meta.get("metrics", {})  # metrics recorded after the commit (on_commit evaluations)
    out = []
    for path, m in scan(run_dir):
        if isinstance(m, Manifest):
            info = CheckpointInfo.from_manifest(path, m, pinned=m.step in pins, mirrored=m.step in mirrored)
            if str(m.step) in later:
                info.metrics.update(later[str(m.step)])
            out.append(info)
    return out


def leftover_tmp_dirs(run_dir: Path) -> list[Path]:
    try:
        return sorted(run_dir / n for n in os.listdir(run_dir) if layout.is_tmp_name(n))
    except FileNotFoundError:
        return []


def verify(checkpoint_dir: Path, *, on_file: Callable[[str, int], None] | None = None) -> Manifest:
    """Check that every file the manifest lists is present with its size and hash.

    Raises ``CorruptCheckpoint`` naming the file and the expected vs. actual value. ``on_file(name,
    size)`` is called after each file checks out (progress bars). A delta checkpoint also needs its
    base committed with the files it was encoded against (``delta.check_base``).
    """
    manifest = read_manifest(checkpoint_dir)
    check_base(checkpoint_dir, manifest)
    for name, expected in manifest.files.items():
        check_file(checkpoint_dir / name, expected)
        if on_file is not None:
            on_file(name, expected.size)
    return manifest


def check_presence(checkpoint_dir: Path, manifest: Manifest) -> None:
    """Every file the manifest lists exists with its recorded size (cheap; no hashing)."""
    for name, expected in manifest.files.items():
        check_size(checkpoint_dir / name, expected)


def check_size(path: Path, expected: FileRecord) -> None:
    try:
        actual_size = path.stat().st_size
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{path} is missing (the manifest lists it, {expected.size} bytes)") from None
    if actual_size != expected.size:
        raise CorruptCheckpoint(f"{path} has {actual_size} bytes, the manifest says {expected.size} "
                                "(truncated or overwritten)")


def check_hash(path: Path, expected: FileRecord, actual: FileRecord) -> None:
    if actual.hash != expected.hash:
        raise CorruptCheckpoint(f"{path} fails its hash check: expected {expected.hash}, got "
                                f"{actual.hash} (the file was modified or damaged)")


def check_file(path: Path, expected: FileRecord) -> None:
    """Size and hash of one file against its manifest record."""
    check_size(path, expected)
    check_hash(path, expected, hash_file(path, like=expected.hash))
