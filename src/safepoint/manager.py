"""CheckpointManager: when to save, what to restore, what to keep. Orchestration only.

The order of a save (each stage has a named fault point, see ``faults``):

1. collect every entry's ``state_dict()`` and the RNG streams, and encode them (bad values are
   refused here, before a byte is written);
2. write the tensor files into ``step_N.tmp-<rand>/``, each fsynced, then ``state.json``;
3. write ``manifest.json`` (sizes + hashes of every file) and fsync it and the directory;
4. rename to ``step_N`` and fsync the run directory: the commit;
5. apply retention to committed checkpoints only, deleting through ``.trash/``.

A restore walks committed checkpoints from the newest, verifies every file against the manifest,
skips (with a warning naming it) any that fails, checks the survivor fits the state, then loads.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from . import faults, layout, stateful
from . import distributed, memtier
from .async_save import BackgroundWriter, SaveHandle, StagingBuffers
from .catalog import CheckpointInfo, check_file, check_presence, leftover_tmp_dirs, list_checkpoints, scan
from .codec import Encoder, decode
from .commit import (delete_checkpoint, dump_json, remove_tree, seal,
                     write_bytes)
from .compact import CheckpointEncoder, CompactOptions, load_entry
from .encoding import is_encoded, is_tensor_file
from .compat import require_fit
from .disk import MinFree, check_space, estimate_checkpoint_size, format_size, parse_size, used_fraction
from .errors import (CheckpointNotFound, CorruptCheckpoint, IncompatibleState, InsufficientDiskSpace,
                     RunDirectoryError, SafepointError, SafepointWarning, UnsupportedFormat)
from .frozen import FROZEN_ENTRY, FrozenWeights
from .hashing import default_algorithm
from .guard import DivergenceError, DivergenceGuard
from .lock import RunLock
from .manifest import Manifest, library_versions, utc_now
from .mirror import MirrorConfig, open_mirror
from .retention import RetentionPolicy, budget_candidates, plan_deletions
from .runlog import RunLog
from .signals import DEFAULT_SIGNALS, PreemptionWatcher
from .tensors import read_tensors_verified

log = logging.getLogger("safepoint")
STATE_FORMAT_VERSION = 1
# Set by `safepoint check-resume` (check_resume.py) for the script it runs twice.
CHECK_DIR_ENV, CHECK_EVERY_ENV = "SAFEPOINT_CHECK_DIR", "SAFEPOINT_CHECK_EVERY"
CHECK_STOP_ENV, CHECK_KILL_ENV = "SAFEPOINT_CHECK_STOP_AT", "SAFEPOINT_CHECK_KILL_AT"


@dataclass
class RestoreReport:
    """What a ``restore`` loaded and what it could not."""

    step: int
    path: Path | None
    restored: list[str] = field(default_factory=list)
    not_in_checkpoint: list[str] = field(default_factory=list)
    not_in_state: list[str] = field(default_factory=list)
    rng: list[str] = field(default_factory=list)
    data_position: str = "not saved"
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.path is None:
            return "no committed checkpoint: starting from step 0"
        parts = [f"restored step {self.step} from {self.path}", f"entries: {', '.join(self.restored) or 'none'}",
                 f"rng: {', '.join(self.rng) or 'none'}", f"data position: {self.data_position}"]
        if self.not_in_checkpoint:
            parts.append(f"NOT restored (absent from the checkpoint): {', '.join(self.not_in_checkpoint)}")
        if self.not_in_state:
            parts.append(f"in the checkpoint but not in state (ignored): {', '.join(self.not_in_state)}")
        if self.skipped:
            parts.append(f"skipped: {'; '.join(self.skipped)}")
        return "; ".join(parts)


class CheckpointManager:
    """Crash-proof checkpoints of a training loop's state in one run directory.

    Args:
        directory: the run directory; created if missing. One writer at a time (a lock enforces it).
        every_steps: ``step()`` saves when ``step % every_steps == 0``.
        every_seconds: ``step()`` saves when this long has passed since the last save.
        keep: retention policies (``KeepLast(3)``, ...); their union is kept. None keeps everything.
        max_disk: hard cap on the run directory's size (bytes or "50GB"); checked before each save.
        min_free: space to leave free on the filesystem (bytes, "10GB" or "5%").
        on_save_error: what a failed save in ``step()`` does: "raise" (default) or "warn" and go on
            training. An explicit ``save()`` always raises.
        disk_warn_at: warn after a save when the filesystem is fuller than this fraction.
        trainable_only: for module entries, save only parameters that require grad (plus buffers)
            and a hash of the frozen ones; a restore refuses a model with different frozen weights.
        on_commit: called with the ``CheckpointInfo`` of each new checkpoint once it is committed
            (on the background writer for async saves), before retention; the metrics it returns
            are stored with the checkpoint (``KeepBest`` can use them).
        guard: a ``DivergenceGuard``: on NaN or a loss spike, ``step()`` rolls back to the last good
            checkpoint and sets ``rolled_back_to`` (continue the loop from that step).
        async_save: ``step()`` saves with ``save_async``: it returns once the state is staged.
        signals: signal names that mean "save at the next step, then stop"; ``()`` to not catch any.
        mirror: object-storage URL (``s3://bucket/prefix``, any fsspec URL) or a ``MirrorConfig``: each
            committed checkpoint is uploaded in the background, and ``restore`` falls back to it.
        mirror_options: fsspec storage options (credentials, ``endpoint_url``, ...).
        mirror_keep: remote retention policies; None keeps every remote checkpoint.
        mirror_keep_local: once mirrored, keep only this many newest checkpoints locally.
        mirror_timeout: seconds ``close()`` waits for uploads; None waits until they are done.
        compress: "zstd" to compress every tensor file (lossless; needs ``safepoint[compress]``).
        delta_every: N >= 2: write a full checkpoint, then up to N-1 delta checkpoints that store only
            the XOR of each tensor with that base, compressed (lossless; the base is kept while a
            delta needs it).
        quantize_optimizer: store Adam's ``exp_avg``/``exp_avg_sq`` in 8 bits (LOSSY, marked so in the
            manifest); model weights are never quantised.
        snapshot_every: under ``safepoint run --dir``, copy the state into the supervisor's shared
            memory every this many steps; when the process dies, the supervisor commits the newest
            copy as a checkpoint before restarting it. Default: ``safepoint run --snapshot-every``.
    """

    def __init__(self, directory: str | os.PathLike[str], *, every_steps: int | None = None,
                 every_seconds: float | None = None, keep: RetentionPolicy | Iterable[RetentionPolicy] | None = None,
                 max_disk: int | str | None = None, min_free: int | str | None = None,
                 on_save_error: Literal["raise", "warn"] = "raise", disk_warn_at: float = 0.9,
                 async_save: bool = False, trainable_only: bool = False, guard: DivergenceGuard | None = None,
                 on_commit: Callable[[CheckpointInfo], Mapping[str, float] | None] | None = None,
                 signals: Iterable[str] = DEFAULT_SIGNALS, mirror: str | MirrorConfig | None = None,
                 mirror_options: Mapping[str, Any] | None = None,
                 mirror_keep: RetentionPolicy | Iterable[RetentionPolicy] | None = None,
                 mirror_keep_local: int | None = None, mirror_timeout: float | None = 600.0,
                 snapshot_every: int | None = None, compress: Literal["zstd"] | None = None,
                 delta_every: int | None = None, quantize_optimizer: bool = False) -> None:
        self._stop_at = self._kill_at = None
        if os.environ.get(CHECK_DIR_ENV):  # run by check-resume: its scratch directory and save schedule,
            # everything kept, plain files (lossless encodings off), no budget, mirror or evaluation hook;
            # it may stop or kill the run at a step
            directory, every_steps, every_seconds = os.environ[CHECK_DIR_ENV], int(os.environ.get(CHECK_EVERY_ENV, 1)), None
            keep = max_disk = min_free = mirror = on_commit = compress = delta_every = None
            self._stop_at, self._kill_at = (int(os.environ[v]) if os.environ.get(v) else None
                                            for v in (CHECK_STOP_ENV, CHECK_KILL_ENV))
        if every_steps is not None and (not isinstance(every_steps, int) or every_steps < 1):
            raise ValueError(f"every_steps must be a positive int or None, got {every_steps!r}")
        if every_seconds is not None and not every_seconds > 0:
            raise ValueError(f"every_seconds must be > 0 or None, got {every_seconds!r}")
        if on_save_error not in ("raise", "warn"):
            raise ValueError(f"on_save_error must be 'raise' or 'warn', got {on_save_error!r}")
        self.directory = Path(directory)
        self.max_disk = None if max_disk is None else parse_size(max_disk, what="max_disk")
        self.min_free = MinFree.parse(min_free)
        self.on_save_error = on_save_error
        self.disk_warn_at = disk_warn_at
        self.async_save = async_save
        self.trainable_only = trainable_only
        self._compact = CompactOptions(compress=compress, delta_every=delta_every, quantize_optimizer=quantize_optimizer)
        self.on_commit = on_commit
        self.guard = guard
        self.rolled_back_to: int | None = None
        self._frozen = FrozenWeights()
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.keep: list[RetentionPolicy] = [] if keep is None else [keep] if hasattr(keep, "keep") else list(keep)
        self.should_stop = False
        self.restore_report: RestoreReport | None = None
        self._restored = False
        self._resumed_from: int | None = None
        self._last_saved: int | None = None
        self._pending: SaveHandle | None = None
        self._staging = StagingBuffers()
        self._writer = BackgroundWriter()
        self._last_save_time = time.monotonic()
        self._closed = False
        self._mirror = None

        _prepare_directory(self.directory)
        # A multi-rank torch.distributed job: rank 0 alone locks, logs, collects debris and commits.
        self._dist = distributed.DistContext.current(mirror=mirror, guard=guard, trainable_only=trainable_only,
                                                     compress=compress, delta_every=delta_every,
                                                     quantize_optimizer=quantize_optimizer)
        self._snapshots = memtier.attach(self.directory, snapshot_every, distributed=self._dist is not None)
        self._lock = RunLock(self.directory)
        if self._dist is not None and not self._dist.leader:
            self._log = self._dist.follow(self.directory)  # waits for rank 0 to open the run
            self._watcher = PreemptionWatcher(tuple(signals))
            self._watcher.install()
            return
        try:
            self._lock.acquire()
            self._log = RunLog(self.directory)
            if self._log.meta.get("max_disk") != self.max_disk:  # shown by `safepoint ls`
                self._log.meta["max_disk"] = self.max_disk
                self._log.write_meta()
            self._mirror = open_mirror(self.directory, self._log, mirror, options=mirror_options, keep=mirror_keep,
                                       keep_local=mirror_keep_local, close_timeout=mirror_timeout)
            self._collect_debris()
            self._watcher = PreemptionWatcher(tuple(signals))
            self._watcher.install()
        except BaseException as err:
            self._lock.release()
            if self._dist is not None:
                self._dist.announce_start(err)  # the other ranks raise it too, instead of waiting
            raise
        if self._dist is not None:
            self._dist.announce_start(None)
        self._log.event("start")

    # ---------------------------------------------------------------- reading

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first."""
        return list_checkpoints(self.directory)

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint (by manifest; ``restore`` also verifies hashes)."""
        found = self.list()
        return found[-1] if found else None

    @property
    def run_id(self) -> str:
        return self._log.run_id

    # ---------------------------------------------------------------- restore

    def restore(self, state: Mapping[str, Any], *, step: int | None = None) -> int:
        """Load the newest good checkpoint (or ``step``) into ``state``; return its step, 0 if none.

        Every file is verified against the manifest first. Without ``step``, a corrupt or
        incomplete checkpoint is skipped with a warning and the next older one is tried; with
        ``step``, it raises ``CorruptCheckpoint`` / ``CheckpointNotFound`` instead.
        """
        self._check_open()
        stateful.check_state(state)
        skipped: list[str] = []
        failed: CorruptCheckpoint | UnsupportedFormat | None = None
        candidates = list(reversed(scan(self.directory)))
        if step is not None:
            candidates = [c for c in candidates if c[0].name == layout.step_dir_name(step)]
            if not candidates and self._mirror is None:
                have = ", ".join(str(c.step) for c in self.list()) or "none"
                raise CheckpointNotFound(f"no checkpoint for step {step} in {self.directory} (committed steps: {have})")
        if self._mirror is not None:  # remote copies interleaved by step, downloaded only when reached
            candidates = self._mirror.restore_candidates(candidates, step=step)
        for path, manifest in candidates:
            report = None
            try:
                if not isinstance(manifest, Manifest):
                    raise manifest
                if distributed.handles(self._dist, manifest):  # sharded or multi-rank: verified and loaded there
                    report = distributed.restore(self._dist, state, path, manifest)
                else:
                    saved = self._read_state(path, manifest)
            except (CorruptCheckpoint, UnsupportedFormat) as err:
                if step is not None and self._mirror is None:
                    raise
                failed = err  # with a mirror, its copy of the step comes next
                skipped.append(f"{path.name} ({err})")
                fallback = "Trying the mirror's copy of this step" if step is not None else "Falling back to an older one"
                warnings.warn(f"safepoint: skipping checkpoint {path}: {err}. {fallback}",
                              SafepointWarning, stacklevel=2)
                self._log.event("skip_corrupt", checkpoint=path.name, reason=str(err))
                continue
            if report is None:
                report = self._apply(state, saved, manifest, path)
            report.skipped = skipped
            return self._finish_restore(report)
        if step is not None:  # only with a mirror: neither copy of the step was usable
            if failed is not None:
                raise failed
            raise CheckpointNotFound(f"no checkpoint for step {step} in {self.directory} or its mirror "
                                     f"{self._mirror.url if self._mirror else ''}")
        report = RestoreReport(step=0, path=None, skipped=skipped)
        self._finish_restore(report)
        return 0

    def _read_state(self, path: Path, manifest: Manifest) -> dict[str, Any]:
        # Every byte is checked against the manifest as it is read, before anything is applied.
        check_presence(path, manifest)
        for name, record in manifest.files.items():
            if not is_tensor_file(name):
                check_file(path / name, record)
        if manifest.parent is not None and self._mirror is not None:
            self._mirror.fetch_base(manifest.parent)  # a delta's base, when only the mirror has it
        doc = json.loads((path / layout.STATE).read_bytes())
        if not isinstance(doc, dict) or not isinstance(doc.get("entries"), dict):
            raise CorruptCheckpoint(f"{path / layout.STATE} has no 'entries' mapping")
        version = doc.get("format_version")
        if version != STATE_FORMAT_VERSION:
            raise UnsupportedFormat(f"{path / layout.STATE} has state format version {version!r}; this "
                                    f"safepoint reads version {STATE_FORMAT_VERSION}. Upgrade safepoint")
        saved = {}
        for name, encoded in doc["entries"].items():
            tensor_file = path / layout.tensor_file_name(name)
            record = manifest.files.get(tensor_file.name)
            if is_encoded(manifest):  # compressed, delta or 8-bit files: see compact.py
                tensors = load_entry(path, manifest, name)
            else:
                tensors = read_tensors_verified(tensor_file, record) if record else {}
            try:
                saved[name] = decode(encoded, tensors)
            except (KeyError, ValueError, TypeError, AttributeError) as err:
                raise CorruptCheckpoint(f"{path / layout.STATE} entry {name!r} cannot be decoded: {err!r} "
                                        f"(a tensor missing from {tensor_file.name}, or a damaged state file)") from None
        return saved

    def _apply(self, state: Mapping[str, Any], saved: dict[str, Any], manifest: Manifest, path: Path) -> RestoreReport:
        frozen = {name: self._frozen.check(name, state[name], record, str(path))
                  for name, record in saved.pop(FROZEN_ENTRY, {}).items() if name in state}
        for name, obj in state.items():
            if name in saved:
                _check_fits(name, obj, saved[name], path, frozen=frozen.get(name, ()))
        for name, obj in state.items():
            if name not in saved:
                continue
            try:
                if name in frozen:  # trainable-only: the frozen part is already in place, and verified
                    obj.load_state_dict(saved[name], strict=False)
                else:
                    stateful.apply({name: obj}, saved)
            except Exception as err:
                raise IncompatibleState(f"state[{name!r}].load_state_dict() rejected the checkpoint {path}: "
                                        f"{err}. Entries loaded before it were already changed; restore "
                                        "again with a matching state") from err
        rng = stateful.restore_rng(saved.get(stateful.RNG_ENTRY, {}))
        user_saved = [n for n in saved if n != stateful.RNG_ENTRY]
        report = RestoreReport(
            step=manifest.step, path=path, restored=[n for n in state if n in saved],
            not_in_checkpoint=[n for n in state if n not in saved],
            not_in_state=[n for n in user_saved if n not in state], rng=rng)
        data = [n for n, obj in state.items() if n in saved and _is_data_position(obj)]
        report.data_position = f"restored ({', '.join(data)})" if data else \
            "not in state: data restarts from its beginning (pass a safepoint.ResumableLoader as an entry)"
        return report

    def _finish_restore(self, report: RestoreReport) -> int:
        self._restored = True
        self.restore_report = report
        if self._snapshots is not None:  # from here on, training goes on from the restored step
            self._snapshots.discard()
        if report.path is not None:
            self._resumed_from = self._last_saved = report.step
        for name in report.not_in_checkpoint:
            warnings.warn(f"safepoint: state[{name!r}] is not in checkpoint {report.path}; it keeps its "
                          "current value", SafepointWarning, stacklevel=3)
        log.info("safepoint: %s", report.summary())
        self._log.event("restore", step=report.step, checkpoint=report.path.name if report.path else None,
                        restored=report.restored, not_in_checkpoint=report.not_in_checkpoint,
                        not_in_state=report.not_in_state, rng=report.rng,
                        data_position=report.data_position, skipped=report.skipped)
        self._last_save_time = time.monotonic()
        if self._mirror is not None:
            self._mirror.kick()  # upload what an earlier attempt left unmirrored
        return report.step

    # ---------------------------------------------------------------- saving

    def step(self, step: int, state: Mapping[str, Any], *, metrics: Mapping[str, Any] | None = None) -> bool:
        """Record ``metrics`` and save if a save is due or a preemption signal arrived.

        Returns True when it saved (with ``async_save``: when a save was started). After a signal,
        the save is committed (synchronously, after the one in flight) and ``should_stop`` is set.
        """
        self._check_open()
        self.rolled_back_to = None
        clean = _clean_metrics(metrics)
        if clean:
            self._log.metrics(step, clean)
        if self.guard is not None and self.guard.metric in clean:
            reason = self.guard.check(clean[self.guard.metric])
            if reason is not None:
                self._roll_back(step, state, reason)
                return False
        signal_name = self._watcher.received
        stop = self._stop_at is not None and step >= self._stop_at  # check-resume's last step
        due = (signal_name is not None or stop
               or (self.every_steps is not None and step % self.every_steps == 0)
               or (self.every_seconds is not None and time.monotonic() - self._last_save_time >= self.every_seconds))
        if self._dist is not None:  # every rank decides alike: one tiny all_reduce per step
            signal_name, due = self._dist.agree_step(signal_name, due)
        saved = False
        try:
            self._surface_pending_error(blocking=False)
            if due and step != self._last_saved:
                if self.async_save and signal_name is None:
                    self._save_async(step, state, clean)
                else:
                    self._save(step, state, clean)
                saved = True
        except OSError as err:
            if self.on_save_error == "raise":
                raise
            warnings.warn(f"safepoint: save of step {step} failed, training continues: {err}",
                          SafepointWarning, stacklevel=2)
            self._log.event("save_failed", step=step, error=str(err))
        if signal_name is None and not (saved and not self.async_save):  # not when just committed
            self._snapshot_if_due(step, state, clean)
        if signal_name is not None:
            self.should_stop = True
            self._log.event("preempted", signal=signal_name, step=step)
            log.warning("safepoint: %s received; checkpoint for step %d is committed, stopping", signal_name, step)
        self.should_stop = self.should_stop or stop
        if self._kill_at is not None and step >= self._kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # check-resume's crash, at the step it chose
        return saved

    def save(self, step: int, state: Mapping[str, Any], *, metrics: Mapping[str, Any] | None = None) -> CheckpointInfo:
        """Save now and block until the checkpoint is committed; return it."""
        self._check_open()
        return self._save(step, state, _clean_metrics(metrics))

    def save_async(self, step: int, state: Mapping[str, Any], *,
                   metrics: Mapping[str, Any] | None = None) -> SaveHandle:
        """Stage the state in host memory and return; the write and commit go on in the background.

        The call first waits for the save in flight (raising its error, if it failed). Once it
        returns, training may modify every tensor in ``state``: the checkpoint holds the values
        at this call.
        """
        self._check_open()
        return self._save_async(step, state, _clean_metrics(metrics))

    def wait(self) -> CheckpointInfo | None:
        """Block until the save in flight is committed; re-raise its error. None if none was."""
        self._check_open()
        return self._surface_pending_error(blocking=True)

    def _save(self, step: int, state: Mapping[str, Any], metrics: dict[str, float]) -> CheckpointInfo:
        self._surface_pending_error(blocking=True)
        if self._dist is not None:  # every rank writes its shards, rank 0 commits
            return distributed.save(self, step, state, metrics, background=False)
        started = time.monotonic()
        encoded, tensor_sets = self._prepare(step, state)
        # Tensors on a GPU go through the pinned staging buffers; CPU tensors are written as they are.
        tensor_sets = self._staging.stage(tensor_sets, only_devices=True)
        return self._commit(step, encoded, tensor_sets, metrics, started)

    def _save_async(self, step: int, state: Mapping[str, Any], metrics: dict[str, float]) -> SaveHandle:
        self._surface_pending_error(blocking=True)
        if self._dist is not None:
            return distributed.save(self, step, state, metrics, background=True)
        started = time.monotonic()
        encoded, tensor_sets = self._prepare(step, state)
        staged = self._staging.stage(tensor_sets)
        self._last_saved = step
        self._log.event("stage", step=step, seconds=round(time.monotonic() - started, 4),
                        staging_bytes=self._staging.nbytes)
        self._pending = self._writer.submit(step, lambda: self._commit(step, encoded, staged, metrics, started))
        return self._pending

    def _prepare(self, step: int, state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
        """Validate, collect and encode the state, and make room for it; nothing is written yet."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        stateful.check_state(state)
        self._check_not_foreign()
        encoded, tensor_sets = self._encode(state)
        tensor_bytes = sum(t.numel() * t.element_size() for ts in tensor_sets.values() for t in ts.values())
        self._ensure_space(step, estimate_checkpoint_size(tensor_bytes, len(tensor_sets) + 2))
        return encoded, tensor_sets

    def _encode(self, state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
        """Every entry's state dict (and the RNG streams) as JSON plus the tensors it refers to."""
        encoded, tensor_sets = {}, {}
        collected = stateful.collect(state)
        if self.trainable_only:
            collected = self._frozen.strip(state, collected)
        for name, sd in collected.items():
            encoder = Encoder(name)
            encoded[name] = encoder.encode(sd)
            tensor_sets[name] = encoder.tensors
        return encoded, tensor_sets

    def _snapshot_if_due(self, step: int, state: Mapping[str, Any], metrics: dict[str, float]) -> None:
        """Copy the state into the supervisor's memory tier every ``snapshot_every`` steps (see memtier)."""
        writer = self._snapshots
        if writer is None or not writer.due(step):
            return
        started = time.monotonic()
        try:
            stateful.check_state(state)
            self._check_not_foreign()
            encoded, tensor_sets = self._encode(state)
            meta = memtier.snapshot_meta(run_dir=self.directory, run_id=self.run_id, metrics=metrics,
                                         entries=[n for n in encoded if n != stateful.RNG_ENTRY],
                                         versions=library_versions(), max_disk=self.max_disk, min_free=self.min_free)
            first = writer.nbytes == 0
            size = writer.write(step, {"format_version": STATE_FORMAT_VERSION, "step": step, "entries": encoded},
                                tensor_sets, meta)
        except OSError as err:
            if self.on_save_error == "raise":
                raise
            warnings.warn(f"safepoint: memory snapshot of step {step} failed, training continues: {err}",
                          SafepointWarning, stacklevel=3)
            self._log.event("snapshot_failed", step=step, error=str(err))
            return
        if first:  # once per process: what a snapshot costs here
            self._log.event("snapshot", step=step, size=size, seconds=round(time.monotonic() - started, 4),
                            every=writer.every)

    def _commit(self, step: int, encoded: dict[str, Any], tensor_sets: dict[str, dict[str, torch.Tensor]],
                metrics: dict[str, float], started: float) -> CheckpointInfo:
        """Write, commit, apply retention. Runs on the caller's thread or the background writer."""
        info = self._write(step, encoded, tensor_sets, metrics)
        self._run_on_commit(info)
        self._last_saved = step
        self._last_save_time = time.monotonic()
        self._log.flush()
        self._log.event("save", step=step, size=info.size, seconds=round(time.monotonic() - started, 4))
        if self._mirror is not None:
            self._mirror.schedule(step)  # uploads in the background; never blocks
        self._apply_retention()
        self._warn_if_disk_full()
        return info

    def _roll_back(self, step: int, state: Mapping[str, Any], reason: str) -> None:
        """Restore the newest finite checkpoint before ``step``; skip the data seen since it."""
        assert self.guard is not None
        self._surface_pending_error(blocking=True)
        if self.guard.rollbacks >= self.guard.max_rollbacks:
            self._log.event("diverged", step=step, reason=reason, rollbacks=self.guard.rollbacks)
            raise DivergenceError(f"training diverged at step {step} ({reason}) after {self.guard.rollbacks} "
                                  "rollback(s); inspect the data and the learning rate, or raise max_rollbacks")
        # Where the data stands now, just past the offending batches: kept after the restore.
        data_now = {n: obj.state_dict() for n, obj in state.items() if _is_data_position(obj)}
        for candidate in reversed([c for c in self.list() if c.step < step]):
            restored = self.restore(state, step=candidate.step)
            if _all_finite(state):
                break
            self._log.event("rollback_skip", step=candidate.step, reason="non-finite weights")
        else:
            raise DivergenceError(f"training diverged at step {step} ({reason}) and no earlier checkpoint "
                                  f"in {self.directory} has finite weights to roll back to")
        for name, position in data_now.items():
            state[name].load_state_dict(position)
        if self.guard.lr_factor != 1.0:
            _scale_lr(state, self.guard.lr_factor)
        self.guard.rollbacks += 1
        self.rolled_back_to = restored
        self._log.event("rollback", from_step=step, to_step=restored, reason=reason,
                        skipped_batches=step - restored, data_position=data_now, lr_factor=self.guard.lr_factor)
        warnings.warn(f"safepoint: {reason} at step {step}; rolled back to step {restored} and skipped the "
                      f"{step - restored} batch(es) seen since", SafepointWarning, stacklevel=3)

    def _run_on_commit(self, info: CheckpointInfo) -> None:
        """The user's post-commit hook (an evaluation, a quality gate); its metrics feed KeepBest."""
        if self.on_commit is None:
            return
        try:
            result = self.on_commit(info)
            values = _clean_metrics(result) if result else {}
        except Exception as err:  # a failing evaluation must not fail a committed save
            warnings.warn(f"safepoint: on_commit for step {info.step} failed: {err!r}", SafepointWarning, stacklevel=2)
            self._log.event("on_commit_failed", step=info.step, error=repr(err))
            return
        if values:
            self._log.add_metrics(info.step, values)
            info.metrics.update(values)
        self._log.event("on_commit", step=info.step, metrics=values)

    def _surface_pending_error(self, *, blocking: bool) -> CheckpointInfo | None:
        """Raise the error of the previous background save, once; optionally wait for it first."""
        pending = self._pending
        if pending is None or (not blocking and not pending.done()):
            return None
        self._pending = None
        try:
            return pending.wait_quietly()
        except BaseException as err:
            if pending.observed:  # the caller already got it from handle.result()
                return None
            self._log.event("save_failed", step=pending.step, error=str(err))
            raise

    def _ensure_space(self, step: int, needed: int) -> None:
        """Free space for a save of ``needed`` bytes, or raise before anything is written."""
        check = check_space(self.directory, needed, max_disk=self.max_disk, min_free=self.min_free)
        if not check.shortfall:
            return
        before = check.describe()
        infos = self.list()
        for victim in budget_candidates(infos, self.keep, resumed_from=self._resumed_from,
                                        unmirrored=self._mirror.unmirrored(infos) if self._mirror else ()):
            self._delete(victim.step, f"disk budget: step {step} {before}")
            check = check_space(self.directory, needed, max_disk=self.max_disk, min_free=self.min_free)
            if not check.shortfall:
                return
        raise InsufficientDiskSpace(errno.ENOSPC, (
            f"not saving step {step} to {self.directory}: it {check.describe()}; short by "
            f"{format_size(check.shortfall)} after deleting every unprotected checkpoint. Nothing was "
            "written. Free space on the filesystem, raise max_disk / lower min_free, or unpin "
            "checkpoints (the newest, best, pinned, resumed-from and not-yet-mirrored ones are never deleted, so the "
            "budget must hold them plus one new checkpoint)"))

    def _warn_if_disk_full(self) -> None:
        fraction = used_fraction(self.directory)
        if fraction >= self.disk_warn_at:
            warnings.warn(f"safepoint: the filesystem of {self.directory} is {fraction:.0%} full",
                          SafepointWarning, stacklevel=3)
            self._log.event("disk_warning", used_fraction=round(fraction, 4))

    def _write(self, step: int, encoded: dict[str, Any], tensor_sets: dict[str, dict[str, torch.Tensor]],
               metrics: dict[str, float]) -> CheckpointInfo:
        created = utc_now()
        tmp = self.directory / layout.tmp_dir_name(step)
        final = self.directory / layout.step_dir_name(step)
        tmp.mkdir()
        try:
            files = {}
            encoder = CheckpointEncoder(self._compact, self.directory, step)  # plain unless asked otherwise
            for name, tensors in tensor_sets.items():
                if tensors:
                    file_name, record = encoder.write(tmp, name, tensors, encoded[name])
                    files[file_name] = record
            faults.reach("after_data")
            files[layout.STATE] = write_bytes(tmp / layout.STATE, dump_json(
                {"format_version": STATE_FORMAT_VERSION, "step": step, "entries": encoded}))
            faults.reach("before_manifest")
            manifest = Manifest(step=step, run_id=self.run_id, files=files, hash_algorithm=default_algorithm(),
                                created=created, committed=utc_now(), metrics=metrics,
                                entries=[n for n in encoded if n != stateful.RNG_ENTRY],
                                versions=library_versions(), **encoder.manifest_fields())
            seal(tmp, final, dump_json(manifest.to_json()))
        except BaseException:
            remove_tree(tmp)
            raise
        faults.reach("after_rename")
        return CheckpointInfo.from_manifest(final, manifest)

    def _apply_retention(self) -> None:
        infos = self.list()
        mirror = self._mirror
        for deletion in plan_deletions(infos, self.keep, resumed_from=self._resumed_from,
                                       unmirrored=mirror.unmirrored(infos) if mirror else (),
                                       keep_local=mirror.config.keep_local if mirror else None):
            self._delete(deletion.step, deletion.reason)

    def _delete(self, step: int, reason: str) -> None:
        """Crash-safe delete: out of every listing by one rename, then removed. Never raises."""
        name = layout.step_dir_name(step)
        try:
            delete_checkpoint(self.directory, name)
        except OSError as err:
            log.warning("safepoint: could not delete %s: %s (will retry after the next save)", name, err)
            return
        log.info("safepoint: deleted %s (%s)", name, reason)
        self._log.event("prune", step=step, reason=reason)

    def _check_not_foreign(self) -> None:
        if self._restored:
            return
        existing = self.list()
        if existing:
            raise RunDirectoryError(
                f"{self.directory} already holds committed checkpoints (steps {existing[0].step}.."
                f"{existing[-1].step}) and this manager has not restored from them, so saving could mix "
                "two runs and let retention delete the other's checkpoints. Call restore(state) first to "
                "resume, or give this run a new directory")
        self._restored = True

    # ---------------------------------------------------------------- pins

    def pin(self, step: int) -> None:
        """Protect a committed checkpoint from retention, durably (stored in run.json)."""
        if not (self.directory / layout.step_dir_name(step) / layout.MANIFEST).exists():
            raise CheckpointNotFound(f"no committed checkpoint for step {step} in {self.directory}")
        self._log.set_pinned(step, True)
        self._log.event("pin", step=step)

    def unpin(self, step: int) -> None:
        self._log.set_pinned(step, False)
        self._log.event("unpin", step=step)

    # ---------------------------------------------------------------- lifecycle

    def _collect_debris(self) -> None:
        for tmp in leftover_tmp_dirs(self.directory):
            remove_tree(tmp)
            self._log.event("gc", removed=tmp.name, reason="unfinished save")
        trash = self.directory / layout.TRASH_DIR
        if trash.exists():
            for item in trash.iterdir():
                remove_tree(item)

    def _check_open(self) -> None:
        if self._closed:
            raise SafepointError(f"this CheckpointManager for {self.directory} is closed")

    def close(self) -> None:
        """Release the directory lock and the signal handlers. Safe to call twice."""
        if self._closed:
            return
        try:
            self._surface_pending_error(blocking=True)
        finally:
            self._closed = True
            self._writer.shutdown()
            if self._mirror is not None and self._mirror.finish():  # waits for uploads, warns about the rest
                self._apply_retention()  # what is mirrored now may go (mirror_keep_local)
            self._watcher.uninstall()
            if self._snapshots is not None:
                self._snapshots.close()
            self._log.event("close", should_stop=self.should_stop)
            self._log.close()
            self._lock.release()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            self.close()
        except Exception:
            if exc_type is None:
                raise
            log.exception("safepoint: a background save failed while another error was raised")

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self.directory)!r}, every_steps={self.every_steps}, keep={self.keep})"


