"""What changed between two checkpoints, tensor by tensor.

For "did this fine-tune touch the embeddings?", "which layers moved most?", or "are these two
checkpoints really the same?": keys added and removed, shape and dtype changes, and for each
common tensor the largest absolute difference and the relative change ``||b - a|| / ||a||``.
Works on safepoint checkpoints (any state entry) and Hugging Face checkpoints (their weights).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .export import load_weights


@dataclass(frozen=True)
class TensorChange:
    name: str
    status: str  # "changed", "same", "added", "removed", "shape", "dtype"
    max_abs: float | None = None
    rel_norm: float | None = None
    detail: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def _compare(name: str, a: torch.Tensor, b: torch.Tensor) -> TensorChange:
    if a.shape != b.shape:
        return TensorChange(name, "shape", detail=f"{tuple(a.shape)} -> {tuple(b.shape)}")
    if a.dtype != b.dtype:
        return TensorChange(name, "dtype", detail=f"{a.dtype} -> {b.dtype}")
    if torch.equal(a, b):
        return TensorChange(name, "same", 0.0, 0.0)
    if not (a.is_floating_point() or a.is_complex()):
        a, b = a.double(), b.double()
    delta = (b.double() - a.double())
    norm = a.double().norm().item()
    rel = delta.norm().item() / norm if norm else float("inf")
    return TensorChange(name, "changed", delta.abs().max().item(), rel)


def diff_checkpoints(a: str | Path, b: str | Path, *, entry: str = "model") -> list[TensorChange]:
    """Every tensor of ``entry`` in ``a`` vs. ``b``, most changed first."""
    left, right = load_weights(Path(a), entry=entry), load_weights(Path(b), entry=entry)
    changes = [_compare(k, left[k], right[k]) for k in left if k in right]
    changes += [TensorChange(k, "removed") for k in left if k not in right]
    changes += [TensorChange(k, "added") for k in right if k not in left]
    order = {"shape": 0, "dtype": 1, "added": 2, "removed": 3, "changed": 4, "same": 5}
    return sorted(changes, key=lambda c: (order[c.status], -(c.rel_norm or 0.0), c.name))
