"""The ``safepoint`` command on runs written by the real CheckpointManager.

Scripts rely on the exit codes (0 ok, 1 corruption, 2 bad input with one ``error:`` line and
nothing deleted) and on ``prune`` never deleting the protected set, so those are asserted
exactly. Most calls go through typer's CliRunner; a few run ``python -m safepoint`` as a real
subprocess to prove the entry point and the cross-process lock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner, Result

from safepoint import CheckpointManager, layout
from safepoint.cli import app
from safepoint.disk import tree_size
from conftest import reference_hash  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = [10, 20, 30, 40, 50]
# Best loss (min) is step 20, best acc (max) is step 30: neither is the newest.
LOSS = {10: 0.9, 20: 0.3, 30: 0.5, 40: 0.6, 50: 0.7}
ACC = {10: 0.1, 20: 0.5, 30: 0.8, 40: 0.6, 50: 0.4}


def cli(*args: object, input: str | None = None) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def cli_proc(*args: object) -> subprocess.CompletedProcess[str]:
    """``python -m safepoint ...`` in a child process with this checkout's ``src`` first."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "safepoint", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)


def fresh_state() -> dict[str, object]:
    model = torch.nn.Linear(8, 4)
    return {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-2)}


def committed_steps(run: Path) -> list[int]:
    return sorted(s for p in run.iterdir() if (s := layout.parse_step(p.name)) is not None)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file with its size and mtime; ``.lock`` (rewritten with the PID of each taker) aside."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and p.name != layout.LOCK_FILE}


def assert_one_line_error(result: Result | subprocess.CompletedProcess[str], code: int = 2) -> str:
    exit_code = result.exit_code if isinstance(result, Result) else result.returncode
    stderr = result.stderr
    assert exit_code == code, f"exit {exit_code}, stdout: {result.stdout!r}, stderr: {stderr!r}"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line: {stderr!r}"
    return lines[0]


