"""The manifest: the commit record of one checkpoint, written last.

A directory is a checkpoint if and only if its ``manifest.json`` parses and has a known format
version. The manifest lists every file with its size and hash, so a restore can prove that what
it reads is what was written. It is immutable once committed: facts that change later (pins,
mirrored) live in ``run.json``.

Format version 1 fields are documented in the README; readers accept any version up to
``FORMAT_VERSION`` and refuse newer ones with an error that says to upgrade. Version 2 is
version 1 plus encoded tensor files (compressed, delta, 8-bit moments; see ``compact.py``) and
is written only for checkpoints that use them, so plain checkpoints stay readable by every version.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import layout
from .commit import FileRecord
from .errors import CorruptCheckpoint, UnsupportedFormat

FORMAT = "safepoint.checkpoint"
FORMAT_VERSION = 2  # the newest version this safepoint reads
PLAIN_FORMAT_VERSION = 1  # what a checkpoint without encoded files is written as


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def library_versions() -> dict[str, str]:
    import torch

    from . import __version__

    return {"safepoint": __version__, "torch": torch.__version__, "python": platform.python_version()}


@dataclass
class Manifest:
    step: int
    run_id: str
    files: dict[str, FileRecord]
    hash_algorithm: str
    created: str
    committed: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    entries: list[str] = field(default_factory=list)
    world_size: int = 1
    # Room for later formats: sharded files name their rank, deltas name their parent.
    parent: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = PLAIN_FORMAT_VERSION

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self.files.values())

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["files"] = {name: asdict(rec) for name, rec in self.files.items()}
        return {"format": FORMAT, **data}

    @classmethod
    def from_json(cls, data: Any, where: Path) -> "Manifest":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CorruptCheckpoint(f"{where} is not a safepoint manifest (no 'format': '{FORMAT}')")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise UnsupportedFormat(
                f"{where} has manifest format version {version!r}; this safepoint reads versions "
                f"1..{FORMAT_VERSION}. Upgrade safepoint to read it (pip install -U safepoint)")
        try:
            files = {name: FileRecord(int(r["size"]), str(r["hash"])) for name, r in data["files"].items()}
            return cls(
                step=int(data["step"]), run_id=str(data["run_id"]), files=files,
                hash_algorithm=str(data["hash_algorithm"]), created=str(data["created"]),
                committed=str(data.get("committed", "")), metrics=dict(data.get("metrics", {})),
                entries=list(data.get("entries", [])), world_size=int(data.get("world_size", 1)),
                parent=data.get("parent"), versions=dict(data.get("versions", {})),
                extra=dict(data.get("extra", {})), format_version=version)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CorruptCheckpoint(f"{where} is malformed: {err!r}") from err


def read_manifest(checkpoint_dir: Path) -> Manifest:
    """Parse ``checkpoint_dir/manifest.json``; raise ``CorruptCheckpoint`` if it is missing or garbled."""
    path = checkpoint_dir / layout.MANIFEST
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError as err:
        raise CorruptCheckpoint(f"{path} is missing: the checkpoint was never committed") from err
    except (OSError, ValueError) as err:
        raise CorruptCheckpoint(f"{path} cannot be read as JSON: {err}") from err
    manifest = Manifest.from_json(data, path)
    expected = layout.parse_step(checkpoint_dir.name)
    if expected is not None and expected != manifest.step:
        raise CorruptCheckpoint(f"{path} says step {manifest.step} but its directory is for step {expected}")
    return manifest
