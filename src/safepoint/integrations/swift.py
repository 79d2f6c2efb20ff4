"""ms-swift: committed checkpoints in ``swift sft`` / ``swift pt`` / ``swift rlhf``, auto-resume across ``v*`` runs.

ms-swift builds its Trainer itself, so the callback comes in as a plugin file:

    swift sft ... --external_plugins "$(python -m safepoint.integrations.swift plugin)" --callbacks safepoint

or, simpler, through the wrapper, which adds both flags, resumes from the newest committed and
verified checkpoint of *every* earlier run under ``--output_dir`` and runs training in its own
process, so SIGTERM/SIGINT reach the trainer (``swift sft`` trains in a child process):

    python -m safepoint.integrations.swift sft --model ... --dataset ... --output_dir out

What the plugin does beyond ``SafepointCallback`` (which commits each ``checkpoint-N`` with a
manifest, applies retention and the disk budget, and turns SIGTERM/SIGINT/SIGUSR1 into
save-then-stop):

* configuration from the environment, since swift constructs callbacks as ``Cls(args, trainer)``
  with no options: ``SAFEPOINT_KEEP_LAST``, ``SAFEPOINT_KEEP_BEST`` (``metric[:min|max]``, comma
  separated), ``SAFEPOINT_KEEP_EVERY``, ``SAFEPOINT_KEEP_WITHIN`` (``6h``), ``SAFEPOINT_MAX_DISK``,
  ``SAFEPOINT_MIN_FREE``, ``SAFEPOINT_ON_SAVE_ERROR`` (``raise``/``warn``), ``SAFEPOINT_SIGNALS``
  (``SIGTERM,SIGINT,SIGUSR1``), ``SAFEPOINT_ASYNC_SAVE`` (``1``: training goes on while each
  checkpoint is written, see ``hf_async``), ``SAFEPOINT_EXACT_DATA`` (``1``; ``0`` turns the fix
  below off);
* an exact resume across epoch boundaries (see ``_seed_train_dataloader``);
* unfinished ``checkpoint-N`` directories (a kill mid-save) in earlier ``v*`` runs under the same
  ``--output_dir`` are removed at start, unless another live process holds that run's lock;
* when started by a plain ``swift sft`` (a parent that does not forward signals), the trainer asks
  the kernel for SIGTERM when that parent dies (Linux), instead of training on as an orphan.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

from .. import layout
from ..commit import delete_checkpoint
from ..errors import DirectoryLocked, SafepointWarning
from ..lock import RunLock
from ..prune import policies_from_options
from ..signals import DEFAULT_SIGNALS
from .hf import SafepointCallback, _checkpoint_dirs, first_verified

log = logging.getLogger("safepoint")

#: ``v<N>-<YYYYmmdd>-<HHMMSS>``: the directory ms-swift adds under ``--output_dir`` for every run.
VERSION_DIR = re.compile(r"^v(\d+)-(\d{8}-\d{6})$")
PLUGIN_FILE = Path(__file__).resolve().parent / "swift_plugin" / "safepoint_swift_plugin.py"
CALLBACK_NAME = "safepoint"

__all__ = ["SwiftSafepointCallback", "latest_swift_checkpoint", "register", "swift_checkpoints", "PLUGIN_FILE"]


# -- finding the checkpoint to resume from ------------------------------------------------------

def _run_dirs(output_dir: Path) -> list[tuple[int, str, Path]]:
    """``(version, timestamp, path)`` of every ``v*`` run under ``output_dir``, plus ``output_dir``
    itself as version -1 (``--add_version false`` writes checkpoints straight into it)."""
    found = [(-1, "", output_dir)]
    try:
        names = os.listdir(output_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    for name in names:
        if (m := VERSION_DIR.match(name)) and (output_dir / name).is_dir():
            found.append((int(m.group(1)), m.group(2), output_dir / name))
    return found


def swift_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Every ``checkpoint-N`` under ``output_dir`` and its ``v*-*`` runs, newest first.

    Newest means the highest step; between equal steps, the later run (higher ``v`` number, then
    later timestamp). Committed or not: ``latest_swift_checkpoint`` is what filters.
    """
    found = []
    for version, stamp, run in _run_dirs(Path(output_dir)):
        found += [((step, version, stamp), path) for step, path in _checkpoint_dirs(run)]
    return [path for _, path in sorted(found, key=lambda item: item[0], reverse=True)]


