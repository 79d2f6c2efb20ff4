#!/usr/bin/env python
"""The memory tier: what a snapshot costs, and how many steps a SIGKILL loses with and without it.

    python benchmarks/snapshot_bench.py [--size 1GB] [--reps 5] [--trials 6] [--dir PATH]

Part 1, one state (model + AdamW, as in ``run.py``), one run, medians of ``--reps``:
  copy floor     ``buf.copy_(t)`` of every tensor into allocated, touched buffers: the least a copy costs
  snapshot       ``CheckpointManager.step`` with ``snapshot_every=1`` under a memory tier in /dev/shm:
                 collect + encode + copy into the preallocated slot (what training waits for)
  disk save      ``CheckpointManager.save`` of the same state on ``--dir``: durable (hashed, fsynced, renamed)
  persist        ``MemoryTier.persist_newest``: what the supervisor spends committing a snapshot after a crash
Part 2, lost steps: ``examples/train.py`` under ``safepoint run``, SIGKILLed once at a random step
between disk saves, with and without ``--snapshot-every``; lost = kill step - the step it resumed from.
Writes ``benchmarks/results/snapshot.md`` (``--out``) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from safepoint import CheckpointManager, KeepLast  # noqa: E402
from safepoint.disk import format_size, parse_size  # noqa: E402
from safepoint.memtier import ENV_DIR, MemoryTier, default_parent  # noqa: E402
from run import QUIET, Contention, build_state, nbytes_of, state_tensors, wait_quiet  # noqa: E402

KILLER = ROOT / "examples" / "kill_at_step.py"  # SIGKILLs the script after step KILL_AT, first start only


def log(msg: str) -> None:
    print(f"[snapshot_bench] {msg}", file=sys.stderr, flush=True)


def median_of(reps: int, fn, before=None) -> tuple[float, float, float, float]:
    """Median, min, max seconds of ``fn(i)`` and the largest CPU share other processes took meanwhile.

    Each repetition starts on a settled machine (``sync``, then ``run.py``'s wait for other processes
    to go quiet); one disturbed by them (over 15% of the CPUs) is run again, up to twice.
    """
    times, foreign = [], []
    for i in range(reps):
        for attempt in range(QUIET["retries"] + 1):
            if before is not None:
                before()
            os.sync()
            wait_quiet()
            with Contention() as busy:
                started = time.perf_counter()
                fn(i)
                elapsed = time.perf_counter() - started
            if busy.foreign <= QUIET["limit"] or attempt == QUIET["retries"]:
                break
        times.append(elapsed)
        foreign.append(busy.foreign)
    return statistics.median(times), min(times), max(times), max(foreign)


def cost_part(size: int, reps: int, work: Path) -> dict:
    model, opt = build_state(size)
    state = {"model": model, "optimizer": opt}
    tensors = state_tensors(model, opt)
    nbytes = nbytes_of(tensors)
    log(f"state: {format_size(nbytes)} in {len(tensors)} tensors")
    run = work / "run"
    tier = MemoryTier.create(run, default_parent())
    os.environ[ENV_DIR] = str(tier.path)
    rows: dict[str, tuple[float, float, float, float]] = {}
    try:
        buffers = [torch.empty_like(t) for t in tensors]
        for b, t in zip(buffers, tensors):
            b.copy_(t)  # touched: the floor is a copy, not page faults

        def floor(_: int) -> None:
            for b, t in zip(buffers, tensors):
                b.copy_(t)

        rows["copy floor"] = median_of(reps, floor)
        del buffers
        with CheckpointManager(run, snapshot_every=1, keep=[KeepLast(1)]) as ckpt:
            ckpt.restore(state)
            ckpt.step(1, state)  # warm-up: allocates the two slots
            ckpt.step(2, state)
            rows["snapshot (blocking)"] = median_of(reps, lambda i: ckpt.step(10 + i, state))
            ckpt.save(100, state)  # warm-up
            rows["disk save (durable)"] = median_of(reps, lambda i: ckpt.save(200 + i, state))
            ckpt.step(1000, state)

        def persist(_: int) -> None:
            result = tier.persist_newest()
            assert result.step == 1000, result

        rows["persist after a crash"] = median_of(
            reps, persist, before=lambda: shutil.rmtree(run / "step_00001000", ignore_errors=True))
    finally:
        tier.close()
        os.environ.pop(ENV_DIR, None)
    return {"nbytes": nbytes, "rows": rows}


def lost_part(trials: int, steps: int, every: int, snapshot_every: int, seed: int, work: Path) -> list[dict]:
    wrapper = KILLER
    rng = random.Random(seed)
    kills = [rng.choice([s for s in range(every + 1, steps) if s % every]) for _ in range(trials)]
    env_base = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                    PYTHONPATH=os.pathsep.join([str(ROOT / "src")] + ([os.environ["PYTHONPATH"]]
                                                                       if os.environ.get("PYTHONPATH") else [])))
    reference = work / "reference.safetensors"
    subprocess.run([sys.executable, str(ROOT / "examples" / "train.py"), "--dir", str(work / "reference"),
                    "--steps", str(steps), "--every", str(10 * steps), "--out", str(reference)],
                   check=True, capture_output=True, env=env_base, cwd=ROOT, timeout=600)
    out = []
    for n, kill_at in enumerate(kills):
        row = {"kill_at": kill_at}
        for label, extra in (("disk only", []), ("memory tier", ["--snapshot-every", str(snapshot_every)])):
            run = work / f"lost-{n}-{label.replace(' ', '-')}"
            env = dict(env_base, KILL_STARTS=str(run) + ".starts", KILL_AT=str(kill_at),
                       KILL_TRAIN=str(ROOT / "examples" / "train.py"))
            cmd = [sys.executable, "-m", "safepoint", "run", "--dir", str(run), "--backoff", "0.05s", *extra, "--",
                   sys.executable, str(wrapper), "--dir", str(run), "--steps", str(steps), "--every", str(every),
                   "--out", str(run) + ".safetensors"]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"supervised run failed:\n{done.stderr[-3000:]}")
            restores = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
            resumed = [e["step"] for e in restores if e["event"] == "restore"][1]
            row[label] = kill_at - resumed
            row["exact" if extra else "exact disk"] = same_bytes(Path(str(run) + ".safetensors"), reference)
        log(f"killed at step {kill_at}: lost {row['disk only']} steps with disk only, "
            f"{row['memory tier']} with the memory tier")
        out.append(row)
    return out


def same_bytes(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return sorted(x) == sorted(y) and all(
        x[k].dtype == y[k].dtype and torch.equal(x[k].view(torch.uint8), y[k].view(torch.uint8)) for k in x)


def render(cost: dict, lost: list[dict], args: argparse.Namespace, work: Path) -> str:
    nbytes = cost["nbytes"]
    rows = cost["rows"]
    snap, disk = rows["snapshot (blocking)"][0], rows["disk save (durable)"][0]
    persist = rows["persist after a crash"][0]
    shm = shutil.disk_usage(default_parent())
    lines = [
        "# Memory tier: snapshot cost and steps lost to a SIGKILL",
        "",
        f"`python benchmarks/snapshot_bench.py --size {args.size} --reps {args.reps} --trials {args.trials}`: "
        f"{format_size(nbytes)} of model + AdamW state, {os.cpu_count()}-core CPU machine "
        f"({platform.machine()}), torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"snapshots in {default_parent()} (tmpfs, {format_size(shm.total)}), disk saves on the filesystem "
        f"of `--dir`. Medians of {args.reps}, min..max in brackets.",
        "",
        "| row | seconds | s per GB | vs copy floor | vs disk save | other processes' CPU share |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    floor = rows["copy floor"][0]
    for name, (med, lo, hi, foreign) in rows.items():
        lines.append(f"| {name} | {med:.3f} [{lo:.3f}..{hi:.3f}] | {med / (nbytes / 1e9):.3f} | "
                     f"{med / floor:.2f}x | {med / disk:.3f}x | {foreign:.0%} |")
    lines += [
        "",
        f"A snapshot blocks training for {snap / (nbytes / 1e9):.3f} s per GB: {snap / disk:.3f}x a durable "
        f"disk save of the same state ({disk / snap:.0f} snapshots for the price of one save) and "
        f"{snap / floor:.2f}x one plain copy of the tensors (fastest runs: {rows['snapshot (blocking)'][1]:.3f} s "
        f"vs {rows['copy floor'][1]:.3f} s). Committing a snapshot after a crash (the supervisor writes, "
        f"hashes and fsyncs it like any checkpoint) costs {persist / disk:.1f}x a disk save, once per crash. "
        "The last column is the share of all CPUs that other processes took while a row ran (the largest "
        "of its repetitions); where it is high, the medians are inflated.",
        "",
        f"## Steps lost to one SIGKILL (`examples/train.py`, {args.steps} steps, disk save every {args.every}, "
        f"snapshot every {args.snapshot_every})",
        "",
        "| killed at step | lost, disk only | lost, with the memory tier |",
        "|---:|---:|---:|",
    ]
    for row in lost:
        lines.append(f"| {row['kill_at']} | {row['disk only']} | {row['memory tier']} |")
    mean_disk = statistics.mean(r["disk only"] for r in lost)
    mean_mem = statistics.mean(r["memory tier"] for r in lost)
    lines += [
        f"| **mean** | **{mean_disk:.1f}** | **{mean_mem:.1f}** |",
        "",
        f"With disk saves alone a kill loses the steps since the last save (up to {args.every - 1}); with the "
        f"memory tier it loses those since the last snapshot (up to {args.snapshot_every - 1}). "
        f"Final weights bitwise equal to an uninterrupted run: {sum(r['exact'] for r in lost)} of "
        f"{len(lost)} runs with the memory tier, {sum(r['exact disk'] for r in lost)} of {len(lost)} with "
        "disk only.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1GB", help="state size (model + optimizer), e.g. 1GB, 200MB")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--trials", type=int, default=6, help="SIGKILLed runs for the lost-steps table")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=100, help="disk save interval of the lost-steps runs")
    p.add_argument("--snapshot-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, default=HERE / "results" / "scratch.tmp",
                   help="scratch directory on the disk to test (a folder is created inside and removed)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="snapshot-bench-", dir=args.dir))
    try:
        cost = cost_part(parse_size(args.size, what="--size"), args.reps, work)
        lost = lost_part(args.trials, args.steps, args.every, args.snapshot_every, args.seed, work)
        text = render(cost, lost, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "snapshot.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
