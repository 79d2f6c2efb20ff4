"""Async checkpoints for the Trainer: it writes ``checkpoint-N`` into RAM, safepoint moves it to disk.

The Trainer's save is a chain of its own serialisers (``save_pretrained``, ``torch.save`` of the
optimizer, scheduler, scaler and RNG, ``trainer_state.json``, FSDP/DeepSpeed variants) that changes
from release to release. Re-implementing or intercepting them would break with the next one, so
``StagedSaves`` changes a single thing: *where* they write. Around the Trainer's
``_save_checkpoint`` it shadows the instance's ``_get_output_dir``, the one place the directory of
a save comes from (transformers 4.40 to 5.x), so the whole ``checkpoint-N`` lands in a staging
directory: on tmpfs (``/dev/shm``) when RAM has room for it, else ``output_dir/.safepoint-staging``.
Training goes on as soon as the Trainer's save returns. Then safepoint's background writer:

1. copies every staged file into ``output_dir/.safepoint-staging/checkpoint-N``, hashing it as it
   is written and fsyncing it (direct I/O for big files); when the Trainer staged on the same disk,
   the files are already there and are only hashed and fsynced;
2. writes the manifest last and renames the directory to ``checkpoint-N`` (``commit.seal``);
3. applies retention (the callback's ``after_commit``) and removes the RAM copy.

What that keeps:

* ``checkpoint-N`` appears only complete and committed. A kill -9 at any moment leaves debris in
  the two hidden staging directories (removed at the next start), never a ``checkpoint-N`` that
  ``latest_checkpoint`` or the Trainer's own ``get_last_checkpoint`` could pick.
* Resuming is exact: the files are byte for byte what the Trainer's save wrote at that step.
* One save in flight: the next save waits for it before its disk-budget check, and so do the
  last save of a run (end of training, a preemption signal) and ``on_train_end``. A failed
  background write is raised there.
* The Trainer's own rotation (``save_total_limit``) only ever looks at the staging directory, so
  it never sees or deletes an in-flight checkpoint; safepoint's retention runs after each commit.

Saved synchronously instead (with a warning): multi-process training (every rank writes its own
files into the checkpoint directory), hyperparameter-search trials and ``push_to_hub`` (which
uploads from the checkpoint directory in the background).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import faults
from ..async_save import BackgroundWriter, SaveHandle
from ..commit import FileRecord, HashingWriter, dump_json, fsync_dir, remove_tree, seal, sync_and_hash_tree
from ..hashing import default_algorithm
from ..manifest import Manifest, library_versions, utc_now

STAGING = ".safepoint-staging"
RAM_DIR = Path("/dev/shm")
# RAM staging needs room for the files plus the serialisers' own buffers; below that, stage on disk.
RAM_HEADROOM = 2
_DIRECT_MIN = 1 << 20  # direct I/O for files from 1 MiB (small files: plain writes)
_CHUNK = 8 << 20
_UNSET = object()

__all__ = ["STAGING", "StagedSaves", "find_trainer", "publish"]


def _key(output_dir: Path) -> str:
    return hashlib.sha256(str(output_dir.resolve()).encode()).hexdigest()[:16]


def fast_staging_dir(output_dir: Path, staging_dir: Path | None = None) -> Path:
    """This output directory's staging directory under ``staging_dir`` (default ``/dev/shm``)."""
    return (staging_dir or RAM_DIR) / f"safepoint-staging-{_key(output_dir)}"


def ram_room(path: Path) -> int:
    """Bytes that may be staged under ``path``: its free space, capped by the RAM available."""
    try:
        free = shutil.disk_usage(path).free
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 0
    return min(free, available)


def find_trainer(callback: Any) -> Any | None:
    """The Trainer whose callback handler is calling ``callback`` right now (from ``on_train_begin``).

    A ``TrainerCallback`` is never handed its Trainer; the Trainer is the ``self`` of the frame
    that fired the event, a few frames up. It is recognised by what matters: a callback handler
    holding this callback, and a ``_save_checkpoint`` to wrap.
    """
    frame = inspect.currentframe()
    try:
        for _ in range(16):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            handler = getattr(candidate, "callback_handler", None)
            if any(cb is callback for cb in getattr(handler, "callbacks", ())) \
                    and callable(getattr(candidate, "_save_checkpoint", None)):
                return candidate
        return None
    finally:
        del frame


def publish(staged: Path, final: Path, *, step: int, run_id: str, metrics: dict[str, float],
            created: str) -> Manifest:
    """Make a staged ``checkpoint-N`` durable and committed as ``final`` (runs on the writer thread).

    ``staged`` is either the tmp directory itself (``final.parent/.safepoint-staging/<name>``) or a
    directory elsewhere (RAM) whose files are copied there. Either way the tmp directory gets the
    manifest last and is renamed to ``final``; on an error it is removed, and so is the RAM copy.
    """
    tmp = final.parent / STAGING / final.name
    try:
        if staged == tmp:
            files = sync_and_hash_tree(tmp)  # the Trainer wrote straight into it
        else:
            remove_tree(tmp)  # an earlier attempt at this step
            files = _copy_hashed(staged, tmp)
        faults.reach("after_data")
        faults.reach("before_manifest")
        manifest = Manifest(step=step, run_id=run_id, files=files, hash_algorithm=default_algorithm(),
                            created=created, committed=utc_now(), metrics=metrics, versions=library_versions())
        seal(tmp, final, dump_json(manifest.to_json()))
    except BaseException:
        remove_tree(tmp)
        remove_tree(staged)
        raise
    faults.reach("after_rename")
    remove_tree(staged)
    return manifest


