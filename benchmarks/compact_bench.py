#!/usr/bin/env python
"""Smaller checkpoints: size and save/restore time of zstd, XOR deltas and 8-bit moments vs. plain.

    python benchmarks/compact_bench.py [--layers 6] [--width 384] [--reps 3] [--out benchmarks/results]

A full fine-tuning-like state: a small causal transformer (fp32, or --dtype bf16) with AdamW,
trained for --warmup steps on a synthetic bigram language (the "base" state), then --delta-steps
more steps (the "later" state). Every variant saves the later state into a fresh run directory;
the delta variants first save the base state there, so the later save is a delta against it.
Reported per variant (median of --reps, warm page cache: files were just written): bytes on disk
of the later checkpoint, save time (``manager.save``, fsync included), restore time
(``manager.restore(step=...)`` into the same objects: every file verified, a delta's base read
too), each as a ratio to plain. Then the loss over --resume-steps steps after restoring the
8-bit checkpoint vs. the full-precision one, on the same batches (max / mean absolute difference).

Writes ``<out>/compact.json`` and ``<out>/compact.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from safepoint import CheckpointManager  # noqa: E402
from safepoint.manifest import read_manifest  # noqa: E402

warnings.filterwarnings("ignore")

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "zstd": {"compress": "zstd"},
    "delta (plain base)": {"delta_every": 1000},
    "delta + zstd base": {"delta_every": 1000, "compress": "zstd"},
    "8-bit moments": {"quantize_optimizer": True},
    "8-bit moments + zstd": {"quantize_optimizer": True, "compress": "zstd"},
    "8-bit + delta + zstd": {"quantize_optimizer": True, "delta_every": 1000, "compress": "zstd"},
}


class TinyLM(nn.Module):
    def __init__(self, vocab: int, width: int, layers: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(seq, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, max(1, width // 64), 4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        h = self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
        return self.head(self.norm(h))


class Bigram:
    """A synthetic language: tokens follow a fixed random bigram table with a few likely successors."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(vocab, vocab, generator=g) * 3
        self.probs = torch.softmax(logits, dim=1)
        self.vocab = vocab

    def batch(self, step: int, batch: int, seq: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(10_000 + step)
        out = torch.empty(batch, seq, dtype=torch.long)
        out[:, 0] = torch.randint(0, self.vocab, (batch,), generator=g)
        for t in range(1, seq):
            out[:, t] = torch.multinomial(self.probs[out[:, t - 1]], 1, generator=g).squeeze(1)
        return out


def train(model: nn.Module, opt: torch.optim.Optimizer, data: Bigram, steps: range, args: argparse.Namespace) -> list[float]:
    losses = []
    for step in steps:
        x = data.batch(step, args.batch, args.seq)
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, data.vocab), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def checkpoint_bytes(path: Path) -> dict[str, int]:
    manifest = read_manifest(path)
    return {name: rec.size for name, rec in manifest.files.items()} | {"manifest.json": (path / "manifest.json").stat().st_size}


def entry_of(file_name: str) -> str:
    return file_name.split(".")[0]


def measure_once(row: dict[str, Any], state: dict[str, Any], base_sd: dict[str, Any], later_sd: dict[str, Any],
                 args: argparse.Namespace, run: Path, *, keep: bool) -> None:
    """Save the later state (after the base, for delta variants) and restore it; record into ``row``."""
    options = row["options"]
    with CheckpointManager(run, signals=(), **options) as ckpt:
        ckpt.restore(state)
        if options.get("delta_every"):
            load(state, base_sd)
            ckpt.save(args.warmup, state)
        load(state, later_sd)
        started = time.perf_counter()
        info = ckpt.save(args.warmup + args.delta_steps, state)
        save_s = time.perf_counter() - started
    with CheckpointManager(run, signals=()) as ckpt:
        started = time.perf_counter()
        ckpt.restore(state, step=args.warmup + args.delta_steps)
        restore_s = time.perf_counter() - started
    sizes = checkpoint_bytes(info.path)
    shutil.rmtree(run)
    if not keep:
        return
    row["save_s"].append(save_s)
    row["restore_s"].append(restore_s)
    row["bytes"] = sum(sizes.values())
    row["files"] = sizes
    row["delta_of"] = info.parent
    row["per_entry"] = {}
    for file_name, size in sizes.items():
        key = entry_of(file_name) if entry_of(file_name) in ("model", "optimizer") else "other"
        row["per_entry"][key] = row["per_entry"].get(key, 0) + size


