"""The ``safepoint`` command: list, check and tidy checkpoint directories from a shell.

Works on safepoint runs and on Hugging Face Trainer / ms-swift output directories. It is a thin
layer over ``rundir`` (listing, verification), ``prune`` (prune, gc, pin) and ``hfdir``, so scripts,
the library and any other front end get the same answers. Exit codes scripts can rely on:

    0  ok
    1  verification failed, corruption found, or a deletion failed
    2  bad input: no such directory, not a run, conflicting options, an impossible budget, an
       unknown step or metric, a run locked by a live writer, a prune not confirmed. One
       ``error: ...`` line on stderr, and nothing is deleted.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from typer.core import TyperGroup
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .disk import format_size
from .encoding import summary as encoding_summary
from .errors import CorruptCheckpoint, SafepointError, UnsupportedFormat
from .prune import PlannedDeletion, PrunePlan, collect_garbage, parse_keep_best, policies_from_options, prune, set_pinned
from .rundir import bytes_to_hash, details, listing, open_run, verify_run, verify_targets

try:  # typer >= 0.22 vendors click; its usage errors derive from TyperException
    from typer import TyperException as _UsageError
except ImportError:  # older typer re-uses click
    from click import ClickException as _UsageError  # type: ignore[assignment]


class _OneLineErrors(TyperGroup):
    """Usage errors become one ``error: ...`` line with exit 2, like the command's own bad input."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _UsageError as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # bare `safepoint`: the help, as click shows it
                err.show()
            else:
                _echo_error(err.format_message())
            sys.exit(2)
        except typer.Abort:
            _echo_error("aborted; nothing deleted")
            sys.exit(2)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(cls=_OneLineErrors, no_args_is_help=True, add_completion=False,
                  help="Inspect, verify and prune safepoint runs and Hugging Face output directories.")

Dir = Annotated[Path, typer.Argument(help="a safepoint run directory or a Hugging Face output dir")]
Step = Annotated[int, typer.Argument(help="the checkpoint's step")]
AsJson = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def _echo_error(message: str) -> None:
    typer.echo("error: " + " ".join(message.split("\n")), err=True)


def _fail(message: str, code: int = 2) -> NoReturn:
    _echo_error(message)
    raise typer.Exit(code)


@contextmanager
def _handled() -> Iterator[None]:
    """Library errors as exit codes: corruption 1, every other refusal (bad input) 2."""
    try:
        yield
    except (CorruptCheckpoint, UnsupportedFormat) as err:
        _fail(str(err), 1)
    except (SafepointError, ValueError) as err:
        _fail(str(err), 2)


def _console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # No markup or emoji: paths and error texts are printed as they are ("[" and ":x:" included).
    return Console(file=stream, markup=False, emoji=False, highlight=False, width=None if stream.isatty() else 200)


def _progress(console: Console, what: str) -> Progress:
    return Progress(TextColumn(what), BarColumn(), DownloadColumn(), TimeRemainingColumn(), console=console,
                    transient=True, disable=not console.is_terminal)


def _say(line: str) -> None:
    """A line on stdout while a progress bar runs: print() goes through rich's stdout redirect
    (which keeps the bar below the text); click's echo would write around it."""
    print(line, flush=True)


