"""Collecting the application's state and putting it back.

An entry of the ``state`` mapping is anything with ``state_dict()`` and ``load_state_dict()`` (the
DCP ``Stateful`` protocol: models, optimizers, schedulers, grad scalers, safepoint's data
loaders, user objects) or a plain ``dict``, which is updated in place on restore. RNG state is not
an entry the user passes: it is captured automatically (python, numpy, torch CPU, every CUDA
device) because forgetting one stream is the commonest reason a resume is not exact.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from . import layout

RNG_ENTRY = "_rng"


@runtime_checkable
class Stateful(Protocol):
    """What safepoint calls: ``state_dict()`` when saving, ``load_state_dict(sd)`` when restoring."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


def check_state(state: Mapping[str, Any]) -> None:
    """Refuse a ``state`` mapping safepoint cannot save, before anything is written."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict of name -> object with state_dict(), got {type(state).__name__}")
    for name, obj in state.items():
        if not isinstance(name, str) or not layout.is_valid_entry_name(name):
            raise ValueError(f"state entry name {name!r} is not allowed: use letters, digits, '_', '.' "
                             "or '-', starting with a letter or digit (it becomes a file name)")
        if isinstance(obj, dict):
            continue
        missing = [m for m in ("state_dict", "load_state_dict") if not callable(getattr(obj, m, None))]
        if missing:
            raise TypeError(
                f"state[{name!r}] is a {type(obj).__name__} without {' and '.join(m + '()' for m in missing)}; "
                "pass an object following the Stateful protocol (model, optimizer, scheduler, "
                "safepoint.ResumableLoader...) or a plain dict")


def collect(state: Mapping[str, Any]) -> dict[str, Any]:
    """Each entry's current state dict, plus the RNG streams under ``_rng``."""
    out = {name: (dict(obj) if isinstance(obj, dict) else obj.state_dict()) for name, obj in state.items()}
    out[RNG_ENTRY] = capture_rng()
    return out


def apply(state: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    """Load ``saved[name]`` into every entry of ``state`` that the checkpoint has."""
    for name, obj in state.items():
        if name not in saved:
            continue
        if isinstance(obj, dict):
            obj.clear()
            obj.update(saved[name])
        else:
            obj.load_state_dict(saved[name])


def capture_rng() -> dict[str, Any]:
    rng: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return rng


def restore_rng(rng: Mapping[str, Any]) -> list[str]:
    """Set every saved RNG stream that this process has; return the names restored."""
    restored = []
    if "python" in rng:
        random.setstate(rng["python"])
        restored.append("python")
    if "numpy" in rng:
        np.random.set_state(rng["numpy"])
        restored.append("numpy")
    if "torch" in rng:
        # clone(): set_rng_state reads the storage from its start, ignoring a view's offset.
        torch.set_rng_state(rng["torch"].clone())
        restored.append("torch")
    if "cuda" in rng:
        states = rng["cuda"]
        if torch.cuda.is_available() and torch.cuda.device_count() == len(states):
            for i, s in enumerate(states):
                torch.cuda.set_rng_state(s.clone(), i)
            restored.append("cuda")
        else:
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            warnings.warn(f"checkpoint has CUDA RNG state for {len(states)} device(s) but this process "
                          f"sees {have}; CUDA RNG not restored, so random ops on the GPU will differ",
                          stacklevel=3)
    return restored
