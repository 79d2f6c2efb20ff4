"""Sharded tensor I/O through ``torch.distributed.checkpoint`` (DCP), kept safe to load.

safepoint does not shard or reshard tensors itself: DCP writes each rank's shards and, on load,
reads whatever slices the current sharding needs, whatever world size wrote them. This module
adapts DCP to safepoint's rules:

* only tensors go through DCP. A state dict's structure and non-tensor values (optimizer
  hyperparameters, scheduler, data position, RNG) are encoded by safepoint's JSON codec, so no
  pickled Python value is ever loaded from a checkpoint;
* DCP's own ``.metadata`` file is a pickle; it is read with an unpickler that only builds DCP's
  metadata classes, ``torch.Size`` and dtypes (anything else is refused), and only after the file
  matched its hash in the manifest;
* the writer reports which files this rank wrote, so each rank hashes its own files and the
  manifest can name the rank that wrote each one.

Layout inside a checkpoint: ``dcp/`` (DCP's ``__<rank>_<n>.distcp`` files and ``.metadata``)
and ``rank<r>/`` (``state.json`` and safetensors of that rank's other entries and RNG).
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import layout
from .catalog import verify
from .codec import Encoder, decode
from .commit import fsync_dir
from .compact import load_entry
from .encoding import is_encoded
from .errors import CorruptCheckpoint, IncompatibleState, SafepointError
from .manifest import read_manifest
from .tensors import read_tensors, write_tensors

DCP_DIR = "dcp"
DCP_METADATA = ".metadata"
SHARDING_KEY = "sharded"  # manifest.extra key describing a sharded checkpoint


def rank_dir(rank: int) -> str:
    return f"rank{rank}"


def is_dcp_entry(obj: Any) -> bool:
    """Models and optimizers are sharded (or deduplicated) through DCP; the rest is per rank."""
    return isinstance(obj, (nn.Module, torch.optim.Optimizer))


def dcp_key(entry: str, name: str) -> str:
    return f"{entry}.{name}"


# ---------------------------------------------------------------- state dicts of models/optimizers


def owner_module(state: Mapping[str, Any], name: str) -> nn.Module:
    """The model entry whose parameters an optimizer entry updates (DCP keys optimizer state by FQN)."""
    opt = state[name]
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    owners = [m for m in state.values() if isinstance(m, nn.Module) and params <= {id(p) for p in m.parameters()}]
    if not owners:
        raise IncompatibleState(
            f"state[{name!r}] is an optimizer whose parameters belong to no nn.Module entry of state; "
            "add the model it trains to state (sharded checkpoints key optimizer state by parameter name)")
    return owners[0]


def get_entry_state(state: Mapping[str, Any], name: str, *, for_load: bool = False) -> dict[str, Any]:
    """A model's or optimizer's state dict in DCP's form: keyed by FQN, DTensors where sharded.

    DCP initialises a fresh optimizer's state (a zero-lr step) to get its structure; unless
    ``for_load`` (the structure to load into), that is undone, so saving changes nothing.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    obj = state[name]
    if isinstance(obj, nn.Module):
        return get_model_state_dict(obj)
    fresh = not obj.state
    sd = get_optimizer_state_dict(owner_module(state, name), obj)
    if fresh and not for_load:
        obj.state.clear()
        sd = {**sd, "state": {}}
    return sd


