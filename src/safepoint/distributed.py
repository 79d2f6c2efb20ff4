"""Distributed runs (torchrun, FSDP2, DDP): every rank writes its shards, rank 0 commits once.

A job of N processes must leave one complete checkpoint or none, whichever rank dies or runs out
of disk. safepoint does not shard tensors itself: ``torch.distributed.checkpoint`` (DCP) writes
each rank's shards and reshards them on load (see ``sharded``). This module puts safepoint's
guarantees around it. A save, on every rank unless said:

1. ``step()`` agrees on whether to save: one ``all_reduce(MAX)`` of (signal, due) per call, so a
   signal on any rank, or any rank's ``every_seconds`` timer, makes all ranks save at that step;
2. collect: models and optimizers through DCP's ``get_state_dict`` (FQN keys, DTensor shards), the
   other entries and the RNG streams per rank;
3. disk: each rank checks the run directory's filesystem for the whole save; if any is short,
   rank 0 deletes unprotected checkpoints one at a time, or every rank raises
   ``InsufficientDiskSpace`` naming the short ranks. Nothing is written;
4. rank 0 creates ``step_N.tmp-<rand>/`` and broadcasts its name;
5. DCP writes the shards into ``dcp/`` (a collective); each rank writes ``rank<r>/`` and hashes
   the files it wrote;
6. vote: an ``all_gather`` of (error, file records). A failed rank means no commit, and every rank
   raises; a dead rank makes the collective fail (gloo notices the closed connection) or time out
   (``SAFEPOINT_DIST_TIMEOUT``, seconds, default 600), and nothing is committed;
7. rank 0 writes the manifest (every rank's files with sizes and hashes, ``world_size``, the rank
   that wrote each file) and renames: the commit. A broadcast of the outcome lets every rank
   return only after it;
8. rank 0 alone applies retention and writes the run's records; it alone holds the lock.

safepoint's own collectives run on two gloo groups created for it, one for the training thread
and one for the thread that writes, so an async save never interleaves with ``step()``'s
all_reduce, and CPU objects can be exchanged even when the training backend is NCCL.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from . import errors, faults, layout, sharded, stateful
from .catalog import CheckpointInfo, check_file, check_presence, read_run_meta
from .commit import FileRecord, dump_json, fsync_dir, hash_file, remove_tree
from .disk import check_space, estimate_checkpoint_size, format_size
from .errors import CorruptCheckpoint, IncompatibleState, InsufficientDiskSpace, SafepointError, SafepointWarning
from .hashing import default_algorithm
from .manifest import Manifest, library_versions, utc_now
from .retention import budget_candidates

if TYPE_CHECKING:
    from .async_save import SaveHandle
    from .manager import CheckpointManager, RestoreReport

TIMEOUT_ENV = "SAFEPOINT_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 600.0


class RankFailure(SafepointError, RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or left the job."""


class DistributedSaveError(SafepointError, OSError):
    """A rank could not write its part of a save; no rank committed it."""


# ---------------------------------------------------------------- the job's ranks


