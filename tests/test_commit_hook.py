"""``safepoint run --on-commit CMD``: each new checkpoint evaluated by a command, its result a metric.

Tried with the real supervisor and the real training script: every checkpoint committed during the
run is evaluated once, its result lands in the checkpoint's metrics (listings and ``KeepBest`` use
it: a prune keeps the best by the evaluation), a failing evaluation is an event and nothing else,
and a later supervisor on the same directory evaluates only what has no result yet.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, TRAIN, train_env
from safepoint import layout, list_checkpoints
from safepoint.commit_hook import parse_result, record_metrics

# An evaluation that needs no torch: it checks it was given the right checkpoint, fails on the
# steps listed in FAIL_STEPS, and otherwise scores the step by its distance from 30.
EVAL = textwrap.dedent("""
    import json, os, sys
    path, step = sys.argv[1], int(sys.argv[2])
    if json.load(open(os.path.join(path, "manifest.json")))["step"] != step:
        sys.exit("given the wrong checkpoint")
    if str(step) in os.environ.get("FAIL_STEPS", "").split(","):
        sys.exit(f"evaluation of step {step} broke")
    print("evaluating...")
    print(json.dumps({"eval_loss": abs(step - 30) / 10 + 0.1}))
""")


def events(run_dir: Path, *kinds: str) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / layout.EVENTS_FILE).read_text().splitlines()]
    return [e for e in lines if not kinds or e["event"] in kinds]


def supervise(run: Path, script: Path, fail_steps: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "safepoint", "run", "--dir", str(run), "--backoff", "0.05s",
           "--on-commit", f"{sys.executable} {script} {{path}} {{step}}", "--",
           sys.executable, str(TRAIN), "--dir", str(run), "--steps", "60", "--every", "10", "--keep", "100"]
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(train_env(), FAIL_STEPS=fail_steps),
                          cwd=ROOT, timeout=180)


def test_each_checkpoint_is_evaluated_and_keep_best_uses_the_result(tmp_path: Path) -> None:
    run, script = tmp_path / "run", tmp_path / "eval.py"
    script.write_text(EVAL)
    done = supervise(run, script, fail_steps="20")
    context = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-3000:]}"
    assert done.returncode == 0, context

    evaluated = {c.step: c.metrics.get("eval_loss") for c in list_checkpoints(run)}
    assert evaluated == {10: 2.1, 20: None, 30: 0.1, 40: 1.1, 50: 2.1, 60: 3.1}, context
    (failed,) = events(run, "on_commit_failed")
    assert failed["step"] == 20 and failed["code"] == 1 and "evaluation of step 20 broke" in failed["output"]
    assert "--on-commit for step 20 failed: exited with code 1" in done.stderr
    assert events(run, "supervisor_exit")[-1]["reason"] == "done"  # a failed evaluation stops nothing

    # KeepBest sees the evaluation: a prune keeping the newest and the best by eval_loss keeps 30.
    pruned = subprocess.run([sys.executable, "-m", "safepoint", "prune", str(run), "--keep-last", "1",
                             "--keep-best", "eval_loss", "--yes"], capture_output=True, text=True,
                            env=train_env(), cwd=ROOT, timeout=60)
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert [c.step for c in list_checkpoints(run)] == [30, 60]


def test_a_later_supervisor_evaluates_what_has_no_result(tmp_path: Path) -> None:
    run, script = tmp_path / "run", tmp_path / "eval.py"
    script.write_text(EVAL)
    first = supervise(run, script, fail_steps="20,40")
    assert first.returncode == 0, first.stderr
    assert sorted(e["step"] for e in events(run, "on_commit_failed")) == [20, 40]
    done_before = sorted(e["step"] for e in events(run, "on_commit"))
    assert done_before == [10, 30, 50, 60]

    second = supervise(run, script, fail_steps="")
    assert second.returncode == 0, second.stderr
    assert sorted(e["step"] for e in events(run, "on_commit")) == [10, 20, 30, 40, 50, 60]  # 20, 40 once more
    assert all(c.metrics.get("eval_loss") is not None for c in list_checkpoints(run))


def test_a_forwarded_signal_stops_the_running_evaluation(tmp_path: Path) -> None:
    run, started = tmp_path / "run", tmp_path / "eval.pid"
    slow = f"import os, pathlib, time; pathlib.Path({str(started)!r}).write_text(str(os.getpid())); time.sleep(120)"
    cmd = [sys.executable, "-m", "safepoint", "run", "--dir", str(run), "--on-commit",
           f"{sys.executable} -c {shlex.quote(slow)}", "--",
           sys.executable, str(TRAIN), "--dir", str(run), "--steps", "400", "--every", "10", "--sleep", "0.02"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=train_env(), cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the evaluation never started"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err  # the trainer saved and exited 0; the evaluation did not hold anything up
    assert not Path(f"/proc/{started.read_text()}").exists()
    (failed,) = events(run, "on_commit_failed")
    assert failed["step"] % 10 == 0 and failed["code"] == -signal.SIGTERM
    assert events(run, "supervisor_exit")[-1]["reason"] == "signal"


@pytest.mark.parametrize("stdout, expected", [
    ("0.25\n", {"score": 0.25}),
    ("loading\n\n{\"eval_loss\": 0.4, \"acc\": 1}\n  \n", {"eval_loss": 0.4, "acc": 1.0}),
    ("-3", {"score": -3.0}),
])
def test_the_last_line_is_the_result(stdout: str, expected: dict) -> None:
    assert parse_result(stdout) == expected


@pytest.mark.parametrize("stdout, message", [
    ("", "printed nothing"),
    ("done!", "neither a number nor a JSON object"),
    ("[1, 2]", "neither a number nor a JSON object"),
    ('{"acc": "high"}', "metric 'acc' in its last line is 'high'"),
    ('{"loss": NaN}', "not a finite number"),
    ("true", "neither a number nor a JSON object"),
])
def test_an_unreadable_result_is_refused_with_the_reason(stdout: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_result(stdout)


def test_metrics_are_merged_into_run_json_keeping_everything_else(tmp_path: Path) -> None:
    assert record_metrics(tmp_path, 5, {"score": 1.0}) is False  # no run.json: not a safepoint run
    (tmp_path / layout.RUN_FILE).write_text(json.dumps({"run_id": "r", "pins": [5], "metrics": {"5": {"a": 2.0}}}))
    assert record_metrics(tmp_path, 5, {"score": 1.0}) is True
    assert record_metrics(tmp_path, 7, {"score": 3.0}) is True
    meta = json.loads((tmp_path / layout.RUN_FILE).read_text())
    assert meta == {"run_id": "r", "pins": [5], "metrics": {"5": {"a": 2.0, "score": 1.0}, "7": {"score": 3.0}}}
    assert not [p for p in tmp_path.iterdir() if p.name not in (layout.RUN_FILE, layout.RUN_JSON_LOCK)]  # no tmp left


def test_run_json_updates_from_two_processes_are_never_lost(tmp_path: Path) -> None:
    """The trainer (pins) and the supervisor's hook (metrics) rewrite run.json at once: every update lands."""
    import subprocess
    import sys

    from safepoint.catalog import read_run_meta
    from safepoint.runlog import RunLog

    RunLog(tmp_path).close()  # creates run.json with a run id
    src = str(Path(__file__).resolve().parents[1] / "src")
    script = (
        "import sys; from pathlib import Path; sys.path.insert(0, %r)\n"
        "from safepoint.runlog import RunLog; from safepoint.commit_hook import record_metrics\n"
        "run, kind = Path(sys.argv[1]), sys.argv[2]\n"
        "log = RunLog(run)\n"
        "for i in range(60):\n"
        "    if kind == 'pins': log.set_pinned(i, True)\n"
        "    else: assert record_metrics(run, i, {'score': float(i)})\n"
    ) % src
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), kind]) for kind in ("pins", "metrics")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    meta = read_run_meta(tmp_path)
    assert meta["pins"] == list(range(60))
    assert {int(k): v["score"] for k, v in meta["metrics"].items()} == {i: float(i) for i in range(60)}
