"""Pure naming rules for a run directory; no I/O.

Every other module asks this one what a path is called, so the format lives in one place:

    step_00001000/                committed checkpoint (has manifest.json)
    step_00002000.tmp-<rand>/     save in progress; never listed, removed on the next start
    .trash/<name>.<rand>          deletion in progress
    run.json, events.jsonl, metrics.jsonl, .lock

Zero-padded step names sort lexically; the patterns are anchored, so stray directories such as
``step_12_old`` are never mistaken for checkpoints.
"""

from __future__ import annotations

import re
import secrets

STEP_DIGITS = 8
MANIFEST = "manifest.json"
STATE = "state.json"
RUN_FILE = "run.json"
EVENTS_FILE = "events.jsonl"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
RUN_JSON_LOCK = ".run.json.lock"  # serialises read-modify-writes of run.json across processes
TRASH_DIR = ".trash"
TENSOR_SUFFIX = ".safetensors"

_COMMITTED = re.compile(r"^step_(\d{%d,})$" % STEP_DIGITS)
_TMP = re.compile(r"^step_(\d{%d,})\.tmp-[0-9a-f]+$" % STEP_DIGITS)
_ENTRY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def step_dir_name(step: int) -> str:
    """``step_00001000`` for step 1000; more digits once a step outgrows the padding."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step:0{STEP_DIGITS}d}"


def tmp_dir_name(step: int) -> str:
    """A fresh, unique in-progress name beside the final directory of ``step``."""
    return f"{step_dir_name(step)}.tmp-{secrets.token_hex(4)}"


def trash_name(name: str) -> str:
    return f"{name}.{secrets.token_hex(4)}"


def parse_step(name: str) -> int | None:
    """The step of a committed-checkpoint directory name, or None for anything else."""
    m = _COMMITTED.match(name)
    return int(m.group(1)) if m else None


def is_tmp_name(name: str) -> bool:
    return _TMP.match(name) is not None


def tensor_file_name(entry: str) -> str:
    return entry + TENSOR_SUFFIX


def is_valid_entry_name(name: str) -> bool:
    """State entry names become file names; internal entries start with an underscore."""
    return bool(_ENTRY.match(name))