def _time(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _count(items: Any, word: str) -> str:
    return f"{len(items)} {word}{'' if len(items) == 1 else 's'}"


def _metric(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


# ------------------------------------------------------------------------------ ls / show


@app.command("ls")
def ls_cmd(directory: Dir, as_json: AsJson = False,
           best: Annotated[Optional[list[str]], typer.Option(
               "--best", metavar="METRIC[:min|max]",
               help="which metrics to mark best, and how (default: loss-like names min, accuracy-like max)")] = None) -> None:
    """List checkpoints: step, time, size, metrics and state; totals for the run and the disk."""
    with _handled():
        data = listing(open_run(directory), [parse_keep_best(s) for s in best] if best else None)
    if as_json:
        typer.echo(json.dumps(data, indent=1))
        return
    table = Table(title=f"{data['directory']} ({'safepoint run' if data['kind'] == 'safepoint' else 'Hugging Face output'})")
    table.add_column("step", justify="right")
    table.add_column("committed")
    table.add_column("size", justify="right")
    for name in data["metrics"]:
        table.add_column(name, justify="right")
    table.add_column("state", overflow="fold")
    blanks = [""] * len(data["metrics"])
    for c in data["checkpoints"]:
        table.add_row(str(c["step"]), _time(c["time"]), format_size(c["size"]),
                      *[_metric(c["metrics"][m]) if m in c["metrics"] else "" for m in data["metrics"]],
                      ", ".join(c["flags"]))
    for c in (c for c in data["corrupt"] if not c["listed"]):
        table.add_row(str(c["step"]), "", "", *blanks, f"corrupt: {c['reason']}")
    for d in data["debris"]:
        table.add_row("", "", format_size(d["size"]), *blanks, f"{d['what']}: {Path(d['path']).name}")
    out = _console()
    out.print(table)
    budget = format_size(data["max_disk"]) if data["max_disk"] is not None else "unknown"
    out.print(f"{_count(data['checkpoints'], 'checkpoint')}; run size {format_size(data['run_size'])}; filesystem free "
              f"{format_size(data['fs_free'])} of {format_size(data['fs_total'])}; budget (max_disk) {budget}")


@app.command("show")
def show_cmd(directory: Dir, step: Step, as_json: AsJson = False) -> None:
    """Show one checkpoint: its manifest (files, sizes, hashes, metrics, versions) and state."""
    with _handled():
        data = details(open_run(directory), step)
    if as_json:
        typer.echo(json.dumps(data, indent=1))
    else:
        _print_details(data)
    if data["problem"]:
        _fail(f"step {step} is corrupt: {data['problem']}", 1)


def _print_details(data: dict[str, Any]) -> None:
    out = _console()
    out.print(f"step {data['step']}: {data['path']}")
    out.print(f"state: {', '.join(data['flags']) or '-'}")
    for key, value in (data["manifest"] or {}).items():
        if key not in ("metrics", "entries") and value not in (None, {}, [], ""):
            if key == "extra" and data.get("encoding"):  # shown below, readably
                continue
            out.print(f"{key}: {value}")
    for line in encoding_summary(data.get("encoding")):
        out.print(f"storage: {line}")
    if data["metrics"]:
        out.print("metrics: " + ", ".join(f"{k}={_metric(v)}" for k, v in data["metrics"].items()))
    if data["entries"]:
        out.print("entries: " + ", ".join(f"{e['name']} ({e['file'] or 'state.json only'})" for e in data["entries"]))
    if "completeness" in data:
        c = data["completeness"]
        out.print(("complete: " + ", ".join(c["present"])) if not c["problems"] else
                  "INCOMPLETE: " + "; ".join(c["problems"]))
    if data["files"]:
        table = Table("file", "size", "hash")
        for f in data["files"]:
            table.add_row(f["name"], format_size(f["size"]), f["hash"] or "(no manifest)")
        out.print(table)


# ------------------------------------------------------------------------------ verify


@app.command("verify")
def verify_cmd(directory: Dir, step: Annotated[Optional[int], typer.Option(help="verify only this step")] = None) -> None:
    """Re-hash every checkpoint (or one) against its manifest; exit 1 on any mismatch.

    Hugging Face checkpoints without a safepoint manifest are checked for completeness instead
    (see ``safepoint.hfdir.check_complete``).
    """
    with _handled():
        view = open_run(directory)
        targets = verify_targets(view, step)
    err = _console(stderr=True)
    with _progress(err, "verifying") as progress:
        task = progress.add_task("verify", total=bytes_to_hash(targets))
        results = verify_run(view, targets, on_bytes=lambda n: progress.advance(task, n),
                             on_result=lambda r: _say(f"step {r.step}: {'' if r.ok else 'FAILED: '}{r.detail}"))
    failed = [r for r in results if not r.ok]
    if failed:
        _fail(f"{len(failed)} of {_count(results, 'checkpoint')} failed verification: steps "
              + ", ".join(str(r.step) for r in failed), 1)
    typer.echo(f"{_count(results, 'checkpoint')} verified" if results else "no checkpoints to verify")


# ------------------------------------------------------------------------------ gc / prune / pin


@app.command("gc")
def gc_cmd(directory: Dir) -> None:
    """Remove debris: unfinished saves (step_*.tmp-*) and interrupted deletions (.trash/)."""
    with _handled():
        removed = collect_garbage(directory)
    for path, size in removed:
        typer.echo(f"removed {path} ({format_size(size)})")
    typer.echo(f"removed {_count(removed, 'item')}, freed {format_size(sum(s for _, s in removed))}" if removed
               else "nothing to remove")


@app.command("prune")
def prune_cmd(
    directory: Dir,
    keep_last: Annotated[Optional[int], typer.Option(help="keep the N newest")] = None,
    keep_best: Annotated[Optional[list[str]], typer.Option(metavar="METRIC[:min|max]",
                                                         help="keep the best by METRIC (default min); repeatable")] = None,
    keep_every: Annotated[Optional[int], typer.Option(metavar="STEPS", help="keep steps that are multiples of STEPS")] = None,
    keep_within: Annotated[Optional[str], typer.Option(metavar="DURATION",
                                                       help="keep those within e.g. 2h/3d of the newest")] = None,
    max_disk: Annotated[Optional[str], typer.Option(help="then delete oldest first until the run fits, e.g. 50GB")] = None,
    dry_run: Annotated[bool, typer.Option(help="show what would be deleted, delete nothing")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
) -> None:
    """Delete checkpoints no policy keeps, then oldest first down to --max-disk.

    The newest, the best by each --keep-best metric, pinned and resumed-from checkpoints are
    never deleted. Takes the run lock: refused while a live run holds it.
    """
    if dry_run and yes:
        _fail("--dry-run and --yes conflict: a dry run deletes nothing, so there is nothing to confirm")
    with _handled():
        policies = policies_from_options(keep_last=keep_last, keep_best=keep_best or (), keep_every=keep_every,
                                         keep_within=keep_within)
        out = _console()
        progress = _progress(_console(stderr=True), "deleting")

        def review(plan: PrunePlan) -> bool:
            _print_plan(out, plan, dry_run)
            if dry_run or not plan.deletions:
                return True
            if not yes and not typer.confirm(f"delete {_count(plan.deletions, 'checkpoint')} "
                                             f"({format_size(plan.freed)})?", default=False):
                return False
            progress.start()
            progress.add_task("delete", total=plan.freed)
            return True

        def deleted(d: PlannedDeletion) -> None:
            progress.advance(progress.task_ids[0], d.size)
            _say(f"deleted step {d.step} ({format_size(d.size)})")

        try:
            result = prune(directory, policies, max_disk=max_disk, dry_run=dry_run, review=review, on_deleted=deleted)
        finally:
            progress.stop()
    if not result.confirmed:
        _fail("not confirmed; nothing deleted (pass --yes to skip the question)")
    for d, why in result.failed:
        _echo_error(f"could not delete step {d.step}: {why}")
    if result.failed:
        raise typer.Exit(1)
    if not dry_run and result.deleted:
        typer.echo(f"deleted {_count(result.deleted, 'checkpoint')}, freed {format_size(sum(d.size for d in result.deleted))}")


def _print_plan(out: Console, plan: PrunePlan, dry_run: bool) -> None:
    if not plan.deletions:
        out.print(f"nothing to delete: every checkpoint of {plan.view.path} is kept")
    else:
        table = Table("step", "size", "reason", title="would delete" if dry_run else "to delete")
        for d in plan.deletions:
            table.add_row(str(d.step), format_size(d.size), d.reason)
        out.print(table)
    protection = plan.view.protection(plan.policies)
    kept = ", ".join(f"{s} ({', '.join(protection[s])})" if s in protection else str(s) for s in plan.kept)
    out.print(f"keeping: {kept or 'none'}")
    after = plan.run_size - plan.freed
    budget = f" (--max-disk {format_size(plan.max_disk)})" if plan.max_disk is not None else ""
    out.print(f"run size {format_size(plan.run_size)} -> {format_size(after)}{budget}")


@app.command("pin")
def pin_cmd(directory: Dir, step: Step) -> None:
    """Protect a checkpoint from every prune and the disk budget (works while a run is live)."""
    with _handled():
        set_pinned(directory, step, True)
    typer.echo(f"pinned step {step}")


@app.command("unpin")
def unpin_cmd(directory: Dir, step: Step) -> None:
    """Let retention delete a pinned checkpoint again."""
    with _handled():
        set_pinned(directory, step, False)
    typer.echo(f"unpinned step {step}")


# ------------------------------------------------------------------------------ export

@app.command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="a safepoint step_N or a Hugging Face checkpoint-N directory")],
    out: Annotated[Path, typer.Argument(help="new directory for the inference checkpoint")],
    dtype: Annotated[Optional[str], typer.Option(help="cast floating tensors: bf16, fp16 or fp32")] = None,
    merge_lora: Annotated[bool, typer.Option("--merge-lora", help="merge a LoRA adapter into its base model")] = False,
    shard_size: Annotated[str, typer.Option(help="split the weights into shards of at most this size")] = "5GB",
    config_from: Annotated[Optional[Path], typer.Option(help="copy config/tokenizer files from this directory")] = None,
) -> None:
    """Weights only, safetensors: what AutoModel.from_pretrained(OUT) needs, without optimizer state."""
    from .export import export

    with _handled():
        files = export(checkpoint, out, dtype=dtype, merge_lora=merge_lora, shard_size=shard_size,
                       config_from=config_from)
    total = sum(f.stat().st_size for f in files)
    _say(f"exported {_count(files, 'weight file')} ({format_size(total)}) to {out}")


