"""Does a checkpoint fit a model? Answered from names and shapes, before anything is loaded.

``load_state_dict`` would say so too, but only after the first mismatching tensor, in a stack trace
from deep inside torch, and after earlier entries were already overwritten. This module compares
whole key sets and shapes up front and names every difference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .errors import IncompatibleState

Shapes = Mapping[str, Sequence[int]]


def shape_mismatches(model: Shapes, checkpoint: Shapes) -> list[str]:
    """Lines describing keys missing on either side and shape differences; empty when they fit."""
    missing = [k for k in model if k not in checkpoint]
    unexpected = [k for k in checkpoint if k not in model]
    wrong = [f"{k}: checkpoint {tuple(checkpoint[k])}, model {tuple(shape)}"
             for k, shape in model.items() if k in checkpoint and tuple(checkpoint[k]) != tuple(shape)]
    lines = []
    if missing:
        lines.append(f"  keys the model has but the checkpoint lacks ({len(missing)}): {few(missing)}")
    if unexpected:
        lines.append(f"  keys in the checkpoint the model lacks ({len(unexpected)}): {few(unexpected)}")
    if wrong:
        lines.append(f"  shape mismatches ({len(wrong)}): {few(wrong)}")
    return lines


def require_fit(what: str, model: Shapes, checkpoint: Shapes) -> None:
    """Raise ``IncompatibleState`` naming every mismatch between ``model`` and ``checkpoint``."""
    lines = shape_mismatches(model, checkpoint)
    if lines:
        raise IncompatibleState("\n".join([f"{what}:", *lines,
                                           "  Is this the same architecture (and vocabulary size)? "
                                           "Use a new directory for a different model."]))


def few(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")
