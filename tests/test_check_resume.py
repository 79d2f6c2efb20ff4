"""``safepoint check-resume``: real scripts, run straight and SIGKILLed-then-resumed, compared.

The example scripts in ``examples/check_resume/`` differ only in what they checkpoint: the exact
one must pass, and the two broken ones must be named for what they forgot (the data position, the
LR scheduler). The comparison itself is also tested on runs written in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, train_env
from safepoint import CheckpointManager, KeepLast
from safepoint.check_resume import CheckResumeError, check_resume, choose_kill_step
from safepoint.manager import CHECK_DIR_ENV, CHECK_EVERY_ENV, CHECK_KILL_ENV, CHECK_STOP_ENV
from safepoint.resume_compare import committed_steps, compare_runs

EXAMPLES = ROOT / "examples" / "check_resume"
STEPS = 6


@pytest.fixture
def child_env(monkeypatch):
    """The scripts check-resume starts import this checkout's safepoint and use one CPU thread."""
    for key, value in train_env().items():
        monkeypatch.setenv(key, value)
    for key in (CHECK_DIR_ENV, CHECK_EVERY_ENV, CHECK_STOP_ENV, CHECK_KILL_ENV):
        monkeypatch.delenv(key, raising=False)


def cli(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    """``safepoint check-resume ARGS``; its default scratch directories go under ``tmp``."""
    return subprocess.run([sys.executable, "-m", "safepoint", "check-resume", *args],
                          env={**train_env(), "TMPDIR": str(tmp)}, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_exact_script_passes_and_its_own_run_directory_is_untouched(tmp_path):
    real_dir = tmp_path / "real-run"
    done = cli("--steps", str(STEPS), "--seed", "7", "--json", "--",
               sys.executable, str(EXAMPLES / "exact.py"), "--dir", str(real_dir), tmp=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["exact"] is True and result["verdict"] == "exact" and result["findings"] == []
    assert 1 <= result["kill_step"] < STEPS and result["kill_step"] == choose_kill_step(range(1, STEPS + 1), 7)
    assert result["resumed_from"] == result["kill_step"]  # restored the checkpoint of the step it was killed at
    assert result["compared_steps"] == list(range(1, STEPS + 1))
    assert {"model", "optimizer", "scheduler", "data", "rng:python", "rng:numpy", "rng:torch"} <= set(result["entries"])
    assert result["restore"]["data_position"] == "restored (data)"
    assert result["final_equal"] is True
    assert result["workdir"] is None  # the scratch runs are removed when the resume is exact
    assert not list(tmp_path.glob("safepoint-check-resume-*"))
    assert not real_dir.exists()  # the check never writes where the script would checkpoint
    # Progress on stderr, stdout left to the JSON.
    for line in ("straight run: starting", f"kill step {result['kill_step']} (seed 7)", "killed (SIGKILL)",
                 f"resumed run, after the kill: exited with code 0, newest checkpoint: step {STEPS}"):
        assert line in done.stderr


def test_plain_dataloader_is_named_as_the_state_not_restored(tmp_path, child_env):
    result = check_resume([sys.executable, str(EXAMPLES / "plain_loader.py")], steps=STEPS, seed=3,
                          workdir=tmp_path / "work")
    assert result.verdict == "not_exact"
    r = result.resumed_from
    assert result.first_diff_step == r + 1  # the first batch after the resume is already a different one
    assert result.findings[0].cause == "data"
    assert "data loader position not restored" in result.findings[0].message
    assert {"model", "optimizer"} <= set(result.first_diffs)
    assert "scheduler" not in result.diverged_at and "rng:python" not in result.diverged_at
    assert result.first_diffs["model"][0].startswith("tensor ")  # named by diff.py, with its max change
    report = result.report()
    assert "NOT EXACT" in report and "1. data loader position not restored" in report
    assert result.workdir == str(tmp_path / "work")  # kept, for `safepoint diff`
    assert committed_steps(tmp_path / "work" / "straight") == list(range(1, STEPS + 1))


def test_forgotten_scheduler_is_named_from_the_learning_rate(tmp_path, child_env):
    result = check_resume([sys.executable, str(EXAMPLES / "no_scheduler.py")], steps=STEPS, seed=1,
                          workdir=tmp_path / "work")
    assert result.verdict == "not_exact"
    r = result.resumed_from
    # The step after the resume used the restored LR; then the restarted scheduler overwrote it.
    assert result.first_diff_step == r + 1
    assert result.first_diffs == {"optimizer": ["param_groups[0].lr"]}
    assert result.diverged_at["model"] == r + 2
    assert [f.cause for f in result.findings] == ["scheduler"]
    assert "state['scheduler'] = scheduler" in result.findings[0].message
    assert result.final_step == STEPS and not result.final_equal and "model" in result.final_diffs


def test_script_failures_and_bad_input_exit_2_with_the_scripts_output(tmp_path, child_env):
    crash = tmp_path / "crash.py"
    crash.write_text("print('loading data')\nraise SystemExit('no such dataset: /data/x')\n")
    done = cli("--workdir", str(tmp_path / "w0"), "--", sys.executable, str(crash), tmp=tmp_path)
    assert done.returncode == 2
    assert "the straight run exited with code 1" in done.stderr and "no such dataset: /data/x" in done.stderr
    assert str(tmp_path / "w0" / "straight.log") in done.stderr  # the whole output stays there

    with pytest.raises(CheckResumeError, match="committed no checkpoint"):
        check_resume([sys.executable, "-c", "print('no safepoint here')"], workdir=tmp_path / "w1")
    busy = tmp_path / "busy"
    (busy / "step_00000010").mkdir(parents=True)
    with pytest.raises(CheckResumeError, match="must be a new or empty directory"):
        check_resume([sys.executable, "-c", "pass"], workdir=busy)
    assert (busy / "step_00000010").is_dir()
    with pytest.raises(CheckResumeError, match="no command to check"):
        check_resume([])
    with pytest.raises(CheckResumeError, match="--steps must be >= 2"):
        check_resume(["true"], steps=1)


def test_choose_kill_step_is_reproducible_and_leaves_a_checkpoint_before_and_steps_after():
    steps = list(range(5, 101, 5))
    picks = {choose_kill_step(steps, seed) for seed in range(200)}
    assert min(picks) >= 5 and max(picks) < 100 and len(picks) > 50
    assert choose_kill_step(steps, 42) == choose_kill_step(steps, 42)
    with pytest.raises(CheckResumeError, match="at least two"):
        choose_kill_step([10], 0)


def test_manager_under_check_uses_the_scratch_directory_saves_every_step_and_stops(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    monkeypatch.setenv(CHECK_DIR_ENV, str(scratch))
    monkeypatch.setenv(CHECK_EVERY_ENV, "2")
    monkeypatch.setenv(CHECK_STOP_ENV, "7")
    model = torch.nn.Linear(2, 2)
    state = {"model": model}
    with CheckpointManager(tmp_path / "real", every_steps=100, keep=[KeepLast(1)], max_disk="1KB") as ckpt:
        ckpt.restore(state)
        for step in range(1, 20):
            ckpt.step(step, state)
            if ckpt.should_stop:
                break
    assert step == 7  # stopped at the check's last step, which is saved even off the schedule
    assert committed_steps(scratch) == [2, 4, 6, 7]  # every 2 steps, all kept, no budget
    assert not (tmp_path / "real").exists()


def _write_run(run: Path, *, values: dict[int, int], steps: int) -> None:
    """A run whose 'counter' entry is the step number, except at the steps ``values`` overrides."""
    counter: dict[str, float] = {}
    state = {"model": torch.nn.Linear(2, 2), "counter": counter}
    with CheckpointManager(run) as ckpt:
        ckpt.restore(state)
        for step in range(1, steps + 1):
            counter["value"] = float(values.get(step, step))
            ckpt.save(step, state)


def test_a_difference_before_the_resume_point_means_the_script_is_not_deterministic(tmp_path):
    torch.manual_seed(0)
    _write_run(tmp_path / "a", values={}, steps=4)
    torch.manual_seed(0)
    _write_run(tmp_path / "b", values={2: 99}, steps=4)  # differs at step 2, before the resume at 3
    result = compare_runs(tmp_path / "a", tmp_path / "b", {"step": 3, "data_position": "not in state"})
    assert result.verdict == "nondeterministic" and not result.exact
    assert result.first_diff_step == 2 and result.first_diffs == {"counter": ["value"]}
    assert result.findings[0].cause == "nondeterministic"
    assert "NOT DETERMINISTIC" in result.report()


def test_an_entry_that_differs_after_the_resume_is_named(tmp_path):
    torch.manual_seed(0)
    _write_run(tmp_path / "a", values={}, steps=4)
    torch.manual_seed(0)
    _write_run(tmp_path / "b", values={4: 99}, steps=4)
    result = compare_runs(tmp_path / "a", tmp_path / "b", {"step": 3, "data_position": "not in state"})
    assert result.verdict == "not_exact" and result.first_diff_step == 4
    assert result.diverged_at == {"counter": 4}
    # The weights did not move, so the missing data loader is not blamed; the entry is.
    assert [f.cause for f in result.findings] == ["entry"] and "'counter'" in result.findings[0].message


def _train(run: Path, steps: range, *, resume: bool) -> dict:
    """AdamW on a 64x64 layer (moments big enough to be quantised), saving each step 8-bit."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"model": model, "optimizer": opt}
    with CheckpointManager(run, quantize_optimizer=True) as ckpt:
        start = ckpt.restore(state)
        assert start == (steps.start if resume else 0)
        for step in steps:
            torch.manual_seed(step)
            loss = model(torch.randn(8, 64)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            ckpt.save(step + 1, state)
        report = ckpt.restore_report
    return {"step": report.step, "rng": report.rng, "data_position": "not in state", "not_in_checkpoint": []}


def test_a_lossy_optimizer_checkpoint_is_named_as_the_reason(tmp_path):
    _train(tmp_path / "a", range(0, 5), resume=False)
    _train(tmp_path / "b", range(0, 2), resume=False)
    restore = _train(tmp_path / "b", range(2, 5), resume=True)  # a new model and optimizer, restored
    result = compare_runs(tmp_path / "a", tmp_path / "b", restore)
    assert result.verdict == "not_exact" and result.first_diff_step == 3
    assert result.findings[0].cause == "lossy" and "optimizer" in result.findings[0].message
