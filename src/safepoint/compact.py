"""Smaller checkpoints: writing each tensor file in the encoding the options ask for, reading any back.

Three independent options, all off by default (``CheckpointManager(compress=..., delta_every=...,
quantize_optimizer=...)``):

- ``compress="zstd"``: lossless; every tensor file is byte planes + zstd (``compress.py``).
- ``delta_every=N``: lossless; a full checkpoint, then up to N-1 deltas against it, each tensor
  the XOR of its bytes with the base's, compressed (``delta.py``). Full files (bases, and any
  entry without a match in the base) stay plain safetensors unless ``compress`` is set too.
- ``quantize_optimizer=True``: lossy; Adam moments stored in 8 bits (``quantize.py``).

With none set, files and manifests are exactly the plain format. The names and manifest records
of encoded files are in ``encoding.py``. Every reader of tensor files (restore, ``export``,
``diff``, consolidation) goes through ``load_entry``, which verifies each file against the
manifest before decoding it, and a delta's base too, so what it returns is bit-exact or it
raises ``CorruptCheckpoint``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from . import compress, delta, encoding, layout, quantize
from .catalog import check_file, list_checkpoints
from .commit import FileRecord
from .errors import CorruptCheckpoint, SafepointWarning, UnsupportedFormat
from .manifest import Manifest, read_manifest
from .rawtensors import decode_header, header_length, tensors_from
from .tensors import read_tensors_verified, write_tensors


@dataclass(frozen=True)
class CompactOptions:
    """The manager's options for smaller checkpoints (see the module docstring)."""

    compress: Literal["zstd"] | None = None
    delta_every: int | None = None
    quantize_optimizer: bool = False

    def __post_init__(self) -> None:
        if self.compress not in (None, compress.CODEC):
            raise ValueError(f"compress must be 'zstd' or None, got {self.compress!r}")
        if self.delta_every is not None and (not isinstance(self.delta_every, int) or isinstance(self.delta_every, bool)
                                             or self.delta_every < 2):
            raise ValueError(f"delta_every must be an int >= 2 (a full checkpoint, then up to N-1 deltas) or None, "
                             f"got {self.delta_every!r}")
        if not isinstance(self.quantize_optimizer, bool):
            raise ValueError(f"quantize_optimizer must be True or False, got {self.quantize_optimizer!r}")
        if self.compress or self.delta_every:
            compress.zstandard()  # a missing package fails here, not at the first save


class CheckpointEncoder:
    """Writes the tensor files of one save in the configured encodings (plain when none is set)
    and says what its manifest must record. The manager's write uses one per save."""

    def __init__(self, options: CompactOptions, run_dir: Path, step: int) -> None:
        self.options = options
        self.encodings: dict[str, dict[str, Any]] = {}
        self.lossy: dict[str, Any] = {}
        self.parent: int | None = None
        self._base: tuple[Path, Manifest] | None = None
        if options.delta_every:
            chosen = delta.choose_base(list_checkpoints(run_dir), options.delta_every, step)
            if chosen is not None:
                try:
                    self._base = chosen.path, read_manifest(chosen.path)
                except (CorruptCheckpoint, UnsupportedFormat) as err:
                    self._give_up_base(f"its manifest is unreadable: {err}")

    def write(self, tmp: Path, entry: str, tensors: dict[str, torch.Tensor], encoded: Any) -> tuple[str, FileRecord]:
        """Write ``entry``'s tensors into ``tmp``; return the file name and its manifest record."""
        if self.options.quantize_optimizer:
            tensors, record = quantize.quantize_moments(tensors, encoded)
            if record is not None:
                self.lossy[entry] = record
        base, base_file = self._base_tensors(entry)
        if self._base is not None and base_file is not None and delta.any_match(tensors, base):
            name = entry + encoding.DELTA
            written = compress.write_compressed(tmp / name, tensors, reference=delta.xor_reference(base))
            self.parent = self._base[1].step
            self.encodings[name] = {**compress.describe(), "raw_size": written.raw_size, encoding.BASE_KEY: {
                "step": self.parent, "file": base_file, "hash": self._base[1].files[base_file].hash}}
            return name, written.record
        if self.options.compress:
            name = entry + encoding.COMPRESSED
            written = compress.write_compressed(tmp / name, tensors)
            self.encodings[name] = {**compress.describe(), "raw_size": written.raw_size}
            return name, written.record
        name = layout.tensor_file_name(entry)
        return name, write_tensors(tmp / name, tensors)

    def manifest_fields(self) -> dict[str, Any]:
        """Manifest fields for this save: none for a plain checkpoint, so its manifest is unchanged."""
        extra: dict[str, Any] = {}
        if self.encodings:
            extra[encoding.ENCODING_KEY] = self.encodings
        if self.lossy:
            extra[encoding.LOSSY_KEY] = self.lossy
        if not extra:
            return {}
        return {"format_version": encoding.ENCODED_FORMAT_VERSION, "parent": self.parent, "extra": extra}

    def _base_tensors(self, entry: str) -> tuple[dict[str, torch.Tensor], str | None]:
        if self._base is None:
            return {}, None
        base_dir, base_manifest = self._base
        base_file = encoding.stored_file(base_manifest, entry)
        if base_file is None:
            return {}, None
        try:
            return load_file(base_dir, base_manifest, base_file, mapped=True), base_file
        except (CorruptCheckpoint, UnsupportedFormat) as err:
            self._give_up_base(str(err))
            return {}, None

    def _give_up_base(self, why: str) -> None:
        # A delta against a damaged base could never be restored: the rest of this save is full.
        warnings.warn(f"safepoint: writing full files instead of a delta: the base is unusable ({why})",
                      SafepointWarning, stacklevel=4)
        self._base = None


