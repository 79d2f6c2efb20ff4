"""How long do this run's saves take? The number a stop grace period must cover.

    python examples/deploy/save_times.py RUN_DIR [--step-seconds 2]

Reads the ``save`` events of ``RUN_DIR/events.jsonl`` (each records its duration and size) and
prints the slowest and median save, and a grace period: one training step plus twice the slowest
save, rounded up to 10 s. Use it for the supervisor's ``--grace``, and give the platform 10 s more
(Kubernetes ``terminationGracePeriodSeconds``, compose ``stop_grace_period``, SLURM ``--signal=USR1@N``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--step-seconds", type=float, default=0.0, help="how long one training step takes")
    args = p.parse_args(argv)
    saves = []
    for line in (args.run_dir / "events.jsonl").read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "save" and isinstance(event.get("seconds"), (int, float)):
            saves.append((event["seconds"], event.get("size") or 0))
    if not saves:
        print(f"no save events in {args.run_dir}/events.jsonl yet: let the run save a few times", file=sys.stderr)
        return 1
    slowest, size = max(saves)
    grace = 10 * math.ceil((args.step_seconds + 2 * slowest) / 10)
    print(f"{len(saves)} saves; median {statistics.median(s for s, _ in saves):.2f}s; slowest {slowest:.2f}s "
          f"({size / 1e9:.2f} GB)")
    print(f"safepoint run --grace {grace}s; platform grace (terminationGracePeriodSeconds) {grace + 10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