def _files(root: Path) -> list[tuple[str, Path]]:
    out = []
    for dirpath, _, names in os.walk(root):
        out += [((Path(dirpath) / n).relative_to(root).as_posix(), Path(dirpath) / n) for n in sorted(names)]
    return out


def _copy_hashed(source: Path, target: Path) -> dict[str, FileRecord]:
    """Copy a tree file by file, each hashed as written and fsynced; directories fsynced too."""
    records: dict[str, FileRecord] = {}
    for rel, path in _files(source):
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "rb", buffering=0) as f, \
                HashingWriter(dest, direct=os.fstat(f.fileno()).st_size >= _DIRECT_MIN) as writer:
            while chunk := f.read(_CHUNK):  # a fresh buffer each time: the hasher may still hold the last
                writer.write(chunk)
            records[rel] = writer.close()
    target.mkdir(parents=True, exist_ok=True)
    for dirpath, _, _ in os.walk(target):
        fsync_dir(Path(dirpath))
    return records


class StagedSaves:
    """Stages the Trainer's saves and commits them on one background writer; see the module docstring.

    The callback drives it: ``remove_debris`` at start, ``attach(trainer)``; before each save's
    disk check ``wait()``; in ``on_save`` ``take(step)`` and, if something was staged,
    ``submit(step, job)``; at the end ``close()``.
    """

    def __init__(self, output_dir: Path, *, staging_dir: str | os.PathLike[str] | None = None,
                 needed_bytes: Callable[[Any], int] = lambda model: 0) -> None:
        self.output_dir = output_dir
        self.disk_root = output_dir / STAGING
        self.fast_root = fast_staging_dir(output_dir, Path(staging_dir) if staging_dir is not None else None)
        self._explicit = staging_dir is not None
        self._needed_bytes = needed_bytes
        self._writer: BackgroundWriter | None = None
        self._handle: SaveHandle | None = None
        self._staged: tuple[int, Path] | None = None
        self._trainer: Any = None

    def remove_debris(self) -> list[Path]:
        """Remove what an interrupted run left in the staging directories (call under the run lock)."""
        removed = [p for p in (self.disk_root, self.fast_root) if p.exists()]
        for path in removed:
            remove_tree(path)
        return removed

    # -- the Trainer's save ----------------------------------------------------------------

    def attach(self, trainer: Any) -> None:
        """Wrap ``trainer._save_checkpoint`` (on the instance only) so its save is staged."""
        original = trainer._save_checkpoint

        def save_checkpoint(model: Any, trial: Any = None, *args: Any, **kwargs: Any) -> Any:
            if trial is not None or getattr(trainer, "hp_search_backend", None) is not None:
                return original(model, trial, *args, **kwargs)
            return self._staged_save(trainer, original, model, trial, *args, **kwargs)

        trainer._save_checkpoint = save_checkpoint
        self._trainer = trainer

    def detach(self) -> None:
        if self._trainer is not None:
            self._trainer.__dict__.pop("_save_checkpoint", None)
            self._trainer = None

    def _staged_save(self, trainer: Any, original: Callable[..., Any], model: Any, *args: Any, **kwargs: Any) -> Any:
        self.wait()  # a save not announced at on_step_end (save_strategy="best") still waits here
        root = self._pick_root(self._needed_bytes(model))
        root.mkdir(parents=True, exist_ok=True)
        step = trainer.state.global_step
        staged = root / f"checkpoint-{step}"
        remove_tree(staged)
        shadowed = trainer.__dict__.get("_get_output_dir", _UNSET)
        trainer._get_output_dir = lambda *a, **k: str(root)
        try:
            result = original(model, *args, **kwargs)
        except BaseException:
            remove_tree(staged)
            raise
        finally:
            if shadowed is _UNSET:
                trainer.__dict__.pop("_get_output_dir", None)
            else:
                trainer._get_output_dir = shadowed
        if staged.is_dir():
            self._point_best_at_output(trainer, root, staged)
            self._staged = (step, staged)
        return result

    def _pick_root(self, needed: int) -> Path:
        if self._explicit or ram_room(RAM_DIR) >= RAM_HEADROOM * needed:
            return self.fast_root
        return self.disk_root

    def _point_best_at_output(self, trainer: Any, root: Path, staged: Path) -> None:
        """The Trainer records the best checkpoint under the directory it saved to: name the final one."""
        best = getattr(trainer.state, "best_model_checkpoint", None)
        if best and Path(best).parent == root:
            trainer.state.best_model_checkpoint = str(self.output_dir / Path(best).name)
            if (staged / "trainer_state.json").exists():
                trainer.state.save_to_json(str(staged / "trainer_state.json"))

    # -- the background write --------------------------------------------------------------

    def take(self, step: int) -> Path | None:
        """The checkpoint the Trainer just staged for ``step``, or None (it saved in place)."""
        staged, self._staged = self._staged, None
        return staged[1] if staged is not None and staged[0] == step else None

    def submit(self, step: int, job: Callable[[], Any]) -> None:
        """Run ``job`` on the writer thread; the caller has waited for the previous one."""
        if self._writer is None:
            self._writer = BackgroundWriter()
        self._handle = self._writer.submit(step, job)

    def wait(self) -> None:
        """Wait for the write in flight, if any; raise its error (once)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.result()

    def close(self) -> None:
        """Wait for the last write (raising its error), unwrap the Trainer, stop the writer thread."""
        try:
            self.wait()
        finally:
            self.detach()
            if self._writer is not None:
                self._writer.shutdown()
                self._writer = None
            for root in (self.disk_root, self.fast_root):
                try:
                    root.rmdir()  # only when empty: no litter in /dev/shm or the output directory
                except OSError:
                    pass
