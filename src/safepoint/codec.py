"""Lossless JSON for ``state_dict()`` structures, with tensors split out.

A state dict is a tree of dicts, lists, tuples, numbers, strings and tensors (optimizer state is
keyed by ints, Adam's ``betas`` is a tuple, a loss may be ``nan``). ``encode`` turns it into
plain JSON, replacing each tensor with a reference to a named tensor that goes into a safetensors
file; ``decode`` reverses it exactly. Anything else is refused with the path to the offending
value: safepoint never pickles, so loading a checkpoint can never run code.

Tagged forms (only used where plain JSON cannot say it):
``{"__tensor__": name}``, ``{"__tuple__": [...]}``, ``{"__dict__": [[k, v], ...]}`` (non-string
or reserved keys), ``{"__float__": "nan" | "inf" | "-inf"}``, ``{"__bytes__": b64}``,
``{"__numpy__": {...}}``, ``{"__dtype__": "float32"}``, ``{"__device__": "cuda:0"}``.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

_TAGS = ("__tensor__", "__tuple__", "__dict__", "__float__", "__bytes__", "__numpy__",
         "__dtype__", "__device__")


def _path_str(path: tuple[Any, ...]) -> str:
    return "".join(f"[{p!r}]" for p in path)


class Encoder:
    """Encodes one entry's state dict; collects its tensors under unique dotted names."""

    def __init__(self, entry: str) -> None:
        self.entry = entry
        self.tensors: dict[str, torch.Tensor] = {}

    def _tensor_name(self, path: tuple[Any, ...]) -> str:
        base = ".".join(str(p) for p in path) or "_"
        name, n = base, 1
        while name in self.tensors or name == "__metadata__":  # safetensors reserves "__metadata__"
            name, n = f"{base}#{n}", n + 1
        return name

    def encode(self, obj: Any, path: tuple[Any, ...] = ()) -> Any:
        if isinstance(obj, torch.Tensor):
            name = self._tensor_name(path)
            self.tensors[name] = obj
            return {"__tensor__": name}
        if isinstance(obj, bool) or obj is None or isinstance(obj, str):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float) and not isinstance(obj, np.generic):  # np.float64 is a float
            return float(obj) if math.isfinite(obj) else {"__float__": repr(float(obj))}
        if isinstance(obj, Mapping):
            if all(isinstance(k, str) and k not in _TAGS for k in obj):
                return {k: self.encode(v, path + (k,)) for k, v in obj.items()}
            return {"__dict__": [[self.encode(k, path), self.encode(v, path + (k,))] for k, v in obj.items()]}
        if isinstance(obj, list):
            return [self.encode(v, path + (i,)) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):  # also torch.Size
            return {"__tuple__": [self.encode(v, path + (i,)) for i, v in enumerate(obj)]}
        if isinstance(obj, (bytes, bytearray)):
            return {"__bytes__": base64.b64encode(bytes(obj)).decode()}
        if isinstance(obj, (np.ndarray, np.generic)):
            arr = np.asarray(obj)
            if arr.dtype.hasobject or arr.dtype.fields is not None:
                raise TypeError(
                    f"state[{self.entry!r}]{_path_str(path)} is a numpy array of dtype {arr.dtype}, which "
                    "safepoint does not store (object arrays would need pickles; structured dtypes lose "
                    "their fields). Convert it to a plain numeric array or to lists.")
            return {"__numpy__": {"dtype": arr.dtype.str, "shape": list(arr.shape),
                                  "scalar": isinstance(obj, np.generic),
                                  "data": base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode()}}
        if isinstance(obj, torch.dtype):
            return {"__dtype__": str(obj).removeprefix("torch.")}
        if isinstance(obj, torch.device):
            return {"__device__": str(obj)}
        raise TypeError(
            f"state[{self.entry!r}]{_path_str(path)} is a {type(obj).__module__}.{type(obj).__qualname__}, "
            "which safepoint does not store: checkpoints hold tensors, numbers, strings, lists and "
            "dicts only (never pickles). Make state_dict() return plain data for it.")


def decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild the structure ``Encoder.encode`` produced, taking tensors from ``tensors``."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, value), = obj.items()
        if tag == "__tensor__":
            return tensors[value]
        if tag == "__tuple__":
            return tuple(decode(v, tensors) for v in value)
        if tag == "__dict__":
            return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in value}
        if tag == "__float__":
            return float(value)
        if tag == "__bytes__":
            return base64.b64decode(value)
        if tag == "__numpy__":
            arr = np.frombuffer(base64.b64decode(value["data"]), dtype=np.dtype(value["dtype"]))
            arr = arr.reshape(value["shape"]).copy()
            return arr[()] if value["scalar"] else arr
        if tag == "__dtype__":
            dtype = getattr(torch, str(value), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"{value!r} is not a torch dtype")
            return dtype
        if tag == "__device__":
            return torch.device(value)
    return {k: decode(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def tensor_refs(obj: Any) -> list[str]:
    """Every tensor name referenced by an encoded structure."""
    if isinstance(obj, list):
        return [r for v in obj for r in tensor_refs(v)]
    if isinstance(obj, dict):
        if len(obj) == 1 and "__tensor__" in obj:
            return [obj["__tensor__"]]
        return [r for v in obj.values() for r in tensor_refs(v)]
    return []