def _prepare_directory(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise RunDirectoryError(f"{directory} is a file, not a directory; give CheckpointManager a directory path")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirectoryError(f"cannot create run directory {directory}: {err.strerror}") from err
    if not os.access(directory, os.W_OK | os.X_OK):
        raise RunDirectoryError(f"run directory {directory} is not writable by this user; fix its "
                                "permissions or choose another directory")


def _clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Metrics as plain floats (tensors and numpy scalars converted); non-finite kept as strings."""
    out: dict[str, Any] = {}
    for key, value in (metrics or {}).items():
        try:
            number = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError):
            raise TypeError(f"metric {key!r} must be a number or a one-element tensor, got {type(value).__name__}") from None
        out[str(key)] = number if math.isfinite(number) else repr(number)
    return out


def _all_finite(state: Mapping[str, Any]) -> bool:
    return all(torch.isfinite(p).all() for obj in state.values() if isinstance(obj, torch.nn.Module)
               for p in obj.parameters() if p.is_floating_point())


def _scale_lr(state: Mapping[str, Any], factor: float) -> None:
    for obj in state.values():
        if isinstance(obj, torch.optim.Optimizer):
            for group in obj.param_groups:
                group["lr"] *= factor
                if "initial_lr" in group:
                    group["initial_lr"] *= factor
        elif hasattr(obj, "base_lrs"):  # LR schedulers recompute lr from base_lrs every step
            obj.base_lrs = [lr * factor for lr in obj.base_lrs]


def _is_data_position(obj: Any) -> bool:
    from .data import ResumableLoader, ResumableSampler

    return isinstance(obj, (ResumableLoader, ResumableSampler)) or type(obj).__name__ == "StatefulDataLoader"


def _check_fits(name: str, obj: Any, saved: Any, path: Path, *, frozen: Iterable[str] = ()) -> None:
    """Refuse, before anything is loaded, a checkpoint whose tensors do not fit a module or optimizer."""
    if isinstance(obj, torch.nn.Module):
        skip = set(frozen)
        current = {k: v.shape for k, v in obj.state_dict().items() if isinstance(v, torch.Tensor) and k not in skip}
        stored = {k: v.shape for k, v in saved.items() if isinstance(v, torch.Tensor)}
        require_fit(f"checkpoint {path} does not fit state[{name!r}] ({type(obj).__name__})", current, stored)
    elif isinstance(obj, torch.optim.Optimizer):
        have = [len(g["params"]) for g in obj.param_groups]
        got = [len(g.get("params", [])) for g in saved.get("param_groups", [])]
        if have != got:
            raise IncompatibleState(f"checkpoint {path} does not fit state[{name!r}]: its optimizer has "
                                    f"param groups of sizes {got}, this optimizer {have}")
