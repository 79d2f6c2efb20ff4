"""Checkpoint tools: diff between checkpoints, and fork a new run from one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from safepoint import CheckpointManager, KeepLast, verify
from safepoint.catalog import read_run_meta
from safepoint.diff import diff_checkpoints
from safepoint.errors import CheckpointNotFound, RunDirectoryError
from safepoint.fork import fork

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "safepoint", *args], env=env, capture_output=True, text=True)


def two_steps(run: Path) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    state = {"model": model}
    with CheckpointManager(run) as ckpt:
        ckpt.restore(state)
        ckpt.save(1, state)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            model[1].weight.add_(0.5)
            model[1].bias[0] -= 2.0
        ckpt.save(2, state)
    return before, {k: v.clone() for k, v in model.state_dict().items()}


def test_diff_reports_exactly_what_changed_and_by_how_much(tmp_path):
    before, after = two_steps(tmp_path)
    changes = {c.name: c for c in diff_checkpoints(tmp_path / "step_00000001", tmp_path / "step_00000002")}
    assert changes["0.weight"].status == changes["0.bias"].status == "same"
    assert changes["1.weight"].status == "changed" and changes["1.weight"].max_abs == pytest.approx(0.5)
    assert changes["1.bias"].max_abs == pytest.approx(2.0)
    expected_rel = ((after["1.bias"] - before["1.bias"]).norm() / before["1.bias"].norm()).item()
    assert changes["1.bias"].rel_norm == pytest.approx(expected_rel)

    done = cli("diff", str(tmp_path / "step_00000001"), str(tmp_path / "step_00000002"), "--json")
    assert done.returncode == 0, done.stderr
    assert {c["name"] for c in json.loads(done.stdout) if c["status"] == "changed"} == {"1.weight", "1.bias"}


def test_diff_names_added_removed_and_reshaped_tensors(tmp_path):
    for name, tensors in {"a": {"x": torch.zeros(2), "gone": torch.ones(1), "w": torch.zeros(2, 2)},
                          "b": {"x": torch.zeros(2), "new": torch.ones(1), "w": torch.zeros(3, 2)}}.items():
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
    status = {c.name: (c.status, c.detail) for c in diff_checkpoints(tmp_path / "a", tmp_path / "b")}
    assert status == {"x": ("same", ""), "gone": ("removed", ""), "new": ("added", ""), "w": ("shape", "(2, 2) -> (3, 2)")}
    assert cli("diff", str(tmp_path / "a"), str(tmp_path / "missing")).returncode == 2


def test_fork_shares_bytes_records_lineage_and_resumes(tmp_path):
    source, trial = tmp_path / "source", tmp_path / "trial"
    _, after = two_steps(source)
    done = cli("fork", str(source), "2", str(trial))
    assert done.returncode == 0, done.stderr
    forked = trial / "step_00000002"
    verify(forked)
    original = source / "step_00000002" / "model.safetensors"
    assert os.stat(forked / "model.safetensors").st_ino == os.stat(original).st_ino  # no bytes copied
    meta, parent = read_run_meta(trial), read_run_meta(source)
    assert meta["run_id"] != parent["run_id"]
    assert meta["forked_from"] == {"run_dir": str(source.resolve()), "run_id": parent["run_id"], "step": 2}
    assert 2 in meta["pins"]

    shutil.rmtree(source)  # the trial keeps its own links
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with CheckpointManager(trial, keep=[KeepLast(1)]) as ckpt:
        assert ckpt.restore({"model": model}) == 2
        assert all(torch.equal(model.state_dict()[k], after[k]) for k in after)
        ckpt.save(3, {"model": model})
        ckpt.save(4, {"model": model})
        assert [c.step for c in ckpt.list()] == [2, 4]  # the fork point is pinned


def test_fork_of_a_delta_brings_its_base_and_resumes_exactly(tmp_path):
    source, trial = tmp_path / "source", tmp_path / "trial"
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    with CheckpointManager(source, delta_every=3, keep=None) as ckpt:
        for step in (1, 2):
            with torch.no_grad():
                model.weight.mul_(1.01)
            ckpt.save(step, {"model": model})
    assert verify(source / "step_00000002").parent == 1  # step 2 is a delta on step 1
    fork(source, 2, trial)
    assert sorted(p.name for p in trial.glob("step_*")) == ["step_00000001", "step_00000002"]
    shutil.rmtree(source)
    fresh = torch.nn.Linear(16, 16)
    with CheckpointManager(trial) as ckpt:
        assert ckpt.restore({"model": fresh}) == 2
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)


def test_fork_refuses_missing_steps_and_non_empty_targets(tmp_path):
    two_steps(tmp_path / "run")
    with pytest.raises(CheckpointNotFound):
        fork(tmp_path / "run", 7, tmp_path / "new")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(RunDirectoryError):
        fork(tmp_path / "run", 1, tmp_path / "busy")
    assert cli("fork", str(tmp_path / "run"), "1", str(tmp_path / "busy")).returncode == 2


def test_on_commit_metrics_feed_keep_best_and_failures_do_not_fail_saves(tmp_path):
    from safepoint import KeepBest, SafepointWarning

    scores = {1: 0.9, 2: 0.2, 3: 0.5, 4: 0.7}
    seen = []

    def evaluate(info):
        seen.append(info.step)
        verify(info.path)  # the hook sees a committed checkpoint
        if info.step == 5:
            raise RuntimeError("evaluator crashed")
        return {"eval_loss": scores[info.step]}

    state = {"w": {"t": torch.zeros(3)}}
    with CheckpointManager(tmp_path, keep=[KeepBest(1, "eval_loss"), KeepLast(1)], on_commit=evaluate) as ckpt:
        ckpt.restore(state)
        for step in range(1, 5):
            ckpt.save(step, state)
        assert [c.step for c in ckpt.list()] == [2, 4]  # the best by the hook's metric survives
        assert ckpt.list()[0].metrics["eval_loss"] == 0.2
        with pytest.warns(SafepointWarning, match="evaluator crashed"):
            ckpt.save(5, state)
        assert ckpt.latest().step == 5
    assert seen == [1, 2, 3, 4, 5]