def load(state: dict[str, Any], sd: dict[str, Any]) -> None:
    state["model"].load_state_dict(sd["model"])
    state["optimizer"].load_state_dict(copy.deepcopy(sd["optimizer"]))


def loss_after_resume(variant: dict[str, Any], later_sd: dict[str, Any], build: Any, data: Bigram,
                      args: argparse.Namespace, scratch: Path) -> list[float]:
    model, opt = build()
    state = {"model": model, "optimizer": opt}
    run = scratch / f"resume-{len(os.listdir(scratch))}"
    with CheckpointManager(run, signals=(), **variant) as ckpt:
        ckpt.restore(state)
        load(state, later_sd)
        ckpt.save(1, state)
    model, opt = build(seed=123)  # a fresh process would start from other weights
    state = {"model": model, "optimizer": opt}
    with CheckpointManager(run, signals=()) as ckpt:
        ckpt.restore(state)
    shutil.rmtree(run)
    start = args.warmup + args.delta_steps
    return train(model, opt, data, range(start, start + args.resume_steps), args)


def run_setup(dtype_name: str, lr: float, args: argparse.Namespace) -> dict[str, Any]:
    """Train one state, measure every variant on it (reps interleaved), and the 8-bit resume."""
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    data = Bigram(args.vocab)

    def build(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = TinyLM(args.vocab, args.width, args.layers, args.seq).to(dtype)
        return model, torch.optim.AdamW(model.parameters(), lr=lr)

    model, opt = build()
    state = {"model": model, "optimizer": opt}
    warm_losses = train(model, opt, data, range(args.warmup), args)
    base_sd = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict())}
    train(model, opt, data, range(args.warmup, args.warmup + args.delta_steps), args)
    later_sd = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict())}
    params = sum(p.numel() for p in model.parameters())
    tensor_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + sum(
        t.numel() * t.element_size() for s in opt.state_dict()["state"].values() for t in s.values()
        if isinstance(t, torch.Tensor))
    print(f"{dtype_name}, lr {lr}: {params / 1e6:.1f}M params, state {tensor_bytes / 1e6:.0f} MB; loss "
          f"{warm_losses[0]:.3f} -> {warm_losses[-1]:.3f} in {args.warmup} steps", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="compact-bench-", dir=args.dir))
    load_before = os.getloadavg()[0]
    try:
        rows = {name: {"variant": name, "options": options, "save_s": [], "restore_s": []}
                for name, options in VARIANTS.items()}
        for rep in range(args.reps + 1):  # variants interleaved, so machine noise spreads over all; rep 0 warms up
            for name, options in VARIANTS.items():
                measure_once(rows[name], state, base_sd, later_sd, args, scratch / f"{rep}-{len(os.listdir(scratch))}",
                             keep=rep > 0)
        for row in rows.values():
            print(f"  {row['variant']:24s} {row['bytes'] / 1e6:8.1f} MB  save {statistics.median(row['save_s']):.3f}s  "
                  f"restore {statistics.median(row['restore_s']):.3f}s", flush=True)
        full = loss_after_resume({}, later_sd, build, data, args, scratch)
        lossy = loss_after_resume({"quantize_optimizer": True}, later_sd, build, data, args, scratch)
        load(state, later_sd)  # the run that never stopped, for reference
        start = args.warmup + args.delta_steps
        uninterrupted = train(model, opt, data, range(start, start + args.resume_steps), args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    diffs = [abs(a - b) for a, b in zip(full, lossy)]
    return {"dtype": dtype_name, "lr": lr, "params": params, "tensor_bytes": tensor_bytes,
            "warmup_loss": [warm_losses[0], warm_losses[-1]], "rows": list(rows.values()),
            "load_average": [load_before, os.getloadavg()[0]],
            "resume": {"full": full, "8bit": lossy, "full_equals_uninterrupted": full == uninterrupted, "max_abs_diff": max(diffs), "mean_abs_diff": statistics.mean(diffs),
                       "mean_loss": statistics.mean(full)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--setups", default="fp32:3e-4,bf16:2e-5",
                   help="comma-separated dtype:lr pairs (the model's and so Adam's dtype; AdamW's lr)")
    p.add_argument("--warmup", type=int, default=40, help="steps before the base checkpoint")
    p.add_argument("--delta-steps", type=int, default=10, help="steps between the base and the later checkpoint")
    p.add_argument("--resume-steps", type=int, default=50, help="steps compared after resuming (8-bit vs full)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", help="scratch directory (on the disk you checkpoint to)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--quick", action="store_true", help="a smoke run: small model, 1 rep")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.width, args.reps, args.warmup, args.resume_steps = 2, 128, 1, 5, 10
    setups = []
    for spec in args.setups.split(","):
        dtype_name, _, lr = spec.partition(":")
        if dtype_name not in ("fp32", "bf16") or not lr:
            p.error(f"--setups: {spec!r} is not dtype:lr with dtype fp32 or bf16")
        setups.append(run_setup(dtype_name, float(lr), args))
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "dir")}, "setups": setups,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compact.json").write_text(json.dumps(result, indent=1))
    markdown = render(result)
    (out / "compact.md").write_text(markdown)
    print(markdown)
    return 0


