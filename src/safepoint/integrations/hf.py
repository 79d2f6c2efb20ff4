"""Hugging Face Trainer (and ms-swift, TRL): commit each ``checkpoint-N`` with a manifest.

The Trainer writes straight into ``checkpoint-N`` and never fsyncs, so a crash mid-save leaves a
directory that ``resume_from_checkpoint=True`` picks and then fails on. ``SafepointCallback``
makes a ``checkpoint-N`` count only once safepoint has fsynced every file in it and written its
``manifest.json`` (sizes + hashes) last, atomically; ``latest_checkpoint`` returns the newest
committed *and verified* one. Around that: retention and the disk budget (checked before the
Trainer starts writing), and SIGTERM/SIGINT/SIGUSR1 turned into save-then-stop. With
``async_save=True`` training goes on while a checkpoint is written (``hf_async``).

    trainer = Trainer(..., callbacks=[SafepointCallback(keep=[KeepLast(2)], max_disk="20GB")])
    trainer.train(resume_from_checkpoint=latest_checkpoint(args.output_dir))
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .. import faults, layout
from ..catalog import CheckpointInfo, read_run_meta, verify
from ..compat import require_fit
from ..commit import delete_checkpoint, dump_json, fsync_dir, sync_and_hash_tree, write_bytes
from ..disk import MinFree, check_space, format_size, parse_size
from ..hashing import default_algorithm
from ..errors import CorruptCheckpoint, InsufficientDiskSpace, SafepointWarning, UnsupportedFormat
from ..lock import RunLock
from ..manifest import Manifest, library_versions, read_manifest, utc_now
from ..retention import RetentionPolicy, budget_candidates, plan_deletions
from ..runlog import RunLog
from ..signals import DEFAULT_SIGNALS, PreemptionWatcher
from .hf_async import StagedSaves, find_trainer, publish

log = logging.getLogger("safepoint")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

__all__ = ["SafepointCallback", "check_fits", "commit_checkpoint_dir", "latest_checkpoint"]


def _checkpoint_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """``checkpoint-N`` directories, newest first."""
    try:
        names = os.listdir(output_dir)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), output_dir / n) for n in names if (m := _CHECKPOINT.match(n))]
    return sorted(found, reverse=True)


def latest_checkpoint(output_dir: str | os.PathLike[str], *, model: Any = None) -> str | None:
    """The newest ``checkpoint-N`` that safepoint committed and that verifies; None if there is none.

    Unfinished (no manifest) and corrupt checkpoints are skipped with a warning naming them. Pass
    the result straight to ``trainer.train(resume_from_checkpoint=...)``: None starts afresh.
    With ``model``, the checkpoint's weights must fit it (names and shapes), or
    ``IncompatibleState`` names every mismatch, instead of a stack trace from inside torch.
    """
    return first_verified((path for _, path in _checkpoint_dirs(Path(output_dir))), model=model)


def first_verified(candidates: Iterable[Path], *, model: Any = None) -> str | None:
    """The first candidate that verifies (the rest are skipped with a warning); None if none does."""
    for path in candidates:
        try:
            verify(path)
        except (CorruptCheckpoint, UnsupportedFormat) as err:
            warnings.warn(f"safepoint: skipping {path}: {err}", SafepointWarning, stacklevel=3)
            continue
        if model is not None:
            check_fits(path, model)
        return str(path)
    return None


def check_fits(checkpoint: Path, model: Any) -> None:
    """Compare a full-model checkpoint's tensor names and shapes with ``model`` (adapters: skipped)."""
    from safetensors import safe_open

    files = [checkpoint / "model.safetensors"]
    index = checkpoint / "model.safetensors.index.json"
    if index.exists():
        files = [checkpoint / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if not all(f.exists() for f in files):
        return  # adapter-only or legacy .bin checkpoints: nothing to compare by header
    stored: dict[str, list[int]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            stored.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    current = model.state_dict()
    # Tied weights are saved once: a key counts as present when any tensor sharing its storage is.
    by_storage: dict[int, list[str]] = {}
    for k, v in current.items():
        by_storage.setdefault(v.data_ptr(), []).append(k)
    shapes = {k: list(v.shape) for k, v in current.items()
              if k in stored or not any(t in stored for t in by_storage[v.data_ptr()])}
    require_fit(f"checkpoint {checkpoint} does not fit {type(model).__name__}", shapes, stored)


def committed_checkpoints(output_dir: Path) -> list[CheckpointInfo]:
    """Committed ``checkpoint-N`` directories as ``CheckpointInfo``, oldest first."""
    pins = set(read_run_meta(output_dir).get("pins", []))
    out = []
    for step, path in _checkpoint_dirs(output_dir):
        try:
            manifest = read_manifest(path)
        except (CorruptCheckpoint, UnsupportedFormat):
            continue
        out.append(CheckpointInfo.from_manifest(path, manifest, pinned=step in pins))
    return out[::-1]


def commit_checkpoint_dir(path: Path, *, step: int, run_id: str, metrics: dict[str, Any]) -> Manifest:
    """Make a directory someone else wrote durable and committed: fsync, hash, manifest last."""
    files = sync_and_hash_tree(path, skip=lambda rel: rel == layout.MANIFEST or rel.startswith(".manifest.tmp"))
    faults.reach("before_manifest")
    manifest = Manifest(step=step, run_id=run_id, files=files, hash_algorithm=default_algorithm(),
                        created=utc_now(), committed=utc_now(), metrics=metrics, versions=library_versions())
    tmp = path / f".manifest.tmp-{os.getpid()}"
    write_bytes(tmp, dump_json(manifest.to_json()))
    os.replace(tmp, path / layout.MANIFEST)
    fsync_dir(path)
    return manifest


class SafepointCallback(TrainerCallback):
    """Commits, budgets and prunes the Trainer's checkpoints; turns preemption into save-and-stop.

    Args:
        keep: retention policies over committed checkpoints (leave the Trainer's
            ``save_total_limit`` unset; it deletes without knowing what is protected).
        max_disk / min_free: the disk budget, checked before the Trainer starts a save.
        on_save_error: "raise" (default) or "warn": skip a save that does not fit and train on.
        signals: signal names that mean "save at the next step, then stop".
        async_save: training goes on while a checkpoint is written: the Trainer's save goes to
            a staging directory (RAM when it fits) and safepoint's background writer commits it
            as ``checkpoint-N`` (see ``hf_async``). Same guarantees; one save in flight.
        staging_dir: where async saves are staged (default: ``/dev/shm`` when RAM has room,
            else a hidden directory in ``output_dir``).
    """

    def __init__(self, *, keep: RetentionPolicy | Iterable[RetentionPolicy] | None = None,
                 max_disk: int | str | None = None, min_free: int | str | None = None,
                 on_save_error: Literal["raise", "warn"] = "raise",
                 signals: Iterable[str] = DEFAULT_SIGNALS, async_save: bool = False,
                 staging_dir: str | os.PathLike[str] | None = None) -> None:
        if on_save_error not in ("raise", "warn"):
            raise ValueError(f"on_save_error must be 'raise' or 'warn', got {on_save_error!r}")
        self.keep = [] if keep is None else [keep] if hasattr(keep, "keep") else list(keep)
        self.max_disk = None if max_disk is None else parse_size(max_disk, what="max_disk")
        self.min_free = MinFree.parse(min_free)
        self.on_save_error = on_save_error
        self._watcher = PreemptionWatcher(tuple(signals))
        self._output_dir: Path | None = None
        self._lock: RunLock | None = None
        self._log: RunLog | None = None
        self._resumed_from: int | None = None
        self.async_save = async_save
        self.staging_dir = staging_dir
        self._staging: StagedSaves | None = None
        self.should_stop = False

    # -- lifecycle -------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if not args.should_save:  # only the main process commits
            return
        self._output_dir = Path(args.output_dir)
        self._output_dir.mkdir(parents=True, exist_ok=True)
        self._lock = RunLock(self._output_dir)
        self._lock.acquire()
        self._log = RunLog(self._output_dir)
        resumed = args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else None
        if resumed and (m := _CHECKPOINT.match(Path(resumed).name)):
            self._resumed_from = int(m.group(1))
        self._log.event("start", resumed_from=self._resumed_from, global_step=state.global_step)
        self._remove_unfinished()
        self._staging = StagedSaves(self._output_dir, staging_dir=self.staging_dir, needed_bytes=self._needed_bytes)
        for path in self._staging.remove_debris():
            self._log.event("gc", removed=str(path), reason="unfinished async save")
        if self.async_save:
            self._start_async(args)
        self._watcher.install()

    def _start_async(self, args: TrainingArguments) -> None:
        """Stage the Trainer's saves, or say why this run saves synchronously."""
        assert self._staging is not None
        trainer = getattr(self, "trainer", None) or find_trainer(self)
        why = ("it runs in several processes, each writing its own files" if args.world_size > 1
               else "push_to_hub uploads from the checkpoint directory" if args.push_to_hub
               else "no Trainer was found calling this callback" if trainer is None else None)
        if why is not None:
            warnings.warn(f"safepoint: async_save is off for this run ({why}); checkpoints are saved "
                          "synchronously", SafepointWarning, stacklevel=3)
            return
        if args.save_total_limit:
            warnings.warn("safepoint: save_total_limit is not applied to async saves (the Trainer rotates its "
                          "staging directory); use keep=[KeepLast(n)]", SafepointWarning, stacklevel=3)
        self._staging.attach(trainer)
        if self._log is not None:
            self._log.event("async_save", staging=str(self._staging.fast_root))

    def _remove_unfinished(self) -> None:
        """``checkpoint-N`` without a manifest is a save that never finished: debris, like a tmp dir."""
        assert self._output_dir is not None and self._log is not None
        for step, path in _checkpoint_dirs(self._output_dir):
            if step != self._resumed_from and not (path / layout.MANIFEST).exists():
                delete_checkpoint(self._output_dir, path.name)
                self._log.event("gc", removed=path.name, reason="unfinished save (no manifest)")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._watcher.uninstall()
        try:
            if self._staging is not None:
                self._staging.close()  # the last async write commits (or raises) before the run ends
        finally:
            self._staging = None
            if self._log is not None:
                self._log.event("close", global_step=state.global_step, should_stop=self.should_stop)
                self._log.close()
                self._log = None
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    # -- saving ----------------------------------------------------------------------------

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._watcher.received is not None and not self.should_stop:
            self.should_stop = True
            control.should_save = True
            control.should_training_stop = True
            if self._log is not None:
                self._log.event("preempted", signal=self._watcher.received, step=state.global_step)
        if control.should_save and self._output_dir is not None:
            if self._staging is not None:
                self._staging.wait()  # one save in flight; its error surfaces here
            self._make_room(state.global_step, control, kwargs.get("model"))
        return control

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._output_dir is None or self._log is None:
            return control
        step = state.global_step
        path = self._output_dir / f"checkpoint-{step}"
        metrics = {k: v for entry in state.log_history if entry.get("step") == step
                   for k, v in entry.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}
        staged = self._staging.take(step) if self._staging is not None else None
        if staged is not None:
            run_id, created = self._log.run_id, utc_now()
            self._staging.submit(step, lambda: self._after_commit(step, path, publish(
                staged, path, step=step, run_id=run_id, metrics=metrics, created=created)))
            if control.should_training_stop or step >= state.max_steps:
                self._staging.wait()  # the Trainer may load the best checkpoint next
            return control
        if not path.is_dir():
            return control
        self._after_commit(step, path, commit_checkpoint_dir(path, step=step, run_id=self._log.run_id, metrics=metrics))
        return control

    def _after_commit(self, step: int, path: Path, manifest: Manifest) -> None:
        """Log the save and apply retention (on the writer thread for async saves)."""
        assert self._output_dir is not None and self._log is not None
        self._log.event("save", step=step, size=manifest.total_size, checkpoint=path.name)
        for deletion in plan_deletions(committed_checkpoints(self._output_dir), self.keep,
                                       resumed_from=self._resumed_from):
            self._delete(deletion.step, deletion.reason)

    def _make_room(self, step: int, control: TrainerControl, model: Any) -> None:
        """The pre-save check: free space under the budget, or refuse before the Trainer writes."""
        assert self._output_dir is not None
        checkpoints = committed_checkpoints(self._output_dir)
        needed = self._needed_bytes(model, checkpoints)
        check = check_space(self._output_dir, needed, max_disk=self.max_disk, min_free=self.min_free)
        if not check.shortfall:
            return
        before = check.describe()
        for victim in budget_candidates(checkpoints, self.keep, resumed_from=self._resumed_from):
            self._delete(victim.step, f"disk budget: checkpoint-{step} {before}")
            check = check_space(self._output_dir, needed, max_disk=self.max_disk, min_free=self.min_free)
            if not check.shortfall:
                return
        message = (f"not saving checkpoint-{step} in {self._output_dir}: it {check.describe()}; short by "
                   f"{format_size(check.shortfall)} after deleting every unprotected checkpoint. Free "
                   "space, raise max_disk / lower min_free, or unpin checkpoints")
        if self.on_save_error == "raise":
            raise InsufficientDiskSpace(28, message)
        warnings.warn(f"safepoint: {message}; training continues", SafepointWarning, stacklevel=2)
        control.should_save = False
        if self._log is not None:
            self._log.event("save_failed", step=step, error=message)

    def _needed_bytes(self, model: Any, checkpoints: list[CheckpointInfo] | None = None) -> int:
        """Expected size of the next save: the last committed one, else an estimate from the model."""
        if checkpoints is None:
            checkpoints = committed_checkpoints(self._output_dir) if self._output_dir is not None else []
        return checkpoints[-1].size if checkpoints else _estimate_from_model(model)

    def _delete(self, step: int, reason: str) -> None:
        assert self._output_dir is not None and self._log is not None
        try:
            delete_checkpoint(self._output_dir, f"checkpoint-{step}")
        except OSError as err:
            log.warning("safepoint: could not delete checkpoint-%d: %s", step, err)
            return
        self._log.event("prune", step=step, reason=reason)


def _estimate_from_model(model: Any) -> int:
    """First save, nothing to measure yet: weights + AdamW's two moments."""
    if model is None:
        return 0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return weights + 2 * trainable
