"""The safepoint demo: a training run killed twice with SIGKILL, resumed, and proven exact.

1. trains examples/train.py once without interruption (the reference);
2. trains it again in a fresh run directory, killing the process with SIGKILL twice at random
   moments (possibly mid-save) and restarting it each time with the same command;
3. compares the final weights of both runs bit for bit.

    python examples/demo.py [--steps 400] [--dir runs/demo]
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent


def train_cmd(run_dir: Path, steps: int, out: Path) -> list[str]:
    return [sys.executable, str(HERE / "train.py"), "--dir", str(run_dir), "--steps", str(steps),
            "--every", "10", "--sleep", "0.01", "--out", str(out)]


def wait_for_start(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline().strip()  # "start step N", printed right after restore
    return line


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--dir", default="runs/demo")
    p.add_argument("--seed", type=int, default=None, help="seed for the kill times (default: random)")
    args = p.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = random.Random(args.seed)

    print(f"[1/3] reference run: {args.steps} steps without interruption")
    subprocess.run(train_cmd(root / "reference", args.steps, root / "reference.safetensors"), check=True,
                   stdout=subprocess.DEVNULL)

    print("[2/3] the same run, killed twice with SIGKILL and restarted")
    cmd = train_cmd(root / "crashy", args.steps, root / "crashy.safetensors")
    for attempt in range(3):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        print(f"      attempt {attempt + 1}: {wait_for_start(proc)}")
        if attempt < 2:
            time.sleep(rng.uniform(1.0, 2.0))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            print(f"      attempt {attempt + 1}: killed with SIGKILL (exit {proc.returncode})")
        else:
            proc.wait()
            if proc.returncode != 0:
                print(f"      the final attempt failed with exit code {proc.returncode}")
                return 1
            print(f"      attempt {attempt + 1}: finished")

    print("[3/3] comparing final weights")
    ref = load_file(root / "reference.safetensors")
    got = load_file(root / "crashy.safetensors")
    same = ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    if same:
        print(f"OK: after two SIGKILLs the final weights equal the uninterrupted run's bit for bit "
              f"({len(ref)} tensors). Checkpoints: {root / 'crashy'}; try: ls {root / 'crashy'}")
        return 0
    print("FAIL: the resumed run's weights differ from the uninterrupted run's")
    return 1


if __name__ == "__main__":
    sys.exit(main())
