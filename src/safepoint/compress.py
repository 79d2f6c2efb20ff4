"""Compressed tensor files: a safetensors stream, split into byte planes, zstd, in bounded chunks.

Why byte planes: the bytes of a float are not alike. Sign and exponent vary slowly across a
tensor, low mantissa bytes look random. Storing byte 0 of every element, then byte 1, and so on
(per chunk) puts the compressible bytes next to each other; on trained transformer weights and
Adam moments this gains 7-20% over zstd on the raw bytes at the same speed (see
``benchmarks/compact_bench.py``). With a reference (a delta checkpoint's base, ``delta.py``) each
chunk is first XORed with the reference's bytes, so unchanged bytes become zeros.

The raw stream, before zstd: the standard safetensors header, then every tensor's bytes in
chunks of ``CHUNK`` bytes, each chunk stored as its byte planes (XORed first when a reference is
given). The file is one zstd frame with its content size and checksum, so ``zstd -t`` can test it.

Memory: writing holds two chunk-sized scratch buffers and zstd's window, never a copy of a file;
output is handed to ``HashingWriter`` (hashed as written, fsynced on close) in batches. Reading
first verifies the compressed bytes against the manifest's hash, then decodes chunk by chunk
straight into the buffer the tensors are views of.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .catalog import check_hash, check_size
from .commit import FileRecord, HashingWriter, read_hashed
from .errors import CorruptCheckpoint, SafepointError, UnsupportedFormat
from .rawtensors import Slot, byte_view, decode_header, encode_header, header_length, tensors_from

CODEC = "zstd"
TRANSFORM = "byteplanes"
CHUNK = 4 << 20  # a multiple of every element size
LEVEL = 1  # on float data level 1 compresses within 1% of level 3, 2-4x faster
_BATCH = 4 << 20

# The tensor whose bytes a slot's bytes are XORed with (same dtype and shape), or None.
Reference = Callable[[Slot], "torch.Tensor | None"]


def _no_reference(slot: Slot) -> None:
    return None


def zstandard() -> Any:
    """The ``zstandard`` module, or an error that says how to install it."""
    try:
        import zstandard
    except ImportError:
        raise SafepointError("compressed and delta checkpoints need the 'zstandard' package: "
                             "pip install 'safepoint[compress]' (or pip install zstandard)") from None
    return zstandard


def _threads() -> int:
    cores = os.cpu_count() or 1
    return 0 if cores < 2 else min(cores, 8)  # 0: compress on the calling thread


@dataclass(frozen=True)
class Written:
    record: FileRecord  # of the compressed file, as the manifest lists it
    raw_size: int  # of the stream before zstd


def describe() -> dict[str, Any]:
    """What the manifest records about how a file of this module was encoded."""
    return {"codec": CODEC, "transform": TRANSFORM, "chunk": CHUNK}


def write_compressed(path: Path, tensors: dict[str, torch.Tensor], *, reference: Reference = _no_reference) -> Written:
    """Encode ``tensors`` into a new file at ``path``, fsync it, return its record."""
    zstd = zstandard()
    header, slots = encode_header(tensors)
    raw_size = len(header) + (slots[-1].end if slots else 0)
    compressor = zstd.ZstdCompressor(level=LEVEL, threads=_threads(), write_checksum=True, write_content_size=True)
    stream = compressor.compressobj(size=raw_size)
    xor_buf = torch.empty(CHUNK, dtype=torch.uint8)
    plane_buf = torch.empty(CHUNK, dtype=torch.uint8)
    writer = HashingWriter(path)
    with writer:
        out = _Batches(writer)
        out.add(stream.compress(header))
        for slot, t in zip(slots, tensors.values()):
            src = byte_view(t)
            ref = _reference_bytes(reference, slot)
            size = slot.dtype.itemsize
            for start in range(0, slot.nbytes, CHUNK):
                piece = src[start:start + CHUNK]
                n = piece.numel()
                if ref is not None:
                    np.bitwise_xor(piece.numpy(), ref[start:start + n].numpy(), out=xor_buf[:n].numpy())
                    piece = xor_buf[:n]
                if size > 1:
                    piece = _to_planes(piece, plane_buf[:n], size)
                out.add(stream.compress(piece.numpy()))
        out.add(stream.flush())
        out.flush()
    return Written(writer.close(), raw_size)


class _Batches:
    """Collects zstd's output into a few MiB per write (it returns many small pieces)."""

    def __init__(self, writer: HashingWriter) -> None:
        self.writer = writer
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> None:
        if data:
            self.parts.append(data)
            self.size += len(data)
            if self.size >= _BATCH:
                self.flush()

    def flush(self) -> None:
        if self.parts:
            # A new immutable bytes object: HashingWriter may still be hashing it after write() returns.
            self.writer.write(b"".join(self.parts))
            self.parts, self.size = [], 0


