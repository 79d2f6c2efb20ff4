"""Delta checkpoints: tensors stored as the XOR of their bytes with the same tensor in a base checkpoint.

Why XOR: a restore is ``base XOR delta``, exact to the bit for every dtype, where a float
difference would round. Bytes that did not change become zeros that zstd compresses to almost
nothing: frozen or rarely updated tensors, buffers, and the sign and exponent bytes of weights
that moved a little. The XORed bytes are then stored like a compressed file (``compress.py``).

Chain length is one: a base is always a full checkpoint, so a restore reads exactly two
checkpoints and never walks a chain, and deleting one delta never breaks another. With
``delta_every=N`` a full checkpoint is written, then up to N-1 deltas against it, then a new full
one. A tensor is XORed if and only if the base stored one with the same name, dtype and shape
(the rule is applied alike when reading); a new or reshaped tensor is stored in full.

Each delta file records its base's step, file and hash, so a base that was replaced (the step
saved again after a rollback) or damaged is refused before anything is decoded against it, and
retention (``retention.with_bases``) never deletes a base while a committed delta needs it.
This module reads manifests only; it needs no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import layout
from .encoding import base_refs
from .errors import CorruptCheckpoint
from .manifest import Manifest, read_manifest

if TYPE_CHECKING:
    from .catalog import CheckpointInfo
    from .rawtensors import Slot

def choose_base(checkpoints: Sequence["CheckpointInfo"], every: int, step: int) -> "CheckpointInfo | None":
    """The checkpoint a save of ``step`` is a delta against, or None for a full save.

    The base is the newest checkpoint before ``step`` if it is full, or that checkpoint's base if
    it is a delta; None once the base has ``every - 1`` deltas (time for a new full one).
    """
    earlier = sorted((c for c in checkpoints if c.step < step), key=lambda c: c.step)
    if not earlier:
        return None
    newest = earlier[-1]
    base_step = newest.step if newest.parent is None else newest.parent
    base = next((c for c in earlier if c.step == base_step), None)
    if base is None or base.parent is not None:
        return None
    deltas = sum(1 for c in earlier if c.parent == base_step)
    return base if deltas < every - 1 else None


def xor_reference(base: Mapping[str, Any]) -> Callable[["Slot"], Any]:
    """The tensor of ``base`` each slot is XORed with: same name, dtype and shape, else None."""
    def reference(slot: "Slot") -> Any:
        t = base.get(slot.name)
        return t if t is not None and _same(t, slot.dtype, slot.shape) else None
    return reference


def any_match(tensors: Mapping[str, Any], base: Mapping[str, Any]) -> bool:
    """Whether any of ``tensors`` would be XORed with ``base`` (else a delta file is pointless)."""
    return any((b := base.get(name)) is not None and _same(b, t.dtype, tuple(t.shape)) for name, t in tensors.items())


def _same(t: Any, dtype: Any, shape: tuple[int, ...]) -> bool:
    return t.dtype == dtype and tuple(t.shape) == tuple(shape)


def check_base(checkpoint_dir: Path, manifest: Manifest) -> tuple[Path, Manifest] | None:
    """For a delta: its base's directory and manifest, after checking that the base is committed,
    is a full checkpoint, and still holds every file the delta was encoded against (same hash).
    None for a full checkpoint. Raises ``CorruptCheckpoint`` naming the delta and the base.

    The base's own files are verified when they are read (or by ``verify`` of the base).
    """
    refs = base_refs(manifest)
    if manifest.parent is None:
        if refs:
            raise CorruptCheckpoint(f"{checkpoint_dir}: files {sorted(refs)} are deltas but the manifest names no parent")
        return None
    base_dir = checkpoint_dir.parent / layout.step_dir_name(manifest.parent)
    what = f"{checkpoint_dir} is a delta against step {manifest.parent}"
    try:
        base = read_manifest(base_dir)
    except CorruptCheckpoint as err:
        raise CorruptCheckpoint(f"{what}, whose checkpoint is missing or not committed ({err}); the delta cannot "
                                "be restored without it") from None
    if base.parent is not None:
        raise CorruptCheckpoint(f"{what}, which is itself a delta (of step {base.parent}); a base must be full")
    for name, ref in refs.items():
        try:
            step, file, digest = int(ref["step"]), str(ref["file"]), str(ref["hash"])
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpoint(f"{checkpoint_dir}: the base record of {name} is malformed: {ref!r}") from None
        record = base.files.get(file)
        if step != manifest.parent:
            raise CorruptCheckpoint(f"{checkpoint_dir}: {name} names base step {step}, the manifest {manifest.parent}")
        if record is None or record.hash != digest:
            raise CorruptCheckpoint(f"{what}, but {base_dir / file} is not the file {name} was encoded against "
                                    f"(expected hash {digest}, the base's manifest has "
                                    f"{record.hash if record else 'no such file'}): the base step was saved again "
                                    "after this delta was written")
    return base_dir, base