# ------------------------------------------------------------------------------ diff / fork

@app.command("diff")
def diff_cmd(
    a: Annotated[Path, typer.Argument(help="a checkpoint directory (step_N or checkpoint-N)")],
    b: Annotated[Path, typer.Argument(help="the checkpoint to compare it with")],
    entry: Annotated[str, typer.Option(help="which state entry of a safepoint checkpoint")] = "model",
    show_all: Annotated[bool, typer.Option("--all", help="also list unchanged tensors")] = False,
    as_json: AsJson = False,
) -> None:
    """Which tensors changed between two checkpoints, and by how much."""
    from .diff import diff_checkpoints

    with _handled():
        changes = diff_checkpoints(a, b, entry=entry)
    if as_json:
        print(json.dumps([c.to_json() for c in changes], indent=1))
        return
    shown = [c for c in changes if show_all or c.status != "same"]
    table = Table(title=f"{a} -> {b}")
    for column in ("tensor", "change", "max |b-a|", "||b-a|| / ||a||"):
        table.add_column(column)
    for c in shown:
        table.add_row(c.name, c.detail or c.status, _metric(c.max_abs) if c.max_abs is not None else "",
                      _metric(c.rel_norm) if c.rel_norm is not None else "")
    _console().print(table)
    counts = {s: sum(c.status == s for c in changes) for s in ("changed", "same", "added", "removed", "shape", "dtype")}
    _say(", ".join(f"{n} {s}" for s, n in counts.items() if n))