def set_entry_state(state: Mapping[str, Any], name: str, sd: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    obj = state[name]
    if isinstance(obj, nn.Module):
        set_model_state_dict(obj, sd)
    elif not sd.get("state"):  # saved before its first step: hyperparameters only, no moments
        obj.state.clear()
        for group, saved in zip(obj.param_groups, sd.get("param_groups", [])):
            group.update({k: v for k, v in saved.items() if k != "params"})
    else:
        set_optimizer_state_dict(owner_module(state, name), obj, sd)


# ---------------------------------------------------------------- snapshot for a save


@dataclass
class Snapshot:
    """One rank's state, split into what DCP writes and what safepoint writes per rank."""

    encoded: dict[str, Any] = field(default_factory=dict)  # every entry's structure; tensors are references
    dcp_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # "entry.name" -> tensor or DTensor
    rank_tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # other entries, RNG
    dcp_entries: list[str] = field(default_factory=list)
    rank_entries: list[str] = field(default_factory=list)

    def local_bytes(self, *, count_replicated: bool) -> int:
        """Bytes this rank writes: its shards, plus (once per job) the tensors DCP deduplicates."""
        from torch.distributed.tensor import DTensor

        total = 0
        for t in self.dcp_tensors.values():
            if isinstance(t, DTensor):
                local = t.to_local()
                total += local.numel() * local.element_size()
            elif count_replicated:
                total += t.numel() * t.element_size()
        return total + sum(t.numel() * t.element_size() for ts in self.rank_tensors.values() for t in ts.values())


def snapshot(state: Mapping[str, Any], rng: dict[str, Any], rng_entry: str) -> Snapshot:
    snap = Snapshot()
    for name, obj in state.items():
        if is_dcp_entry(obj):
            encoder = Encoder(name)
            snap.encoded[name] = encoder.encode(get_entry_state(state, name))
            snap.dcp_tensors.update({dcp_key(name, k): t for k, t in encoder.tensors.items()})
            snap.dcp_entries.append(name)
        else:
            encoder = Encoder(name)
            snap.encoded[name] = encoder.encode(dict(obj) if isinstance(obj, dict) else obj.state_dict())
            snap.rank_tensors[name] = encoder.tensors
            snap.rank_entries.append(name)
    encoder = Encoder(rng_entry)
    snap.encoded[rng_entry] = encoder.encode(rng)
    snap.rank_tensors[rng_entry] = encoder.tensors
    return snap


class DcpStaging:
    """Host copies of the tensors DCP writes, allocated once and reused by every async save.

    A DTensor's copy is a DTensor with the same sharding whose local shard lives on the host
    (what DCP's own stager does), so the background write plans exactly as a direct one.
    """

    def __init__(self) -> None:
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(_local(t).numel() * _local(t).element_size() for t in self._cache.values())

    def stage(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, t in tensors.items():
            t = t.detach()
            copy = self._cache.get(key)
            if copy is None or not _same_layout(copy, t):
                copy = self._cache[key] = _host_like(t)
            _local(copy).copy_(_local(t))
            out[key] = copy
        for key in set(self._cache) - set(tensors):
            del self._cache[key]
        return out


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    if type(a) is not type(b) or a.shape != b.shape or a.dtype != b.dtype:
        return False
    return not isinstance(a, DTensor) or (a.placements == b.placements and _local(a).shape == _local(b).shape)


def _host_like(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return t.to("cpu") if t.device.type != "cpu" else t.clone()
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")


# ---------------------------------------------------------------- DCP storage


def _writer_class() -> type:
    from torch.distributed.checkpoint import FileSystemWriter

    class RecordingWriter(FileSystemWriter):
        """DCP's file writer, remembering the files this rank wrote (and rank 0 the metadata)."""

        written: list[str]

        def write_data(self, plan, planner):  # type: ignore[no-untyped-def]
            future = super().write_data(plan, planner)
            self.written = sorted({r.storage_data.relative_path for r in future.wait()})
            return future

        def finish(self, metadata, results) -> None:  # type: ignore[no-untyped-def]
            super().finish(metadata, results)
            self.written = [*getattr(self, "written", []), DCP_METADATA]

    return RecordingWriter


_SAFE_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_SAFE_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                 ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("pathlib", "PosixPath"),
                 ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else: no arbitrary callable can run while loading."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _SAFE_GLOBALS or (module in _SAFE_METADATA_MODULES and isinstance(
                getattr(__import__(module, fromlist=[name]), name, None), type)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of DCP's metadata")


def read_metadata(directory: Path) -> Any:
    """DCP's ``.metadata`` of ``directory``, through the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = directory / DCP_METADATA
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError) as err:
        raise CorruptCheckpoint(f"{path} cannot be read as DCP metadata: {err}") from err
    for info in getattr(metadata, "storage_data", {}).values():  # files must stay inside dcp/
        rel = getattr(info, "relative_path", "")
        if not isinstance(rel, str) or "/" in rel or "\\" in rel or rel in ("", ".", ".."):
            raise CorruptCheckpoint(f"{path} points at {rel!r}, outside its directory")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def _reader(directory: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_metadata(directory)
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(directory)


def write_dcp(tensors: dict[str, torch.Tensor], directory: Path, *, process_group: Any = None) -> list[str]:
    """Write this rank's part of ``tensors`` with DCP (a collective); return the files it wrote."""
    import torch.distributed.checkpoint as dcp

    writer = _writer_class()(directory, sync_files=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        dcp.save(tensors, storage_writer=writer, process_group=process_group, no_dist=process_group is None)
    return list(getattr(writer, "written", []))


def load_dcp(targets: dict[str, torch.Tensor], directory: Path, *, process_group: Any = None) -> None:
    """Fill ``targets`` in place from DCP files written at any world size (DCP reshards)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(targets, storage_reader=_reader(directory), process_group=process_group,
                 no_dist=process_group is None)


def saved_shapes(directory: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Global shape and dtype of every tensor in a DCP directory (from its metadata)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = read_metadata(directory)
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


# ---------------------------------------------------------------- per-rank files


def write_rank_files(directory: Path, rank: int, step: int, world_size: int, snap: Snapshot,
                     state_format_version: int) -> dict[str, Any]:
    """``rank<r>/state.json`` and one safetensors per entry with tensors; returns name -> FileRecord."""
    from .commit import dump_json, write_bytes

    sub = directory / rank_dir(rank)
    sub.mkdir()
    records = {}
    for name, tensors in snap.rank_tensors.items():
        if tensors:
            file_name = layout.tensor_file_name(name)
            records[f"{rank_dir(rank)}/{file_name}"] = write_tensors(sub / file_name, tensors)
    records[f"{rank_dir(rank)}/{layout.STATE}"] = write_bytes(sub / layout.STATE, dump_json(
        {"format_version": state_format_version, "step": step, "rank": rank, "world_size": world_size,
         "dcp_entries": snap.dcp_entries, "entries": snap.encoded}))
    fsync_dir(sub)
    return records


# ---------------------------------------------------------------- consolidation (no process group)


def load_consolidated(checkpoint: str | os.PathLike[str], entry: str = "model", *,
                      verify_files: bool = True) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors of one entry of a committed checkpoint, on the CPU, in one process.

    Works for sharded checkpoints written at any world size (keys are the entry's tensor names:
    parameter FQNs for a model, ``state.<fqn>.exp_avg`` for an optimizer) and for single-process
    ones. Every file is verified against the manifest first unless ``verify_files=False``.
    """
    path = Path(checkpoint)
    manifest = verify(path) if verify_files else read_manifest(path)
    if is_encoded(manifest):  # single-process, compressed, delta or 8-bit files
        return load_entry(path, manifest, entry)
    if SHARDING_KEY not in manifest.extra:
        file = path / layout.tensor_file_name(entry)
        if not file.exists():
            raise SafepointError(f"{path} has no tensors for entry {entry!r} (entries: {', '.join(manifest.entries)})")
        return read_tensors(file)
    if entry not in manifest.extra[SHARDING_KEY].get("dcp_entries", []):
        raise SafepointError(f"{path}: entry {entry!r} is not a sharded model/optimizer entry (sharded: "
                             f"{', '.join(manifest.extra[SHARDING_KEY].get('dcp_entries', [])) or 'none'})")
    prefix = entry + "."
    targets = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in saved_shapes(path / DCP_DIR).items()
               if k.startswith(prefix)}
    load_dcp(targets, path / DCP_DIR)
    return {k[len(prefix):]: t for k, t in targets.items()}


def export_consolidated(checkpoint: str | os.PathLike[str], out_file: str | os.PathLike[str], *,
                        entry: str = "model", dtype: torch.dtype | None = None) -> Path:
    """Write one entry (the model, by default) of a checkpoint as one weights-only safetensors file.

    The checkpoint may have been written by any number of ranks; this runs in a single process
    without a process group. Floating tensors are cast to ``dtype`` if given. The file is written
    beside ``out_file`` and renamed into place, so a crash never leaves a partial file there.
    """
    tensors = load_consolidated(checkpoint, entry)
    if dtype is not None:
        tensors = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in tensors.items()}
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        write_tensors(tmp, {k: t.contiguous() for k, t in tensors.items()})
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)
    return out


def decode_entry(encoded: Any, tensors: dict[str, torch.Tensor], where: Path, name: str) -> Any:
    try:
        return decode(encoded, tensors)
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise CorruptCheckpoint(f"{where} entry {name!r} cannot be decoded: {err!r}") from None