def load_entry(checkpoint_dir: Path, manifest: Manifest, entry: str) -> dict[str, torch.Tensor]:
    """``entry``'s tensors as saved (decoded, 8-bit moments dequantised); {} when it has none.

    Every file is verified against the manifest before it is decoded, and a delta's base too.
    Raises ``CorruptCheckpoint`` (or ``UnsupportedFormat`` for an encoding from a newer safepoint).
    """
    name = encoding.stored_file(manifest, entry)
    if name is None:
        return {}
    tensors = load_file(checkpoint_dir, manifest, name)
    lossy = encoding.lossy_record(manifest, entry)
    if lossy:
        tensors = quantize.dequantize(tensors, lossy, checkpoint_dir / name)
    return tensors


def load_file(checkpoint_dir: Path, manifest: Manifest, name: str, *, mapped: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of one file as stored (8-bit moments still packed), verified. ``mapped``: a
    plain file is memory-mapped once verified, not read into memory (for the base of a delta)."""
    path = checkpoint_dir / name
    record = manifest.files[name]
    how = encoding.file_encoding(manifest, name)
    if how is None:
        if not name.endswith(encoding.PLAIN):
            raise CorruptCheckpoint(f"{path} is encoded but {checkpoint_dir / layout.MANIFEST} records no encoding for it")
        return _map_plain(path, record) if mapped else read_tensors_verified(path, record)
    ref = how.get(encoding.BASE_KEY)
    if ref is None:
        return compress.read_compressed(path, record, how)
    checked = delta.check_base(checkpoint_dir, manifest)
    assert checked is not None  # a file with a base record makes check_base require a parent
    base_dir, base_manifest = checked
    base_file = str(ref["file"])
    if (encoding.file_encoding(base_manifest, base_file) or {}).get(encoding.BASE_KEY):
        raise CorruptCheckpoint(f"{path} is a delta against {base_dir / base_file}, which is itself a delta")
    base = load_file(base_dir, base_manifest, base_file, mapped=True)
    return compress.read_compressed(path, record, how, reference=delta.xor_reference(base))


def _map_plain(path: Path, record: FileRecord) -> dict[str, torch.Tensor]:
    check_file(path, record)
    mapped = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: page cache, no private copy
    length = header_length(mapped[:8].tobytes(), path)
    slots = decode_header(mapped[:length].tobytes(), mapped.size - length, path)
    return tensors_from(torch.from_numpy(mapped), length, slots)
