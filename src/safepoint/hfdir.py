"""Hugging Face Trainer and ms-swift output directories: ``checkpoint-N`` folders, listed and checked.

Trainer (and ms-swift, which uses it) writes ``output_dir/checkpoint-<global_step>/`` holding the
weights, ``trainer_state.json`` (whose ``log_history`` has the losses and eval metrics) and, unless
``save_only_model``, the optimizer, scheduler and RNG state. Listing them as ``CheckpointInfo`` lets
``ls``, ``prune`` and ``verify`` treat them like safepoint runs, with the same retention code.

A checkpoint safepoint committed carries a ``manifest.json`` (same format as ``step_N``) and is
verified by hash. One it never committed can only be checked for completeness; ``check_complete``
documents exactly what that means. ``CheckpointInfo.committed`` holds the manifest's commit time,
or ``""`` for a checkpoint without a manifest (``created`` is then its save time, from mtime).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import layout
from .catalog import CheckpointInfo, read_run_meta
from .disk import tree_size
from .errors import CorruptCheckpoint, UnsupportedFormat
from .manifest import Manifest, read_manifest

TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Full-model weights, as save_pretrained writes them (one file, or an index naming its shards).
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# PEFT (LoRA etc.): adapter weights need their config to be loadable.
_ADAPTERS = ("adapter_model.safetensors", "adapter_model.bin")
_ADAPTER_CONFIG = "adapter_config.json"
_OPTIMIZER, _SCHEDULER = "optimizer.pt", "scheduler.pt"
# Logged alongside eval metrics but not metrics of the model.
_NOT_METRICS = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


def parse_checkpoint_step(name: str) -> int | None:
    """The step of a ``checkpoint-N`` directory name, or None for anything else."""
    m = _CHECKPOINT.match(name)
    return int(m.group(1)) if m else None


def checkpoint_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` directory, oldest first."""
    try:
        entries = list(os.scandir(out_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [(step, Path(e.path)) for e in entries
             if (step := parse_checkpoint_step(e.name)) is not None and e.is_dir()]
    return sorted(found)


def is_output_dir(path: Path) -> bool:
    """True when ``path`` holds at least one ``checkpoint-N`` directory."""
    return bool(checkpoint_dirs(path))


def read_trainer_state(checkpoint_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((checkpoint_dir / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def metrics_at(trainer_state: dict[str, Any], step: int) -> dict[str, float]:
    """``loss`` and ``eval_*`` metrics that ``log_history`` recorded at exactly ``step``."""
    out: dict[str, float] = {}
    for entry in trainer_state.get("log_history") or []:
        if not isinstance(entry, dict) or entry.get("step") != step:
            continue
        for key, value in entry.items():
            if (key == "loss" or key.startswith("eval_")) and key not in _NOT_METRICS \
                    and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[key] = float(value)
    return out


def manifest_of(checkpoint_dir: Path) -> Manifest | CorruptCheckpoint | UnsupportedFormat | None:
    """The safepoint manifest of an HF checkpoint, the reason it is unreadable, or None if absent."""
    if not (checkpoint_dir / layout.MANIFEST).exists():
        return None
    try:
        return read_manifest(checkpoint_dir)
    except (CorruptCheckpoint, UnsupportedFormat) as err:
        return err


def list_checkpoints(out_dir: Path) -> list[CheckpointInfo]:
    """Every ``checkpoint-N`` of ``out_dir`` as ``CheckpointInfo``, oldest first.

    ``size`` is what the directory occupies on disk; ``pinned`` comes from a safepoint ``run.json``
    in ``out_dir`` if there is one (``safepoint pin`` writes it).
    """
    out_dir = Path(out_dir)
    pins = set(read_run_meta(out_dir).get("pins", []))
    infos = []
    for step, path in checkpoint_dirs(out_dir):
        state = read_trainer_state(path)
        manifest = manifest_of(path)
        metrics = dict(manifest.metrics) if isinstance(manifest, Manifest) else {}
        metrics.update(metrics_at(state, step))
        committed = (manifest.committed or manifest.created) if isinstance(manifest, Manifest) else ""
        infos.append(CheckpointInfo(
            step=step, path=path, created=_saved_at(path), committed=committed, size=tree_size(path),
            metrics=metrics, pinned=step in pins,
            run_id=manifest.run_id if isinstance(manifest, Manifest) else ""))
    return infos


def trainer_best_step(checkpoints: list[CheckpointInfo]) -> int | None:
    """The step Trainer itself considers best (``load_best_model_at_end``), from the newest state."""
    for info in reversed(checkpoints):
        state = read_trainer_state(info.path)
        if not state:
            continue
        best = state.get("best_global_step")
        if isinstance(best, int) and not isinstance(best, bool):
            return best
        name = state.get("best_model_checkpoint")
        return parse_checkpoint_step(Path(name).name) if isinstance(name, str) else None
    return None


def _saved_at(path: Path) -> str:
    """When Trainer finished the save: trainer_state.json is written last (else the dir's mtime)."""
    for candidate in (path / TRAINER_STATE, path):
        try:
            mtime = candidate.stat().st_mtime
        except FileNotFoundError:
            continue
        return datetime.fromtimestamp(mtime, timezone.utc).isoformat(timespec="microseconds")
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


# ------------------------------------------------------------------------- completeness


@dataclass
class Completeness:
    """What ``check_complete`` found: the files that make the checkpoint, and what is wrong."""

    present: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_complete(checkpoint_dir: Path) -> Completeness:
    """Check that a ``checkpoint-N`` directory has what Trainer needs to load it. No hashing.

    What is checked:

    1. ``trainer_state.json`` exists and parses to an object; its ``global_step``, if set, is N.
    2. Weights, at least one of: ``model.safetensors`` or ``pytorch_model.bin``; a sharded
       ``model.safetensors.index.json`` / ``pytorch_model.bin.index.json`` with every shard its
       ``weight_map`` names present; ``adapter_model.safetensors`` / ``.bin`` (PEFT) together with
       ``adapter_config.json``; or a DeepSpeed ``global_step*/`` or FSDP ``pytorch_model_fsdp*``
       directory (ZeRO-3 and sharded FSDP keep the weights only there).
    3. Every weight file is non-empty, and every ``.safetensors`` file's header is intact: the
       tensors it describes end exactly at the end of the file (catches truncation cheaply).
    4. Training state: if any of ``optimizer.pt``, ``scheduler.pt`` or ``rng_state*.pth`` is present
       (the checkpoint is meant for resuming, not ``save_only_model``), then the optimizer state
       (``optimizer.pt``, or a DeepSpeed ``global_step*/`` / FSDP ``optimizer_*`` directory) and
       ``scheduler.pt`` (not needed with DeepSpeed, which keeps its scheduler itself) are present
       and non-empty.
    """
    result = Completeness()
    try:
        names = set(os.listdir(checkpoint_dir))
    except OSError as err:
        result.problems.append(f"{checkpoint_dir} cannot be listed: {err.strerror}")
        return result
    _check_trainer_state(checkpoint_dir, names, result)
    _check_weights(checkpoint_dir, names, result)
    _check_training_state(checkpoint_dir, names, result)
    return result


def _check_trainer_state(path: Path, names: set[str], result: Completeness) -> None:
    if TRAINER_STATE not in names:
        result.problems.append(f"{path / TRAINER_STATE} is missing")
        return
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError) as err:
        result.problems.append(f"{path / TRAINER_STATE} cannot be read as JSON: {err}")
        return
    step = parse_checkpoint_step(path.name)
    global_step = state.get("global_step") if isinstance(state, dict) else None
    if not isinstance(state, dict):
        result.problems.append(f"{path / TRAINER_STATE} is not a JSON object")
    elif step is not None and global_step is not None and global_step != step:
        result.problems.append(f"{path / TRAINER_STATE} says global_step {global_step}, the directory is for step {step}")
    else:
        result.present.append(TRAINER_STATE)


def _check_weights(path: Path, names: set[str], result: Completeness) -> None:
    weights = [n for n in _WEIGHTS if n in names]
    for index in (n for n in _INDEXES if n in names):
        weights.append(index)
        shards = _index_shards(path / index, result)
        missing = sorted(s for s in shards if s not in names)
        if missing:
            result.problems.append(f"{path / index} lists shards that are missing: {', '.join(missing)}")
        weights += sorted(s for s in shards if s in names)
    adapters = [n for n in _ADAPTERS if n in names]
    if adapters and _ADAPTER_CONFIG not in names:
        result.problems.append(f"{path} has {adapters[0]} but no {_ADAPTER_CONFIG} (PEFT needs both)")
    weights += adapters
    sharded = sorted(n for n in names if n.startswith(("global_step", "pytorch_model_fsdp")) and (path / n).is_dir())
    if not weights and not sharded:
        result.problems.append(f"{path} has no model weights (none of {', '.join(_WEIGHTS + _INDEXES + _ADAPTERS)}, "
                               "nor a DeepSpeed/FSDP checkpoint directory)")
    for name in weights:
        if name.endswith(".json"):
            continue
        problem = _file_problem(path / name)
        if problem:
            result.problems.append(problem)
    result.present += [n for n in weights if n not in result.present] + sharded


def _check_training_state(path: Path, names: set[str], result: Completeness) -> None:
    resumable = _OPTIMIZER in names or _SCHEDULER in names or any(n.startswith("rng_state") for n in names)
    if not resumable:
        return
    deepspeed = any(n.startswith("global_step") and (path / n).is_dir() for n in names)
    sharded_optimizer = deepspeed or any(n.startswith("optimizer_") and (path / n).is_dir() for n in names)
    required = ([] if sharded_optimizer else [_OPTIMIZER]) + ([] if deepspeed else [_SCHEDULER])
    for name in required:
        if name not in names:
            result.problems.append(f"{path / name} is missing (the checkpoint has training state: "
                                   "optimizer, scheduler or RNG files, so it needs both)")
            continue
        problem = _file_problem(path / name)
        if problem:
            result.problems.append(problem)
        else:
            result.present.append(name)


def _index_shards(index: Path, result: Completeness) -> set[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return {str(v) for v in weight_map.values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        result.problems.append(f"{index} cannot be read as a shard index: {err!r}")
        return set()


def _file_problem(path: Path) -> str | None:
    """Why a weight/state file is unusable (empty, truncated safetensors), or None."""
    try:
        size = path.stat().st_size
    except OSError as err:
        return f"{path} cannot be read: {err.strerror}"
    if size == 0:
        return f"{path} is empty"
    if path.suffix != ".safetensors":
        return None
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len > size - 8:
                return f"{path} is truncated: {size} bytes, its header alone claims {header_len}"
            header = json.loads(f.read(header_len))
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        return f"{path} has an unreadable safetensors header: {err!r}"
    expected = 8 + header_len + end
    if expected != size:
        return f"{path} has {size} bytes, its safetensors header describes {expected} (truncated or overwritten)"
    return None
