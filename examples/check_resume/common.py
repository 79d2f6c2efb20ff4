"""What the three check-resume examples share: data, model, schedule, one training step, arguments.

The scripts differ only in what they put in the checkpointed state, so `diff exact.py
plain_loader.py` shows the bug that `safepoint check-resume` finds.
"""

from __future__ import annotations

import argparse
import math
import random

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dir", default="runs/check-resume-example", help="run directory for checkpoints")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def build(seed: int) -> tuple[nn.Module, TensorDataset]:
    """A small MLP with dropout and 256 samples: an epoch is 16 batches of 16."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(256, 8)
    y = (x[:, :3].sum(dim=1, keepdim=True) > 0).float()
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 1))
    return model, TensorDataset(x, y)


def warmup_cosine(total: int, warmup: int = 10):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    # A little noise from the python and numpy RNGs too, so a stream left unrestored would show.
    noise = 1e-3 * (random.random() + float(np.random.rand()))
    loss = nn.functional.binary_cross_entropy_with_logits(model(x) + noise, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()