def render(r: dict[str, Any]) -> str:
    c = r["config"]
    med = statistics.median
    first = r["setups"][0]
    lines = [
        "# Smaller checkpoints: zstd, XOR deltas, 8-bit optimizer moments",
        "",
        f"`python benchmarks/compact_bench.py{' --quick' if c['quick'] else ''}`: a {first['params'] / 1e6:.1f}M-parameter "
        f"causal transformer ({c['layers']} layers, width {c['width']}, vocab {c['vocab']}) trained with AdamW on a "
        f"synthetic bigram language. The base checkpoint is taken after {c['warmup']} steps, the measured one "
        f"{c['delta_steps']} steps later (a delta against the base where the variant makes deltas). Median of "
        f"{c['reps']} (variants interleaved), warm page cache, {r['machine']['cpus']}-CPU machine, torch "
        f"{r['machine']['torch']}.",
        "",
        "Size: bytes of the measured checkpoint, and of its model / optimizer files, as a fraction of plain (a "
        "delta's base is not counted: one base serves every delta until the next full checkpoint). Save: "
        "`manager.save`, fsync included. Restore: `manager.restore(step=...)`, every file verified; a delta's "
        "restore reads and verifies its base too.",
    ]
    for setup in r["setups"]:
        plain = setup["rows"][0]
        lines += [
            "",
            f"## {setup['dtype']} weights and moments, lr {setup['lr']:g} ({setup['tensor_bytes'] / 1e6:.0f} MB of tensors; "
            f"loss {setup['warmup_loss'][0]:.2f} -> {setup['warmup_loss'][1]:.2f} before the base)",
            "",
            "| variant | size | vs plain | model | optimizer | save s | save vs plain | restore s | restore vs plain |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in setup["rows"]:
            lines.append(
                f"| {row['variant']} | {row['bytes'] / 1e6:.1f} MB | {row['bytes'] / plain['bytes']:.2f}x | "
                f"{row['per_entry'].get('model', 0) / max(1, plain['per_entry'].get('model', 1)):.2f}x | "
                f"{row['per_entry'].get('optimizer', 0) / max(1, plain['per_entry'].get('optimizer', 1)):.2f}x | "
                f"{med(row['save_s']):.3f} | {med(row['save_s']) / med(plain['save_s']):.2f}x | "
                f"{med(row['restore_s']):.3f} | {med(row['restore_s']) / med(plain['restore_s']):.2f}x |")
        res = setup["resume"]
        idx = sorted({i for i in (0, 4, 9, 24) if i < len(res["full"])} | {len(res["full"]) - 1})
        cells = lambda xs: " | ".join(f"{xs[i]:.4f}" for i in idx)  # noqa: E731
        lines += [
            "",
            f"Resuming from 8-bit moments ({c['resume_steps']} steps after the restore, same batches): the loss differs "
            f"from the full-precision resume by at most {res['max_abs_diff']:.4f} (mean {res['mean_abs_diff']:.4f}; "
            f"mean loss {res['mean_loss']:.3f}, so at most {res['max_abs_diff'] / res['mean_loss']:.3%}). The "
            f"full-precision resume's losses equal those of the run that never stopped: "
            f"{'yes' if res['full_equals_uninterrupted'] else 'NO'}.",
            "",
            "| loss, steps after resume | " + " | ".join(str(i + 1) for i in idx) + " |",
            "|---|" + "---:|" * len(idx),
            f"| full precision | {cells(res['full'])} |",
            f"| 8-bit moments | {cells(res['8bit'])} |",
            "",
            f"Load average (1 min) at start / end of this setup: {setup['load_average'][0]:.1f} / "
            f"{setup['load_average'][1]:.1f} on {r['machine']['cpus']} CPUs.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
