"""Comparing two runs of one script, checkpoint by checkpoint, and naming what a resume missed.

The backend of ``safepoint check-resume`` (``check_resume.py`` runs the script). Both runs save
at the same steps and keep everything; the checkpoint of each step is compared entry by entry:
every state entry (``model``, ``optimizer``, ``scheduler``, the data position, user objects) and
each RNG stream as an entry of its own (``rng:python``, ``rng:numpy``, ``rng:torch``,
``rng:cuda``). JSON state is compared leaf by leaf (``param_groups[0].lr``); tensor files by
the hashes in their manifests, and where they differ, tensor by tensor with ``diff.py``.

A difference before the resume point means the script is not deterministic, so nothing can be
said about the resume. After it, the entries that differ first, together with what the resumed
run's ``restore`` reported (``RestoreReport``: which entries, RNG streams and data position it
loaded), point at the state that was not restored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import layout
from .diff import diff_checkpoints
from .encoding import LOSSY_KEY
from .manifest import read_manifest
from .stateful import RNG_ENTRY
from .tensors import read_tensors

RNG_PREFIX = "rng:"  # RNG streams are entries of their own: rng:python, rng:torch, ...


@dataclass
class Finding:
    """One likely reason the resume is not exact; ``cause`` is a stable keyword for scripts."""

    cause: str  # "data", "scheduler", "rng", "lossy", "not_restored", "entry", "steps", "nondeterministic"
    message: str


@dataclass
class CheckResult:
    """The outcome of a check: the verdict, where and how the runs part, and the likely causes.

    "Entries" are the state entries plus one per RNG stream (``rng:torch``); the ``*_diffs`` map
    an entry to what differs in it (tensors with their largest change, JSON paths).
    """

    command: list[str]
    seed: int
    kill_step: int
    resumed_from: int
    compared_steps: list[int]
    verdict: str  # "exact", "not_exact", "nondeterministic"
    entries: list[str]
    first_diff_step: int | None = None
    first_diffs: dict[str, list[str]] = field(default_factory=dict)  # at first_diff_step
    diverged_at: dict[str, int] = field(default_factory=dict)  # entry -> the first step it differs
    final_step: int | None = None  # the last step both runs saved
    final_diffs: dict[str, list[str]] = field(default_factory=dict)  # empty: the final state is equal
    findings: list[Finding] = field(default_factory=list)
    restore: dict[str, Any] = field(default_factory=dict)  # the resumed run's restore event
    workdir: str | None = None  # kept for inspection; None once removed

    @property
    def exact(self) -> bool:
        return self.verdict == "exact"

    @property
    def final_equal(self) -> bool:
        """Whether the final state (weights, optimizer, everything) of the two runs is bitwise equal."""
        return self.final_step is not None and not self.final_diffs

    def to_json(self) -> dict[str, Any]:
        return {"exact": self.exact, "final_equal": self.final_equal, **asdict(self)}

    def report(self) -> str:
        """The human report: verdict, where the runs part, and the likely causes, ranked."""
        lines = [f"command: {' '.join(self.command)}",
                 f"killed with SIGKILL after step {self.kill_step} (seed {self.seed}); resumed from step "
                 f"{self.resumed_from}; compared {_span(self.compared_steps)}"]
        if self.exact:
            resumed = _span([s for s in self.compared_steps if s > self.resumed_from])
            lines.append(f"EXACT: every checkpoint after the resume ({resumed}), the final one included, is bitwise "
                         f"equal to the uninterrupted run's, in every entry: {', '.join(self.entries)}")
        else:
            lines.append("NOT DETERMINISTIC: two runs differ before the kill, so the resume cannot be judged"
                         if self.verdict == "nondeterministic" else
                         f"NOT EXACT: the resumed run differs from step {self.first_diff_step} on")
            if self.first_diff_step is not None:
                lines.append(f"first differences, at step {self.first_diff_step}:")
                lines += [f"  {u}: {', '.join(w)}" for u, w in self.first_diffs.items()]
                equal = [u for u in self.entries if u not in self.first_diffs]
                lines.append(f"  still equal there: {', '.join(equal) or 'nothing'}")
                order = sorted(self.diverged_at.items(), key=lambda kv: (kv[1], _report_order(kv[0])))
                never = [u for u in self.entries if u not in self.diverged_at]
                lines.append("first step each entry differs: " + ", ".join(f"{u} {s}" for u, s in order)
                             + (f"; never: {', '.join(never)}" if never else ""))
            if self.final_step is not None:
                lines.append(f"final state (step {self.final_step}): "
                             + ("; ".join(f"{u}: {', '.join(w)}" for u, w in self.final_diffs.items())
                                or "bitwise equal"))
            lines.append("likely cause" + ("s, most likely first:" if len(self.findings) > 1 else ":"))
            lines += [f"  {i}. {f.message}" for i, f in enumerate(self.findings, 1)]
        if self.workdir:
            lines.append(f"runs kept in {self.workdir} (straight/ and resumed/, logs beside them)")
            if self.first_diff_step is not None:
                step_dir = layout.step_dir_name(self.first_diff_step)
                lines.append(f"  safepoint diff {self.workdir}/straight/{step_dir} {self.workdir}/resumed/{step_dir}")
        return "\n".join(lines)


def compare_runs(straight: Path, resumed: Path, restore: dict[str, Any], *, command: Sequence[str] = (),
                 seed: int = 0, kill_step: int = 0) -> CheckResult:
    """Compare a straight run with a resumed run of one script (``restore``: the resumed run's restore event).

    ``command``, ``seed`` and ``kill_step`` are only recorded in the result.
    """
    resumed_from = int(restore.get("step") or 0)
    a_steps, b_steps = committed_steps(straight), committed_steps(resumed)
    common = [s for s in a_steps if s in set(b_steps)]
    diffs = {s: _diff_step(straight / layout.step_dir_name(s), resumed / layout.step_dir_name(s)) for s in common}
    last_entries = _read(straight / layout.step_dir_name(common[-1]))[0] if common else {}
    names = sorted(_entry_names(last_entries), key=_report_order)
    result = CheckResult(command=[str(c) for c in command], seed=seed, kill_step=kill_step, resumed_from=resumed_from,
                         compared_steps=common, verdict="exact", entries=names, restore=restore,
                         final_step=common[-1] if common else None)
    before = [s for s in common if s <= resumed_from and diffs[s]]
    after = [s for s in common if s > resumed_from and diffs[s]]
    unmatched = sorted(s for s in set(a_steps) ^ set(b_steps) if s > resumed_from)
    if not before and not after and not unmatched:
        return result
    first_paths: dict[str, list[str]] = {}  # entry -> what differs at the first step it differs
    for s in before or after:
        for name, paths in diffs[s].items():
            if name not in result.diverged_at:
                result.diverged_at[name], first_paths[name] = s, paths
    if before or after:
        first = result.first_diff_step = (before or after)[0]
        result.first_diffs = _details(straight, resumed, first, diffs[first])
    if common:
        result.final_diffs = _details(straight, resumed, common[-1], diffs[common[-1]])
    if before:
        result.verdict = "nondeterministic"
        result.findings = [Finding("nondeterministic", (
            f"two runs of the script differ at step {before[0]}, before any kill "
            f"({', '.join(diffs[before[0]])}): it does not compute the same thing twice. Seed every RNG "
            "(random, numpy, torch), remove time- or hash-order-dependent code, and call "
            "torch.use_deterministic_algorithms(True) (on a GPU also set CUBLAS_WORKSPACE_CONFIG=:4096:8)"))]
        return result
    result.verdict = "not_exact"
    scheduler_in_state = any(isinstance(e, dict) and "last_epoch" in e for e in last_entries.values())
    lossy = sorted(read_manifest(resumed / layout.step_dir_name(resumed_from)).extra.get(LOSSY_KEY) or {}) \
        if resumed_from in b_steps else []
    result.findings = _diagnose(result, first_paths, scheduler_in_state, lossy)
    if unmatched:
        result.findings.append(Finding("steps", "the runs saved different steps after the resume; only one of them "
                                                f"has: {', '.join(map(str, unmatched))}"))
    return result


# ------------------------------------------------------------------------------ diagnosis


def _diagnose(result: CheckResult, first_paths: dict[str, list[str]], scheduler_in_state: bool,
              lossy: list[str]) -> list[Finding]:
    """Likely causes of the differences at the first step the runs part, most likely first.

    Each cause is tied to the step where the state it explains first differs; earlier is more
    likely the root (a wrong batch or learning rate moves the weights one step later).
    """
    restore, r, first = result.restore, result.resumed_from, result.first_diff_step
    ranked: list[tuple[int, int, Finding]] = []
    explained: set[str] = set()
    at_first = {u for u, s in result.diverged_at.items() if s == first}

    if lossy:
        ranked.append((r, 0, Finding("lossy", (
            f"the checkpoint resumed from stores {', '.join(lossy)} lossily (quantize_optimizer=True: 8-bit Adam "
            "moments), so this resume cannot be exact; turn it off where exactness matters"))))
        explained |= {n for n in result.diverged_at if not n.startswith(RNG_PREFIX)}
    if restore.get("not_in_checkpoint"):
        ranked.append((r, 0, Finding("not_restored", (
            f"state entries not in the checkpoint, so the resume did not restore them: "
            f"{', '.join(restore['not_in_checkpoint'])}"))))
    moved = {u for u, paths in first_paths.items() if not u.startswith(RNG_PREFIX) and "tensors" in paths}
    if moved and not str(restore.get("data_position", "")).startswith("restored"):
        step = min(result.diverged_at[u] for u in moved)
        ranked.append((step, 1, Finding("data", (
            f"data loader position not restored: the state holds no data loader whose position safepoint "
            f"restores, so after resuming at step {r} the script read its data from the start of a new order (a "
            f"plain DataLoader has no state_dict, and each new iterator draws its shuffle seed from the torch "
            f"RNG); the weights differ from step {step} on. Fix: pass a safepoint.ResumableLoader(dataset, "
            "batch_size=..., shuffle=True, seed=...) as state['data'], or torchdata's StatefulDataLoader"))))
        explained |= moved | {RNG_PREFIX + "torch"}
    lr_entries = {u: p for u, paths in first_paths.items() for p in paths if _is_lr_path(p)}
    if lr_entries and not scheduler_in_state:
        name, path = min(lr_entries.items(), key=lambda kv: result.diverged_at[kv[0]])
        step = result.diverged_at[name]
        ranked.append((step, 2, Finding("scheduler", (
            f"LR scheduler not restored: the learning rate ({name} {path}) differs from step {step} on and no "
            "scheduler is in the state, so the resumed scheduler started its schedule again. Fix: add it, "
            "state['scheduler'] = scheduler"))))
        explained |= set(lr_entries) | {u for u, s in result.diverged_at.items() if s > step}
    saved_rng = {u.removeprefix(RNG_PREFIX) for u in result.entries if u.startswith(RNG_PREFIX)}
    lost = sorted(saved_rng - set(restore.get("rng") or saved_rng))
    if lost:
        ranked.append((r, 0, Finding("rng", f"RNG stream(s) saved but not restored: {', '.join(lost)} "
                                            "(a different number of devices on resume?)")))
    for name in sorted(at_first - explained, key=_report_order):
        if name.startswith(RNG_PREFIX):
            ranked.append((first, 3, Finding("rng", (
                f"RNG stream '{name.removeprefix(RNG_PREFIX)}' differs from step {first} on although it was "
                f"restored at step {r}: after the resume the script draws from it differently than an "
                "uninterrupted run (setup code between restore() and the loop, a new DataLoader iterator, a "
                "generator seeded at startup)"))))
        else:
            ranked.append((first, 4, Finding("entry", (
                f"entry '{name}' differs from step {first} on ({', '.join(first_paths[name][:3])}) although it was "
                f"restored at step {r}: its load_state_dict() may not restore all that its state_dict() holds, or "
                "an input it depends on (data, a generator, a value outside the state) differs after the resume"))))
    return [f for _, _, f in sorted(ranked, key=lambda t: (t[0], t[1]))]


def _is_lr_path(path: str) -> bool:
    return path.startswith("param_groups") and path.rsplit(".", 1)[-1] == "lr"


# ------------------------------------------------------------------------------ comparing checkpoints


def _read(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """A checkpoint's encoded entries (state.json) and its files' hashes (manifest)."""
    manifest = read_manifest(path)
    doc = json.loads((path / layout.STATE).read_bytes())
    return doc.get("entries", {}), {name: record.hash for name, record in manifest.files.items()}


def _entry_names(entries: dict[str, Any]) -> list[str]:
    out = [n for n in entries if n != RNG_ENTRY]
    rng = entries.get(RNG_ENTRY, {})
    return out + [RNG_PREFIX + stream for stream in rng] if isinstance(rng, dict) else out


def _report_order(name: str) -> tuple[int, str]:
    """Report order: small state that explains the rest first, weights last."""
    return (1 if name.startswith(RNG_PREFIX) else 2 if name in ("optimizer", "model") else 0, name)


def _diff_step(a: Path, b: Path) -> dict[str, list[str]]:
    """Every entry whose state differs between two checkpoints of the same step, with what differs.

    JSON parts are compared leaf by leaf; tensor files by their manifest hashes (equal bytes, equal
    tensors), except the small RNG file, whose streams are compared one by one.
    """
    (ea, ha), (eb, hb) = _read(a), _read(b)
    out: dict[str, list[str]] = {}
    for name in sorted(ea.keys() | eb.keys()):
        if name not in ea or name not in eb:
            out[name] = ["only in the " + ("resumed" if name in eb else "straight") + " run"]
            continue
        if name == RNG_ENTRY:
            for stream in sorted(ea[name].keys() | eb[name].keys()):
                if list(_json_diffs(ea[name].get(stream), eb[name].get(stream))):
                    out[RNG_PREFIX + stream] = ["generator state"]
            file = layout.tensor_file_name(name)
            if ha.get(file) != hb.get(file):
                ta, tb = read_tensors(a / file), read_tensors(b / file)
                for key in sorted(ta.keys() | tb.keys()):
                    if key not in ta or key not in tb or not ta[key].equal(tb[key]):
                        out[RNG_PREFIX + key.split(".")[0]] = ["generator state"]
            continue
        found = list(_json_diffs(ea[name], eb[name]))
        file = layout.tensor_file_name(name)
        if ha.get(file) != hb.get(file):
            found.append("tensors")
        if found:
            out[name] = found
    return out


def _details(straight: Path, resumed: Path, step: int, diffs: dict[str, list[str]]) -> dict[str, list[str]]:
    """What differs at ``step``: JSON paths, and for tensor entries the tensors that moved most (diff.py)."""
    a, b = straight / layout.step_dir_name(step), resumed / layout.step_dir_name(step)
    out = {}
    for name in sorted(diffs, key=_report_order):
        what = []
        if "tensors" in diffs[name]:
            changed = [c for c in diff_checkpoints(a, b, entry=name) if c.status != "same"]
            what = [f"tensor {c.name} ({_change(c)})" for c in changed[:3]]
            if len(changed) > 3:
                what.append(f"{len(changed) - 3} more tensor{'s' if len(changed) > 4 else ''}")
        paths = [w for w in diffs[name] if w != "tensors"]
        out[name] = what + paths[:4] + ([f"{len(paths) - 4} more values"] if len(paths) > 4 else [])
    return out


def _change(c: Any) -> str:
    return c.detail or (f"max |b-a| {c.max_abs:.3g}" if c.max_abs is not None else c.status)


def _json_diffs(a: Any, b: Any, path: str = "") -> Iterator[str]:
    """Paths (``param_groups[0].lr``) where two encoded JSON trees differ; tagged values are leaves."""
    if a == b:
        return
    a, b = _untag(a), _untag(b)
    if isinstance(a, dict) and isinstance(b, dict) and not _is_leaf(a) and not _is_leaf(b):
        for key in list(a) + [k for k in b if k not in a]:
            yield from _json_diffs(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _json_diffs(x, y, f"{path}[{i}]")
    else:
        yield path or "value"


def _untag(value: Any) -> Any:
    """Look through the codec's tuple and non-string-key dict tags (codec.py) to their contents."""
    if isinstance(value, dict) and len(value) == 1:
        if "__tuple__" in value:
            return value["__tuple__"]
        if "__dict__" in value and isinstance(value["__dict__"], list):
            return {str(k): v for k, v in value["__dict__"]}
    return value


def _is_leaf(value: dict[str, Any]) -> bool:
    return len(value) == 1 and next(iter(value)).startswith("__")


def committed_steps(run_dir: Path) -> list[int]:
    """The committed steps of a run directory, oldest first (the names alone: cheap to poll)."""
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return []
    return sorted(s for s in map(layout.parse_step, names) if s is not None)



def _span(steps: Sequence[int]) -> str:
    if not steps:
        return "no steps"
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}..{steps[-1]}"
