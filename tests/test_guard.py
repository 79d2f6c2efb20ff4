"""Rollback on divergence, in a real training loop with a poisoned batch at a known place."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import TensorDataset

from safepoint import (CheckpointManager, DivergenceError, DivergenceGuard, KeepLast, ResumableLoader,
                       SafepointWarning)


def poisoned_run(tmp_path, *, poison: list[int], guard: DivergenceGuard, total: int = 30):
    """Train one epoch (32 batches of 8); ``poison`` are positions in the epoch's shuffled order."""
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x.sum(dim=1, keepdim=True)
    loader = ResumableLoader(TensorDataset(x, y), batch_size=8, shuffle=True, seed=0)
    order = loader.sampler.epoch_order(0)
    x[[order[i] for i in poison]] = float("nan")  # NaN loss, NaN weights
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "data": loader}
    steps_seen = []
    with CheckpointManager(tmp_path, every_steps=5, keep=[KeepLast(2)], guard=guard) as ckpt:
        step = ckpt.restore(state)
        batches = loader.iter_forever()
        while step < total:
            xb, yb = next(batches)
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            steps_seen.append(step)
            ckpt.step(step, state, metrics={"loss": loss})
            if ckpt.rolled_back_to is not None:
                step = ckpt.rolled_back_to
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    return model, opt, events, steps_seen


def test_nan_from_a_bad_batch_rolls_back_skips_it_and_finishes(tmp_path):
    guard = DivergenceGuard(metric="loss", lr_factor=0.5)
    with pytest.warns(SafepointWarning, match="rolled back"):
        model, opt, events, steps = poisoned_run(tmp_path, poison=[100], guard=guard)  # batch 13
    assert all(torch.isfinite(p).all() for p in model.parameters())
    rollbacks = [e for e in events if e["event"] == "rollback"]
    assert len(rollbacks) == 1 and guard.rollbacks == 1
    rb = rollbacks[0]
    assert rb["reason"] == "loss is nan" and rb["to_step"] < rb["from_step"]
    assert (rb["from_step"], rb["to_step"], rb["skipped_batches"]) == (13, 10, 3)
    assert steps[-1] == 30 and steps.count(rb["to_step"] + 1) == 2  # those steps ran twice
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)  # lowered, and kept by the scheduler


def test_spike_detection_and_the_rollback_limit(tmp_path):
    guard = DivergenceGuard(spike_factor=2.0, window=4)
    for value in (1.0, 1.1, 0.9, 1.0):
        assert guard.check(value) is None
    assert "recent median" in guard.check(5.0)
    assert guard.check(1.05) is None
    with pytest.raises(ValueError):
        DivergenceGuard(spike_factor=0.5)

    # Poison everywhere after batch 10: the run keeps diverging and must stop, clearly.
    with pytest.warns(SafepointWarning), pytest.raises(DivergenceError, match="after 1 rollback"):
        poisoned_run(tmp_path, poison=list(range(80, 256, 3)), guard=DivergenceGuard(max_rollbacks=1))
