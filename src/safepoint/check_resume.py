"""``safepoint check-resume``: is a script's resume exact, and if not, which state was not restored?

A resume can look fine (the loss curve goes on) and still not be exact: a plain ``DataLoader``
starts its order again, a scheduler left out of the state restarts its warmup, a generator made
at startup is drawn anew. The proof is to run the script twice, once straight through and once
killed with SIGKILL and resumed, and compare. This module runs the user's own command that way on
a scratch directory; ``resume_compare`` compares the two runs checkpoint by checkpoint, entry by
entry, and names the state that was not restored.

How the script is driven, without editing it: ``CheckpointManager`` honours environment variables
(``manager.CHECK_*_ENV``) that give it the scratch run directory instead of its own (a real run's
checkpoints are never touched), a save every ``every`` steps with everything kept, the last step
(``should_stop`` is set there), and, for the first start of the resumed run, a step after which
the process SIGKILLs itself. The kill step is drawn from ``seed``. ``{dir}`` and ``{steps}`` in
the command become the run's scratch directory and the step count, for scripts that need them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import layout
from .errors import SafepointError
from .manager import CHECK_DIR_ENV, CHECK_EVERY_ENV, CHECK_KILL_ENV, CHECK_STOP_ENV
from .resume_compare import CheckResult, Finding, compare_runs, committed_steps
from .supervisor import describe_exit

__all__ = ["CheckResult", "CheckResumeError", "Finding", "check_resume", "choose_kill_step"]
_LOG_TAIL = 15


class CheckResumeError(SafepointError):
    """The check could not be made: bad input, or the script failed or did not checkpoint."""


def choose_kill_step(saved_steps: Sequence[int], seed: int) -> int:
    """A step from the first checkpoint up to (not including) the last, drawn from ``seed``.

    At or after the first checkpoint, so the resumed run has one to restore; before the last, so
    it has steps left to redo.
    """
    if len(saved_steps) < 2:
        raise CheckResumeError(f"the straight run committed {len(saved_steps)} checkpoint(s) "
                               f"({', '.join(map(str, saved_steps)) or 'none'}); a check needs at least two: "
                               "run more steps (--steps) or save more often (--every)")
    return random.Random(seed).randrange(saved_steps[0], saved_steps[-1])


def check_resume(command: Sequence[str], *, steps: int = 20, every: int = 1, seed: int | None = None,
                 workdir: str | os.PathLike[str] | None = None, keep: bool = False, timeout: float | None = None,
                 progress: Callable[[str], None] | None = None) -> CheckResult:
    """Run ``command`` straight and killed-then-resumed; compare the two runs checkpoint by checkpoint.

    Args:
        command: the training command (argv); it must use ``CheckpointManager`` and call ``step()``.
        steps: the last step of both runs (the script must honour ``ckpt.should_stop``, or take
            ``{steps}``); a script that ends earlier is compared up to its end.
        every: save every this many steps (1 finds the exact step where the runs part).
        seed: draws the kill step; None draws a seed (reported, to repeat the check).
        workdir: a new or empty scratch directory; default a temporary one, removed when the
            resume is exact unless ``keep``.
        timeout: seconds each start of the script may take.
        progress: called with one-line progress messages.
    """
    if not command:
        raise CheckResumeError("no command to check: give it after '--', e.g. "
                               "safepoint check-resume -- python train.py")
    if steps < 2 or every < 1:
        raise CheckResumeError(f"--steps must be >= 2 and --every >= 1, got steps={steps}, every={every}")
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    say = progress or (lambda line: None)
    work = _scratch(workdir)
    straight, resumed = work / "straight", work / "resumed"

    def start(run_dir: Path, label: str, kill_at: int | None = None) -> int:
        env = {**os.environ, CHECK_DIR_ENV: str(run_dir), CHECK_EVERY_ENV: str(every), CHECK_STOP_ENV: str(steps)}
        env.pop(CHECK_KILL_ENV, None)
        if kill_at is not None:
            env[CHECK_KILL_ENV] = str(kill_at)
        argv = [a.replace("{dir}", str(run_dir)).replace("{steps}", str(steps)) for a in command]
        return _run(argv, env, run_dir, work / f"{run_dir.name}.log", label, steps, timeout, say)

    _expect(start(straight, "straight run"), 0, work / "straight.log", "the straight run")
    saved = committed_steps(straight)
    if not saved:
        raise CheckResumeError(f"the script committed no checkpoint (log: {work / 'straight.log'}); check-resume "
                               "needs a script that uses safepoint.CheckpointManager and calls ckpt.step() each step")
    kill_step = choose_kill_step(saved, seed)
    say(f"kill step {kill_step} (seed {seed})")
    _expect(start(resumed, f"resumed run, to be killed after step {kill_step}", kill_step), -signal.SIGKILL,
            work / "resumed.log", f"the run to be killed after step {kill_step}")
    _expect(start(resumed, "resumed run, after the kill"), 0, work / "resumed.log", "the resumed run")
    restore = _last_restore(resumed)
    result = compare_runs(straight, resumed, restore, command=command, seed=seed, kill_step=kill_step)
    if result.exact and not keep and workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        result.workdir = str(work)
    return result


def _scratch(workdir: str | os.PathLike[str] | None) -> Path:
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix="safepoint-check-resume-"))
    work = Path(workdir)
    if work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise CheckResumeError(f"--workdir {work} must be a new or empty directory (it may hold a real run's "
                               "checkpoints, which the check must not touch)")
    work.mkdir(parents=True, exist_ok=True)
    return work


def _run(argv: list[str], env: dict[str, str], run_dir: Path, log_path: Path, label: str, total: int,
         timeout: float | None, say: Callable[[str], None]) -> int:
    """Start the script once; report its newest checkpoint as it goes; return its return code."""
    say(f"{label}: starting")
    with open(log_path, "ab") as log:
        log.write(f"--- {label}: {' '.join(argv)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as err:
            raise CheckResumeError(f"cannot start {argv[0]!r}: {err}") from err
        began, shown, last_said = time.monotonic(), None, 0.0
        try:
            while proc.poll() is None:
                if timeout is not None and time.monotonic() - began > timeout:
                    raise CheckResumeError(f"{label} took longer than {timeout:g}s (--timeout); log: {log_path}")
                newest = max(committed_steps(run_dir), default=None)
                if newest != shown and time.monotonic() - last_said >= 0.5:
                    say(f"{label}: step {newest}/{total}")
                    shown, last_said = newest, time.monotonic()
                time.sleep(0.05)
        finally:
            if proc.poll() is None:  # interrupted or timed out: leave nothing running
                _kill_group(proc)
                proc.wait()
    newest = max(committed_steps(run_dir), default="none")
    how = "killed (SIGKILL)" if proc.returncode == -signal.SIGKILL else describe_exit(proc.returncode)
    say(f"{label}: {how}, newest checkpoint: step {newest}")
    return proc.returncode


def _expect(returncode: int, wanted: int, log_path: Path, what: str) -> None:
    if returncode == wanted:
        return
    tail = log_path.read_text(errors="replace").splitlines()[-_LOG_TAIL:]
    expected = "to be killed at its kill step" if wanted < 0 else "to exit 0"
    raise CheckResumeError(f"{what} {describe_exit(returncode)} (expected {expected}); its output ends with:\n"
                           + "\n".join("  " + line for line in tail) + f"\n(full log: {log_path})")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and its data loader workers
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _last_restore(run_dir: Path) -> dict[str, Any]:
    """The ``restore`` event of the resumed run: the first one of the last process that started."""
    found: dict[str, Any] | None = None
    attempt = None
    try:
        with open(run_dir / layout.EVENTS_FILE, encoding="utf-8") as events:
            for line in events:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("event") == "start":
                    attempt, found = record.get("attempt"), None
                elif record.get("event") == "restore" and found is None and record.get("attempt") == attempt:
                    found = record
    except FileNotFoundError:
        pass
    if found is None:
        raise CheckResumeError(f"the resumed run did not call ckpt.restore(state) (no restore event in {run_dir}); "
                               "call it before the training loop")
    if not found.get("step"):
        raise CheckResumeError("the resumed run found no committed checkpoint to restore: the kill came before "
                               "the first save was committed (an async save?); try another --seed")
    return {k: found.get(k) for k in ("step", "restored", "not_in_checkpoint", "not_in_state", "rng",
                                      "data_position")}
