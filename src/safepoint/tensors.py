"""Tensor files: safetensors written by streaming, read by the safetensors library.

Writing is done here, not by ``safetensors.torch.save_file``, for three reasons: the bytes are
hashed as they are written (no second pass over the file), nothing is serialised in memory (each
tensor's bytes stream through two reused direct-I/O buffers to the disk, see ``HashingWriter``),
and a full disk surfaces as a clean ``OSError(ENOSPC)`` naming the file. The output is plain
safetensors (header length, JSON header, raw little-endian data; ``rawtensors``), so any tool
reads it. Verified reads hash the file while reading it once and parse only JSON and offsets;
unverified reads use the safetensors library itself. Neither ever executes code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from .commit import FileRecord, HashingWriter, read_hashed
from .catalog import check_hash, check_size
from .rawtensors import byte_view, decode_header, encode_header, header_length, tensors_from


def host_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor as a view of a CPU buffer (copied only when it must be)."""
    return memoryview(byte_view(t).numpy()).cast("B")


def header_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return encode_header(tensors)[0]


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> FileRecord:
    """Stream ``tensors`` into a new safetensors file at ``path``, fsync it, return its record."""
    assert sys.byteorder == "little", "safetensors is little-endian"
    writer = HashingWriter(path, direct=True)
    with writer:
        writer.write(header_bytes(tensors))
        for t in tensors.values():
            if t.numel():
                writer.write(host_bytes(t))
    return writer.close()


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file onto the CPU (callers place them on devices)."""
    return load_file(str(path), device="cpu")


def read_tensors_verified(path: Path, expected: FileRecord) -> dict[str, torch.Tensor]:
    """Read a safetensors file once, hashing while reading; tensors are views of one CPU buffer.

    Raises ``CorruptCheckpoint`` when the size or hash differs from the manifest's record, so
    nothing unverified is ever parsed. The header is plain JSON; no code can run.
    """
    check_size(path, expected)
    buf = torch.empty(expected.size, dtype=torch.uint8)
    check_hash(path, expected, read_hashed(path, memoryview(buf.numpy()).cast("B"), like=expected.hash))
    head_len = header_length(buf[:8].numpy().tobytes(), path)
    slots = decode_header(buf[:head_len].numpy().tobytes(), expected.size - head_len, path)
    return tensors_from(buf, head_len, slots)