def read_compressed(path: Path, record: FileRecord, encoding: Mapping[str, Any], *,
                    reference: Reference = _no_reference) -> dict[str, torch.Tensor]:
    """Verify ``path`` against its manifest record, then decode its tensors.

    ``encoding`` is what the manifest recorded for the file (``describe()`` plus ``raw_size``);
    ``reference`` gives the tensor each slot was XORed with when written (delta files).
    Raises ``CorruptCheckpoint`` when the file fails its hash or does not decode as recorded.
    """
    if encoding.get("codec") != CODEC or encoding.get("transform") != TRANSFORM or encoding.get("chunk") != CHUNK:
        raise UnsupportedFormat(f"{path} is encoded as {dict(encoding)!r}; this safepoint reads "
                                f"{describe()!r}. Upgrade safepoint")
    try:
        raw_size = int(encoding["raw_size"])
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptCheckpoint(f"{path}: its manifest's encoding record has no valid raw_size: {err!r}") from None
    zstd = zstandard()
    check_size(path, record)
    packed = torch.empty(record.size, dtype=torch.uint8)
    check_hash(path, record, read_hashed(path, memoryview(packed.numpy()).cast("B"), like=record.hash))
    try:
        reader = zstd.ZstdDecompressor().stream_reader(packed.numpy())
        prefix = _read_exactly(reader, torch.empty(8, dtype=torch.uint8), path)
        header_len = header_length(prefix.numpy().tobytes(), path)
        if header_len > raw_size:
            raise CorruptCheckpoint(f"{path}: its header claims {header_len} bytes of a {raw_size}-byte stream")
        rest = _read_exactly(reader, torch.empty(header_len - 8, dtype=torch.uint8), path)
        slots = decode_header(prefix.numpy().tobytes() + rest.numpy().tobytes(), raw_size - header_len, path)
        data = torch.empty(raw_size - header_len, dtype=torch.uint8)
        scratch = torch.empty(min(CHUNK, data.numel()), dtype=torch.uint8)
        for slot in slots:
            ref = _reference_bytes(reference, slot)
            size = slot.dtype.itemsize
            for start in range(0, slot.nbytes, CHUNK):
                n = min(CHUNK, slot.nbytes - start)
                dest = data[slot.start + start:slot.start + start + n]
                if size == 1:
                    _read_exactly(reader, dest, path)
                else:
                    _from_planes(_read_exactly(reader, scratch[:n], path), dest, size)
                if ref is not None:
                    np.bitwise_xor(dest.numpy(), ref[start:start + n].numpy(), out=dest.numpy())
        if reader.read(1):
            raise CorruptCheckpoint(f"{path} decodes to more than the {raw_size} bytes its manifest records")
    except zstd.ZstdError as err:
        raise CorruptCheckpoint(f"{path} does not decode as zstd: {err}") from None
    return tensors_from(data, 0, slots)


# Byte planes and XOR run in numpy on the calling thread: multi-threaded torch copies stall badly
# when zstd's workers or the training process already keep the cores busy.

def _to_planes(src: torch.Tensor, out: torch.Tensor, size: int) -> torch.Tensor:
    np.copyto(out.numpy().reshape(size, -1), src.numpy().reshape(-1, size).T)
    return out


def _from_planes(planes: torch.Tensor, out: torch.Tensor, size: int) -> None:
    columns, rows = out.numpy().reshape(-1, size), planes.numpy().reshape(size, -1)
    for i in range(size):  # one plane at a time: 2-3x faster than a transposed copy
        columns[:, i] = rows[i]


def _reference_bytes(reference: Reference, slot: Slot) -> torch.Tensor | None:
    ref = reference(slot)
    if ref is None:
        return None
    if ref.dtype != slot.dtype or tuple(ref.shape) != slot.shape:
        raise ValueError(f"the reference for tensor {slot.name!r} is {ref.dtype} {tuple(ref.shape)}, "
                         f"expected {slot.dtype} {slot.shape}")
    return byte_view(ref)


def _read_exactly(reader: Any, into: torch.Tensor, path: Path) -> torch.Tensor:
    view = memoryview(into.numpy()).cast("B")
    got = 0
    while got < len(view):
        n = reader.readinto(view[got:])
        if not n:
            raise CorruptCheckpoint(f"{path} decodes to fewer bytes than its manifest records")
        got += n
    return into
