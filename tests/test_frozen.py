"""Trainable-only checkpoints: small, exact, and never applied to a different backbone."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from safepoint import CheckpointManager, IncompatibleState


def model_with_frozen_backbone(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 4))
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(8, 64)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_only_trainable_tensors_are_written_and_resume_is_exact(tmp_path):
    model = model_with_frozen_backbone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    state = {"model": model, "optimizer": opt}
    with CheckpointManager(tmp_path, trainable_only=True) as ckpt:
        ckpt.restore(state)
        train(model, opt, 3)
        info = ckpt.save(3, state)
    saved = load_file(info.path / "model.safetensors")
    assert "0.weight" not in saved and "0.bias" not in saved
    assert {"1.weight", "1.running_mean", "1.num_batches_tracked", "2.weight", "2.bias"} <= set(saved)
    full = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    frozen = sum(p.numel() * p.element_size() for p in model[0].parameters())
    assert sum(v.numel() * v.element_size() for v in saved.values()) == full - frozen
    rng = torch.get_rng_state()
    train(model, opt, 2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    # A fresh process would build the same frozen backbone (e.g. from_pretrained) and restore.
    resumed = model_with_frozen_backbone()
    resumed_opt = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    with CheckpointManager(tmp_path, trainable_only=True) as ckpt:
        assert ckpt.restore({"model": resumed, "optimizer": resumed_opt}) == 3
    torch.set_rng_state(rng)
    train(resumed, resumed_opt, 2)
    assert all(torch.equal(resumed.state_dict()[k], expected[k]) for k in expected)


def test_a_different_backbone_is_refused_and_left_untouched(tmp_path):
    model = model_with_frozen_backbone(seed=0)
    with CheckpointManager(tmp_path, trainable_only=True) as ckpt:
        ckpt.restore({"model": model})
        ckpt.save(1, {"model": model})
    other = model_with_frozen_backbone(seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with CheckpointManager(tmp_path) as ckpt:
        with pytest.raises(IncompatibleState, match="frozen weights .* differ"):
            ckpt.restore({"model": other})
    assert all(torch.equal(other.state_dict()[k], before[k]) for k in before)