@app.command("fork")
def fork_cmd(directory: Dir, step: Step,
             new_dir: Annotated[Path, typer.Argument(help="the new run directory (must not exist or be empty)")]) -> None:
    """Start a new run from a committed checkpoint (hard links where possible; lineage recorded)."""
    from .fork import fork

    with _handled():
        target = fork(directory, step, new_dir)
    _say(f"forked step {step} of {directory} into {target}")


# ------------------------------------------------------------------------------ check-resume


@app.command("check-resume", context_settings={"allow_interspersed_args": False})
def check_resume_cmd(
    command: Annotated[Optional[list[str]], typer.Argument(help="the training command, after --", metavar="-- CMD...")] = None,
    steps: Annotated[int, typer.Option(help="last step of both runs ({steps} in CMD; the loop must stop on ckpt.should_stop)")] = 20,
    every: Annotated[int, typer.Option(help="save every N steps in both runs; 1 finds the very step where they part")] = 1,
    seed: Annotated[Optional[int], typer.Option(help="draw the kill step from this seed (default: a new one, printed)")] = None,
    workdir: Annotated[Optional[Path], typer.Option(help="a new or empty scratch directory (default: a temporary one)")] = None,
    keep: Annotated[bool, typer.Option("--keep", help="keep the scratch runs even when the resume is exact")] = False,
    timeout: Annotated[Optional[str], typer.Option(help="give up when one start of the script takes longer, e.g. 30m")] = None,
    as_json: AsJson = False,
) -> None:
    """Is the resume exact? Run CMD straight, and killed then resumed; compare every checkpoint.

    Exit 0: bitwise equal. Exit 1: not exact (the report names the state that was not restored) or
    the script is not deterministic. Exit 2: bad input, or the script failed or did not checkpoint.
    """
    from .check_resume import CheckResumeError, check_resume
    from .supervisor import parse_seconds

    try:
        limit = None if timeout is None else parse_seconds(timeout, what="--timeout")
        result = check_resume(command or [], steps=steps, every=every, seed=seed, workdir=workdir, keep=keep,
                              timeout=limit, progress=lambda line: typer.echo(f"check-resume: {line}", err=True))
    except CheckResumeError as err:  # may carry the tail of the script's output: kept on its lines
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    except (SafepointError, ValueError) as err:
        _fail(str(err))
    print(json.dumps(result.to_json(), indent=1) if as_json else result.report())
    raise typer.Exit(0 if result.exact else 1)


# ------------------------------------------------------------------------------ run / serve


