#!/usr/bin/env python
"""safepoint benchmark: floors, safepoint, peers, training-loop stall, memory, size, in one run.

    python benchmarks/run.py [--size 1.5GB] [--reps 5] [--dir PATH] [--out benchmarks/results] [--quick]

Writes ``<out>/benchmark.json`` (every repetition) and ``<out>/benchmark.md`` (the table, the
ratios and the goals), and prints the table. See ``benchmarks/README.md`` for what each row means.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import mmap
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import safepoint  # noqa: E402
from safepoint import CheckpointManager, KeepLast, commit  # noqa: E402

warnings.filterwarnings("ignore")
GB = 1e9
MiB = 1 << 20
T0 = time.perf_counter()


# ---------------------------------------------------------------------------------------- output

def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def parse_size(text: str) -> int:
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", text.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a size (e.g. 200MB, 1.5GB)")
    unit = m.group(2).upper()
    mult = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}.get(unit)
    if mult is None:
        raise argparse.ArgumentTypeError(f"unknown unit in {text!r}")
    return int(float(m.group(1)) * mult)


# ---------------------------------------------------------------------------------------- system

def read_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssPeak:
    """Peak RSS during a block: a thread samples VmRSS every ``interval`` s (and VmHWM after a reset)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.before = self.peak = 0
        self.hwm_peak: int | None = None
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, read_rss())
            time.sleep(self.interval)

    def __enter__(self) -> "RssPeak":
        gc.collect()
        try:  # reset the kernel's peak-RSS counter (VmHWM) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hwm_ok = True
        except OSError:
            self._hwm_ok = False
        self.before = self.peak = read_rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, read_rss())
        if self._hwm_ok:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.hwm_peak = int(line.split()[1]) * 1024
            if self.hwm_peak is not None:
                self.peak = max(self.peak, self.hwm_peak)

    @property
    def extra(self) -> int:
        return self.peak - self.before


_TICK = os.sysconf("SC_CLK_TCK")
_NCPU = os.cpu_count() or 1


def _cpu_snapshot() -> tuple[float, float, float]:
    """(wall s, busy CPU-seconds of the whole machine, CPU-seconds of this process and its waited children)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(v[:8]) - v[3] - v[4]) / _TICK  # user..steal minus idle and iowait
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    own = sum(int(x) for x in fields[11:15]) / _TICK  # utime stime cutime cstime
    return time.monotonic(), busy, own


class Contention:
    """How busy the machine was with work that is not ours during a block (fraction of all cores)."""

    def __enter__(self) -> "Contention":
        self.a = _cpu_snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        b = _cpu_snapshot()
        wall = max(b[0] - self.a[0], 1e-6)
        self.foreign = max(0.0, ((b[1] - self.a[1]) - (b[2] - self.a[2])) / (wall * _NCPU))


QUIET = {"max_wait": 60.0, "threshold": 0.10, "retries": 2, "limit": 0.15, "waited": 0.0}


def wait_quiet() -> float:
    """Wait (up to QUIET['max_wait'] s) until other processes use < threshold of the CPUs; return the load seen."""
    deadline = time.monotonic() + QUIET["max_wait"]
    calm = 0
    t_start = time.monotonic()
    warned = False
    while True:
        with Contention() as c:
            time.sleep(0.5)
        calm = calm + 1 if c.foreign < QUIET["threshold"] else 0
        if calm >= 2 or time.monotonic() > deadline:
            QUIET["waited"] += time.monotonic() - t_start
            return c.foreign
        if not warned and time.monotonic() - t_start > 1.5:
            log(f"    (machine busy with other processes: {c.foreign:.0%} of CPUs; waiting up to "
                f"{QUIET['max_wait']:.0f} s for quiet)")
            warned = True


_DROP_OK: bool | None = None


def evict(paths: list[Path]) -> str:
    """Make the next read of ``paths`` cold: drop the page cache (root), else fadvise DONTNEED."""
    global _DROP_OK
    os.sync()
    if _DROP_OK is not False:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            _DROP_OK = True
            return "drop_caches"
        except OSError:
            _DROP_OK = False
    ok = True
    for p in paths:
        files = [p] if p.is_file() else [Path(r) / n for r, _, fs in os.walk(p) for n in fs]
        for fp in files:
            try:
                fd = os.open(fp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            except (OSError, AttributeError):
                ok = False
    return "fadvise_dontneed" if ok else "warm (could not evict)"


def settle() -> None:
    """Between repetitions: flush everything and give the device a moment."""
    gc.collect()
    os.sync()
    time.sleep(0.3)


def fsync_path(path: Path) -> None:
    commit.fsync_file(path)  # directories too: O_RDONLY opens either


def fsync_tree(root: Path) -> None:
    for r, ds, fs in os.walk(root):
        for n in fs:
            fsync_path(Path(r) / n)
        fsync_path(Path(r))
    fsync_path(root.parent)


def rm(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def tree_bytes(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of a file or tree."""
    files = [path] if path.is_file() else [Path(r) / n for r, _, fs in os.walk(path) for n in fs]
    apparent = alloc = 0
    for f in files:
        st = f.stat()
        apparent += st.st_size
        alloc += st.st_blocks * 512
    return apparent, alloc


def sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def machine_info(bench_dir: Path) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    fs: dict[str, str] = {}
    real = os.path.realpath(bench_dir)
    with contextlib.suppress(OSError):
        best = ""
        for line in open("/proc/mounts"):
            dev, mnt, fstype, opts = line.split()[:4]
            mnt = mnt.replace("\\040", " ")
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best = mnt
                fs = {"device": dev, "mount": mnt, "type": fstype, "options": opts}
    usage = shutil.disk_usage(bench_dir)
    fs["free"] = fmt_bytes(usage.free)
    dev = os.path.basename(fs.get("device", ""))
    base = re.sub(r"p?\d+$", "", dev) if not os.path.exists(f"/sys/block/{dev}") else dev
    sched = sh(f"cat /sys/block/{base}/queue/scheduler") if base else ""
    env_keys = [k for k in os.environ if k.startswith(("MALLOC_", "PYTORCH_", "OMP_", "MKL_", "GLIBC_TUNABLES",
                                                         "LD_PRELOAD", "KMP_", "JEMALLOC", "TCMALLOC"))]
    vm = {k: sh(f"cat /proc/sys/vm/{k}") for k in ("dirty_ratio", "dirty_background_ratio", "dirty_bytes",
                                                  "dirty_background_bytes", "dirty_expire_centisecs")}
    thp = sh("cat /sys/kernel/mm/transparent_hugepage/enabled")
    versions = {"python": platform.python_version(), "torch": torch.__version__, "safepoint": safepoint.__version__}
    for mod in ("numpy", "safetensors", "transformers", "accelerate"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    return {
        "cpu_model": cpu, "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
        "ram": mem, "ram_h": fmt_bytes(mem), "kernel": platform.release(),
        "filesystem": fs, "io_scheduler": sched, "bench_dir": str(bench_dir),
        "torch_threads": torch.get_num_threads(), "versions": versions,
        "allocator_env": {k: os.environ[k] for k in sorted(env_keys)},
        "allocator_note": ("default glibc malloc, no allocator env set" if not env_keys else "see allocator_env"),
        "vm": vm, "transparent_hugepage": thp,
        "sha256_hw": "sha_ni" in sh("grep -m1 -o -w sha_ni /proc/cpuinfo"),
        "flush_denormal": True,
    }


# ---------------------------------------------------------------------------------------- results

class Results:
    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, str] = {}
        self.extra: dict[str, Any] = {}

    def add(self, key: str, group: str, label: str, values: list[float], *, nbytes: int | None = None,
            note: str = "", unit: str = "s") -> dict[str, Any]:
        row = {"group": group, "label": label, "values": values, "unit": unit, "bytes": nbytes, "note": note}
        if values:
            row["median"] = statistics.median(values)
            row["min"] = min(values)
            row["max"] = max(values)
            if nbytes and unit == "s" and row["median"] > 0:
                row["gbps"] = nbytes / row["median"] / GB
        self.rows[key] = row
        med = row.get("median")
        shown = f"{med:.3f} {unit}" if med is not None and unit == "s" else (fmt_bytes(med) if med is not None else "-")
        log(f"  -> {label}: median {shown}" + (f" ({row['gbps']:.2f} GB/s)" if "gbps" in row else "")
            + (f"  [{note}]" if note else ""))
        return row

    def med(self, key: str) -> float | None:
        return self.rows.get(key, {}).get("median")

    def gbps(self, key: str) -> float | None:
        return self.rows.get(key, {}).get("gbps")

    def best_gbps(self, key: str) -> float | None:
        """GB/s of the fastest repetition (the disk's fast spells, for the read rows)."""
        row = self.rows.get(key, {})
        return row["bytes"] / row["min"] / GB if row.get("bytes") and row.get("min") else None


