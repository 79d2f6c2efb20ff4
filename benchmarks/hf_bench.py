#!/usr/bin/env python
"""How long the Hugging Face Trainer's training loop stands still per checkpoint, four ways.

    python benchmarks/hf_bench.py [--reps 5] [--hidden 768] [--layers 6] [--vocab 32000] [--every 3]
                                  [--dir PATH] [--out benchmarks/results] [--quick]

A random-initialised Llama (built from a config, no download) trains on CPU with the Trainer's
AdamW; every run saves every ``--every`` steps and lasts four intervals. The modes:

* ``trainer``: the Trainer's own save, nothing else (not durable: it never fsyncs) — the reference;
* ``trainer + fsync``: the same, then every file fsynced in ``on_save`` (what durability costs it);
* ``safepoint sync``: ``SafepointCallback()``: budget check, the Trainer's save, fsync + hash +
  manifest in ``on_save``;
* ``safepoint async``: ``SafepointCallback(async_save=True)``: budget check, the Trainer's save into
  ``/dev/shm``, then copy + hash + fsync + manifest + rename on the background writer.

Measured per save (the three saves inside the run; the run's last save is left out, since every
mode waits for it at the end):

* **blocked**: time from the end of the step that saves to the start of the next step, minus the
  same gap for steps that do not save (the data loader's share);
* **effective stall**: (time of the steps from step 2 to the last step, minus the same for a run
  that never saves, same repetition) / 3: also charges what the background writer takes from the
  training threads (CPU, memory bandwidth, page cache);
* **committed after**: from the end of the step to the ``save`` event in ``events.jsonl`` (when the
  checkpoint is durable and visible).

Each repetition runs every mode once (the order rotates), each from the same initial weights in a
fresh output directory, after ``sync`` and a wait for a quiet machine (``run.py``'s rules: a run
during which other processes took over 15% of the CPUs is run again). Results:
``<out>/hf.md`` and ``<out>/hf.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from run import QUIET, Contention, fmt_bytes, log, machine_info, settle, tree_bytes, wait_quiet  # noqa: E402

from safepoint.hf import SafepointCallback  # noqa: E402
from safepoint.integrations.hf_async import RAM_DIR  # noqa: E402

warnings.filterwarnings("ignore")
MODES = ("trainer", "trainer + fsync", "safepoint sync", "safepoint async")
REFERENCE = "trainer"


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, args.hidden // 64)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 4), max_position_embeddings=args.seq,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int, vocab: int) -> None:
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def clock_callback() -> Any:
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        """First in the list: times every step and the gap after it (where a save happens)."""

        def __init__(self) -> None:
            self.begin: dict[int, float] = {}
            self.end: dict[int, float] = {}
            self.end_wall: dict[int, float] = {}
            self.saves: list[int] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin[state.global_step + 1] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.end[state.global_step] = time.perf_counter()
            self.end_wall[state.global_step] = time.time()
            if control.should_save:
                self.saves.append(state.global_step)

    return Clock()


def fsync_callback() -> Any:
    from transformers import TrainerCallback

    class FsyncOnSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            root = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            for dirpath, _, names in os.walk(root):
                for name in names + ["."]:
                    fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)

    return FsyncOnSave()


def train_once(mode: str, model: torch.nn.Module, initial: dict[str, torch.Tensor], data: Tokens, out: Path,
               args: argparse.Namespace, steps: int) -> dict[str, Any]:
    from transformers import Trainer, TrainingArguments

    model.load_state_dict(initial)
    clock = clock_callback()
    callbacks = [clock]
    if mode == "trainer + fsync":
        callbacks.append(fsync_callback())
    elif mode.startswith("safepoint"):
        callbacks.append(SafepointCallback(async_save=mode == "safepoint async"))
    training = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=args.batch, learning_rate=1e-4,
        save_strategy="no" if mode == "no saves" else "steps", save_steps=args.every, logging_strategy="no",
        report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=data, callbacks=callbacks)
    trainer.train()
    last = steps
    window = clock.end[last] - clock.begin[2]
    in_loop = [s for s in clock.saves if s != last]
    gaps = {s: clock.begin[s + 1] - clock.end[s] for s in range(1, last)}
    plain_gap = statistics.median(g for s, g in gaps.items() if s not in in_loop)
    result: dict[str, Any] = {"window": window, "blocked": [gaps[s] - plain_gap for s in in_loop],
                              "saves": in_loop, "step_s": statistics.median(
                                  clock.end[s] - clock.begin[s] for s in range(2, last + 1) if s not in in_loop)}
    events = out / "events.jsonl"
    if events.exists():
        saved = {e["step"]: datetime.fromisoformat(e["time"]).timestamp()
                 for e in map(json.loads, events.read_text().splitlines()) if e["event"] == "save"}
        result["committed_after"] = [saved[s] - clock.end_wall[s] for s in in_loop]
    ckpt = out / f"checkpoint-{in_loop[0]}" if in_loop else None
    if ckpt is not None and ckpt.exists():
        result["checkpoint_bytes"] = tree_bytes(ckpt)[0]
        result["files"] = sorted(p.name for p in ckpt.iterdir())
    return result


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def render(doc: dict[str, Any]) -> str:
    cfg, rows, info = doc["config"], doc["rows"], doc["machine"]
    ref_blocked = rows[REFERENCE]["blocked"]["median"]
    ref_effective = rows[REFERENCE]["effective"]["median"]

    def cell(s: dict[str, float]) -> str:
        return f"{s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f})"

    def ratio(value: float, ref: float) -> str:
        return f"{value / ref:.2f}×" if ref > 0 else "-"

    lines = [
        "# Hugging Face Trainer: training-loop stall per checkpoint",
        "",
        f"Generated {doc['generated']} by `{' '.join(['python benchmarks/hf_bench.py', *cfg['argv']])}` in "
        f"{cfg['wall_s']:.0f} s. Method: `benchmarks/hf_bench.py` (docstring).",
        "",
        f"**Run**: {cfg['model']}, CPU, batch {cfg['batch']} × {cfg['seq']} tokens, the Trainer's AdamW; "
        f"{cfg['step_s']:.2f} s per step; a save every {cfg['every']} steps, {cfg['steps']} steps per run "
        f"(3 saves measured per run); {cfg['reps']} runs per mode, so {rows[REFERENCE]['blocked']['n']} saves "
        f"per mode. **Checkpoint**: {fmt_bytes(cfg['checkpoint_bytes'])} ({', '.join(cfg['files'])}).",
        "",
        f"**Machine**: {info['cpu_model']}, {info['cpu_affinity']} cores, torch threads {info['torch_threads']}, "
        f"RAM {info['ram_h']}; output on {info['filesystem'].get('type', '?')}; async staging in "
        f"{cfg['staging']}; transformers {info['versions'].get('transformers', '?')}, "
        f"torch {info['versions']['torch']}. Other processes took a median "
        f"{cfg['other_processes_cpu']['median']:.0%} (max {cfg['other_processes_cpu']['max']:.0%}) of the CPUs "
        "during the kept runs (a run above 15% is run again, up to twice).",
        "",
        "Times in seconds: median (min–max). Ratios: median / the Trainer's own save's median.",
        "",
        "| mode | durable | blocked per save | × Trainer's own | effective stall per save | × Trainer's own "
        "| committed after |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        row = rows[mode]
        committed = f"{row['committed_after']['median']:.3f}" if "committed_after" in row else "-"
        durable = {"trainer": "no (never fsyncs)", "trainer + fsync": "files only, no manifest",
                   "safepoint sync": "yes", "safepoint async": "yes, once committed"}[mode]
        lines.append(f"| {mode} | {durable} | {cell(row['blocked'])} | {ratio(row['blocked']['median'], ref_blocked)} "
                     f"| {cell(row['effective'])} | {ratio(row['effective']['median'], ref_effective)} | {committed} |")
    lines += [
        "",
        "*blocked*: end of the saving step to the start of the next one, minus the same gap without a save. "
        "*effective stall*: (run time − a run without saves, same repetition) / saves; it also charges the "
        "background writer's use of the CPU, and is noisier (the difference of two runs). *committed after*: "
        "end of the step to the checkpoint's `save` event (durable and visible to `latest_checkpoint`).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--every", type=int, default=3, help="save every N steps")
    p.add_argument("--dir", type=Path, default=None, help="scratch directory (on the disk to test)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--quick", action="store_true", help="smoke run: a small model, 2 repetitions")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.hidden, args.layers, args.vocab = 2, 256, 2, 8000
    if args.reps < 1 or args.every < 2:
        p.error("--reps must be >= 1 and --every >= 2")
    base = args.dir or HERE / "results" / "scratch.tmp"
    work = base / f"hf-bench-{os.getpid()}"
    work.mkdir(parents=True)
    t_start = time.perf_counter()
    steps = 4 * args.every
    try:
        model = build_model(args)
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        params = sum(t.numel() for t in model.parameters())
        data = Tokens(steps * args.batch, args.seq, args.vocab)
        log(f"model: {params / 1e6:.1f}M parameters, {fmt_bytes(params * 4)} of fp32 weights")
        for mode in MODES:  # warm-up: imports, allocator, the first staging directory
            train_once(mode, model, initial, data, work / "warmup", args, args.every)
            shutil.rmtree(work / "warmup", ignore_errors=True)
        samples: dict[str, dict[str, list[float]]] = {m: {"blocked": [], "effective": [], "committed_after": []}
                                                       for m in MODES}
        extra: dict[str, Any] = {}
        foreign: list[float] = []
        for rep in range(args.reps):
            order = ["no saves"] + [MODES[(rep + i) % len(MODES)] for i in range(len(MODES))]
            windows = {}
            for mode in order:
                out = work / f"r{rep}-{mode.replace(' ', '').replace('+', '-')}"
                for attempt in range(1 + QUIET["retries"]):  # a run disturbed by other processes is run again
                    shutil.rmtree(out, ignore_errors=True)
                    settle()
                    wait_quiet()
                    with Contention() as busy:
                        result = train_once(mode, model, initial, data, out, args, steps)
                    if busy.foreign <= QUIET["limit"]:
                        break
                    log(f"    other processes took {busy.foreign:.0%} of the CPUs during {mode}; again")
                foreign.append(busy.foreign)
                windows[mode] = result["window"]
                if mode == "no saves":
                    extra.setdefault("step_s", []).append(result["step_s"])
                else:
                    samples[mode]["blocked"] += result["blocked"]
                    samples[mode]["committed_after"] += result.get("committed_after", [])
                    if "checkpoint_bytes" in result and mode == REFERENCE:
                        extra["checkpoint_bytes"], extra["files"] = result["checkpoint_bytes"], result["files"]
                    log(f"rep {rep + 1}/{args.reps} {mode}: blocked "
                        + ", ".join(f"{b:.3f}" for b in result["blocked"]) + " s")
                shutil.rmtree(out, ignore_errors=True)
            for mode in MODES:
                samples[mode]["effective"].append((windows[mode] - windows["no saves"]) / 3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.dir is None:
            try:
                base.rmdir()
            except OSError:
                pass

    info = machine_info(base if base.exists() else HERE)
    info["bench_dir"] = "<bench dir>"
    shown = ["<bench dir>" if a == str(args.dir) else a for a in argv]
    rows = {m: {k: summary(v) for k, v in s.items() if v} for m, s in samples.items()}
    cfg = {"argv": shown, "reps": args.reps, "every": args.every, "steps": steps, "batch": args.batch,
           "seq": args.seq, "wall_s": time.perf_counter() - t_start, "step_s": statistics.median(extra["step_s"]),
           "model": f"Llama {params / 1e6:.0f}M parameters (hidden {args.hidden}, {args.layers} layers, "
                    f"vocab {args.vocab}, untied head), random init, fp32",
           "checkpoint_bytes": extra["checkpoint_bytes"], "files": extra["files"],
           "staging": f"{RAM_DIR} (tmpfs)" if RAM_DIR.is_dir() else "the output directory",
           "other_processes_cpu": summary(foreign)}
    doc = {"generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), "config": cfg,
           "machine": info, "rows": rows, "samples": samples}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hf.json").write_text(json.dumps(doc, indent=1, default=str))
    md = render(doc)
    (args.out / "hf.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