class DistContext:
    """This process's place in a multi-rank job, and safepoint's own gloo groups."""

    def __init__(self, timeout: float) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.timeout = timeout
        self.control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        self.io = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        self.staging = sharded.DcpStaging()  # host copies for async saves, reused

    @classmethod
    def current(cls, **unsupported: Any) -> "DistContext | None":
        """None outside a ``torch.distributed`` job of two or more ranks (a collective otherwise).

        ``unsupported``: manager options that a multi-rank run refuses when set (truthy).
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        refused = sorted(k for k, v in unsupported.items() if v)
        if refused:
            raise SafepointError(f"CheckpointManager options {', '.join(refused)} are not supported in a "
                                 f"distributed run (world size {dist.get_world_size()}); leave them unset")
        return cls(float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT)))

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def _run(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RuntimeError as err:  # gloo: closed connection, timeout; DistBackendError is one
            raise RankFailure(f"rank {self.rank}: {what} failed, so another rank died, hung for more than "
                              f"{self.timeout:.0f}s ({TIMEOUT_ENV}) or left the job: {err}") from err

    def share(self, obj: Any, *, io: bool = False, what: str = "a broadcast from rank 0") -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        self._run(what, lambda: dist.broadcast_object_list(box, src=0, group=self.io if io else self.control))
        return box[0]

    def gather(self, obj: Any, *, io: bool = False, what: str = "an all_gather") -> list[Any]:
        """Every rank's ``obj``, by rank, on every rank."""
        out: list[Any] = [None] * self.world_size
        self._run(what, lambda: dist.all_gather_object(out, obj, group=self.io if io else self.control))
        return out

    def barrier(self, *, what: str) -> None:
        """Wait for every rank (on the writer's group: runs where saves run)."""
        self._run(what, lambda: dist.barrier(group=self.io))

    def agree_step(self, signal_name: str | None, due: bool) -> tuple[str | None, bool]:
        """(signal, due) as the whole job sees it: one tiny all_reduce(MAX) per ``step()``."""
        flags = torch.tensor([signal.Signals[signal_name].value if signal_name else 0, int(due)], dtype=torch.int64)
        self._run("the per-step agreement", lambda: dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control))
        signum, any_due = int(flags[0]), bool(flags[1])
        if signum and signal_name is None:
            signal_name = f"{signal.Signals(signum).name} (on another rank)"
        return signal_name, any_due or bool(signum)

    def announce_start(self, error: BaseException | None) -> None:
        """Rank 0: whether it opened the run (lock, run.json, debris); the other ranks wait for it."""
        self.share(None if error is None else (type(error).__name__, str(error)), what="the start of the run")

    def follow(self, directory: Path) -> "FollowerLog":
        """Ranks > 0: wait for rank 0 to open the run, raising its error; then read its records."""
        failure = self.share(None, what="the start of the run")
        if failure is not None:
            kind, message = failure
            cls = getattr(errors, kind, SafepointError)
            cls = cls if isinstance(cls, type) and issubclass(cls, SafepointError) else SafepointError
            raise cls(f"rank 0 could not open the run: {message}")
        return FollowerLog(directory)


class FollowerLog:
    """What ranks > 0 have instead of a ``RunLog``: rank 0's run id; every write is rank 0's job."""

    def __init__(self, run_dir: Path) -> None:
        self.meta = read_run_meta(run_dir)
        self.attempt = ""

    @property
    def run_id(self) -> str:
        return str(self.meta.get("run_id", ""))

    def __getattr__(self, name: str) -> Callable[..., None]:
        # event, metrics, flush, close, write_meta, set_pinned, add_metrics, ...: rank 0 records them.
        return lambda *args, **kwargs: None


# ---------------------------------------------------------------- saving


@dataclass
class _Plan:
    step: int
    tmp: Path
    snap: sharded.Snapshot
    dcp_tensors: dict[str, torch.Tensor]
    created: str


def save(m: "CheckpointManager", step: int, state: Mapping[str, Any], metrics: dict[str, float], *,
         background: bool) -> "CheckpointInfo | SaveHandle":
    """A sharded save of ``state`` by every rank; with ``background``, the write runs on the writer thread."""
    ctx: DistContext = m._dist
    started = time.monotonic()
    plan = _prepare(m, ctx, step, state)
    if not background:
        return _write_and_commit(m, ctx, plan, metrics, started)
    try:  # host copies, so training may change every tensor as soon as this returns
        plan.dcp_tensors = ctx.staging.stage(plan.dcp_tensors)
        plan.snap.rank_tensors = m._staging.stage(plan.snap.rank_tensors)
    except BaseException:
        if ctx.leader:
            remove_tree(plan.tmp)
        raise
    m._last_saved = step
    m._log.event("stage", step=step, seconds=round(time.monotonic() - started, 4),
                 staging_bytes=m._staging.nbytes + ctx.staging.nbytes)
    m._pending = m._writer.submit(step, lambda: _write_and_commit(m, ctx, plan, metrics, started))
    return m._pending


