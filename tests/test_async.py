"""save_async: staged copies, one writer, errors that surface, and every other feature still on."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from safepoint import CheckpointManager, KeepLast, SaveHandle, verify
from safepoint.faults import ENV, InjectedFault


def make_state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt}


def test_save_async_commits_the_values_at_the_call_even_if_training_mutates_them(tmp_path):
    state = make_state()
    model, opt = state["model"], state["optimizer"]
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_moment = opt.state[model[0].weight]["exp_avg"].clone()
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.restore(state)
        handle = ckpt.save_async(1, state)
        # Training goes on at once and changes everything in place.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(100.0)
        opt.state[model[0].weight]["exp_avg"].mul_(-3)
        info = handle.result(timeout=30)
    assert isinstance(handle, SaveHandle) and handle.done()
    assert info.step == 1
    verify(info.path)
    saved = load_file(info.path / "model.safetensors")
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    moments = load_file(info.path / "optimizer.safetensors")
    assert any(torch.equal(t, expected_moment) for t in moments.values())


def test_staging_buffers_are_reused_across_saves(tmp_path):
    state = make_state()
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.restore(state)
        ckpt.save_async(1, state).result()
        first = {k: b.data_ptr() for k, b in ckpt._staging._buffers.items()}
        ckpt.save_async(2, state).result()
        second = {k: b.data_ptr() for k, b in ckpt._staging._buffers.items()}
    assert first and first == second
    tensor_bytes = sum(t.numel() * t.element_size() for t in state["model"].state_dict().values())
    assert ckpt._staging.nbytes >= tensor_bytes


def test_next_save_waits_for_the_one_in_flight(tmp_path, monkeypatch):
    state = make_state()
    gate = threading.Event()
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.restore(state)
        original = ckpt._write

        def slow_write(*args, **kwargs):
            gate.wait(10)
            return original(*args, **kwargs)

        monkeypatch.setattr(ckpt, "_write", slow_write)
        first = ckpt.save_async(1, state)
        assert not first.done()
        threading.Timer(0.2, gate.set).start()
        second = ckpt.save_async(2, state)  # blocks until the first is committed
        assert first.done()
        second.result()
        assert [c.step for c in ckpt.list()] == [1, 2]


def test_background_error_surfaces_on_the_next_call_and_nothing_partial_is_listed(tmp_path, monkeypatch):
    state = make_state()
    ckpt = CheckpointManager(tmp_path)
    ckpt.restore(state)
    ckpt.save(1, state)
    monkeypatch.setenv(ENV, "before_rename")
    handle = ckpt.save_async(2, state)
    while not handle.done():  # done() does not count as seeing the error
        time.sleep(0.01)
    monkeypatch.delenv(ENV)
    with pytest.raises(InjectedFault):
        ckpt.save_async(3, state)
    assert [c.step for c in ckpt.list()] == [1]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    ckpt.save_async(3, state).result()
    assert [c.step for c in ckpt.list()] == [1, 3]
    ckpt.close()


def test_error_already_seen_through_the_handle_is_not_raised_twice(tmp_path, monkeypatch):
    state = make_state()
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.restore(state)
        monkeypatch.setenv(ENV, "after_data")
        handle = ckpt.save_async(1, state)
        with pytest.raises(InjectedFault):
            handle.result()
        monkeypatch.delenv(ENV)
        ckpt.save_async(2, state).result()
        assert [c.step for c in ckpt.list()] == [2]


def test_close_and_wait_raise_a_background_error(tmp_path, monkeypatch):
    state = make_state()
    ckpt = CheckpointManager(tmp_path)
    ckpt.restore(state)
    monkeypatch.setenv(ENV, "before_manifest")
    ckpt.save_async(1, state)
    with pytest.raises(InjectedFault):
        ckpt.close()
    # The lock was released all the same.
    monkeypatch.delenv(ENV)
    with CheckpointManager(tmp_path) as again:
        assert again.list() == []
        again.restore(state)
        again.save_async(1, state)
        assert again.wait().step == 1


def test_async_step_with_retention_keeps_only_committed_checkpoints(tmp_path):
    state = make_state()
    with CheckpointManager(tmp_path, every_steps=2, keep=[KeepLast(2)], async_save=True) as ckpt:
        ckpt.restore(state)
        saved = [s for s in range(1, 11) if ckpt.step(s, state)]
        ckpt.wait()
        assert saved == [2, 4, 6, 8, 10]
        assert [c.step for c in ckpt.list()] == [8, 10]
    for c in ckpt.list():
        verify(c.path)


def test_signal_during_async_run_commits_synchronously_and_stops(tmp_path):
    state = make_state()
    with CheckpointManager(tmp_path, every_steps=2, async_save=True) as ckpt:
        ckpt.restore(state)
        ckpt.step(2, state)  # an async save in flight
        os.kill(os.getpid(), signal.SIGUSR1)
        assert ckpt.step(3, state) is True
        assert ckpt.should_stop
        # The signal save is committed when step() returns, after the one in flight.
        assert [c.step for c in ckpt.list()] == [2, 3]
        verify(ckpt.latest().path)