def latest_swift_checkpoint(output_dir: str | os.PathLike[str], *, model: Any = None) -> str | None:
    """The newest committed, verified ``checkpoint-N`` of any run under an ms-swift ``--output_dir``.

    ms-swift writes every run, a resumed one too, into a new ``v<N>-<timestamp>/`` under
    ``--output_dir``; this searches them all (and ``output_dir`` itself, for ``--add_version
    false``). Unfinished (no manifest) and corrupt checkpoints are skipped with a
    ``SafepointWarning`` naming them. None when there is none: start afresh. With ``model``, the
    checkpoint's weights must fit it (``IncompatibleState`` names every mismatch).
    """
    return first_verified(swift_checkpoints(output_dir), model=model)


# -- the callback -------------------------------------------------------------------------------

def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def options_from_env() -> dict[str, Any]:
    """``SafepointCallback`` keyword arguments from ``SAFEPOINT_*`` variables (ValueError if bad)."""
    def integer(name: str) -> int | None:
        value = _env(name)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name}={value!r}: expected a whole number") from None

    keep_best = [s.strip() for s in (_env("SAFEPOINT_KEEP_BEST") or "").split(",") if s.strip()]
    keep = policies_from_options(keep_last=integer("SAFEPOINT_KEEP_LAST"), keep_best=keep_best,
                                 keep_every=integer("SAFEPOINT_KEEP_EVERY"),
                                 keep_within=_env("SAFEPOINT_KEEP_WITHIN"))
    signals = tuple(s.strip() for s in (_env("SAFEPOINT_SIGNALS") or ",".join(DEFAULT_SIGNALS)).split(",")
                    if s.strip())
    return {"keep": keep, "max_disk": _env("SAFEPOINT_MAX_DISK"), "min_free": _env("SAFEPOINT_MIN_FREE"),
            "on_save_error": _env("SAFEPOINT_ON_SAVE_ERROR") or "raise", "signals": signals,
            "async_save": _flag("SAFEPOINT_ASYNC_SAVE")}


def _flag(name: str) -> bool:
    value = (_env(name) or "0").lower()
    if value not in ("0", "1", "true", "false", "yes", "no"):
        raise ValueError(f"{name}={value!r}: expected 1 or 0")
    return value in ("1", "true", "yes")


class SwiftSafepointCallback(SafepointCallback):
    """``SafepointCallback`` as ms-swift constructs a callback: ``Cls(args, trainer)``, options from env."""

    def __init__(self, args: Any = None, trainer: Any = None) -> None:
        super().__init__(**options_from_env())
        self.args = args
        self.trainer = trainer
        if getattr(args, "save_total_limit", None):
            warnings.warn("safepoint: --save_total_limit deletes checkpoints without knowing which ones safepoint "
                          "protects; leave it unset and use SAFEPOINT_KEEP_LAST / SAFEPOINT_MAX_DISK instead",
                          SafepointWarning, stacklevel=2)
        if trainer is not None and _env("SAFEPOINT_EXACT_DATA") != "0":
            seed = getattr(args, "data_seed", None)
            _seed_train_dataloader(trainer, getattr(args, "seed", 0) if seed is None else seed)
        _terminate_with_parent()

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self._output_dir is not None and self._log is not None:
            parent = self._output_dir.parent
            if VERSION_DIR.match(self._output_dir.name):
                for _, _, run in _run_dirs(parent):
                    if run != self._output_dir:
                        self._remove_unfinished_in(run, args.resume_from_checkpoint)

    def _remove_unfinished_in(self, run: Path, resumed: Any) -> None:
        """Tidy an earlier run: its ``checkpoint-N`` without a manifest is a save that never finished.

        Only runs safepoint wrote (they have its ``events.jsonl``), so checkpoints of runs made
        without safepoint are never touched, and only while nobody else holds that run's lock.
        """
        assert self._log is not None
        if not (run / layout.EVENTS_FILE).exists():
            return
        unfinished = [p for _, p in _checkpoint_dirs(run)
                      if not (p / layout.MANIFEST).exists() and str(p) != str(resumed)]
        if not unfinished:
            return
        lock = RunLock(run)
        try:
            lock.acquire()
        except DirectoryLocked:
            return  # a live run: its saves in progress look just like this
        try:
            for path in unfinished:
                delete_checkpoint(run, path.name)
                self._log.event("gc", removed=str(path), reason="unfinished save (no manifest)")
            _repoint_last_checkpoint(run)
        finally:
            lock.release()


