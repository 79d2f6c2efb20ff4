"""Disk space: estimates, budgets, and the check that runs before a byte is written.

Two limits: ``max_disk`` caps what the run directory may hold; ``min_free`` keeps space free on
the filesystem for everyone else (bytes, or a percentage of the filesystem). A save needs its
estimated size under both. Sizes are counted in allocated blocks where the filesystem reports
them, because that is what fills a disk.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
# Per-file overhead on top of tensor bytes: safetensors header, JSON, manifest, block rounding.
_OVERHEAD_PER_FILE = 16 << 10


def parse_size(value: int | float | str, *, what: str = "size") -> int:
    """Bytes from ``1000``, ``"50GB"``, ``"1.5GiB"``, ``"200MB"`` (decimal and binary units)."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number of bytes or a string like '50GB', got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{what} must be >= 0, got {value!r}")
        return int(value)
    m = _SIZE.match(str(value))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"{what}: cannot read {value!r} as a size; use bytes or e.g. '500MB', '50GB', '1.5GiB'")
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


@dataclass(frozen=True)
class MinFree:
    """Free space to leave on the filesystem: absolute bytes or a fraction of its size."""

    bytes: int = 0
    fraction: float = 0.0

    @classmethod
    def parse(cls, value: int | str | None) -> "MinFree":
        if value is None:
            return cls()
        if isinstance(value, str) and value.strip().endswith("%"):
            pct = float(value.strip()[:-1])
            if not 0 <= pct < 100:
                raise ValueError(f"min_free percentage must be in [0, 100), got {value!r}")
            return cls(fraction=pct / 100)
        return cls(bytes=parse_size(value, what="min_free"))

    def resolve(self, total: int) -> int:
        return max(self.bytes, int(self.fraction * total))


def tree_size(path: Path) -> int:
    """Bytes a directory tree occupies on disk (allocated blocks, not apparent size)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            total += max(st.st_blocks * 512, st.st_size)
    return total


def estimate_checkpoint_size(tensor_bytes: int, n_files: int) -> int:
    return tensor_bytes + n_files * _OVERHEAD_PER_FILE


@dataclass(frozen=True)
class SpaceCheck:
    needed: int
    free: int
    reserve: int
    run_size: int
    max_disk: int | None

    @property
    def shortfall(self) -> int:
        """Bytes that must be freed before the save fits (0 when it fits)."""
        short = self.needed + self.reserve - self.free
        if self.max_disk is not None:
            short = max(short, self.run_size + self.needed - self.max_disk)
        return max(short, 0)

    def describe(self) -> str:
        parts = [f"needs {format_size(self.needed)}", f"filesystem has {format_size(self.free)} free"]
        if self.reserve:
            parts.append(f"min_free keeps {format_size(self.reserve)}")
        if self.max_disk is not None:
            parts.append(f"run uses {format_size(self.run_size)} of its max_disk {format_size(self.max_disk)}")
        return ", ".join(parts)


def check_space(run_dir: Path, needed: int, *, max_disk: int | None, min_free: MinFree) -> SpaceCheck:
    usage = shutil.disk_usage(run_dir)
    run_size = tree_size(run_dir) if max_disk is not None else 0
    return SpaceCheck(needed=needed, free=usage.free, reserve=min_free.resolve(usage.total),
                      run_size=run_size, max_disk=max_disk)


def used_fraction(path: Path) -> float:
    usage = shutil.disk_usage(path)
    return usage.used / usage.total if usage.total else 0.0