def _prepare(m: "CheckpointManager", ctx: DistContext, step: int, state: Mapping[str, Any]) -> _Plan:
    """Collect every rank's state and agree that it fits on disk; then rank 0 makes the tmp dir."""
    snap, needed, error = None, 0, None
    try:
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        stateful.check_state(state)
        m._check_not_foreign()
        snap = sharded.snapshot(state, stateful.capture_rng(), stateful.RNG_ENTRY)
        needed = estimate_checkpoint_size(snap.local_bytes(count_replicated=ctx.leader), len(snap.rank_tensors) + 2)
    except Exception as err:  # refused on one rank: refused on all, before anything is written
        error = err
    reports = ctx.gather((None if error is None else f"rank {ctx.rank}: {error}", needed),
                         what=f"preparing the save of step {step}")
    if error is not None:
        raise error
    refused = [r for r, _ in reports if r]
    if refused:
        raise SafepointError(f"not saving step {step}: {'; '.join(refused)}")
    _ensure_space(m, ctx, step, sum(n for _, n in reports))
    tmp_name = None
    if ctx.leader:
        tmp = m.directory / layout.tmp_dir_name(step)
        try:
            (tmp / sharded.DCP_DIR).mkdir(parents=True)
            tmp_name = tmp.name
        except OSError as err:
            tmp_name = OSError(err.errno, f"rank 0 cannot create {tmp}: {err.strerror}")
    tmp_name = ctx.share(tmp_name, what=f"the tmp directory of step {step}")
    if isinstance(tmp_name, OSError):
        raise tmp_name
    assert snap is not None
    return _Plan(step, m.directory / tmp_name, snap, snap.dcp_tensors, utc_now())


def _ensure_space(m: "CheckpointManager", ctx: DistContext, step: int, needed: int) -> None:
    """Every rank's filesystem must hold the whole save; rank 0 frees space with the budget's deletions."""
    tried: set[int] = set()
    while True:
        check = check_space(m.directory, needed, max_disk=m.max_disk, min_free=m.min_free)
        checks = ctx.gather((check.shortfall, check.describe()), what=f"the disk check of step {step}")
        short = [(r, s, d) for r, (s, d) in enumerate(checks) if s]
        if not short:
            return
        victim = None
        if ctx.leader:
            for info in budget_candidates(m.list(), m.keep, resumed_from=m._resumed_from):
                if info.step not in tried:
                    victim = info.step
                    m._delete(victim, f"disk budget: step {step} on rank {short[0][0]}: {short[0][2]}")
                    tried.add(victim)
                    break
        victim = ctx.share(victim, what=f"the disk check of step {step}")
        if victim is None:
            where = "; ".join(f"rank {r}: it {d}, short by {format_size(s)}" for r, s, d in short)
            raise InsufficientDiskSpace(errno.ENOSPC, (
                f"not saving step {step} to {m.directory} on any rank: {where}, after deleting every "
                "unprotected checkpoint. Nothing was written. Free space, raise max_disk / lower min_free, "
                "or unpin checkpoints (the newest, best, pinned and resumed-from ones are never deleted)"))


def _entry_digest(encoded: Any, record: FileRecord | None) -> str:
    h = hashlib.sha256(dump_json(encoded))
    h.update((record.hash if record else "").encode())
    return h.hexdigest()