def _repoint_last_checkpoint(run: Path) -> None:
    """ms-swift's ``last-checkpoint`` symlink may name a checkpoint just removed: point it at the newest left."""
    link = run / "last-checkpoint"
    if not link.is_symlink() or link.exists():
        return
    left = [p for _, p in _checkpoint_dirs(run) if (p / layout.MANIFEST).exists()]
    try:
        if left:
            tmp = run / "last-checkpoint.tmp"
            if os.path.lexists(tmp):
                os.remove(tmp)
            os.symlink(left[0].name, tmp)
            os.replace(tmp, link)
        else:
            link.unlink()
    except OSError as err:
        log.warning("safepoint: could not update %s: %s", link, err)


def _seed_train_dataloader(trainer: Any, seed: int) -> None:
    """Make the training data loader's iterators leave the global torch RNG alone.

    Why a resume drifted after an epoch boundary: creating a ``DataLoader`` iterator draws the
    worker base seed from the *global* torch RNG (``_BaseDataLoaderIter.__init__``, when the
    loader has no ``generator``). ms-swift defaults to one worker with ``persistent_workers``, so
    an uninterrupted run creates its iterator once, at epoch 0, and never draws again. A resumed
    run builds a second loader to skip the batches already trained (``skip_first_batches``), and
    the Trainer restores the checkpoint's RNG state after that loader's first batch, so far so
    good; but at the next epoch the original loader creates its first iterator and draws. From
    there every dropout mask differs from the uninterrupted run's. (Resuming exactly at an epoch
    boundary draws at once.) The sample order itself is exact: ms-swift's sampler is a pure
    function of ``(data_seed, epoch)``.

    The fix: each training loader gets its own generator, reseeded from ``(seed, epoch)`` on
    ``set_epoch``, so iterator creation never touches the global RNG and the worker seeds are the
    same whichever loader object asks. Applied to the uninterrupted run too (the plugin is in
    both), which therefore consumes one draw less per epoch than a run without safepoint.
    """
    import torch
    from torch.utils.data import DataLoader

    original = trainer.get_train_dataloader

    def get_train_dataloader(*args: Any, **kwargs: Any):
        loader = original(*args, **kwargs)
        base = loader
        for attr in ("base_dataloader", "dataloader"):  # accelerate's / swift's wrappers
            if not isinstance(base, DataLoader) and isinstance(getattr(base, attr, None), DataLoader):
                base = getattr(base, attr)
        if not isinstance(base, DataLoader) or base.generator is not None:
            return loader
        generator = torch.Generator()
        generator.manual_seed(seed)
        base.generator = generator
        set_epoch = getattr(loader, "set_epoch", None)
        if callable(set_epoch):
            def seeded_set_epoch(epoch: int) -> None:
                set_epoch(epoch)
                generator.manual_seed((seed * 1_000_003 + int(epoch)) % (2**63))

            loader.set_epoch = seeded_set_epoch
        return loader

    trainer.get_train_dataloader = get_train_dataloader


def _terminate_with_parent() -> None:
    """Under a plain ``swift sft`` the trainer is a child the parent never forwards signals to:
    if that parent dies (SIGTERM from a scheduler), ask the kernel to send this process SIGTERM,
    so it saves and stops instead of training on as an orphan. Only when the parent is the
    ``swift`` command line; Linux only; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        cmdline = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if not any(Path(os.fsdecode(a)).name == "swift" or a == b"swift.cli.main" for a in cmdline[:3]):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def register() -> None:
    """Add ``safepoint`` to ms-swift's ``callbacks_map`` (what the plugin file does on import)."""
    from swift.callbacks import callbacks_map

    callbacks_map[CALLBACK_NAME] = SwiftSafepointCallback


# -- the wrapper --------------------------------------------------------------------------------

