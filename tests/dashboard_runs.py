"""Runs for the dashboard tests, made by the real library: a crash, a resume, supervisor records.

``make_run`` writes a safepoint run the way a supervised training run leaves it:

* attempt 1 (a child process) logs steps 1..25 with ``loss = 2/step + 0.5``, saves steps 10 and
  20, and is SIGKILLed after step 25. Its buffered metric lines for steps 21..25 would be lost;
  a longer run would have flushed some of them (the buffer fills), so they are appended here
  under attempt 1's id, to give the stitching something to decide;
* attempt 2 (this process) resumes from step 20 and logs 21..40 with ``loss = 2/step``, saving
  30 and 40, then closes;
* the supervisor's lines (start, the SIGKILL exit, the restart, the clean exit) are written by
  the real ``Supervisor.event``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from conftest import ROOT, train_env
from safepoint import CheckpointManager, KeepLast, layout
from safepoint.supervisor import Supervisor

ATTEMPT_1 = """
import os, signal, sys, torch
from safepoint import CheckpointManager, KeepLast
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
with CheckpointManager(sys.argv[1], every_steps=10, keep=[KeepLast(10)], max_disk="50MB") as ckpt:
    ckpt.restore({"model": model})
    for step in range(1, 26):
        ckpt.step(step, {"model": model}, metrics={"loss": 2.0 / step + 0.5, "acc": step / 100})
    os.kill(os.getpid(), signal.SIGKILL)
"""


def loss(step: int, attempt: int) -> float:
    return 2.0 / step + (0.5 if attempt == 1 else 0.0)


def make_run(run: Path) -> dict[str, int]:
    """Build the run described above in ``run``; return the pids of its two attempts."""
    sup = Supervisor(["python", "train.py"], run_dir=run)
    sup.event("supervisor_start", command=sup.command, max_restarts=10, crash_loop=3, grace=30.0,
              backoff=[1.0, 60.0], newest_step=None)
    child = subprocess.Popen([sys.executable, "-c", ATTEMPT_1, str(run)], env=train_env(), cwd=ROOT,
                             stderr=subprocess.PIPE, text=True)
    sup.event("child_start", n=1, child_pid=child.pid, resume_step=None)
    _, err = child.communicate(timeout=120)
    assert child.returncode == -9, f"attempt 1 should have been SIGKILLed, got {child.returncode}\n{err}"
    sup.event("child_exit", n=1, child_pid=child.pid, code=None, signal="SIGKILL", seconds=1.0, newest_step=20,
              progress=True, killed_after_grace=False)
    events = [json.loads(line) for line in (run / layout.EVENTS_FILE).read_text().splitlines()]
    attempt_1 = next(e["attempt"] for e in events if e["event"] == "start")
    with open(run / layout.METRICS_FILE, "a") as f:
        for step in range(21, 26):
            f.write(json.dumps({"step": step, "time": 0.0, "attempt": attempt_1, "loss": loss(step, 1),
                                "acc": step / 100}) + "\n")
    sup.event("restart", n=2, delay=1.0, after_code=None, after_signal="SIGKILL")
    sup.event("child_start", n=2, child_pid=os.getpid(), resume_step=20)

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    with CheckpointManager(run, every_steps=10, keep=[KeepLast(10)], max_disk="50MB") as ckpt:
        start = ckpt.restore({"model": model})
        assert start == 20
        for step in range(start + 1, 41):
            ckpt.step(step, {"model": model}, metrics={"loss": loss(step, 2), "acc": step / 100})
    sup.event("child_exit", n=2, child_pid=os.getpid(), code=0, signal=None, seconds=1.0, newest_step=40,
              progress=True, killed_after_grace=False)
    sup.event("supervisor_exit", code=0, reason="done")
    return {"attempt_1": child.pid, "attempt_2": os.getpid()}


def make_hf_output(out: Path, steps: tuple[int, ...] = (5, 10)) -> None:
    """A Trainer-style output dir: checkpoint-N with weights, config and trainer_state.json."""
    for step in steps:
        ckpt = out / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        save_file({"w": torch.zeros(2, 2)}, str(ckpt / "model.safetensors"))
        (ckpt / "config.json").write_text("{}")
        history = [{"step": s, "loss": 1.0 / s, "learning_rate": 1e-3, "epoch": s / 10} for s in range(1, step + 1)]
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": history}))
