"""Async saves with a real Trainer: training goes on while ``checkpoint-N`` is written, nothing weakens.

The tiny Llama of ``examples/hf_train.py`` trains in this process for the quick checks (its
``build_trainer``), and as a subprocess where a real kill -9 is needed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra (transformers, accelerate) is not installed")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from safetensors.torch import load_file  # noqa: E402
from test_hf import SCRIPT, run  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from safepoint import verify  # noqa: E402
from safepoint.faults import ENV, InjectedFault  # noqa: E402
from safepoint.hf import SafepointCallback, latest_checkpoint  # noqa: E402
from safepoint.integrations.hf_async import STAGING, fast_staging_dir  # noqa: E402


def _load_example() -> Any:
    spec = importlib.util.spec_from_file_location("hf_train_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


@pytest.fixture
def one_thread():
    """One intra-op thread while a test trains: runs compared bit for bit do the same arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build(out: Path, *, steps: int, async_save: bool = True, callbacks: tuple[TrainerCallback, ...] = (),
          **kwargs: Any) -> tuple[Any, SafepointCallback]:
    """A Trainer of the example's run with a ``SafepointCallback`` last; ``kwargs`` as for build_trainer."""
    kwargs.setdefault("save_steps", 4)
    callback = SafepointCallback(async_save=async_save, **kwargs.pop("safepoint", {}))
    trainer = example.build_trainer(out, steps=steps, callbacks=[*callbacks, callback], **kwargs)
    return trainer, callback


def train(out: Path, *, steps: int, resume: str | None = None, **kwargs: Any) -> tuple[Any, SafepointCallback]:
    trainer, callback = build(out, steps=steps, **kwargs)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


