"""Shared fixtures: running ``examples/train.py`` as a real subprocess, and comparing weights bitwise."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
TRAIN = ROOT / "examples" / "train.py"

if importlib.util.find_spec("safepoint") is None:  # run without PYTHONPATH=src or an install
    sys.path.insert(0, str(SRC))

_START = re.compile(r"^start step (\d+)$")


def train_env(fault: str | None = None) -> dict[str, str]:
    """The environment every train.py child gets: this checkout's ``src`` first, one CPU thread.

    One thread keeps the numerics identical between runs (and between a run and its reference)
    and keeps several children from fighting over the cores.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env.pop("SAFEPOINT_FAULT", None)
    if fault is not None:
        env["SAFEPOINT_FAULT"] = fault
    return env


class TrainRun:
    """One ``python examples/train.py ...`` child, its stdout read line by line as it comes."""

    def __init__(self, run_dir: Path, *, steps: int, every: int, sleep: float = 0.0, out: Path | None = None,
                 fault: str | None = None, extra: tuple[str, ...] = ()) -> None:
        self.cmd = [sys.executable, str(TRAIN), "--dir", str(run_dir), "--steps", str(steps), "--every", str(every)]
        self.cmd += extra
        if sleep:
            self.cmd += ["--sleep", repr(sleep)]
        if out is not None:
            self.cmd += ["--out", str(out)]
        self.fault = fault
        self.lines: list[str] = []
        self.err: list[str] = []
        self.start_step: int | None = None
        self._started = threading.Event()  # set on "start step N", or when stdout closes first
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=train_env(fault), cwd=ROOT)
        self._readers = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._readers:
            t.start()

    def _read_out(self) -> None:
        try:
            for line in self.proc.stdout:
                line = line.rstrip("\n")
                self.lines.append(line)
                m = _START.match(line)
                if m and self.start_step is None:
                    self.start_step = int(m.group(1))
                    self._started.set()
        finally:
            self._started.set()

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self.err.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_started(self, timeout: float | None = 120) -> int | None:
        """The step it printed on start; None if it did not print one within ``timeout`` (or exited)."""
        self._started.wait(timeout)
        return self.start_step

    def send(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    def wait(self, timeout: float = 120) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
            pytest.fail(f"train.py did not exit within {timeout}s\n{self.describe()}")
        for t in self._readers:
            t.join(10)
        return rc

    def stderr(self) -> str:
        return "".join(self.err)

    def describe(self) -> str:
        tail = "".join(self.err[-30:])
        return (f"command: {' '.join(self.cmd)}\nfault: {self.fault}\nreturncode: {self.proc.returncode}\n"
                f"stdout: {self.lines}\nstderr (tail):\n{tail}")

    def cleanup(self) -> None:
        self.kill()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def spawn_train():
    """Factory for ``TrainRun`` children; any still running when the test ends is SIGKILLed."""
    runs: list[TrainRun] = []

    def spawn(run_dir: Path, **kwargs) -> TrainRun:
        run = TrainRun(run_dir, **kwargs)
        runs.append(run)
        return run

    try:
        yield spawn
    finally:
        for run in runs:
            run.cleanup()


class Reference:
    """Final weights of uninterrupted runs that never save (``--every`` beyond the last step).

    A run that never checkpoints is the strictest reference: equality with it proves that resuming
    is exact and that saving itself does not perturb training. Started in the background on first
    ask, shared by the whole session, one per ``steps``.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.runs: dict[int, TrainRun] = {}

    def start(self, steps: int) -> None:
        if steps not in self.runs:
            self.runs[steps] = TrainRun(self.base / f"ref-{steps}", steps=steps, every=10**9,
                                        out=self.base / f"ref-{steps}.safetensors")

    def path(self, steps: int) -> Path:
        self.start(steps)
        run = self.runs[steps]
        rc = run.wait(300)
        assert rc == 0 and run.lines[-1:] == [f"done {steps} steps"], f"reference run failed\n{run.describe()}"
        assert not [p for p in (self.base / f"ref-{steps}").iterdir() if p.name.startswith("step_")], \
            "the reference run saved a checkpoint although --every is beyond its last step"
        return self.base / f"ref-{steps}.safetensors"

    def cleanup(self) -> None:
        for run in self.runs.values():
            run.cleanup()


@pytest.fixture(scope="session")
def reference_weights(tmp_path_factory):
    ref = Reference(tmp_path_factory.mktemp("reference"))
    try:
        yield ref
    finally:
        ref.cleanup()


def assert_same_weights(got: Path, expected: Path) -> None:
    """Both safetensors files hold the same tensors, bit for bit (dtype, shape and every byte)."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(got)), load_file(str(expected))
    assert sorted(a) == sorted(b), f"different tensor names: {sorted(a)} vs {sorted(b)}"
    differ = []
    for name in sorted(a):
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            differ.append(f"{name}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}")
        elif not torch.equal(x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8)):
            diff = (x.double() - y.double()).abs().max().item()
            differ.append(f"{name}: bytes differ (max abs diff {diff:.3g})")
    assert not differ, f"{got} is not bitwise equal to {expected}:\n  " + "\n  ".join(differ)


@pytest.fixture
def same_weights():
    """``same_weights(got, expected)`` asserts two safetensors weight files are bitwise equal."""
    return assert_same_weights


def reference_hash(data: bytes, like: str) -> str:
    """The hash of ``data`` computed with the reference library of the algorithm ``like`` names."""
    if like.startswith("blake3:"):
        import blake3

        return "blake3:" + blake3.blake3(data).hexdigest()
    import hashlib

    return hashlib.sha256(data).hexdigest()
