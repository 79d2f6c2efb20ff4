"""A tiny transformer trained with FSDP2 or DDP under torchrun, checkpointed by safepoint.

The same ``CheckpointManager`` code as a single-process run: every rank writes its shards, rank 0
commits once for the job, a signal on any rank makes every rank save and stop, and the job can
resume with another number of ranks (or in one plain process) from the same checkpoint.

    torchrun --standalone --nproc_per_node=2 examples/train_dist.py --dir runs/dist --mode fsdp
    torchrun --standalone --nproc_per_node=4 examples/train_dist.py --dir runs/dist --mode fsdp  # reshards
    python examples/train_dist.py --dir runs/dist                                                # 1 process

Options used by the tests: ``--fault POINT[:kill] --fault-rank R --fault-step S`` breaks one rank
inside the save of step S; ``--dump-restored`` writes the restored model and optimizer (full,
unsharded) right after ``restore``; ``--log-samples`` records which samples each rank trained on.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from safepoint import CheckpointManager, KeepLast
from safepoint.dist_data import DistributedResumableLoader

VOCAB, DIM, SEQ = 64, 32, 16
# FSDP2 warns that the root returns a view (the head's 3-D output); nothing modifies it in place.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


class TinyLM(nn.Module):
    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(DIM, 4, 2 * DIM, dropout=0.1, batch_first=True)
                                    for _ in range(layers))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


class Tokens(Dataset):
    """Synthetic sequences (a noisy counting pattern); items are (index, tokens)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        self.data = (start + torch.arange(SEQ + 1)) % VOCAB
        noise = torch.rand(self.data.shape, generator=g) < 0.1
        self.data[noise] = torch.randint(0, VOCAB, (int(noise.sum()),), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, self.data[i]


def wrap(model: nn.Module, mode: str) -> nn.Module:
    if not dist.is_initialized():
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Unsharded model and optimizer tensors (on rank 0), keyed as safepoint's consolidated export."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    out = {f"model.{k}": v for k, v in get_model_state_dict(model, options=options).items()}
    for fqn, slots in get_optimizer_state_dict(model, opt, options=options).get("state", {}).items():
        out.update({f"optimizer.state.{fqn}.{k}": v for k, v in slots.items() if isinstance(v, torch.Tensor)})
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True)
    p.add_argument("--mode", choices=("fsdp", "ddp"), default="fsdp")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4, help="per rank")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds per step (leaves time for signals)")
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--out", help="rank 0 writes the final full weights here (safetensors)")
    p.add_argument("--dump-restored", help="rank 0 writes the restored full model+optimizer here")
    p.add_argument("--log-samples", help="each rank appends the sample indices it trains on to <this>.rank<r>")
    p.add_argument("--pid-dir", help="each rank writes its pid to <dir>/rank<r>.pid once started")
    p.add_argument("--fault", help="SAFEPOINT_FAULT value for one rank's save of --fault-step")
    p.add_argument("--fault-rank", type=int, default=0)
    p.add_argument("--fault-step", type=int, default=0)
    args = p.parse_args(argv)

    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = wrap(TinyLM(), args.mode)
    torch.manual_seed(args.seed * 1000 + rank + 1)  # each rank its own dropout stream
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(s, 1000) / 1000)))
    loader = DistributedResumableLoader(Tokens(args.samples, args.seed), batch_size=args.batch_size, seed=args.seed)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "data": loader}

    with CheckpointManager(args.dir, every_steps=args.every, keep=[KeepLast(args.keep)],
                           async_save=args.async_save) as ckpt:
        start = ckpt.restore(state)
        if args.dump_restored:
            restored = full_state(model, opt)
            if rank == 0:
                save_file(restored, args.dump_restored)
        if args.pid_dir:
            Path(args.pid_dir, f"rank{rank}.pid").write_text(str(os.getpid()))
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            print(f"start step {start} world {world}", flush=True)
        samples = open(f"{args.log_samples}.rank{rank}", "a") if args.log_samples else None
        batches = loader.iter_forever()
        model.train()
        for step in range(start, args.steps):
            index, seq = next(batches)
            if samples:
                samples.write(" ".join(map(str, index.tolist())) + "\n")
                samples.flush()
            logits = model(seq[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), seq[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if args.fault and rank == args.fault_rank and step + 1 == args.fault_step:
                os.environ["SAFEPOINT_FAULT"] = args.fault
            ckpt.step(step + 1, state, metrics={"loss": loss.item()})
            if args.sleep:
                time.sleep(args.sleep)
            if ckpt.should_stop:
                print(f"rank {rank} preempted: saved step {step + 1}, exiting", flush=True)
                return 0
    final = full_state(model, opt)
    if args.out and rank == 0:
        save_file({k[len("model."):]: v for k, v in final.items() if k.startswith("model.")}, args.out)
    if rank == 0:
        print(f"done {args.steps} steps", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