def weights(trainer: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_bitwise_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    differ = [k for k in got if not torch.equal(got[k], expected[k])]
    assert not differ, f"tensors differ: {differ}"


def assert_no_staging_left(out: Path) -> None:
    leftovers = [p for p in (out / STAGING, fast_staging_dir(out)) if p.exists()]
    assert not leftovers, f"staging debris left behind: {leftovers}"


class SeeOnSave(TrainerCallback):
    """Placed before SafepointCallback: what exists the moment the Trainer's save has returned."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.seen: dict[int, dict[str, bool]] = {}
        self.where: dict[int, str] = {}

    def on_save(self, args, state, control, **kwargs):
        name = f"checkpoint-{state.global_step}"
        ram, disk = (fast_staging_dir(self.out) / name).is_dir(), (self.out / STAGING / name).is_dir()
        self.seen[state.global_step] = {"final": (self.out / name).exists(), "staged": ram or disk}
        self.where[state.global_step] = "ram" if ram else "disk" if disk else "nowhere"


class BusyWriterAtTheEnd(TrainerCallback):
    """Placed before SafepointCallback: the last write queues behind half a second of other work, and
    whether that checkpoint is committed is recorded when the Trainer logs its final metrics (right
    before it loads the best checkpoint)."""

    def __init__(self, out: Path, steps: int) -> None:
        self.out, self.steps = out, steps
        self.safepoint: SafepointCallback | None = None
        self.committed_at_final_log: bool | None = None

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.steps:
            self.safepoint._staging.submit(state.global_step, lambda: time.sleep(0.5))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "train_runtime" in logs:
            self.committed_at_final_log = (self.out / f"checkpoint-{self.steps}" / "manifest.json").exists()


def test_async_saves_commit_every_checkpoint_and_train_exactly_like_sync_saves(tmp_path, one_thread):
    best = dict(evaluate=True, eval_strategy="steps", eval_steps=4, load_best_model_at_end=True,
                metric_for_best_model="eval_loss")
    sync, _ = train(tmp_path / "sync", steps=12, async_save=False, **best)
    out = tmp_path / "async"
    seen, busy = SeeOnSave(out), BusyWriterAtTheEnd(out, 12)
    trainer, callback = build(out, steps=12, callbacks=(seen, busy), **best)
    busy.safepoint = callback
    trainer.train()

    # The Trainer's save went to the staging directory: checkpoint-N did not exist when it returned.
    assert seen.seen == {n: {"final": False, "staged": True} for n in (4, 8, 12)}
    # The last save is committed before the Trainer goes on to load the best checkpoint.
    assert busy.committed_at_final_log is True
    # Same training, same checkpoints: every one committed, verified, with the Trainer's files.
    assert_bitwise_equal(weights(trainer), weights(sync))
    for n in (4, 8, 12):
        manifest = verify(out / f"checkpoint-{n}")
        assert manifest.step == n
        expected = {p.name for p in (tmp_path / "sync" / f"checkpoint-{n}").iterdir()}
        assert {p.name for p in (out / f"checkpoint-{n}").iterdir()} == expected
    # load_best_model_at_end found the best checkpoint under output_dir, not in the staging directory.
    best_dir = Path(trainer.state.best_model_checkpoint)
    assert best_dir.parent == out and best_dir.name == Path(sync.state.best_model_checkpoint).name
    saved_state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    assert Path(saved_state["best_model_checkpoint"]).parent == out
    assert_no_staging_left(out)
    assert not callback.should_stop


@pytest.mark.parametrize("steps", [8, 4], ids=["at-next-save", "at-train-end"])
def test_a_failed_async_write_is_raised_at_the_next_save_or_at_the_end(tmp_path, monkeypatch, steps):
    monkeypatch.setenv(ENV, "before_manifest")  # every background commit fails before its manifest
    out = tmp_path / "run"
    trainer, callback = build(out, steps=steps)
    try:
        with pytest.raises(InjectedFault):
            trainer.train()
        # Training went on after the save at step 4 was handed over, up to the next save or the end.
        assert trainer.state.global_step == steps
    finally:
        monkeypatch.delenv(ENV)
        callback.on_train_end(trainer.args, trainer.state, trainer.control)  # release the lock and signals
    assert not (out / "checkpoint-4").exists()
    assert latest_checkpoint(out) is None
    assert_no_staging_left(out)


class SigtermAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_then_stops_and_the_resume_is_bitwise_exact(tmp_path, one_thread):
    ref, _ = train(tmp_path / "ref", steps=12, async_save=False)
    out = tmp_path / "run"
    trainer, callback = train(out, steps=12, callbacks=(SigtermAt(6),))
    assert callback.should_stop and trainer.state.global_step == 6
    verify(out / "checkpoint-4")
    verify(out / "checkpoint-6")  # committed before train() returned
    events = [json.loads(line)["event"] for line in (out / "events.jsonl").read_text().splitlines()]
    assert "preempted" in events

    resume = latest_checkpoint(out)
    assert resume == str(out / "checkpoint-6")
    resumed, _ = train(out, steps=12, resume=resume)
    assert_bitwise_equal(weights(resumed), weights(ref))
    assert_no_staging_left(out)


@pytest.mark.slow
def test_kill_9_during_an_async_write_then_resume_is_bitwise_exact(tmp_path):
    run("--out-dir", str(tmp_path / "ref"), "--steps", "16", "--weights", str(tmp_path / "ref.safetensors"))

    out = tmp_path / "crashy"
    killed = run("--out-dir", str(out), "--steps", "16", "--async-save", "--kill-in-save", "12", check=False)
    assert killed.returncode == -9
    # Killed on the writer thread before the manifest: checkpoint-12 was never visible at all.
    assert not (out / "checkpoint-12").exists()
    assert (out / STAGING / "checkpoint-12").is_dir()
    assert latest_checkpoint(out) == str(out / "checkpoint-8")

    resumed = run("--out-dir", str(out), "--steps", "16", "--async-save",
                  "--weights", str(tmp_path / "got.safetensors"))
    assert f"resume from {out / 'checkpoint-8'}" in resumed.stdout
    ref, got = load_file(tmp_path / "ref.safetensors"), load_file(tmp_path / "got.safetensors")
    assert_bitwise_equal(got, ref)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-16"]  # KeepLast(2)
    for path in out.glob("checkpoint-*"):
        verify(path)
    assert_no_staging_left(out)  # the debris of the killed run was removed, in RAM too