@app.command("run", context_settings={"allow_interspersed_args": False})
def run_cmd(
    command: Annotated[Optional[list[str]], typer.Argument(help="the training command, after --", metavar="-- CMD...")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(
        "--dir", help="the run directory the command checkpoints into: crash-loop detection and events.jsonl")] = None,
    max_restarts: Annotated[int, typer.Option(help="restarts allowed in all; 0 never restarts, -1 no limit")] = 10,
    backoff: Annotated[str, typer.Option(metavar="BASE..MAX",
                                         help="delay before restart n: BASE*2^(n-1) up to MAX, minus up to 20% jitter")] = "1s..60s",
    grace: Annotated[str, typer.Option(help="after a forwarded SIGTERM/SIGINT/SIGUSR1, wait this long, then SIGKILL")] = "30s",
    crash_loop: Annotated[int, typer.Option(help="stop after N consecutive crashes without a new checkpoint")] = 3,
    snapshot_every: Annotated[Optional[int], typer.Option(
        help="the trainer copies its state into shared memory every N steps; after a crash that copy is "
             "committed before the restart (CheckpointManager(snapshot_every=...) overrides)")] = None,
    snapshot_dir: Annotated[Optional[Path], typer.Option(
        help="the tmpfs that holds the memory snapshots (default /dev/shm); removed on exit")] = None,
    on_commit: Annotated[Optional[str], typer.Option(
        metavar="CMD", help="run CMD for each new checkpoint ({path} {step} {run_dir} replaced); its last "
                            "output line, a number or JSON object, is stored as the checkpoint's metrics")] = None,
) -> None:
    """Run a training command; restart it when it crashes; forward SIGTERM; stop crash loops.

    Exit status: the child's (0 once it exits 0; 128+N when a signal N killed it), also after a
    forwarded signal (never restarted then). Giving up (crash loop, --max-restarts) is non-zero.
    """
    from .supervisor import Backoff, Supervisor, parse_seconds

    try:
        supervisor = Supervisor(command or [], run_dir=run_dir, max_restarts=None if max_restarts < 0 else max_restarts,
                                backoff=Backoff.parse(backoff), grace=parse_seconds(grace, what="--grace"),
                                crash_loop=crash_loop, snapshot_every=snapshot_every, snapshot_dir=snapshot_dir,
                                on_commit=on_commit)
    except ValueError as err:
        _fail(str(err))
    raise typer.Exit(supervisor.run())


@app.command("serve")
def serve_cmd(
    directory: Annotated[Path, typer.Argument(help="a run, or a directory holding runs")],
    host: Annotated[str, typer.Option(help="address to bind; anything but loopback needs --token")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8080,
    token: Annotated[Optional[str], typer.Option(envvar="SAFEPOINT_TOKEN",
                                                 help="required by every action (pin, delete, ...); env SAFEPOINT_TOKEN")] = None,
) -> None:
    """Dashboard: checkpoints, curves stitched across restarts, disk, restarts, actions, /metrics."""
    try:
        from .dashboard.server import serve
    except ImportError as err:
        _fail(f"the dashboard needs the dashboard extra ({err.name} is missing): pip install 'safepoint[dashboard]'")
    with _handled():
        serve(directory, host=host, port=port, token=token)


# ------------------------------------------------------------------------------ push / pull

Url = Annotated[str, typer.Argument(help="the mirror: s3://bucket/prefix, or any fsspec URL")]
Steps = Annotated[Optional[list[int]], typer.Option("--step", help="only this step (repeatable)")]


def _transfer(what: str, run: Any) -> None:
    """Run a push/pull with a byte progress bar; exit 1 when any checkpoint failed."""
    console = _console(stderr=True)
    with _progress(console, what) as bar, _handled():
        task = bar.add_task(what, total=None)

        def on_progress(event: Any) -> None:
            if event.kind == "plan":
                bar.update(task, total=event.nbytes)
            elif event.kind in ("bytes", "skip"):
                bar.advance(task, event.nbytes)
            elif event.kind in ("step_done", "step_skipped", "step_failed"):
                _say(f"step {event.step}: {event.kind.removeprefix('step_')}"
                     + (f" ({event.message})" if event.message else ""))

        report = run(on_progress)
    _say(report.summary())
    if not report.ok:
        raise typer.Exit(1)


@app.command("push")
def push_cmd(directory: Dir, url: Url, steps: Steps = None) -> None:
    """Upload committed checkpoints to object storage (resumable; the manifest goes last)."""
    from .mirror import push

    _transfer("push", lambda on_progress: push(directory, url, steps=steps, progress=on_progress))


@app.command("pull")
def pull_cmd(url: Url, directory: Dir, steps: Steps = None,
             latest: Annotated[bool, typer.Option("--latest", help="only the newest checkpoint")] = False) -> None:
    """Download checkpoints from object storage, verified, into a run directory (resumable)."""
    from .mirror import pull

    if latest and steps:
        _fail("--latest and --step exclude each other")
    _transfer("pull", lambda on_progress: pull(url, directory, steps=steps, latest=latest, progress=on_progress))
