#!/usr/bin/env python
"""Sharded save throughput: safepoint's distributed save vs. DCP alone, with 2 and 4 ranks.

    python benchmarks/dist_bench.py [--mb 64] [--repeats 3] [--ranks 2 4] [--dir /tmp/sp-dist-bench]

Each job (torchrun, gloo, CPU) trains an FSDP2 model of ``--mb`` MB of fp32 parameters with AdamW
(state = 3x the parameters) for one step, then saves it ``--repeats`` times each way:

* ``dcp``: ``torch.distributed.checkpoint.save`` of ``get_state_dict`` into a fresh directory
  (fsynced files; no hashes, no manifest, no atomic commit) — the floor;
* ``safepoint``: ``CheckpointManager.save`` with ``KeepLast(1)`` (the same DCP write, plus each
  rank hashing its files, the vote, the manifest, the rename, retention and the barrier);
* ``safepoint async``: ``save_async`` — the time training is stalled (staging), and the time to
  the commit.

Times run from a barrier before the save to a barrier after it, the two ways alternating in
order; throughput is the checkpoint's bytes over the median time. Results go to ``benchmarks/results/dist.md`` (and ``dist.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    from safepoint import CheckpointManager, KeepLast

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    width = 1024
    layers = max(1, round(args.mb * 1e6 / 4 / (width * width + width)))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    state = {"model": model, "optimizer": opt}
    nbytes = 3 * sum(p.numel() * 4 for p in model.parameters())  # params + exp_avg + exp_avg_sq (global)
    base = Path(args.dir) / f"w{world}"
    if rank == 0:
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
    dist.barrier()

    def timed(fn) -> float:
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - start

    results: dict[str, list[float]] = {"dcp": [], "safepoint": [], "async_stall": [], "async_commit": [],
                                       "sp_write_dcp": [], "sp_hash": [], "sp_retention": []}
    phases: dict[str, float] = {}

    def timing(owner: object, name: str, key: str) -> None:  # where a safepoint save's time goes
        fn = getattr(owner, name)

        def timed_fn(*a, **k):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[key] = phases.get(key, 0.0) + time.perf_counter() - start
        setattr(owner, name, timed_fn)

    import safepoint.distributed as sp_dist
    import safepoint.sharded as sp_sharded

    timing(sp_sharded, "write_dcp", "sp_write_dcp")
    timing(sp_dist, "hash_file", "sp_hash")
    with CheckpointManager(base / "run", keep=[KeepLast(1)], signals=()) as ckpt:  # as DCP: one on disk
        timing(ckpt, "_apply_retention", "sp_retention")
        ckpt.restore(state)
        for i in range(args.repeats):
            def dcp_save(i: int = i) -> None:
                msd, osd = get_state_dict(model, opt)
                dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=base / f"dcp_{i}")
            ways = [("dcp", dcp_save), ("safepoint", lambda i=i: ckpt.save(10 * i + 1, state))]
            for name, fn in ways if i % 2 == 0 else ways[::-1]:  # alternate: neither always goes first
                phases.clear()
                results[name].append(timed(fn))
                if name == "safepoint":
                    for key in ("sp_write_dcp", "sp_hash", "sp_retention"):
                        results[key].append(phases.get(key, 0.0))
            box: dict[str, object] = {}
            results["async_stall"].append(timed(lambda i=i: box.setdefault("h", ckpt.save_async(10 * i + 2, state))))
            dist.barrier()
            start = time.perf_counter()
            box["h"].result()  # type: ignore[union-attr]
            dist.barrier()
            results["async_commit"].append(results["async_stall"][-1] + time.perf_counter() - start)
            if rank == 0:
                shutil.rmtree(base / f"dcp_{i}", ignore_errors=True)
    if rank == 0:
        Path(args.json).write_text(json.dumps({"world": world, "bytes": nbytes, "layers": layers, **results}))
        shutil.rmtree(base, ignore_errors=True)
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=64, help="MB of fp32 parameters (the state is 3x this)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--dir", default="/tmp/sp-dist-bench")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    runs = []
    for world in args.ranks:
        out = Path(args.dir) / f"result-{world}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc_per_node={world}", __file__, "--worker", "--mb", str(args.mb),
               "--repeats", str(args.repeats), "--dir", args.dir, "--json", str(out)]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        runs.append(json.loads(out.read_text()))

    def mbps(nbytes: int, seconds: float) -> str:
        return f"{nbytes / seconds / 1e6:.0f} MB/s"

    lines = [
        "# Distributed save: safepoint vs. DCP alone",
        "",
        f"FSDP2 model + AdamW state of {runs[0]['bytes'] / 1e6:.0f} MB (fp32), gloo on the CPU, "
        f"{os.cpu_count()} cores, {platform.system()} {platform.release()}, median of {args.repeats}; "
        f"`python benchmarks/dist_bench.py --mb {args.mb:g} --repeats {args.repeats}`.",
        "",
        "| ranks | DCP alone | safepoint save | overhead | of which: DCP write / hashing / retention "
        "(rank 0) | safepoint async: stall | async: to commit |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        d, s = statistics.median(r["dcp"]), statistics.median(r["safepoint"])
        a, c = statistics.median(r["async_stall"]), statistics.median(r["async_commit"])
        w, h, k = (statistics.median(r[key]) for key in ("sp_write_dcp", "sp_hash", "sp_retention"))
        lines.append(f"| {r['world']} | {d:.2f} s ({mbps(r['bytes'], d)}) | {s:.2f} s ({mbps(r['bytes'], s)}) | "
                     f"{(s / d - 1) * 100:+.0f}% | {w:.2f} / {h:.2f} / {k:.2f} s | {a:.2f} s | {c:.2f} s |")
    lines += [
        "",
        "The DCP write inside a safepoint save is the same `dcp.save` call. The overhead is "
        "what makes the save crash-proof and bounded on disk: each rank re-reads and sha256-hashes the files "
        "it wrote (from the page cache; every rank hashes its own share at once), retention deleting the "
        "previous checkpoint (DCP alone deletes nothing), the vote, the manifest, the directory fsyncs, the "
        "rename and the closing barrier. The async stall is the host copy of each rank's shards, the only "
        "time training waits; the write and the commit run on safepoint's background writer. Timings on a "
        "small shared machine vary by tens of percent between runs.",
    ]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dist.md").write_text("\n".join(lines) + "\n")
    (out_dir / "dist.json").write_text(json.dumps(runs, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