def _write_and_commit(m: "CheckpointManager", ctx: DistContext, plan: _Plan, metrics: dict[str, float],
                      started: float) -> CheckpointInfo:
    """Write this rank's files, vote, and (rank 0) commit; every rank returns after the commit."""
    from .manager import STATE_FORMAT_VERSION

    step, tmp = plan.step, plan.tmp
    error, no_space, records, digests = None, False, {}, {}
    try:
        for name in sharded.write_dcp(plan.dcp_tensors, tmp / sharded.DCP_DIR, process_group=ctx.io):
            records[f"{sharded.DCP_DIR}/{name}"] = hash_file(tmp / sharded.DCP_DIR / name)
        records.update(sharded.write_rank_files(tmp, ctx.rank, step, ctx.world_size, plan.snap, STATE_FORMAT_VERSION))
        own = sharded.rank_dir(ctx.rank)
        digests = {name: _entry_digest(plan.snap.encoded[name], records.get(f"{own}/{layout.tensor_file_name(name)}"))
                   for name in plan.snap.rank_entries}
        faults.reach("after_data")
    except Exception as err:
        error = f"rank {ctx.rank}: {type(err).__name__}: {err}"
        no_space = isinstance(err, OSError) and err.errno == errno.ENOSPC
    votes = ctx.gather((error, no_space, records, digests), io=True, what=f"the commit vote on step {step}")
    failed = [v[0] for v in votes if v[0]]
    if failed:
        if ctx.leader:
            remove_tree(tmp)
        raise DistributedSaveError(errno.ENOSPC if any(v[1] for v in votes) else errno.EIO, (
            f"step {step} was not committed because {len(failed)} of {ctx.world_size} rank(s) failed: "
            f"{'; '.join(failed)}. Committed checkpoints are untouched"))
    outcome, leader_error = None, None
    if ctx.leader:
        try:
            outcome = ("ok", _commit_leader(m, ctx, plan, votes, metrics).to_json())
        except Exception as err:
            outcome, leader_error = ("error", f"{type(err).__name__}: {err}"), err
    outcome = ctx.share(outcome, io=True, what=f"the commit of step {step}")
    if outcome[0] != "ok":
        if leader_error is not None:
            raise leader_error
        raise DistributedSaveError(errno.EIO, f"rank 0 could not commit step {step}: {outcome[1]}")
    final = m.directory / layout.step_dir_name(step)
    info = CheckpointInfo.from_manifest(final, Manifest.from_json(outcome[1], final / layout.MANIFEST))
    if ctx.leader:
        faults.reach("after_rename")
    m._run_on_commit(info)
    m._last_saved = step
    m._last_save_time = time.monotonic()
    if ctx.leader:
        m._log.flush()
        m._log.event("save", step=step, size=info.size, seconds=round(time.monotonic() - started, 4),
                     world_size=ctx.world_size)
        m._apply_retention()
        m._warn_if_disk_full()
    ctx.barrier(what=f"the end of the save of step {step}")  # every rank sees the same checkpoints
    return info


def _commit_leader(m: "CheckpointManager", ctx: DistContext, plan: _Plan, votes: list[Any],
                   metrics: dict[str, float]) -> Manifest:
    tmp, step, snap = plan.tmp, plan.step, plan.snap
    final = m.directory / layout.step_dir_name(step)
    try:
        files: dict[str, FileRecord] = {}
        writers: dict[str, int] = {}
        for rank, (_, _, records, _) in enumerate(votes):
            for name, record in records.items():
                files[name], writers[name] = record, rank
        fsync_dir(tmp / sharded.DCP_DIR)  # DCP fsyncs its files, not their directory
        faults.reach("before_manifest")
        digests = [v[3] for v in votes]
        replicated = [n for n in snap.rank_entries if len({d.get(n) for d in digests}) == 1]
        manifest = Manifest(
            step=step, run_id=m.run_id, files=files, hash_algorithm=default_algorithm(), created=plan.created,
            committed=utc_now(), metrics=metrics, entries=[*snap.dcp_entries, *snap.rank_entries],
            world_size=ctx.world_size, versions=library_versions(),
            extra={sharded.SHARDING_KEY: {
                "format": "torch.distributed.checkpoint", "dcp_dir": sharded.DCP_DIR,
                "dcp_entries": snap.dcp_entries, "rank_entries": snap.rank_entries,
                "replicated": replicated, "writers": writers}})
        from .commit import seal

        seal(tmp, final, dump_json(manifest.to_json()))
    except BaseException:
        remove_tree(tmp)
        raise
    return manifest


# ---------------------------------------------------------------- restoring


def handles(ctx: DistContext | None, manifest: Manifest) -> bool:
    """Whether a restore of this checkpoint goes through this module."""
    return ctx is not None or sharded.SHARDING_KEY in manifest.extra


