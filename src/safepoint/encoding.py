"""How the tensor files of a checkpoint are encoded: their names and what the manifest records.

Plain checkpoints hold ``<entry>.safetensors`` and manifest format version 1. A checkpoint with
any encoded file (``compact.py`` writes them) has manifest format version 2, so an older
safepoint says "upgrade" instead of misreading it, and records each encoding in
``manifest.extra``:

    <entry>.safetensors.zst        compressed: extra.encoding[file] = {codec, transform, chunk, raw_size}
    <entry>.safetensors.xor.zst    delta: the same plus xor_with = {step, file, hash} of the base file
    extra.lossy[entry]             8-bit optimizer moments: {scheme, block, tensors: {name: {dtype, shape, sqrt}}}
    parent                         the base step of a delta

This module only names things and reads manifests, so listings and the command line can show
encodings without importing torch.
"""

from __future__ import annotations

from typing import Any

from . import layout
from .manifest import Manifest

ENCODED_FORMAT_VERSION = 2
ENCODING_KEY = "encoding"  # manifest.extra[ENCODING_KEY][file name]: how that file is encoded
BASE_KEY = "xor_with"  # ...[file name][BASE_KEY]: {"step", "file", "hash"} of the base file
LOSSY_KEY = "lossy"  # manifest.extra[LOSSY_KEY][entry]: quantize.py's record
PLAIN = layout.TENSOR_SUFFIX
COMPRESSED = layout.TENSOR_SUFFIX + ".zst"
DELTA = layout.TENSOR_SUFFIX + ".xor.zst"
_SUFFIXES = (PLAIN, COMPRESSED, DELTA)


def is_encoded(manifest: Manifest) -> bool:
    """Whether any tensor file of a checkpoint is compressed, a delta, or holds 8-bit moments."""
    return bool(manifest.extra.get(ENCODING_KEY) or manifest.extra.get(LOSSY_KEY))


def is_tensor_file(name: str) -> bool:
    """Whether a manifest's file holds tensors, in any encoding."""
    return name.endswith(_SUFFIXES)


def stored_file(manifest: Manifest, entry: str) -> str | None:
    """The file that holds ``entry``'s tensors in a checkpoint, whichever encoding; None if none."""
    for suffix in _SUFFIXES:
        if entry + suffix in manifest.files:
            return entry + suffix
    return None


def file_encoding(manifest: Manifest, name: str) -> dict[str, Any] | None:
    """The manifest's encoding record of one file; None for a plain file."""
    record = (manifest.extra.get(ENCODING_KEY) or {}).get(name)
    return record if isinstance(record, dict) else None


def lossy_record(manifest: Manifest, entry: str) -> dict[str, Any] | None:
    record = (manifest.extra.get(LOSSY_KEY) or {}).get(entry)
    return record if isinstance(record, dict) else None


def base_refs(manifest: Manifest) -> dict[str, dict[str, Any]]:
    """``{file name: {"step", "file", "hash"}}`` for every file of ``manifest`` stored as a delta."""
    encodings = manifest.extra.get(ENCODING_KEY) or {}
    return {name: enc[BASE_KEY] for name, enc in encodings.items() if isinstance(enc, dict) and BASE_KEY in enc}


def describe(manifest: Manifest) -> dict[str, Any] | None:
    """How a checkpoint is stored, for ``safepoint show``: None when it is plain."""
    encodings = manifest.extra.get(ENCODING_KEY) or {}
    lossy = manifest.extra.get(LOSSY_KEY) or {}
    if not encodings and not lossy:
        return None
    files = {}
    for name, enc in encodings.items():
        raw = int(enc.get("raw_size", 0))
        size = manifest.files[name].size if name in manifest.files else 0
        files[name] = {"codec": f"{enc.get('codec')}+{enc.get('transform')}", "raw_size": raw,
                       "ratio": round(raw / size, 2) if size else None,
                       "delta_of": (enc.get(BASE_KEY) or {}).get("step")}
    return {"delta_of": manifest.parent, "files": files,
            "lossy": {entry: {"scheme": rec.get("scheme"), "block": rec.get("block"),
                              "tensors": len(rec.get("tensors", {}))} for entry, rec in lossy.items()}}


def summary(description: dict[str, Any] | None) -> list[str]:
    """Human lines for ``describe``'s output (``safepoint show``)."""
    if not description:
        return []
    lines = []
    if description["delta_of"] is not None:
        lines.append(f"delta of step {description['delta_of']} (restore reads both; exact)")
    for name, f in description["files"].items():
        base = f" XOR step {f['delta_of']}" if f["delta_of"] is not None else ""
        lines.append(f"{name}: {f['codec']}{base}, {f['ratio']}x of {f['raw_size']} bytes")
    for entry, rec in description["lossy"].items():
        lines.append(f"LOSSY: {entry}: {rec['tensors']} optimizer moment tensor(s) stored in 8 bits ({rec['scheme']}, "
                     f"block {rec['block']})")
    return lines