CONTENTION: dict[str, list[float]] = {}


def repeat(name: str, reps: int, fn: Callable[[int], dict[str, float]], *,
           before: Callable[[int], Any] | None = None, after: Callable[[int], Any] | None = None) -> dict[str, list[float]]:
    """Warm up once (i = -1), then run ``reps`` measured repetitions; ``fn`` returns named timings.

    Before each repetition it waits for the machine to be quiet; a repetition during which other
    processes used more than QUIET['limit'] of the CPUs is run again (up to QUIET['retries'] times).
    """
    out: dict[str, list[float]] = {}
    loads = CONTENTION.setdefault(name, [])
    for i in range(-1, reps):
        for attempt in range(QUIET["retries"] + 1):
            if before:
                before(i)
            wait_quiet()
            with Contention() as c:
                r = fn(i)
            if after:
                after(i)
            tag = "warm-up" if i < 0 else f"rep {i + 1}/{reps}"
            busy = f"  [other processes: {c.foreign:.0%} CPU]" if c.foreign >= 0.05 else ""
            log(f"  {name} {tag}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()) + busy)
            if i < 0 or c.foreign <= QUIET["limit"] or attempt == QUIET["retries"]:
                break
            log(f"    contended rep, running it again ({attempt + 1}/{QUIET['retries']})")
        if i >= 0:
            loads.append(round(c.foreign, 3))
            for k, v in r.items():
                out.setdefault(k, []).append(v)
    return out


# ---------------------------------------------------------------------------------------- state

def build_state(total: int, dim: int = 4096, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A stack of Linear(dim, dim) layers (1/3 of ``total``) plus AdamW state after one step (2/3)."""
    torch.manual_seed(seed)
    per_layer = (dim * dim + dim) * 4
    target = total / 3
    n_full = int(target // per_layer)
    rem = target - n_full * per_layer
    layers: list[nn.Module] = [nn.Linear(dim, dim) for _ in range(n_full)]
    out = int(rem // ((dim + 1) * 4))
    if out >= 64 or not layers:
        layers.append(nn.Linear(dim, max(out, 64)))
    model = nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def state_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    ts = [t for t in model.state_dict().values()]
    for st in opt.state_dict()["state"].values():
        ts += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return ts


def nbytes_of(ts: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def torch_obj(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def flat_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The same state as one flat dict of tensors for safetensors (param groups go in metadata)."""
    flat = {f"model.{k}": v for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                flat[f"optim.state.{pid}.{k}"] = v
    return flat, {"param_groups": json.dumps(osd["param_groups"])}


def dcp_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


# ---------------------------------------------------------------------------------------- sections

def bench_floors(R: Results, ts: list[torch.Tensor], nbytes: int, work: Path, reps: int) -> None:
    log("== floors: copy into fresh memory")
    def fresh(_: int) -> dict[str, float]:
        t0 = time.perf_counter()
        out = [t.clone() for t in ts]
        dt = time.perf_counter() - t0
        del out
        gc.collect()
        return {"clone": dt}
    r = repeat("fresh-allocation copy", reps, fresh)
    R.add("floor_fresh_copy", "floor", "copy into fresh allocations (clone; info)", r["clone"], nbytes=nbytes,
          note="page faults on first touch; what a stager without reused buffers pays")

    log("== floors: disk write through the page cache")
    f = work / "floor.bin"
    count = max(1, math.ceil(nbytes / (16 * MiB)))
    fbytes = count * 16 * MiB
    have_dd = shutil.which("dd") is not None
    method = {"direct": None, "buffered": None}

    def write_buffered(_: int) -> dict[str, float]:
        if have_dd:
            t0 = time.perf_counter()
            p = subprocess.run(["dd", "if=/dev/zero", f"of={f}", "bs=16M", f"count={count}", "conv=fsync"],
                               capture_output=True, text=True)
            dt = time.perf_counter() - t0
            if p.returncode == 0:
                method["buffered"] = "dd bs=16M conv=fsync (page cache, then fsync)"
                return {"write": dt}
        return {"write": py_write(f, count, direct=False, method=method)}

    fresh = lambda i: (rm(f), settle())  # noqa: E731 - every write goes to a new file on a settled system
    r = repeat("disk write (buffered+fsync)", reps, write_buffered, before=fresh)
    R.add("floor_write_buffered", "floor", "disk write through page cache + fsync (info)", r["write"], nbytes=fbytes,
          note=method["buffered"] or "python buffered")

    views = [host_view(t) for t in ts]

    def fill(path: Path) -> float:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        t0 = time.perf_counter()
        try:
            for v in views:
                for s in range(0, len(v), 8 * MiB):
                    os.write(fd, v[s:s + 8 * MiB])
        finally:
            os.close(fd)
        return time.perf_counter() - t0

    r = repeat("page-cache fill", reps, lambda i: {"write": fill(f)}, before=fresh)
    R.add("floor_pagecache", "floor", "page-cache fill: write() of the state into a new file, no fsync (info)",
          r["write"], nbytes=nbytes, note="8 MiB writes; the cost of fresh page-cache pages")

    def fill_after_delete(_: int) -> dict[str, float]:
        fill(f)
        rm(f)  # its pages are free again, and reused at once by the next write
        return {"write": fill(f)}
    r = repeat("page-cache fill right after a delete", reps, fill_after_delete, before=fresh)
    R.add("floor_pagecache_reuse", "floor", "page-cache fill right after deleting a same-size file (info)",
          r["write"], nbytes=nbytes, note="reuses just-freed pages: compare with the row above")
    rm(f)
    del views


def write_floor_direct(f: Path, count: int, method: dict[str, Any]) -> float:
    """The disk's durable sequential write: ``count`` 16 MiB blocks, O_DIRECT, then fsync."""
    if shutil.which("dd") is not None:
        t0 = time.perf_counter()
        p = subprocess.run(["dd", "if=/dev/zero", f"of={f}", "bs=16M", f"count={count}", "oflag=direct",
                            "conv=fsync"], capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if p.returncode == 0:
            method["direct"] = "dd bs=16M oflag=direct conv=fsync"
            return dt
    return py_write(f, count, direct=True, method=method)


def host_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B")


def py_write(f: Path, count: int, *, direct: bool, method: dict[str, Any]) -> float:
    buf = mmap.mmap(-1, 16 * MiB)  # page-aligned, as O_DIRECT needs
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    key = "direct" if direct else "buffered"
    if direct and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(f, flags | os.O_DIRECT)
            method[key] = "python O_DIRECT 16 MiB writes + fsync"
        except OSError:
            fd = os.open(f, flags)
            method[key] = "python buffered 16 MiB writes + fsync (O_DIRECT refused)"
    else:
        fd = os.open(f, flags)
        method[key] = "python buffered 16 MiB writes + fsync"
    t0 = time.perf_counter()
    try:
        for _ in range(count):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def bench_safepoint(R: Results, model: nn.Module, opt: torch.optim.Optimizer, nbytes: int, work: Path,
                    reps: int) -> None:
    state = {"model": model, "optim": opt}
    step = iter(range(1, 10**9))

    log("== safepoint: save (sync, durable)")
    d_sync = work / "sp_sync"
    mgr = CheckpointManager(d_sync, signals=())
    last: dict[str, Any] = {}

    floor = work / "floor.bin"
    count = max(1, math.ceil(nbytes / (16 * MiB)))
    method: dict[str, Any] = {"direct": None}

    def save_once() -> dict[str, float]:
        s = next(step)
        t0 = time.perf_counter()
        info = mgr.save(s, state)
        dt = time.perf_counter() - t0
        last["info"] = info
        return {"save": dt}

    def floor_once() -> dict[str, float]:
        dt = write_floor_direct(floor, count, method)
        rm(floor)
        return {"floor": dt}

    def cleanup(_: int) -> None:
        rm(last["info"].path)

    # The disk floor and the save alternate in a shuffled order, each on a settled system, so a
    # slow spell of a shared disk weighs on both (see "Cold reads, side by side" in the README).
    order = [save_once, floor_once]

    def save(_: int) -> dict[str, float]:
        out: dict[str, float] = {}
        random.shuffle(order)
        for fn in order:
            settle()
            out.update(fn())
        return out
    r = repeat("safepoint save + disk floor", reps, save, after=cleanup)
    R.add("floor_write", "floor", "disk durable write (O_DIRECT + fsync)", r["floor"], nbytes=count * 16 * MiB,
          note=(method["direct"] or "python O_DIRECT") + "; interleaved with the safepoint save")
    R.add("sp_save", "safepoint", "safepoint save (sync, durable)", r["save"], nbytes=nbytes)

    # one extra instrumented save: where does the time go?
    settle()
    R.extra["sp_save_breakdown"] = profile_save(mgr, next(step), state)
    log(f"  breakdown: {R.extra['sp_save_breakdown']}")
    info = R.extra["sp_save_breakdown"].pop("_info")
    apparent, alloc = tree_bytes(info.path)
    R.extra["size"] = {"tensor_bytes": nbytes, "apparent": apparent, "allocated": alloc,
                       "ratio": apparent / nbytes, "ratio_allocated": alloc / nbytes,
                       "files": sorted(os.listdir(info.path))}
    R.add("sp_size", "size", "safepoint checkpoint size on disk (apparent)", [apparent], unit="B",
          note=f"allocated blocks {fmt_bytes(alloc)}")
    mgr.close()

    rm(d_sync)

    log("== safepoint: save_async")
    d_async = work / "sp_async"
    amgr = CheckpointManager(d_async, signals=())
    mem: dict[str, Any] = {}

    def save_async(i: int) -> dict[str, float]:
        s = next(step)
        with RssPeak() as rp:
            t0 = time.perf_counter()
            h = amgr.save_async(s, state)
            t1 = time.perf_counter()
            info = h.result()
            t2 = time.perf_counter()
        last["info"] = info
        mem.setdefault("first" if i < 0 else "steady", []).append(rp.extra)
        return {"blocking": t1 - t0, "total": t2 - t0}
    # The staging floor (one copy of every tensor into already-touched buffers) alternates with the
    # async save in a shuffled order, so both see the same memory bandwidth.
    ts = state_tensors(model, opt)
    bufs = [torch.empty_like(t) for t in ts]
    for b, t in zip(bufs, ts):
        b.copy_(t)  # touch: the floor is a copy into already-faulted memory

    def staging_once() -> dict[str, float]:
        t0 = time.perf_counter()
        for b, t in zip(bufs, ts):
            b.copy_(t)
        return {"staging": time.perf_counter() - t0}

    def async_round(i: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for fn in random.sample([staging_once, lambda: save_async(i)], 2):
            settle()
            out.update(fn())
        return out
    r = repeat("safepoint save_async + staging floor", reps, async_round, after=cleanup)
    del bufs, ts
    R.add("floor_staging", "floor", "staging floor: copy into touched buffers", r["staging"], nbytes=nbytes,
          note="interleaved with save_async")
    R.add("sp_async_block", "safepoint", "safepoint save_async: blocking (until it returns)", r["blocking"],
          nbytes=nbytes)
    R.add("sp_async_total", "safepoint", "safepoint save_async: total (until handle.result())", r["total"],
          nbytes=nbytes)
    staging = amgr._staging.nbytes
    R.add("mem_sp_async_first", "memory", "safepoint save_async, first save (allocates staging): peak extra RSS",
          mem["first"], unit="B")
    R.add("mem_sp_async_steady", "memory", "safepoint save_async, later saves (buffers reused): peak extra RSS",
          mem["steady"], unit="B")
    R.add("mem_sp_staging", "memory", "safepoint staging buffers held between saves (manager._staging.nbytes)",
          [staging], unit="B", note="resident for the manager's lifetime")
    amgr.close()
    rm(d_async)


def profile_save(mgr: CheckpointManager, step: int, state: dict[str, Any]) -> dict[str, Any]:
    """Time the phases of one sync save by wrapping HashingWriter methods and os.fsync (not the measured reps)."""
    acc = {"write_calls_s": 0.0, "fsync_s": 0.0, "close_s": 0.0, "buffer_wait_s": 0.0}
    orig_write, orig_close, orig_finish, orig_fsync = (commit.HashingWriter.write, commit.HashingWriter.close,
                                                       commit.HashingWriter._wait, os.fsync)

    def timed(key: str, fn: Callable) -> Callable:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[key] += time.perf_counter() - t0
        return wrapper
    commit.HashingWriter.write = timed("write_calls_s", orig_write)
    commit.HashingWriter.close = timed("close_s", orig_close)
    commit.HashingWriter._wait = timed("buffer_wait_s", orig_finish)
    os.fsync = timed("fsync_s", orig_fsync)
    try:
        t0 = time.perf_counter()
        info = mgr.save(step, state)
        total = time.perf_counter() - t0
    finally:
        commit.HashingWriter.write, commit.HashingWriter.close = orig_write, orig_close
        commit.HashingWriter._wait, os.fsync = orig_finish, orig_fsync
    out = {k: round(v, 4) for k, v in acc.items()}
    out["total_s"] = round(total, 4)
    out["other_s"] = round(total - acc["write_calls_s"] - acc["close_s"], 4)
    out["_info"] = info
    return out


def profile_restore(mgr: CheckpointManager, state: dict[str, Any], path: Path) -> dict[str, Any]:
    """Cold restore with the read+hash and the load_state_dict parts timed separately."""
    from safepoint import manager as mm
    acc = {"read_verify_s": 0.0, "apply_s": 0.0}
    orig_read, orig_apply = mm.read_tensors_verified, mm.CheckpointManager._apply

    def read(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return orig_read(*a, **k)
        finally:
            acc["read_verify_s"] += time.perf_counter() - t0

    def apply(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return orig_apply(*a, **k)
        finally:
            acc["apply_s"] += time.perf_counter() - t0
    mm.read_tensors_verified, mm.CheckpointManager._apply = read, apply
    try:
        evict([path])
        t0 = time.perf_counter()
        mgr.restore(state)
        total = time.perf_counter() - t0
    finally:
        mm.read_tensors_verified, mm.CheckpointManager._apply = orig_read, orig_apply
    gc.collect()
    out = {k: round(v, 4) for k, v in acc.items()}
    out["total_s"] = round(total, 4)
    return out


def bench_reads(R: Results, model: nn.Module, opt: torch.optim.Optimizer, nbytes: int, work: Path,
                reps: int) -> None:
    """Cold reads side by side: each repetition runs the disk's read floor, the same read into fresh
    memory, safepoint's verified restore and ``torch.load`` one after another in a shuffled order,
    so a slow spell of a shared disk weighs on all of them alike and their ratios compare like
    with like."""
    log("== cold reads: disk floors, safepoint restore, torch.load (interleaved)")
    state = {"model": model, "optim": opt}
    d_sp = work / "sp_read"
    mgr = CheckpointManager(d_sp, signals=())
    info = mgr.save(1, state)
    pt = work / "torch.pt"
    with open(pt, "wb") as fh:
        torch.save(torch_obj(model, opt), fh)
    floor = work / "floor.bin"
    count = max(1, math.ceil(nbytes / (16 * MiB)))
    fbytes = count * 16 * MiB
    have_dd = shutil.which("dd") is not None
    py_write(floor, count, direct=True, method={})
    how = {"v": ""}

    def read_floor(path: Path, *flags: str) -> float | None:
        t0 = time.perf_counter()
        if have_dd:
            p = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M", *flags], capture_output=True)
            return time.perf_counter() - t0 if p.returncode == 0 else None
        if flags:
            return None
        with open(path, "rb", buffering=0) as fh:
            buf = bytearray(16 * MiB)
            while fh.readinto(buf):
                pass
        return time.perf_counter() - t0

    def floor_read() -> dict[str, float]:
        t = read_floor(floor)
        assert t is not None
        return {"floor": t}

    def restore() -> dict[str, float]:
        t0 = time.perf_counter()
        got = mgr.restore(state)
        dt = time.perf_counter() - t0
        assert got == info.step, got
        gc.collect()
        return {"restore": dt}

    def tload() -> dict[str, float]:
        t0 = time.perf_counter()
        obj = torch.load(pt, weights_only=True, map_location="cpu")
        t1 = time.perf_counter()
        model.load_state_dict(obj["model"])
        opt.load_state_dict(obj["optim"])
        t2 = time.perf_counter()
        del obj
        gc.collect()
        return {"load": t1 - t0, "load_apply": t2 - t0}

    def fresh_read() -> dict[str, float]:
        # What any loader must do at least: the same read, into memory allocated for the result.
        t0 = time.perf_counter()
        buf = torch.empty(fbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy()).cast("B")
        with open(floor, "rb", buffering=0) as fh:
            pos = 0
            while pos < fbytes:
                got = fh.readinto(view[pos:pos + 32 * MiB])
                if not got:
                    break
                pos += got
        dt = time.perf_counter() - t0
        del view, buf
        return {"fresh": dt}

    order = [floor_read, restore, tload, fresh_read]

    def one_round(_: int) -> dict[str, float]:
        out: dict[str, float] = {}
        random.shuffle(order)
        for fn in order:
            how["v"] = evict([floor, d_sp, pt])
            out.update(fn())
        return out
    r = repeat("cold reads (floor, fresh, restore, torch.load)", reps, one_round)
    R.add("floor_read", "floor", "disk read, cold cache (buffered, 16 MiB reads)", r["floor"], nbytes=fbytes,
          note=f"cache evicted by {how['v']}; interleaved with the rows it is compared with")
    R.extra["read_cold_method"] = how["v"]
    R.add("floor_read_fresh", "floor", "disk read into freshly allocated memory, cold cache (info)", r["fresh"],
          nbytes=fbytes, note="32 MiB reads, one thread: the page faults any loader pays, and the floor above does not")
    R.add("sp_restore", "safepoint", "safepoint restore (verified), cold cache", r["restore"], nbytes=nbytes,
          note=f"cache evicted by {how['v']}; includes load_state_dict")
    R.add("torch_load", "peer", "torch.load(weights_only=True), cold cache", r["load"], nbytes=nbytes,
          note=f"cache evicted by {how['v']}; read only")
    R.add("torch_load_apply", "peer", "torch.load + load_state_dict, cold cache (info)", r["load_apply"],
          nbytes=nbytes, note="same work as safepoint restore")

    def read_direct(_: int) -> dict[str, float]:
        evict([floor])
        t = read_floor(floor, "iflag=direct")
        return {} if t is None else {"read": t}
    r = repeat("disk read (O_DIRECT)", reps, read_direct)
    if r:
        R.add("floor_read_direct", "floor", "disk read O_DIRECT, 16 MiB, queue depth 1 (info)", r["read"],
              nbytes=fbytes)

    r = repeat("safepoint restore (warm)", reps, lambda _: restore())
    R.add("sp_restore_warm", "safepoint", "safepoint restore (verified), warm cache (info)", r["restore"],
          nbytes=nbytes)
    R.extra["sp_restore_breakdown"] = profile_restore(mgr, state, info.path)
    log(f"  restore breakdown: {R.extra['sp_restore_breakdown']}")
    mgr.close()
    for path in (d_sp, pt, floor):
        rm(path)


def bench_peers(R: Results, model: nn.Module, opt: torch.optim.Optimizer, nbytes: int, work: Path, reps: int,
                with_hf: bool) -> None:
    log("== peers: torch.save + fsync")
    pt = work / "torch.pt"

    def tsave(_: int) -> dict[str, float]:
        t0 = time.perf_counter()
        with open(pt, "wb") as f:
            torch.save(torch_obj(model, opt), f)
            f.flush()
            os.fsync(f.fileno())
        return {"save": time.perf_counter() - t0}
    r = repeat("torch.save+fsync", reps, tsave, before=lambda i: (rm(pt), settle()))
    R.add("torch_save", "peer", "torch.save + fsync", r["save"], nbytes=nbytes)

    rm(pt)

    log("== peers: safetensors save_file + fsync")
    from safetensors.torch import load_file, save_file
    st = work / "state.safetensors"

    def stsave(_: int) -> dict[str, float]:
        t0 = time.perf_counter()
        flat, meta = flat_tensors(model, opt)
        save_file(flat, str(st), metadata=meta)
        fsync_path(st)
        return {"save": time.perf_counter() - t0}
    r = repeat("save_file+fsync", reps, stsave, before=lambda i: (rm(st), settle()))
    R.add("st_save", "peer", "safetensors save_file + fsync", r["save"], nbytes=nbytes)

    def stload(_: int) -> dict[str, float]:
        evict([st])
        t0 = time.perf_counter()
        out = load_file(str(st), device="cpu")
        for v in out.values():  # load_file maps the file: touch every page so it is really read
            if v.numel():
                float(v.reshape(-1)[::1024].sum())
        dt = time.perf_counter() - t0
        del out
        gc.collect()
        return {"load": dt}
    r = repeat("safetensors load_file", reps, stload)
    R.add("st_load", "peer", "safetensors load_file + touching every page, cold cache (info, unverified)", r["load"], nbytes=nbytes)
    rm(st)

    log("== peers: torch.distributed.checkpoint")
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
    except Exception as err:  # pragma: no cover
        R.skipped["dcp"] = f"torch.distributed.checkpoint unavailable: {err}"
        dcp = None
    if dcp is not None:
        dd = work / "dcp"

        def dsave(_: int) -> dict[str, float]:
            t0 = time.perf_counter()
            dcp.save(dcp_state(model, opt), checkpoint_id=str(dd), no_dist=True)
            return {"save": time.perf_counter() - t0}
        r = repeat("dcp.save", reps, dsave, before=lambda i: (rm(dd), settle()))
        R.add("dcp_save", "peer", "dcp.save (no_dist, FileSystemWriter sync_files=True)", r["save"], nbytes=nbytes)
        R.extra["dcp_size"] = tree_bytes(dd)[0]
        dmem: list[int] = []

        def dasave(_: int) -> dict[str, float]:
            with RssPeak() as rp:
                t0 = time.perf_counter()
                fut = dcp.async_save(dcp_state(model, opt), checkpoint_id=str(dd), no_dist=True,
                                     async_checkpointer_type=AsyncCheckpointerType.THREAD)
                t1 = time.perf_counter()
                (fut.upload_completion if hasattr(fut, "upload_completion") else fut).result()
                t2 = time.perf_counter()
            dmem.append(rp.extra)
            return {"blocking": t1 - t0, "total": t2 - t0}
        r = repeat("dcp.async_save (thread)", reps, dasave, before=lambda i: (rm(dd), settle()))
        R.add("dcp_async_block", "peer", "dcp.async_save (thread): blocking", r["blocking"], nbytes=nbytes)
        R.add("dcp_async_total", "peer", "dcp.async_save (thread): total", r["total"], nbytes=nbytes)
        R.add("mem_dcp_async", "memory", "dcp.async_save (thread): peak extra RSS", dmem[1:] or dmem, unit="B",
              note="default stager copies into fresh memory every save")
        rm(dd)

    if not with_hf:
        R.skipped["hf_trainer"] = "disabled with --no-hf"
        return
    log("== peers: HF Trainer checkpoint (_save_checkpoint + fsync)")
    try:
        bench_hf(R, model, nbytes, work, reps)
    except Exception as err:
        R.skipped["hf_trainer"] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
        log(f"  HF Trainer skipped: {R.skipped['hf_trainer']}")
        traceback.print_exc()


def bench_hf(R: Results, model: nn.Module, nbytes: int, work: Path, reps: int) -> None:
    import logging
    from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)

    dims = [model[0].in_features] + [m.out_features for m in model]

    class StackConfig(PretrainedConfig):
        model_type = "safepoint-bench-stack"

        def __init__(self, dims: list[int] | None = None, **kw: Any) -> None:
            self.dims = list(dims or [8, 8])
            super().__init__(**kw)

    class StackModel(PreTrainedModel):
        config_class = StackConfig
        base_model_prefix = "stack"

        def __init__(self, cfg: StackConfig) -> None:
            super().__init__(cfg)
            d = cfg.dims
            self.layers = nn.ModuleList([nn.Linear(d[i], d[i + 1]) for i in range(len(d) - 1)])
            self.post_init()

        def _init_weights(self, module: nn.Module) -> None:
            pass

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    hm = StackModel(StackConfig(dims))
    with torch.no_grad():
        for a, b in zip(hm.layers, model):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
    out_dir = work / "hf"
    args = TrainingArguments(output_dir=str(out_dir), save_strategy="no", report_to=[], use_cpu=True,
                             optim="adamw_torch", save_safetensors=True) if _accepts_kw(TrainingArguments, "save_safetensors") \
        else TrainingArguments(output_dir=str(out_dir), save_strategy="no", report_to=[], use_cpu=True, optim="adamw_torch")
    tr = Trainer(model=hm, args=args)
    tr.create_optimizer_and_scheduler(num_training_steps=10)
    for p in hm.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    tr.optimizer.step()
    tr.optimizer.zero_grad(set_to_none=True)

    def hsave(i: int) -> dict[str, float]:
        tr.state.global_step = i + 2
        t0 = time.perf_counter()
        tr._save_checkpoint(tr.model, trial=None)
        t1 = time.perf_counter()
        fsync_tree(next(out_dir.iterdir()))
        t2 = time.perf_counter()
        return {"save": t2 - t0, "no_fsync": t1 - t0}
    r = repeat("HF Trainer _save_checkpoint", reps, hsave, before=lambda i: (rm(out_dir), settle()))
    R.add("hf_save", "peer", "HF Trainer _save_checkpoint + fsync of every file", r["save"], nbytes=nbytes,
          note="model.safetensors + optimizer.pt (torch.save) + rng/scheduler/trainer_state")
    rm(out_dir)
    del tr, hm
    gc.collect()


def _accepts_kw(cls: type, name: str) -> bool:
    import inspect
    try:
        return name in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------- training loop

class Saver:
    name = ""
    blocking: list[float]

    def __init__(self) -> None:
        self.blocking = []

    def save(self, step: int) -> None: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...


def bench_training(R: Results, work: Path, reps: int, train_bytes: int, batch: int, n_saves: int,
                   min_interval: float) -> None:
    log("== training loop: effective stall")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    dim = 2048
    layers = max(1, round(train_bytes / (12 * (dim * dim + dim))))
    torch.manual_seed(1)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(dim, dim), nn.ReLU()) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, dim)
    y = torch.randn(batch, dim)
    state = {"model": model, "optim": opt}

    def train_step() -> None:
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()

    for _ in range(25):  # the first steps allocate optimizer state and let malloc settle
        train_step()
    sbytes = nbytes_of(state_tensors(model, opt))
    wait_quiet()
    t0 = time.perf_counter()
    for _ in range(20):
        train_step()
    step_time = (time.perf_counter() - t0) / 20
    log(f"  training model: {layers} x Linear({dim},{dim}), batch {batch}, state {fmt_bytes(sbytes)}, "
        f"{step_time * 1000:.0f} ms/step")

    class TorchSave(Saver):
        name = "torch.save + fsync (sync)"

        def __init__(self) -> None:
            super().__init__()
            self.prev: Path | None = None

        def save(self, step: int) -> None:
            p = work / f"train_{step}.pt"
            with open(p, "wb") as f:
                torch.save(torch_obj(model, opt), f)
                f.flush()
                os.fsync(f.fileno())
            if self.prev:
                rm(self.prev)
            self.prev = p

        def close(self) -> None:
            if self.prev:
                rm(self.prev)

    class SpSync(Saver):
        name = "safepoint save (sync)"

        def __init__(self) -> None:
            super().__init__()
            self.mgr = CheckpointManager(work / "train_sp_sync", keep=KeepLast(1), signals=())

        def save(self, step: int) -> None:
            self.mgr.save(step, state)

        def close(self) -> None:
            self.mgr.close()
            rm(work / "train_sp_sync")

    class SpAsync(Saver):
        name = "safepoint save_async"

        def __init__(self) -> None:
            super().__init__()
            self.mgr = CheckpointManager(work / "train_sp_async", keep=KeepLast(1), signals=())

        def save(self, step: int) -> None:
            self.mgr.save_async(step, state)

        def finish(self) -> None:
            self.mgr.wait()

        def close(self) -> None:
            self.mgr.close()
            rm(work / "train_sp_async")

    class DcpAsync(Saver):
        name = "dcp.async_save (thread)"

        def __init__(self) -> None:
            super().__init__()
            self.fut: Any = None
            self.dirs: list[Path] = []

        def _wait(self) -> None:
            if self.fut is not None:
                (self.fut.upload_completion if hasattr(self.fut, "upload_completion") else self.fut).result()
                self.fut = None
                for d in self.dirs[:-1]:
                    rm(d)
                self.dirs = self.dirs[-1:]

        def save(self, step: int) -> None:
            self._wait()
            d = work / f"train_dcp_{step}"
            self.dirs.append(d)
            self.fut = dcp.async_save(dcp_state(model, opt), checkpoint_id=str(d), no_dist=True,
                                      async_checkpointer_type=AsyncCheckpointerType.THREAD)

        def finish(self) -> None:
            self._wait()

        def close(self) -> None:
            self._wait()
            for d in self.dirs:
                rm(d)

    savers = [TorchSave(), SpSync(), SpAsync(), DcpAsync()]
    # warm-up: one save each (allocates staging buffers, imports, first-touch of files)
    warm_times = {}
    for s in savers:
        wait_quiet()
        t0 = time.perf_counter()
        s.save(10**6)
        s.finish()
        warm_times[s.name] = time.perf_counter() - t0
        log(f"  warm-up save {s.name}: {warm_times[s.name]:.2f} s")
    settle()
    slowest = max(warm_times.values())
    every = max(10, math.ceil(max(min_interval, 2.5 * slowest) / step_time))
    every = min(every, max(10, int(12.0 / step_time)))  # keep a run under ~(saves + 1) * 12 s
    n_steps = (n_saves + 1) * every
    log(f"  loop: {n_steps} steps, a save every {every} steps ({n_saves} saves, the last has {every} steps "
        f"to finish in the background); {reps} reps")
    R.extra["training"] = {"layers": layers, "dim": dim, "batch": batch, "state_bytes": sbytes,
                           "step_time_s": step_time, "every": every, "n_steps": n_steps, "n_saves": n_saves,
                           "warmup_save_s": warm_times}

    def run(saver: Saver | None, base_step: int) -> float:
        t0 = time.perf_counter()
        for i in range(1, n_steps + 1):
            train_step()
            if saver is not None and i % every == 0 and i < n_steps:
                tb = time.perf_counter()
                saver.save(base_step + i)
                saver.blocking.append(time.perf_counter() - tb)
        if saver is not None:
            saver.finish()
        return time.perf_counter() - t0

    base: list[float] = []
    stalls: dict[str, list[float]] = {s.name: [] for s in savers}
    blocking: dict[str, list[float]] = {s.name: [] for s in savers}
    loads = CONTENTION.setdefault("training loop", [])
    step_base = 0

    def quiet_run(saver: Saver | None, label: str) -> float:
        nonlocal step_base
        for attempt in range(QUIET["retries"] + 1):
            settle()
            wait_quiet()
            step_base += 10 * n_steps
            if saver is not None:
                saver.blocking = []
            with Contention() as c:
                t = run(saver, step_base)
            busy = f"  [other processes: {c.foreign:.0%} CPU]" if c.foreign >= 0.05 else ""
            log(f"  {label}: {t:.2f} s ({t / n_steps * 1000:.0f} ms/step)" + busy)
            if c.foreign <= QUIET["limit"] or attempt == QUIET["retries"]:
                loads.append(round(c.foreign, 3))
                return t
            log(f"    contended run, running it again ({attempt + 1}/{QUIET['retries']})")
        raise AssertionError

    for rep in range(reps):
        # The baseline and every saver run in a shuffled order each repetition: whatever the run
        # before leaves behind (writeback, memory being handed back to the host) then slows each
        # of them alike instead of always the one that comes first.
        order: list[Saver | None] = [None, *savers]
        random.shuffle(order)
        walls: dict[str, float] = {}
        for saver in order:
            name = "baseline" if saver is None else saver.name
            walls[name] = quiet_run(saver, f"rep {rep + 1}/{reps} {name}")
            if saver is not None:
                blocking[saver.name] += saver.blocking
        b = walls["baseline"]
        base.append(b)
        for s in savers:
            stall = (walls[s.name] - b) / n_saves
            stalls[s.name].append(stall)
            log(f"    {s.name}: stall/save {stall:.3f} s, blocking/save {statistics.median(s.blocking):.3f} s")
    for s in savers:
        s.close()
    R.add("train_baseline", "train", "training loop baseline (no saves): s per step",
          [b / n_steps for b in base], note=f"{n_steps} steps per run")
    keys = {"torch.save + fsync (sync)": "torchsave", "safepoint save (sync)": "sp_sync",
            "safepoint save_async": "sp_async", "dcp.async_save (thread)": "dcp_async"}
    for s in savers:
        k = keys[s.name]
        R.add(f"train_block_{k}", "train", f"{s.name}: blocking per save", blocking[s.name], nbytes=sbytes)
        R.add(f"train_stall_{k}", "train", f"{s.name}: effective stall per save", stalls[s.name],
              note="(wall - baseline) / saves")
    del model, opt, state
    gc.collect()


# ---------------------------------------------------------------------------------------- report

def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def compute_ratios(R: Results) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    m, g = R.med, R.gbps
    rat = {
        "save_gbps_vs_disk_write": ratio(g("sp_save"), g("floor_write")),
        "save_gbps_vs_buffered_write": ratio(g("sp_save"), g("floor_write_buffered")),
        "restore_gbps_vs_cold_read": ratio(g("sp_restore"), g("floor_read")),
        "restore_gbps_vs_cold_read_fastest": ratio(R.best_gbps("sp_restore"), R.best_gbps("floor_read")),
        "async_block_vs_staging_floor": ratio(m("sp_async_block"), m("floor_staging")),
        "async_block_vs_torch_save": ratio(m("sp_async_block"), m("torch_save")),
        "async_block_vs_dcp_async_block": ratio(m("sp_async_block"), m("dcp_async_block")),
        "stall_async_vs_sync_torch_save": ratio(m("train_stall_sp_async"), m("train_stall_torchsave")),
        "stall_async_vs_dcp_async": ratio(m("train_stall_sp_async"), m("train_stall_dcp_async")),
        "save_time_vs_torch_save": ratio(m("sp_save"), m("torch_save")),
        "save_time_vs_save_file": ratio(m("sp_save"), m("st_save")),
        "save_time_vs_dcp_save": ratio(m("sp_save"), m("dcp_save")),
        "save_time_vs_hf_trainer": ratio(m("sp_save"), m("hf_save")),
        "restore_time_vs_torch_load": ratio(m("sp_restore"), m("torch_load")),
        "restore_time_vs_torch_load_apply": ratio(m("sp_restore"), m("torch_load_apply")),
        "size_vs_tensor_bytes": R.extra.get("size", {}).get("ratio"),
        "async_peak_extra_vs_state_first": ratio(m("mem_sp_async_first"), R.extra.get("state_bytes")),
        "async_peak_extra_vs_state_steady": ratio(m("mem_sp_async_steady"), R.extra.get("state_bytes")),
        "staging_vs_state": ratio(m("mem_sp_staging"), R.extra.get("state_bytes")),
    }

    def check(name: str, value: float | None, op: str, target: float) -> dict[str, Any]:
        if value is None:
            return {"goal": name, "value": None, "target": f"{op} {target:g}", "met": None}
        met = {"<=": value <= target, "<": value < target, ">=": value >= target}[op]
        return {"goal": name, "value": value, "target": f"{op} {target:g}", "met": met}

    goals = [
        check("save_async blocking / staging floor", rat["async_block_vs_staging_floor"], "<=", 1.5),
        check("save_async blocking / dcp.async_save blocking", rat["async_block_vs_dcp_async_block"], "<", 1.0),
        check("effective stall: save_async / sync torch.save", rat["stall_async_vs_sync_torch_save"], "<=", 0.5),
        check("save GB/s / disk durable write GB/s (O_DIRECT)", rat["save_gbps_vs_disk_write"], ">=", 0.8),
        check("save time / torch.save time", rat["save_time_vs_torch_save"], "<", 1.0),
        check("save time / save_file time", rat["save_time_vs_save_file"], "<", 1.0),
        check("save time / dcp.save time", rat["save_time_vs_dcp_save"], "<", 1.0),
        check("verified restore GB/s / cold read GB/s", rat["restore_gbps_vs_cold_read"], ">=", 0.85),
        check("verified restore time / torch.load time", rat["restore_time_vs_torch_load"], "<=", 1.0),
        check("size on disk / tensor bytes", rat["size_vs_tensor_bytes"], "<=", 1.001),
    ]
    return rat, goals


def f3(v: float | None, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def render_md(R: Results, info: dict[str, Any], cfg: dict[str, Any], rat: dict[str, Any],
              goals: list[dict[str, Any]]) -> str:
    L: list[str] = []
    L.append("# safepoint benchmark\n")
    L.append(f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `python benchmarks/run.py "
             f"{' '.join(cfg['argv'])}` in {cfg['wall_s']:.0f} s.\n")
    st = R.extra.get("state", {})
    L.append(f"**State**: {st.get('desc', '')} — {fmt_bytes(R.extra.get('state_bytes', 0))} of tensors "
             f"({st.get('n_tensors', '?')} tensors). Each method: 1 warm-up, then {cfg['reps']} measured reps; "
             "median (min–max). GB/s = tensor bytes / median time (floors: bytes written or read).\n")
    fs = info["filesystem"]
    L.append("## Machine\n")
    L.append("| | |\n|---|---|")
    L.append(f"| CPU | {info['cpu_model']}, {info['cpu_count']} logical cores ({info['cpu_affinity']} usable), "
             f"torch threads {info['torch_threads']}, SHA-NI {'yes' if info['sha256_hw'] else 'no'} |")
    L.append(f"| RAM | {info['ram_h']} |")
    L.append(f"| bench dir | `{info['bench_dir']}` on {fs.get('device', '?')} ({fs.get('type', '?')}, "
             f"{fs.get('options', '')}), {fs.get('free', '')} free, I/O scheduler `{info['io_scheduler']}` |")
    L.append(f"| kernel | {info['kernel']}; vm.dirty_ratio {info['vm'].get('dirty_ratio')}, "
             f"dirty_background_ratio {info['vm'].get('dirty_background_ratio')}; THP `{info['transparent_hugepage']}` |")
    v = info["versions"]
    L.append(f"| software | python {v.get('python')}, torch {v.get('torch')}, safepoint {v.get('safepoint')}, "
             f"safetensors {v.get('safetensors')}, transformers {v.get('transformers', '-')}, numpy {v.get('numpy')} |")
    alloc = info["allocator_env"]
    L.append(f"| allocator | {info['allocator_note']}"
             + ("".join(f"; `{k}={val}`" for k, val in alloc.items()) if alloc else "")
             + "; PYTORCH_CPU_ALLOCATOR " + (os.environ.get("PYTORCH_CPU_ALLOCATOR") or "unset") + " |")
    L.append(f"| cold reads | page cache evicted with `{R.extra.get('read_cold_method', '?')}` before every cold read |")
    loads = [v for vs in CONTENTION.values() for v in vs]
    if loads:
        worst = max(CONTENTION.items(), key=lambda kv: max(kv[1]) if kv[1] else 0)
        L.append(f"| other processes | CPU share other processes took during the kept repetitions: median "
                 f"{statistics.median(loads):.0%}, max {max(loads):.0%} ({worst[0]}); the run waited "
                 f"{QUIET['waited']:.0f} s in all for quiet (threshold {QUIET['threshold']:.0%}, reps above "
                 f"{QUIET['limit']:.0%} re-run up to {QUIET['retries']}×) |")
    L.append("")

    def table(keys_groups: list[tuple[str, list[str]]], ref: dict[str, tuple[str, str]] | None = None) -> None:
        L.append("| row | median s | min s | max s | GB/s | ratio | note |")
        L.append("|---|---:|---:|---:|---:|---|---|")
        for title, keys in keys_groups:
            if title:
                L.append(f"| **{title}** | | | | | | |")
            for k in keys:
                row = R.rows.get(k)
                if row is None:
                    continue
                r = ""
                if ref and k in ref:
                    r = ref[k][1].format(ref_val=rat.get(ref[k][0])) if rat.get(ref[k][0]) is not None else ""
                L.append(f"| {row['label']} | {f3(row.get('median'))} | {f3(row.get('min'))} | {f3(row.get('max'))} "
                         f"| {f3(row.get('gbps'), 2)} | {r} | {row['note']} |")

    L.append("## Throughput and latency\n")
    ref = {
        "sp_save": ("save_gbps_vs_disk_write", "{ref_val:.2f}× disk write GB/s"),
        "sp_restore": ("restore_gbps_vs_cold_read", "{ref_val:.2f}× cold read GB/s"),
        "sp_async_block": ("async_block_vs_staging_floor", "{ref_val:.2f}× staging floor"),
        "torch_save": ("save_time_vs_torch_save", "safepoint save = {ref_val:.2f}× this"),
        "st_save": ("save_time_vs_save_file", "safepoint save = {ref_val:.2f}× this"),
        "dcp_save": ("save_time_vs_dcp_save", "safepoint save = {ref_val:.2f}× this"),
        "hf_save": ("save_time_vs_hf_trainer", "safepoint save = {ref_val:.2f}× this"),
        "dcp_async_block": ("async_block_vs_dcp_async_block", "safepoint blocking = {ref_val:.2f}× this"),
        "torch_load": ("restore_time_vs_torch_load", "safepoint restore = {ref_val:.2f}× this"),
        "torch_load_apply": ("restore_time_vs_torch_load_apply", "safepoint restore = {ref_val:.2f}× this"),
        "train_stall_sp_async": ("stall_async_vs_sync_torch_save", "{ref_val:.2f}× torch.save stall"),
    }
    table([("floors", ["floor_staging", "floor_fresh_copy", "floor_write", "floor_write_buffered", "floor_pagecache",
                       "floor_pagecache_reuse", "floor_read", "floor_read_fresh", "floor_read_direct"]),
           ("safepoint", ["sp_save", "sp_async_block", "sp_async_total", "sp_restore", "sp_restore_warm"]),
           ("peers", ["torch_save", "st_save", "dcp_save", "dcp_async_block", "dcp_async_total", "hf_save",
                      "torch_load", "torch_load_apply", "st_load"])], ref)
    if R.skipped:
        L.append("")
        for k, why in R.skipped.items():
            L.append(f"- skipped **{k}**: {why}")
    L.append("")
    tr = R.extra.get("training")
    if tr:
        L.append("## Effective stall in a training loop\n")
        L.append(f"Model: {tr['layers']} × (Linear({tr['dim']},{tr['dim']}) + ReLU), batch {tr['batch']}, "
                 f"fused AdamW; saved state (model + optimizer) {fmt_bytes(tr['state_bytes'])}; "
                 f"{tr['step_time_s'] * 1000:.0f} ms/step before the runs. Each run: {tr['n_steps']} steps, a save "
                 f"every {tr['every']} steps ({tr['n_saves']} saves; the run ends {tr['every']} steps after the last "
                 "save and then waits for any save still in flight, so unfinished background work is counted). "
                 "Stall per save = (run wall time − baseline run wall time, same rep) / saves. Checkpoints: "
                 "keep the newest only (safepoint `KeepLast(1)`; peers delete the previous one after a save).\n")
        table([("", ["train_baseline", "train_block_torchsave", "train_stall_torchsave", "train_block_sp_sync",
                     "train_stall_sp_sync", "train_block_sp_async", "train_stall_sp_async", "train_block_dcp_async",
                     "train_stall_dcp_async"])], ref)
        L.append("")
    L.append("## Memory and size\n")
    L.append("| row | median | min | max | relative to state | note |")
    L.append("|---|---:|---:|---:|---:|---|")
    sb = R.extra.get("state_bytes", 1)
    for k in ["mem_sp_async_first", "mem_sp_async_steady", "mem_sp_staging", "mem_dcp_async", "sp_size"]:
        row = R.rows.get(k)
        if row is None:
            continue
        L.append(f"| {row['label']} | {fmt_bytes(row['median'])} | {fmt_bytes(row['min'])} | {fmt_bytes(row['max'])} "
                 f"| {row['median'] / sb:.4f}× | {row['note']} |")
    L.append("\nPeak extra RSS = max(VmRSS sampled every 5 ms, VmHWM after a reset) − RSS just before the call; "
             "page cache is not counted.\n")
    L.append("## Ratios (computed in this run)\n")
    L.append("| ratio | value |\n|---|---:|")
    for k, val in rat.items():
        L.append(f"| {k} | {f3(val)} |")
    L.append("\n## Goals\n")
    L.append("| goal | measured | target | status |\n|---|---:|---|---|")
    for gl in goals:
        status = "n/a" if gl["met"] is None else ("**met**" if gl["met"] else "**MISSED**")
        L.append(f"| {gl['goal']} | {f3(gl['value'])} | {gl['target']} | {status} |")
    bd = R.extra.get("sp_save_breakdown")
    rb = R.extra.get("sp_restore_breakdown")
    if bd or rb:
        L.append("\n## Where safepoint's time goes (one extra instrumented save / cold restore)\n")
        if bd:
            L.append("Save: " + ", ".join(f"{k} {v}" for k, v in bd.items()) +
                     " — `write_calls` = HashingWriter.write (write() into the page cache + waiting for the "
                     "hash of the previous chunk), `close` = fsync + final hash wait, `other` = collect/encode, "
                     "space check, state.json/manifest, rename, retention.\n")
        if rb:
            L.append("Restore: " + ", ".join(f"{k} {v}" for k, v in rb.items()) +
                     " — `read_verify` = read_tensors_verified (read + hash check), `apply` = load_state_dict.\n")
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description="safepoint benchmark (see benchmarks/README.md)")
    p.add_argument("--size", type=parse_size, default=None, help="state size, e.g. 1.5GB (default), 200MB")
    p.add_argument("--reps", type=int, default=None, help="measured repetitions per method (default 5)")
    p.add_argument("--dir", type=Path, default=None,
                   help="scratch directory on the filesystem to test (default benchmarks/results/scratch.tmp)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="where benchmark.json/.md go")
    p.add_argument("--quick", action="store_true", help="smoke run: 200MB, 2 reps, small training loop")
    p.add_argument("--train-size", type=parse_size, default=None,
                   help="state size of the training-loop model (default 0.75GB; quick 0.2GB)")
    p.add_argument("--train-batch", type=int, default=8, help="batch size of the training loop")
    p.add_argument("--train-saves", type=int, default=None, help="saves per training run (default 3; quick 2)")
    p.add_argument("--only", default="floors,safepoint,peers,reads,train",
                   help="comma list of sections to run: floors,safepoint,peers,reads,train")
    p.add_argument("--no-hf", action="store_true", help="skip the HF Trainer peer")
    p.add_argument("--quiet-wait", type=float, default=120.0,
                   help="before each rep, wait up to this many seconds for other processes to go quiet")
    args = p.parse_args(argv)
    size = args.size or (200 * 10**6 if args.quick else int(1.5e9))
    reps = args.reps or (2 if args.quick else 5)
    train_bytes = args.train_size or (int(0.2e9) if args.quick else int(0.75e9))
    n_saves = args.train_saves or (2 if args.quick else 3)
    sections = set(args.only.split(","))
    QUIET["max_wait"] = args.quiet_wait
    torch.set_flush_denormal(True)

    base = (args.dir or HERE / "results" / "scratch.tmp").resolve()
    base.mkdir(parents=True, exist_ok=True)
    work = base / f"bench-{os.getpid()}"
    work.mkdir()
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine_info(base)
    log(f"safepoint benchmark: state {fmt_bytes(size)}, {reps} reps, scratch {work}")
    log(f"machine: {info['cpu_model']}, {info['cpu_count']} cores, {info['ram_h']} RAM, "
        f"{info['filesystem'].get('type')} on {info['filesystem'].get('device')}")

    R = Results()
    t_start = time.perf_counter()
    try:
        log("== building state")
        model, opt = build_state(size)
        ts = state_tensors(model, opt)
        nbytes = nbytes_of(ts)
        R.extra["state_bytes"] = nbytes
        shapes = [tuple(m.weight.shape) for m in model]
        R.extra["state"] = {"desc": f"{len(shapes)} × nn.Linear ({shapes[0][1]}→{shapes[0][0]}"
                                    + (f", last →{shapes[-1][0]}" if shapes[-1] != shapes[0] else "")
                                    + ") fp32 + AdamW exp_avg/exp_avg_sq after one step",
                            "n_tensors": len(ts), "layers": shapes}
        log(f"  state: {R.extra['state']['desc']}: {fmt_bytes(nbytes)}")
        if "floors" in sections:
            bench_floors(R, ts, nbytes, work, reps)
        del ts
        if "safepoint" in sections:
            bench_safepoint(R, model, opt, nbytes, work, reps)
        if "peers" in sections:
            bench_peers(R, model, opt, nbytes, work, reps, with_hf=not args.no_hf)
        if "reads" in sections:
            bench_reads(R, model, opt, nbytes, work, reps)
        del model, opt
        gc.collect()
        if "train" in sections:
            bench_training(R, work, reps, train_bytes, args.train_batch, n_saves, min_interval=2.0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.dir is None:
            with contextlib.suppress(OSError):
                base.rmdir()

    rat, goals = compute_ratios(R)
    # No machine paths in the results: the scratch directory is named by its filesystem only.
    info["bench_dir"] = "<bench dir>"
    shown_argv = ["<bench dir>" if a == str(args.dir) else a for a in argv]
    cfg = {"argv": shown_argv, "size": size, "reps": reps, "train_bytes": train_bytes,
           "wall_s": time.perf_counter() - t_start, "dir": "<bench dir>"}
    md = render_md(R, info, cfg, rat, goals)

    def clean(o: Any) -> Any:
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, Path):
            return str(o)
        if isinstance(o, float) and not math.isfinite(o):
            return None
        return o
    doc = {"config": cfg, "machine": info, "rows": R.rows, "skipped": R.skipped, "extra": R.extra,
           "ratios": rat, "goals": goals, "contention": CONTENTION,
           "quiet": {k: QUIET[k] for k in ("max_wait", "threshold", "limit", "retries", "waited")}}
    (args.out / "benchmark.json").write_text(json.dumps(clean(doc), indent=1, default=str))
    (args.out / "benchmark.md").write_text(md)
    print()
    print(md)
    log(f"wrote {args.out / 'benchmark.json'} and {args.out / 'benchmark.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