def restore(ctx: DistContext | None, state: Mapping[str, Any], path: Path, manifest: Manifest) -> "RestoreReport":
    """Verify a checkpoint (split across ranks) and load it into ``state`` at this world size.

    Without a process group (``ctx`` None) a sharded checkpoint loads in one process. Raises
    ``CorruptCheckpoint`` on every rank alike when any rank finds a bad file, and
    ``IncompatibleState`` before anything is loaded when the state cannot be mapped.
    """
    from .manager import STATE_FORMAT_VERSION, RestoreReport

    rank, world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
    sharding = manifest.extra.get(sharded.SHARDING_KEY)
    if sharding is None:
        raise IncompatibleState(
            f"{path} was saved by a single process; a job of {world} ranks cannot resume it. Resume it "
            "without torch.distributed (one process), save, or start this run in a new directory")
    _verify(ctx, path, manifest)
    saved_world = manifest.world_size
    same = saved_world == world
    source = rank if same else 0
    doc = _read_rank_state(path, source, STATE_FORMAT_VERSION)
    dcp_entries, rank_entries = list(sharding["dcp_entries"]), list(sharding["rank_entries"])
    replicated = set(sharding.get("replicated", []))

    # Everything that can be refused is refused here, before anything is loaded.
    for name, obj in state.items():
        if name in dcp_entries and not sharded.is_dcp_entry(obj):
            raise IncompatibleState(f"{path}: entry {name!r} holds a model or optimizer, state[{name!r}] is a "
                                    f"{type(obj).__name__}")
        if name in rank_entries and sharded.is_dcp_entry(obj):
            raise IncompatibleState(f"{path}: entry {name!r} was not saved as a model or optimizer, but "
                                    f"state[{name!r}] is a {type(obj).__name__}")
    if not same:
        unmapped = [n for n in state if n in rank_entries and n not in replicated]
        if unmapped:
            raise IncompatibleState(
                f"{path} was saved by {saved_world} ranks and this job has {world}: entries "
                f"{', '.join(unmapped)} differed between ranks, so they cannot be mapped to another world "
                f"size. Resume with world size {saved_world}, make them identical on every rank, or leave "
                "them out of state")
    loading = [n for n in state if n in dcp_entries]
    targets: dict[str, torch.Tensor] = {}
    for name in loading:
        if _refs(doc["entries"][name]):  # an optimizer saved before its first step has no tensors
            encoder = sharded.Encoder(name)
            encoder.encode(sharded.get_entry_state(state, name, for_load=True))
            targets.update({sharded.dcp_key(name, k): t for k, t in encoder.tensors.items()})
    _check_fits(path, [n for n in loading if _refs(doc["entries"][n])], targets)

    sharded.load_dcp(targets, path / sharded.DCP_DIR, process_group=ctx.io if ctx else None)
    for name in loading:
        tensors = {k[len(name) + 1:]: t for k, t in targets.items() if k.startswith(name + ".")}
        sd = sharded.decode_entry(doc["entries"][name], tensors, path, name)
        try:
            sharded.set_entry_state(state, name, sd)
        except Exception as err:
            raise IncompatibleState(f"state[{name!r}] rejected the checkpoint {path}: {err}") from err
    others = {n: _read_entry(path, manifest, source, doc, n) for n in state if n in rank_entries}
    stateful.apply(state, others)
    rng_names: list[str] = []
    if rank < saved_world:
        own = doc if same else _read_rank_state(path, rank, STATE_FORMAT_VERSION)
        if stateful.RNG_ENTRY in own["entries"]:
            rng_names = stateful.restore_rng(_read_entry(path, manifest, rank, own, stateful.RNG_ENTRY))
    if not same:
        kept = "its own streams" if rank < saved_world else "its current streams (no saved rank matches)"
        warnings.warn(f"safepoint: {path} was saved by {saved_world} ranks, this job has {world}: model, "
                      "optimizer, step, scheduler and the global data position are resharded, but RNG streams "
                      f"cannot map 1:1; rank {rank} restored {kept}. The resumed run is not bitwise identical "
                      "to an uninterrupted one", SafepointWarning, stacklevel=3)
    restored = [n for n in state if n in dcp_entries or n in rank_entries]
    report = RestoreReport(step=manifest.step, path=path, restored=restored,
                           not_in_checkpoint=[n for n in state if n not in restored],
                           not_in_state=[n for n in manifest.entries if n not in state], rng=rng_names)
    data = [n for n in state if n in rank_entries and _is_data_position(state[n])]
    moved = "" if same else f", world size {saved_world} -> {world}"
    report.data_position = f"restored ({', '.join(data)}{moved})" if data else \
        "not in state: data restarts from its beginning (pass a safepoint.DistributedResumableLoader)"
    for name in data:
        if not same and not getattr(state[name], "state_dict", lambda: {})().get("global"):
            warnings.warn(f"safepoint: state[{name!r}] counts one process's samples; with the world size "
                          f"changed from {saved_world} to {world} use safepoint.DistributedResumableLoader, whose "
                          "position is global", SafepointWarning, stacklevel=3)
    return report


