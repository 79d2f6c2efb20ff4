"""Start a new run from a committed checkpoint of another, without copying bytes.

A hyper-parameter trial, a branch after a loss spike, an ablation: each wants to begin where an
existing run stood. ``fork`` makes ``NEW_DIR/step_N`` from ``DIR/step_N`` with hard links (the
files of a committed checkpoint are never modified in place, so sharing them is safe, and
deleting one run's copy leaves the other's intact); across filesystems it copies. The new run
gets its own run id and records its lineage in ``run.json``; the forked checkpoint is pinned there,
so retention in the new run never deletes its starting point. A delta checkpoint brings its base.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from . import layout
from .catalog import read_run_meta, verify
from .commit import commit_dir, fsync_dir
from .errors import CheckpointNotFound, RunDirectoryError
from .manifest import read_manifest
from .runlog import RunLog


def fork(run_dir: str | Path, step: int, new_dir: str | Path) -> Path:
    """Create ``new_dir`` holding checkpoint ``step`` of ``run_dir``; return the new checkpoint."""
    run_dir, new_dir = Path(run_dir), Path(new_dir)
    source = run_dir / layout.step_dir_name(step)
    if not (source / layout.MANIFEST).exists():
        raise CheckpointNotFound(f"no committed checkpoint for step {step} in {run_dir}")
    if new_dir.exists() and any(new_dir.iterdir()):
        raise RunDirectoryError(f"{new_dir} exists and is not empty; fork into a new directory")
    manifest = verify(source)  # a delta's base is verified with it
    new_dir.mkdir(parents=True, exist_ok=True)
    linked = True
    if manifest.parent is not None:  # a delta checkpoint: its base comes along (retention keeps it)
        linked &= _link_checkpoint(run_dir, manifest.parent, new_dir)
    linked &= _link_checkpoint(run_dir, step, new_dir)
    log = RunLog(new_dir)
    parent_id = read_run_meta(run_dir).get("run_id", manifest.run_id)
    log.meta["forked_from"] = {"run_dir": str(run_dir.resolve()), "run_id": parent_id, "step": step}
    log.write_meta()
    log.set_pinned(step, True)
    log.event("fork", source=str(run_dir.resolve()), step=step, hard_links=linked)
    log.close()
    return new_dir / layout.step_dir_name(step)


def _link_checkpoint(run_dir: Path, step: int, new_dir: Path) -> bool:
    """Commit a hard-linked (or, across filesystems, copied) ``step`` of ``run_dir`` into ``new_dir``."""
    source = run_dir / layout.step_dir_name(step)
    tmp = new_dir / layout.tmp_dir_name(step)
    tmp.mkdir()
    linked = True
    for name in read_manifest(source).files | {layout.MANIFEST: None}:
        target = tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source / name, target)
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            shutil.copy2(source / name, target)
            linked = False
    fsync_dir(tmp)
    commit_dir(tmp, new_dir / layout.step_dir_name(step))
    return linked