def _flag_values(argv: list[str], flag: str) -> tuple[int, int] | None:
    """``(start, end)`` of the last ``--flag v1 v2 ...`` group in argv (values: argv[start+1:end])."""
    found = None
    i = 0
    while i < len(argv):
        if argv[i] == flag:
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            found = (i, j)
            i = j
        else:
            i += 1
    return found


def _get_flag(argv: list[str], flag: str) -> list[str] | None:
    for arg in reversed(argv):
        if arg.startswith(flag + "="):
            return [arg.split("=", 1)[1]]
    span = _flag_values(argv, flag)
    return None if span is None else argv[span[0] + 1:span[1]]


def _add_to_list_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """Append ``value`` to a list-valued flag (a repeated flag would replace, not extend, the list)."""
    argv = [a for a in argv]
    for k, arg in enumerate(argv):
        if arg.startswith(flag + "="):
            argv[k:k + 1] = [flag, arg.split("=", 1)[1]]
    span = _flag_values(argv, flag)
    if span is None:
        return argv + [flag, value]
    start, end = span
    if value in argv[start + 1:end]:
        return argv
    return argv[:end] + [value] + argv[end:]


def build_command(command: str, argv: Sequence[str]) -> tuple[list[str], str | None]:
    """The command line that runs ``swift <command> ARGV`` with the plugin, resuming when there is something
    to resume from; and the checkpoint it resumes from (None: starts afresh or the user chose one)."""
    import importlib.util

    from swift.cli.main import ROUTE_MAPPING, get_torchrun_args, parse_yaml_args

    argv = list(argv)
    parse_yaml_args(argv)  # a config.yaml / .json first argument becomes flags, as `swift` does
    argv = _add_to_list_flag(argv, "--external_plugins", str(PLUGIN_FILE))
    argv = _add_to_list_flag(argv, "--callbacks", CALLBACK_NAME)
    resumed = None
    if _get_flag(argv, "--resume_from_checkpoint") is None:
        output_dir = (_get_flag(argv, "--output_dir") or [None])[0]
        if output_dir is None:
            raise SystemExit("error: pass --output_dir: auto-resume looks for checkpoints of earlier runs there")
        resumed = latest_swift_checkpoint(os.path.abspath(output_dir))
        if resumed is not None:
            argv += ["--resume_from_checkpoint", resumed]
    entry = importlib.util.find_spec(ROUTE_MAPPING[command]).origin
    torchrun = get_torchrun_args()
    if torchrun is None:
        return [sys.executable, entry, *argv], resumed
    return [sys.executable, "-m", "torch.distributed.run", *torchrun, entry, *argv], resumed


USAGE = """usage: python -m safepoint.integrations.swift COMMAND ...

  sft|pt|rlhf ARGS...  run `swift COMMAND ARGS...` with the safepoint callback; without
                       --resume_from_checkpoint, resume from the newest committed, verified
                       checkpoint under --output_dir (any v*-* run). Trains in this process
                       (exec), so SIGTERM/SIGINT sent to it reach the trainer.
  latest OUTPUT_DIR    print that checkpoint's path; print nothing if there is none
  plugin               print the path of the plugin file for --external_plugins
"""


@contextlib.contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    """A skipped checkpoint is news for the person at the shell: one plain line each, not a source line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SafepointWarning)
        yield
    for w in caught:
        print(str(w.message), file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "latest":
        if len(rest) != 1:
            print("usage: python -m safepoint.integrations.swift latest OUTPUT_DIR", file=sys.stderr)
            return 2
        with _warnings_to_stderr():
            found = latest_swift_checkpoint(os.path.abspath(rest[0]))
        if found:
            print(found)
        return 0
    if command == "plugin":
        print(PLUGIN_FILE)
        return 0
    if command in ("sft", "pt", "rlhf"):
        with _warnings_to_stderr():
            cmd, resumed = build_command(command, rest)
        if resumed:
            print(f"safepoint: resuming from {resumed}", flush=True)
        elif _get_flag(cmd, "--resume_from_checkpoint") is None:
            print("safepoint: no committed checkpoint under --output_dir; starting afresh", flush=True)
        print(f"run sh: `{' '.join(cmd)}`", flush=True)
        sys.stderr.flush()
        os.execv(cmd[0], cmd)
    print(f"error: unknown command {command!r}\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
