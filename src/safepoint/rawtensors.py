"""A tensor set as safetensors bytes in memory: the layout an encoder transforms, and parsing it back.

Encoded tensor files (``compress``) hold a safetensors byte stream that was transformed on its way
to disk (XOR against a base, byte planes, zstd). Encoders need that stream's layout without
writing a plain file first, and decoders need to turn a decoded buffer back into tensors without
copying it again. Both live here, below ``tensors.py`` (which writes and reads plain files
with them): the header is the standard one (8-byte little-endian length, JSON, space padding to 8
bytes, tensors back to back), so a decoded buffer is a valid safetensors file. Parsing is JSON
and offsets only; no code can run.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CorruptCheckpoint

_CODES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {dtype: code for code, dtype in _CODES.items()}
_ALIGN = 8


@dataclass(frozen=True)
class Slot:
    """Where one tensor's bytes sit in the stream (``start``/``end`` from the start of the data)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor as a flat uint8 CPU tensor (a view when it already is contiguous on the CPU)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8)


def encode_header(tensors: dict[str, torch.Tensor]) -> tuple[bytes, list[Slot]]:
    """The safetensors header for ``tensors`` (in their order) and the slot of each tensor."""
    header: dict[str, object] = {}
    slots = []
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store; "
                            f"supported: {', '.join(str(d) for d in _NAMES)}")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        slots.append(Slot(name, t.dtype, tuple(t.shape), offset, offset + nbytes))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % _ALIGN)
    return struct.pack("<Q", len(raw)) + raw, slots


def header_length(prefix: bytes, where: Path) -> int:
    """The total header size (length field included) from the first 8 bytes of a stream."""
    if len(prefix) < 8:
        raise CorruptCheckpoint(f"{where} decodes to {len(prefix)} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", prefix[:8])
    return 8 + n


def decode_header(header: bytes, data_size: int, where: Path) -> list[Slot]:
    """The slots a header describes, checked to tile ``data_size`` bytes exactly, in stream order."""
    try:
        doc = json.loads(header[8:])
        slots = []
        for name, meta in doc.items():
            if name == "__metadata__":
                continue
            start, end = (int(x) for x in meta["data_offsets"])
            slots.append(Slot(name, _CODES[meta["dtype"]], tuple(int(d) for d in meta["shape"]), start, end))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CorruptCheckpoint(f"{where} decodes to an unreadable safetensors header: {err!r}") from None
    slots.sort(key=lambda s: s.start)
    offset = 0
    for s in slots:
        numel = 1
        for d in s.shape:
            numel *= d
        if s.start != offset or s.nbytes != numel * s.dtype.itemsize:
            raise CorruptCheckpoint(f"{where}: tensor {s.name!r} has offsets {s.start}..{s.end}, which do not fit "
                                    f"its shape {list(s.shape)} and dtype, or leave a gap")
        offset = s.end
    if offset != data_size:
        raise CorruptCheckpoint(f"{where}: its tensors cover {offset} bytes, the stream holds {data_size}")
    return slots


def tensors_from(buf: torch.Tensor, data_start: int, slots: list[Slot]) -> dict[str, torch.Tensor]:
    """Tensors as views of ``buf`` (a flat uint8 tensor); misaligned ones are copied once."""
    out = {}
    for s in slots:
        raw = buf[data_start + s.start:data_start + s.end]
        if (data_start + s.start) % s.dtype.itemsize:
            raw = raw.clone()  # views need aligned storage offsets
        out[s.name] = raw.view(s.dtype).reshape(s.shape)
    return out