def prune_events(run: Path) -> list[dict]:
    events = [json.loads(line) for line in (run / layout.EVENTS_FILE).read_text().splitlines()]
    return [e for e in events if e["event"] == "prune"]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run with five committed checkpoints and metrics; each test gets a copy."""
    run = tmp_path_factory.mktemp("template") / "run"
    torch.manual_seed(0)
    state = fresh_state()
    with CheckpointManager(run, signals=()) as ckpt:
        ckpt.restore(state)
        for step in STEPS:
            state["model"](torch.randn(2, 8)).sum().backward()
            state["optimizer"].step()
            ckpt.save(step, state, metrics={"loss": LOSS[step], "acc": ACC[step]})
    return run


@pytest.fixture
def run(template: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(template, dst)
    return dst


def resume_from(run: Path, step: int) -> None:
    """A restart that resumed from ``step`` (logs the ``restore`` event ls and prune read)."""
    with CheckpointManager(run, signals=()) as ckpt:
        ckpt.restore(fresh_state(), step=step)


# ------------------------------------------------------------------------------ ls / show


def test_ls_json_through_the_entry_point(run: Path) -> None:
    proc = cli_proc("ls", run, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["kind"] == "safepoint"
    assert [c["step"] for c in data["checkpoints"]] == STEPS
    for c in data["checkpoints"]:
        assert c["metrics"] == {"loss": LOSS[c["step"]], "acc": ACC[c["step"]]}
        assert c["committed"] and "committed" in c["flags"]
        assert c["size"] > 0
    flags = {c["step"]: c["flags"] for c in data["checkpoints"]}
    assert "best(loss)" in flags[20] and "best(acc)" in flags[30]
    assert not any("best" in f for s in (10, 40, 50) for f in flags[s])
    assert data["run_size"] == tree_size(run) and data["fs_free"] > 0 and data["max_disk"] is None


def test_ls_table_shows_state_flags_corrupt_and_unfinished(run: Path) -> None:
    resume_from(run, 40)
    assert cli("pin", run, 10).exit_code == 0
    (run / layout.step_dir_name(30) / layout.MANIFEST).write_text("{not json")
    (run / "step_00000060.tmp-0badcafe").mkdir()
    result = cli("ls", run)
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 3}
    assert "pinned" in rows["10"] and "committed" in rows["10"]
    assert "best(loss)" in rows["20"]
    assert "corrupt" in rows["30"] and "cannot be read as JSON" in rows["30"]
    assert "resumed-from" in rows["40"] and "pinned" not in rows["40"]
    assert "unfinished save: step_00000060.tmp-0badcafe" in result.stdout
    for column in ("step", "committed", "size", "loss", "acc", "state"):
        assert column in result.stdout
    assert "run size" in result.stdout and "filesystem free" in result.stdout
    data = json.loads(cli("ls", run, "--json").stdout)
    assert data["resumed_from"] == 40 and data["pinned"] == [10]
    assert [c["step"] for c in data["corrupt"]] == [30]
    assert 30 not in [c["step"] for c in data["checkpoints"]]  # an unreadable manifest is not committed


def test_show_prints_the_manifest(run: Path) -> None:
    manifest = json.loads((run / layout.step_dir_name(20) / layout.MANIFEST).read_text())
    result = cli("show", run, 20)
    assert result.exit_code == 0, result.output
    for name, record in manifest["files"].items():
        assert name in result.stdout and record["hash"] in result.stdout
    assert manifest["run_id"] in result.stdout and "torch" in result.stdout
    assert "model (model.safetensors)" in result.stdout and "best(loss)" in result.stdout
    data = json.loads(cli("show", run, 20, "--json").stdout)
    assert {f["name"]: f["hash"] for f in data["files"]} == {n: r["hash"] for n, r in manifest["files"].items()}
    assert data["metrics"] == {"loss": 0.3, "acc": 0.5}
    assert [e["name"] for e in data["entries"]] == ["model", "optimizer"]


# ------------------------------------------------------------------------------ verify


def test_verify_ok_then_a_flipped_byte_is_named(run: Path) -> None:
    result = cli("verify", run)
    assert result.exit_code == 0, result.output
    assert [line.split(":")[0] for line in result.stdout.splitlines()[:-1]] == [f"step {s}" for s in STEPS]
    assert "5 checkpoints verified" in result.stdout

    target = run / layout.step_dir_name(20) / "model.safetensors"
    expected = json.loads((target.parent / layout.MANIFEST).read_text())["files"]["model.safetensors"]["hash"]
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    actual = reference_hash(bytes(data), expected)

    proc = cli_proc("verify", run)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = [line for line in proc.stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and failed[0].startswith("step 20:")
    assert str(target) in failed[0] and expected in failed[0] and actual in failed[0]
    assert "steps 20" in proc.stderr
    assert cli("verify", run, "--step", 30).exit_code == 0
    assert cli("verify", run, "--step", 20).exit_code == 1


def test_verify_fails_on_a_missing_file_and_an_unreadable_manifest(run: Path) -> None:
    (run / layout.step_dir_name(10) / "state.json").unlink()
    (run / layout.step_dir_name(40) / layout.MANIFEST).write_text("[]")
    result = cli("verify", run)
    assert result.exit_code == 1
    assert "step 10: FAILED" in result.stdout and "state.json is missing" in result.stdout
    assert "step 40: FAILED" in result.stdout and "not a safepoint manifest" in result.stdout
    assert result.stdout.count("FAILED") == 2


# ------------------------------------------------------------------------------ gc


def make_debris(run: Path) -> list[Path]:
    tmp = run / "step_00000060.tmp-0123abcd"
    trash = run / layout.TRASH_DIR / "step_00000005.deadbeef"
    for d in (tmp, trash):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"x" * 5000)
    return [tmp, trash]


def test_gc_removes_tmp_and_trash_debris(run: Path) -> None:
    debris = make_debris(run)
    before = {p: p.stat().st_mtime_ns for p in run.glob("step_????????/*")}
    result = cli("gc", run)
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in debris)
    assert all(p.name in result.stdout for p in debris)
    assert committed_steps(run) == STEPS and {p: p.stat().st_mtime_ns for p in run.glob("step_????????/*")} == before
    assert cli("verify", run).exit_code == 0
    assert cli("gc", run).stdout.strip() == "nothing to remove"


def test_gc_refused_while_a_live_run_holds_the_lock(run: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from safepoint import CheckpointManager
            with CheckpointManager({str(run)!r}, signals=()):
                print("ready", flush=True)
                sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    try:
        assert holder.stdout.readline().strip() == "ready"
        debris = make_debris(run)  # after the holder started: a manager's start collects debris too
        before = snapshot(run)
        proc = cli_proc("gc", run)
        line = assert_one_line_error(proc)
        assert f"pid {holder.pid}" in line
        assert snapshot(run) == before and all(p.exists() for p in debris)
    finally:
        holder.stdin.close()
        holder.wait(60)
    assert cli("gc", run).exit_code == 0 and not any(p.exists() for p in debris)


# ------------------------------------------------------------------------------ prune


def test_prune_dry_run_lists_reasons_and_deletes_nothing(run: Path) -> None:
    before = snapshot(run)
    result = cli("prune", run, "--keep-last", 2, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would delete" in result.stdout
    for step in (10, 20, 30):
        assert any(line.split("│")[1].strip() == str(step) and "not kept by KeepLast(n=2)" in line
                   for line in result.stdout.splitlines() if "│" in line)
    assert snapshot(run) == before


def test_prune_deletes_what_no_policy_keeps_and_logs_it(run: Path) -> None:
    result = cli("prune", run, "--keep-last", 2, "--keep-best", "loss", "--yes")
    assert result.exit_code == 0, result.output
    assert committed_steps(run) == [20, 40, 50]
    assert [(e["step"], e["by"]) for e in prune_events(run)] == [(10, "cli"), (30, "cli")]
    assert "KeepLast(n=2)" in prune_events(run)[0]["reason"]
    assert not (run / layout.TRASH_DIR).exists()
    assert cli("verify", run).exit_code == 0


def test_prune_never_deletes_the_protected_set(run: Path) -> None:
    cli("pin", run, 10)
    resume_from(run, 20)
    # keep-last 1 keeps only 50; 10 is pinned, 20 resumed-from, 30 best by acc, 50 newest.
    result = cli("prune", run, "--keep-last", 1, "--keep-best", "acc:max", "--yes")
    assert result.exit_code == 0, result.output
    assert committed_steps(run) == [10, 20, 30, 50]
    assert "10 (pinned)" in result.stdout and "20 (resumed-from)" in result.stdout
    assert "30 (best(acc))" in result.stdout and "50 (newest)" in result.stdout


def test_prune_keep_within_and_keep_every(run: Path) -> None:
    # Make 10..30 three days older than the newest: the manifest is not in its own hash list.
    for step in (10, 20, 30):
        path = run / layout.step_dir_name(step) / layout.MANIFEST
        doc = json.loads(path.read_text())
        doc["committed"] = (datetime.fromisoformat(doc["committed"]) - timedelta(days=3)).isoformat()
        path.write_text(json.dumps(doc))
    assert cli("prune", run, "--keep-within", "2d", "--keep-every", 20, "--yes").exit_code == 0
    assert committed_steps(run) == [20, 40, 50]


@pytest.mark.parametrize("policy, expected", [
    ([], [30, 40, 50]),
    # Every checkpoint is kept by a policy, but the budget is a hard cap; 20 (best loss) is protected.
    (["--keep-last", "5", "--keep-best", "loss"], [20, 40, 50]),
])
def test_prune_max_disk_deletes_oldest_first_until_it_fits(run: Path, policy: list[str], expected: list[int]) -> None:
    size = tree_size(run / layout.step_dir_name(10))
    budget = tree_size(run) - int(1.5 * size)  # two checkpoints must go
    result = cli("prune", run, "--max-disk", budget, *policy, "--yes")
    assert result.exit_code == 0, result.output
    assert committed_steps(run) == expected
    assert tree_size(run) <= budget
    assert [e["reason"].split(":")[0] for e in prune_events(run)] == ["disk budget"] * 2


def test_prune_refuses_a_budget_below_the_protected_set(run: Path) -> None:
    before = snapshot(run)
    line = assert_one_line_error(cli("prune", run, "--max-disk", "1KB", "--yes"))
    assert "smaller than what must be kept" in line and "50 (newest)" in line
    assert snapshot(run) == before


def test_pin_unpin_then_prune(run: Path) -> None:
    with CheckpointManager(run, signals=()) as live:  # pins work while a run holds the lock
        assert cli("pin", run, 20).exit_code == 0
        assert 20 in {c.step for c in live.list() if c.pinned}
    assert json.loads((run / layout.RUN_FILE).read_text())["pins"] == [20]
    assert "pinned" in [c for c in json.loads(cli("ls", run, "--json").stdout)["checkpoints"] if c["step"] == 20][0]["flags"]
    assert cli("prune", run, "--keep-last", 1, "--yes").exit_code == 0
    assert committed_steps(run) == [20, 50]
    assert cli("unpin", run, 20).exit_code == 0
    assert cli("prune", run, "--keep-last", 1, "--yes").exit_code == 0
    assert committed_steps(run) == [50]


@pytest.mark.parametrize("args", [
    ["ls", "{missing}"],
    ["ls", "{plain}"],
    ["ls", "{file}"],
    ["ls", "{run}", "--no-such-option"],
    ["prune", "{run}"],
    ["prune", "{run}", "--keep-last", "1", "--dry-run", "--yes"],
    ["prune", "{run}", "--keep-best", "loss:min", "--keep-best", "loss:max", "--yes"],
    ["prune", "{run}", "--keep-best", "los", "--yes"],
    ["prune", "{run}", "--keep-best", "loss:up", "--yes"],
    ["prune", "{run}", "--keep-last", "0", "--yes"],
    ["prune", "{run}", "--keep-within", "3x", "--yes"],
    ["prune", "{run}", "--max-disk", "lots", "--yes"],
    ["prune", "{run}", "--max-disk", "1", "--yes"],
    ["prune", "{run}", "--keep-last", "1"],  # no --yes and no answer on stdin
    ["prune", "{plain}", "--keep-last", "1", "--yes"],
    ["show", "{run}", "999"],
    ["verify", "{run}", "--step", "999"],
    ["pin", "{run}", "999"],
    ["unpin", "{run}", "999"],
    ["gc", "{missing}"],
])
def test_bad_input_is_one_line_exit_2_and_deletes_nothing(run: Path, tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("not a run")
    (tmp_path / "file").write_text("a file")
    paths = {"run": run, "plain": tmp_path / "plain", "missing": tmp_path / "missing", "file": tmp_path / "file"}
    before = snapshot(tmp_path)
    assert_one_line_error(cli(*[a.format(**paths) for a in args]))
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "plain" / layout.LOCK_FILE).exists()  # a non-run is left as it was


def test_declined_confirmation_deletes_nothing(run: Path) -> None:
    before = snapshot(run)
    result = cli("prune", run, "--keep-last", 1, input="n\n")
    assert "delete 4 checkpoints" in result.stdout
    assert_one_line_error(result)
    assert snapshot(run) == before
    assert cli("prune", run, "--keep-last", 1, input="y\n").exit_code == 0
    assert committed_steps(run) == [50]
