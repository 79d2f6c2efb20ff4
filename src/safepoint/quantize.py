"""Lossy 8-bit optimizer moments: Adam's ``exp_avg`` and ``exp_avg_sq`` as one byte per element.

Adam keeps two fp32 moments per parameter, two thirds of a full fine-tuning checkpoint. Stored as
one byte per element plus one fp32 scale per block of ``BLOCK`` elements, they shrink about 3.9x.
It is lossy, so it is off unless asked for (``quantize_optimizer=True``), recorded per tensor in
the manifest (``extra.lossy``) and shown by ``safepoint show``. Model weights are never touched:
only entries shaped like a torch optimizer's ``state_dict`` (``state`` + ``param_groups``), and
in them only floating tensors named ``state.<i>.exp_avg``, ``exp_avg_sq`` or ``max_exp_avg_sq``
with at least ``MIN_NUMEL`` elements, all finite. Everything else stays exact.

- ``exp_avg`` (signed): ``q = round(x / s)`` in [-127, 127] with ``s = absmax(block) / 127``, so
  ``|x' - x| <= s / 2``.
- ``exp_avg_sq`` and ``max_exp_avg_sq`` (non-negative, spanning many orders of magnitude): the
  square root is quantised, rounded *up*, into [0, 255] with ``s = absmax(sqrt(block)) / 255``, so
  ``0 <= sqrt(v') - sqrt(v) <= s``. Rounding up means a restored second moment is never smaller
  than the saved one: Adam's step ``m / (sqrt(v) + eps)`` can shrink, but never blows up where a
  small ``v`` would otherwise round to zero.

A restore dequantises into the tensor's saved dtype; ``load_state_dict`` then moves it where the
optimizer wants it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from .errors import CorruptCheckpoint, UnsupportedFormat

SCHEME = "absmax8-blockwise"
BLOCK = 256
MIN_NUMEL = 4096
_MOMENT = re.compile(r"^state\.[^.]+\.(exp_avg|exp_avg_sq|max_exp_avg_sq)$")
_NON_NEGATIVE = ("exp_avg_sq", "max_exp_avg_sq")
_VALUES, _SCALES = "::q8", "::absmax"
_PASS = BLOCK * 4096  # elements per pass, to bound temporary memory on huge tensors


def is_optimizer_state(encoded: Any) -> bool:
    """Whether an encoded entry has the shape of ``torch.optim.Optimizer.state_dict()``."""
    return isinstance(encoded, dict) and isinstance(encoded.get("state"), dict) \
        and isinstance(encoded.get("param_groups"), list)


def quantize_moments(tensors: dict[str, torch.Tensor], encoded: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """``tensors`` with every eligible moment replaced by its 8-bit form, and the manifest record
    (None when nothing was quantised). The input is not modified."""
    if not is_optimizer_state(encoded):
        return tensors, None
    out: dict[str, torch.Tensor] = {}
    done: dict[str, Any] = {}
    for name, t in tensors.items():
        match = _MOMENT.match(name)
        if (match is None or not t.is_floating_point() or t.numel() < MIN_NUMEL
                or name + _VALUES in tensors or name + _SCALES in tensors):
            out[name] = t
            continue
        sqrt = match.group(1) in _NON_NEGATIVE
        packed = _quantize(t, sqrt=sqrt)
        if packed is None:  # non-finite, or a negative "square": keep it exact
            out[name] = t
            continue
        out[name + _VALUES], out[name + _SCALES] = packed
        done[name] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "sqrt": sqrt}
    if not done:
        return tensors, None
    return out, {"scheme": SCHEME, "block": BLOCK, "tensors": done}


def dequantize(tensors: dict[str, torch.Tensor], record: dict[str, Any], where: Path) -> dict[str, torch.Tensor]:
    """Undo ``quantize_moments`` on tensors read back, as its manifest ``record`` describes."""
    if record.get("scheme") != SCHEME or record.get("block") != BLOCK:
        raise UnsupportedFormat(f"{where} holds optimizer moments quantised as {record.get('scheme')!r} with block "
                                f"{record.get('block')!r}; this safepoint reads {SCHEME!r} with block {BLOCK}. "
                                "Upgrade safepoint")
    out = dict(tensors)
    try:
        for name, meta in record["tensors"].items():
            values, scales = out.pop(name + _VALUES), out.pop(name + _SCALES)
            dtype = getattr(torch, str(meta["dtype"]), None)
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise CorruptCheckpoint(f"{where}: {name!r} records dtype {meta['dtype']!r}, not a floating dtype")
            shape = [int(d) for d in meta["shape"]]
            numel = math.prod(shape)
            if values.numel() != numel or scales.numel() != -(-numel // BLOCK) or scales.dtype != torch.float32 \
                    or values.dtype != (torch.uint8 if meta["sqrt"] else torch.int8):
                raise CorruptCheckpoint(f"{where}: the 8-bit form of {name!r} does not fit its recorded shape {shape}")
            out[name] = _dequantize(values, scales, bool(meta["sqrt"]), dtype).view(shape)
    except (KeyError, TypeError, AttributeError) as err:
        raise CorruptCheckpoint(f"{where}: the 8-bit optimizer moments do not match the manifest ({err!r})") from None
    return out


def _quantize(t: torch.Tensor, *, sqrt: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    flat = t.detach().reshape(-1).cpu()
    numel = flat.numel()
    values = torch.empty(numel, dtype=torch.uint8 if sqrt else torch.int8)
    scales = torch.empty(-(-numel // BLOCK), dtype=torch.float32)
    top = 255.0 if sqrt else 127.0
    for start in range(0, numel, _PASS):
        x = flat[start:start + _PASS].to(torch.float32, copy=True)
        if not torch.isfinite(x).all() or (sqrt and (x < 0).any()):
            return None
        if sqrt:
            x.sqrt_()
        rows, tail = _blocks(x)
        scale = scales[start // BLOCK:start // BLOCK + -(-x.numel() // BLOCK)]
        if rows.numel():
            top_of = torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg_())  # absmax, no |x| copy
            scale[:rows.shape[0]] = top_of
        if tail.numel():
            scale[-1] = tail.abs().max()
        scale.div_(top)
        inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        rows.mul_(inverse[:rows.shape[0], None])
        tail.mul_(inverse[-1])
        (x.ceil_() if sqrt else x.round_()).clamp_(0.0 if sqrt else -top, top)
        values[start:start + x.numel()] = x  # exact small integers: the cast loses nothing
    return values, scales


def _dequantize(values: torch.Tensor, scales: torch.Tensor, sqrt: bool, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(values.numel(), dtype=torch.float32)
    for start in range(0, values.numel(), _PASS):
        x = out[start:start + _PASS]
        x.copy_(values[start:start + _PASS])
        rows, tail = _blocks(x)
        first = start // BLOCK
        rows.mul_(scales[first:first + rows.shape[0], None])
        if tail.numel():
            tail.mul_(scales[first + rows.shape[0]])
        if sqrt:
            x.square_()
    return out if dtype == torch.float32 else out.to(dtype)


def _blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of a flat tensor: whole blocks as rows of ``BLOCK``, and the shorter last block."""
    whole = x.numel() // BLOCK * BLOCK
    return x[:whole].view(-1, BLOCK), x[whole:]
