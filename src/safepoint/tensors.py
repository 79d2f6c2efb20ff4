"""Tensor files: safetensors written by streaming, read by the safetensors library.

Writing is done here, not by ``safetensors.torch.save_file``, for three reasons: the bytes are
hashed as they are written (no second pass over the file), nothing is serialised in memory (each
tensor's bytes stream through two reused direct-I/O buffers to the disk, see ``HashingWriter``),
and a full disk surfaces as a clean ``OSError(ENOSPC)`` naming the file. The output is plain safetensors (header length, JSON header,
raw little-endian data), so any tool reads it; reading uses the safetensors library itself, which
never executes code.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from .commit import FileRecord, HashingWriter, read_hashed
from .catalog import check_hash, check_size
from .errors import CorruptCheckpoint

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_ALIGN = 8


def dtype_code(t: torch.Tensor, name: str) -> str:
    try:
        return _DTYPES[t.dtype]
    except KeyError:
        raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store; "
                        f"supported: {', '.join(str(d) for d in _DTYPES)}") from None


def host_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor as a view of a CPU buffer (copied only when it must be)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def header_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    header: dict[str, object] = {}
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": dtype_code(t, name), "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % _ALIGN)
    return struct.pack("<Q", len(raw)) + raw


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


_CODES = {code: dtype for dtype, code in _DTYPES.items()}


def read_tensors_verified(path: Path, expected: FileRecord) -> dict[str, torch.Tensor]:
    """Read a safetensors file once, hashing while reading; tensors are views of one CPU buffer.

    Raises ``CorruptCheckpoint`` when the size or hash differs from the manifest's record, so
    nothing unverified is ever parsed. The header is plain JSON; no code can run.
    """
    check_size(path, expected)
    buf = torch.empty(expected.size, dtype=torch.uint8)
    check_hash(path, expected, read_hashed(path, memoryview(buf.numpy()).cast("B"), like=expected.hash))
    try:
        (header_len,) = struct.unpack("<Q", buf[:8].numpy().tobytes())
        header = json.loads(buf[8:8 + header_len].numpy().tobytes())
        base = 8 + header_len
        out = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = _CODES[meta["dtype"]]
            start, end = meta["data_offsets"]
            raw = buf[base + start:base + end]
            if (base + start) % dtype.itemsize:
                raw = raw.clone()  # views need aligned storage offsets
            out[name] = raw.view(dtype).reshape(meta["shape"])
        return out
    except (KeyError, ValueError, RuntimeError, struct.error) as err:
        raise CorruptCheckpoint(f"{path} is not a valid safetensors file: {err!r}") from err
