"""A training loop whose resume is exact: `safepoint check-resume -- python exact.py` says so.

Model, optimizer, LR scheduler and a ResumableLoader are in the state; safepoint adds the RNGs.
"""

from __future__ import annotations

import torch

from common import build, parse_args, train_step, warmup_cosine
from safepoint import CheckpointManager, KeepLast, ResumableLoader

args = parse_args(__doc__)
model, data = build(args.seed)
loader = ResumableLoader(data, batch_size=16, shuffle=True, seed=args.seed)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.steps))
state = {"model": model, "optimizer": opt, "scheduler": sched, "data": loader}

with CheckpointManager(args.dir, every_steps=50, keep=[KeepLast(2)]) as ckpt:
    start = ckpt.restore(state)
    batches = loader.iter_forever()
    for step in range(start, args.steps):
        loss = train_step(model, opt, *next(batches))
        sched.step()
        ckpt.step(step + 1, state, metrics={"loss": loss})
        if ckpt.should_stop:
            break
