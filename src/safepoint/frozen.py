"""Trainable-only checkpoints for models with a frozen backbone.

Fine-tuning a head or a few layers on a frozen multi-GB backbone should not write the backbone
at every save. With ``trainable_only=True`` a module entry keeps only its parameters that
require grad (and its buffers, which training may update); the frozen parameters are replaced by
their names and one sha256 over their bytes. A restore recomputes that hash on the model it is
given and refuses a different backbone, so a trainable-only checkpoint can never be applied to
weights it was not trained on. The hash is computed once per model and cached: frozen weights,
by definition, do not change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

from .errors import IncompatibleState
from .tensors import host_bytes

FROZEN_ENTRY = "_frozen"


def frozen_names(module: torch.nn.Module) -> list[str]:
    return sorted(n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad)


class FrozenWeights:
    """Strips frozen parameters from module entries and checks them on restore."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, ...], str] = {}

    def fingerprint(self, module: torch.nn.Module, names: list[str]) -> str:
        params = dict(module.named_parameters(remove_duplicate=False))
        key = tuple(params[n].data_ptr() for n in names)
        if key not in self._cache:
            h = hashlib.sha256()
            for n in names:
                t = params[n]
                h.update(f"{n}|{t.dtype}|{tuple(t.shape)}\n".encode())
                if t.numel():
                    h.update(host_bytes(t))
            self._cache[key] = h.hexdigest()
        return self._cache[key]

    def strip(self, state: Mapping[str, Any], collected: dict[str, Any]) -> dict[str, Any]:
        """Collected state with frozen parameters of every module entry replaced by a record."""
        records = {}
        for name, obj in state.items():
            if not isinstance(obj, torch.nn.Module):
                continue
            names = frozen_names(obj)
            if not names:
                continue
            dropped = set(names)
            collected[name] = {k: v for k, v in collected[name].items() if k not in dropped}
            records[name] = {"keys": names, "sha256": self.fingerprint(obj, names)}
        if records:
            collected[FROZEN_ENTRY] = records
        return collected

    def check(self, name: str, module: Any, record: Mapping[str, Any], where: str) -> list[str]:
        """Refuse a module whose frozen weights differ from the checkpoint's; return the frozen keys."""
        if not isinstance(module, torch.nn.Module):
            raise IncompatibleState(f"{where} saved state[{name!r}] trainable-only; it can only be restored "
                                    f"into an nn.Module, got {type(module).__name__}")
        names = list(record["keys"])
        missing = [n for n in names if n not in dict(module.named_parameters(remove_duplicate=False))]
        if missing:
            raise IncompatibleState(f"{where}: state[{name!r}] lacks the frozen parameters the checkpoint "
                                    f"was trained with: {', '.join(missing[:8])}")
        if self.fingerprint(module, names) != record["sha256"]:
            raise IncompatibleState(
                f"{where} holds only the trainable part of state[{name!r}]; its frozen weights "
                f"({len(names)} tensors) differ from those it was trained on (sha256 {record['sha256'][:12]}…). "
                "Load the same base model (same weights, dtype, and frozen set) before restoring")
        return names
