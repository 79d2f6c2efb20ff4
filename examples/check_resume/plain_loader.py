"""A resume that is NOT exact: a plain shuffled DataLoader has no state, so it is not checkpointed.

After a resume the loader starts a new epoch order from its beginning (and its new iterator draws
a seed from the torch RNG). `safepoint check-resume -- python plain_loader.py` names it.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from common import build, parse_args, train_step, warmup_cosine
from safepoint import CheckpointManager, KeepLast

args = parse_args(__doc__)
model, data = build(args.seed)
loader = DataLoader(data, batch_size=16, shuffle=True)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.steps))
state = {"model": model, "optimizer": opt, "scheduler": sched}  # no data position


def forever(loader: DataLoader):
    while True:
        yield from loader


with CheckpointManager(args.dir, every_steps=50, keep=[KeepLast(2)]) as ckpt:
    start = ckpt.restore(state)
    batches = forever(loader)
    for step in range(start, args.steps):
        loss = train_step(model, opt, *next(batches))
        sched.step()
        ckpt.step(step + 1, state, metrics={"loss": loss})
        if ckpt.should_stop:
            break
