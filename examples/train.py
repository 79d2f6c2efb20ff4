"""A small, deterministic training run that resumes exactly after any crash.

Shuffled data, dropout, AdamW, a warmup + cosine LR schedule and a grad scaler: every piece of
state that makes a resume inexact when it is forgotten. Run it, kill it with ``kill -9`` at any
moment, run it again with the same arguments: it picks up from the newest good checkpoint, and its
final weights are bitwise equal to those of a run that was never interrupted.

    python examples/train.py --dir runs/demo --steps 300 --out final.safetensors
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from safepoint import CheckpointManager, KeepLast, ResumableLoader


def build(seed: int, hidden: int) -> tuple[nn.Module, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 16, generator=g)
    y = (x[:, :4].sum(dim=1, keepdim=True) > 0).float()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, hidden),
                          nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, 1))
    return model, TensorDataset(x, y)


def warmup_cosine(total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="run directory for checkpoints")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=10, help="save every N steps")
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep per step (to leave time for kills)")
    p.add_argument("--out", help="write the final weights here (safetensors)")
    p.add_argument("--async-save", action="store_true", help="save in the background")
    p.add_argument("--crash-at", type=int, help="simulate a crash: os._exit(1) right after this step")
    p.add_argument("--mirror", help="also keep every checkpoint in object storage (s3://bucket/prefix, file://...)")
    args = p.parse_args(argv)

    random.seed(args.seed)
    np.random.seed(args.seed)
    model, data = build(args.seed, args.hidden)
    loader = ResumableLoader(data, batch_size=32, shuffle=True, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.steps, warmup=args.steps // 10))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler, "data": loader}

    with CheckpointManager(args.dir, every_steps=args.every, keep=[KeepLast(args.keep)],
                           async_save=args.async_save, mirror=args.mirror) as ckpt:
        start = ckpt.restore(state)
        print(f"start step {start}", flush=True)
        batches = loader.iter_forever()
        model.train()
        for step in range(start, args.steps):
            x, y = next(batches)
            # Random noise from every RNG stream, so a resume that forgot one would diverge.
            noise = 1e-3 * (random.random() + float(np.random.rand()))
            # (On the logits: added to the loss, a constant would not change a single gradient.)
            loss = nn.functional.binary_cross_entropy_with_logits(model(x) + noise, y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            ckpt.step(step + 1, state, metrics={"loss": loss.item(), "lr": sched.get_last_lr()[0]})
            if args.crash_at == step + 1:
                os._exit(1)
            if args.sleep:
                time.sleep(args.sleep)
            if ckpt.should_stop:
                print(f"preempted: saved step {step + 1}, exiting", flush=True)
                return 0
    if args.out:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)
    print(f"done {args.steps} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