def _verify(ctx: DistContext | None, path: Path, manifest: Manifest) -> None:
    """Every file against the manifest, each rank hashing a share; all ranks agree on the verdict."""
    rank, world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
    problem = None
    try:
        check_presence(path, manifest)
        for name in sorted(manifest.files)[rank::world]:
            check_file(path / name, manifest.files[name])
    except CorruptCheckpoint as err:
        problem = str(err)
    problems = ctx.gather(problem, what=f"verifying {path.name}") if ctx else [problem]
    found = [p for p in problems if p]
    if found:
        raise CorruptCheckpoint(found[0])


def _read_rank_state(path: Path, rank: int, version: int) -> dict[str, Any]:
    import json

    file = path / sharded.rank_dir(rank) / layout.STATE
    try:
        doc = json.loads(file.read_bytes())
    except (OSError, ValueError) as err:
        raise CorruptCheckpoint(f"{file} cannot be read: {err}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), dict):
        raise CorruptCheckpoint(f"{file} has no 'entries' mapping")
    if doc.get("format_version") != version:
        raise errors.UnsupportedFormat(f"{file} has state format version {doc.get('format_version')!r}; this "
                                       f"safepoint reads version {version}. Upgrade safepoint")
    return doc


def _read_entry(path: Path, manifest: Manifest, rank: int, doc: dict[str, Any], name: str) -> Any:
    from .tensors import read_tensors_verified

    if name not in doc["entries"]:
        raise CorruptCheckpoint(f"{path / sharded.rank_dir(rank) / layout.STATE} lacks entry {name!r}")
    file_name = f"{sharded.rank_dir(rank)}/{layout.tensor_file_name(name)}"
    record = manifest.files.get(file_name)
    tensors = read_tensors_verified(path / file_name, record) if record else {}
    return sharded.decode_entry(doc["entries"][name], tensors, path, name)


def _check_fits(path: Path, loading: list[str], targets: dict[str, torch.Tensor]) -> None:
    """Names and global shapes of the model/optimizer tensors against DCP's metadata."""
    from .compat import require_fit

    saved = sharded.saved_shapes(path / sharded.DCP_DIR)
    for name in loading:
        prefix = name + "."
        have = {k[len(prefix):]: tuple(t.shape) for k, t in targets.items() if k.startswith(prefix)}
        got = {k[len(prefix):]: shape for k, (shape, _) in saved.items() if k.startswith(prefix)}
        require_fit(f"checkpoint {path} does not fit state[{name!r}]", have, got)


def _refs(encoded: Any) -> bool:
    if isinstance(encoded, dict):
        return "__tensor__" in encoded or any(_refs(v) for v in encoded.values())
    if isinstance(encoded, list):
        return any(_refs(v) for v in encoded)
    return False


def _is_data_position(obj: Any) -> bool:
    from .data import ResumableLoader, ResumableSampler
    from .dist_data import DistributedResumableLoader

    return isinstance(obj, (ResumableLoader, ResumableSampler, DistributedResumableLoader)) or \
        type(obj).__name__ == "StatefulDataLoader"


# ---------------------------------------------------------------- export

load_consolidated = sharded.load_consolidated
export_consolidated = sharded.export_consolidated
