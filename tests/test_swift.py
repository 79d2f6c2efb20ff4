"""ms-swift: real ``swift sft`` runs (offline, CPU, a tiny local Qwen2) with the safepoint plugin.

A SIGKILL while safepoint commits ``checkpoint-16`` → the auto-resume picks ``v0-*/checkpoint-12``
→ the resumed run (in a new ``v1-*`` directory, crossing an epoch boundary) ends bitwise equal to an
uninterrupted run. SIGTERM reaches the trainer through the wrapper (and, under a plain ``swift
sft``, when the parent dies), and becomes save-then-stop.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra (transformers, accelerate) is not installed")

from safepoint import SafepointWarning, verify  # noqa: E402
from safepoint.hf import commit_checkpoint_dir  # noqa: E402
from safepoint.integrations import swift as sp_swift  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAKE_TINY = ROOT / "examples" / "swift" / "make_tiny.py"

try:
    SWIFT_VERSION = importlib.metadata.version("ms-swift")
except importlib.metadata.PackageNotFoundError:
    SWIFT_VERSION = None
needs_swift = pytest.mark.skipif(SWIFT_VERSION is None or importlib.util.find_spec("swift") is None,
                                 reason="ms-swift is not installed (pip install 'safepoint[swift]')")

FAULT_PLUGIN = ROOT / "examples" / "swift" / "fault_plugin.py"  # kill_in_save: SIGKILL mid-commit of KILL_IN_SAVE

# A test-only plugin, loaded next to safepoint's with --external_plugins and listed before it in --callbacks.
TEST_PLUGIN = '''
import os, time
from pathlib import Path
from swift.callbacks import TrainerCallback, callbacks_map

class PauseForSignal(TrainerCallback):
    """At step N, say so in a file (with this pid) and wait for safepoint to see a preemption signal."""
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != int(os.environ.get("TEST_PAUSE_AT", "-1")):
            return
        ours = [c for c in self.trainer.callback_handler.callbacks if type(c).__name__ == "SwiftSafepointCallback"]
        Path(os.environ["TEST_PAUSE_MARKER"]).write_text(str(os.getpid()))
        deadline = time.time() + 60
        while ours[0]._watcher.received is None and time.time() < deadline:
            time.sleep(0.05)

callbacks_map["pause_for_signal"] = PauseForSignal
'''


# -- no ms-swift needed ---------------------------------------------------------------------------

def _commit(path: Path, step: int, payload: bytes = b"w") -> None:
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(payload * 100)
    (path / "trainer_state.json").write_text('{"global_step": %d}' % step)
    commit_checkpoint_dir(path, step=step, run_id="r", metrics={})


def test_latest_swift_checkpoint_searches_every_version_dir(tmp_path):
    out = tmp_path / "out"
    assert sp_swift.latest_swift_checkpoint(out) is None
    _commit(out / "v0-20260101-000000" / "checkpoint-10", 10)
    _commit(out / "v0-20260101-000000" / "checkpoint-20", 20)
    _commit(out / "v1-20260102-000000" / "checkpoint-20", 20)  # a resumed run saved step 20 again: newer wins
    (out / "v1-20260102-000000" / "checkpoint-30").mkdir()  # killed mid-save: no manifest
    _commit(out / "v2-20260103-000000" / "checkpoint-25", 25, b"x")
    (out / "v2-20260103-000000" / "checkpoint-25" / "adapter_model.safetensors").write_bytes(b"y" * 100)  # corrupt
    (out / "v3-20260104-000000").mkdir()  # a run that saved nothing
    (out / "notes-v9").mkdir()
    with pytest.warns(SafepointWarning) as caught:
        assert sp_swift.latest_swift_checkpoint(out) == str(out / "v1-20260102-000000" / "checkpoint-20")
    messages = " ".join(str(w.message) for w in caught)
    assert "v1-20260102-000000/checkpoint-30" in messages and "v2-20260103-000000/checkpoint-25" in messages
    # --add_version false: checkpoints straight in output_dir count too.
    _commit(out / "checkpoint-40", 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SafepointWarning)
        assert sp_swift.latest_swift_checkpoint(out) == str(out / "checkpoint-40")
    assert [p.name for p in sp_swift.swift_checkpoints(out)][:3] == ["checkpoint-40", "checkpoint-30", "checkpoint-25"]


def test_cli_latest_prints_nothing_when_there_is_nothing(tmp_path, capsys):
    assert sp_swift.main(["latest", str(tmp_path / "none")]) == 0
    assert capsys.readouterr().out == ""
    _commit(tmp_path / "out" / "v0-20260101-000000" / "checkpoint-4", 4)
    assert sp_swift.main(["latest", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "v0-20260101-000000" / "checkpoint-4")
    assert sp_swift.main(["plugin"]) == 0
    plugin = Path(capsys.readouterr().out.strip())
    assert plugin == sp_swift.PLUGIN_FILE and plugin.is_file()
    # swift puts the plugin's folder first on sys.path: nothing there may shadow a real package.
    assert sorted(p.name for p in plugin.parent.glob("*.py")) == ["__init__.py", "safepoint_swift_plugin.py"]


def test_list_flags_are_extended_not_replaced():
    add = sp_swift._add_to_list_flag
    assert add(["--model", "m"], "--callbacks", "safepoint") == ["--model", "m", "--callbacks", "safepoint"]
    assert add(["--callbacks", "a", "b", "--model", "m"], "--callbacks", "safepoint") == \
        ["--callbacks", "a", "b", "safepoint", "--model", "m"]
    assert add(["--callbacks=a"], "--callbacks", "safepoint") == ["--callbacks", "a", "safepoint"]
    assert add(["--callbacks", "safepoint"], "--callbacks", "safepoint") == ["--callbacks", "safepoint"]
    assert sp_swift._get_flag(["--output_dir", "o", "--x"], "--output_dir") == ["o"]
    assert sp_swift._get_flag(["--output_dir=o"], "--output_dir") == ["o"]
    assert sp_swift._get_flag(["--model", "m"], "--output_dir") is None


def test_options_from_env(monkeypatch):
    from safepoint import KeepBest, KeepLast

    for name in ("KEEP_LAST", "KEEP_BEST", "KEEP_EVERY", "KEEP_WITHIN", "MAX_DISK", "MIN_FREE", "ON_SAVE_ERROR", "SIGNALS",
                 "ASYNC_SAVE"):
        monkeypatch.delenv(f"SAFEPOINT_{name}", raising=False)
    assert sp_swift.options_from_env()["keep"] == [] and sp_swift.options_from_env()["async_save"] is False
    monkeypatch.setenv("SAFEPOINT_ASYNC_SAVE", "1")
    assert sp_swift.options_from_env()["async_save"] is True
    monkeypatch.setenv("SAFEPOINT_ASYNC_SAVE", "maybe")
    with pytest.raises(ValueError, match="SAFEPOINT_ASYNC_SAVE"):
        sp_swift.options_from_env()
    monkeypatch.delenv("SAFEPOINT_ASYNC_SAVE")
    monkeypatch.setenv("SAFEPOINT_KEEP_LAST", "2")
    monkeypatch.setenv("SAFEPOINT_KEEP_BEST", "eval_loss, token_acc:max")
    monkeypatch.setenv("SAFEPOINT_MAX_DISK", "20GB")
    monkeypatch.setenv("SAFEPOINT_SIGNALS", "SIGTERM")
    opts = sp_swift.options_from_env()
    assert opts["keep"] == [KeepLast(2), KeepBest(1, "eval_loss", "min"), KeepBest(1, "token_acc", "max")]
    assert opts["max_disk"] == "20GB" and opts["signals"] == ("SIGTERM",)
    monkeypatch.setenv("SAFEPOINT_KEEP_LAST", "two")
    with pytest.raises(ValueError, match="SAFEPOINT_KEEP_LAST"):
        sp_swift.options_from_env()


# -- real swift sft runs --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Qwen2 (random weights, a BPE tokenizer trained here) and a 40-row chat dataset: 10 steps an epoch."""
    base = tmp_path_factory.mktemp("swift-tiny")
    done = subprocess.run([sys.executable, str(MAKE_TINY), str(base)], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    plugin = base / "test_plugin.py"
    plugin.write_text(TEST_PLUGIN)
    return base


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAFEPOINT_", "TEST_", "KILL_IN_SAVE"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", MODELSCOPE_OFFLINE="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _sft_args(tiny: Path, out: Path, *extra: str) -> list[str]:
    # swift's defaults otherwise: one persistent data-loader worker, LoRA dropout 0.05, AdamW.
    return ["--model", str(tiny / "model"), "--model_type", "qwen2", "--template", "qwen", "--tuner_type", "lora",
            "--check_model", "false", "--gradient_accumulation_steps", "1", "--dataset", str(tiny / "data.jsonl"),
            "--output_dir", str(out), "--max_steps", "30", "--save_steps", "4", "--per_device_train_batch_size", "4",
            "--logging_steps", "5", "--seed", "0", "--report_to", "none", *extra]


def wrapped(tiny: Path, out: Path, *extra: str) -> list[str]:
    """``python -m safepoint.integrations.swift sft ...``: plugin added, auto-resume, trains in this process."""
    return [sys.executable, "-m", "safepoint.integrations.swift", "sft", *_sft_args(tiny, out, *extra)]


def launch(cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=_env(**env), cwd=ROOT)


def run(cmd: list[str], log: Path, **env: str) -> tuple[int, str]:
    proc = launch(cmd, log, **env)
    try:
        rc = proc.wait(300)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{cmd} did not finish in 300s:\n{log.read_text()[-3000:]}")
    return rc, log.read_text()


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "checkpoint-30" / "adapter_model.safetensors")


def assert_bitwise_equal(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert got.keys() == ref.keys() and got
    differ = {k: (got[k].double() - ref[k].double()).abs().max().item() for k in ref if not torch.equal(got[k], ref[k])}
    assert not differ, f"not bitwise equal (max abs diff per tensor): {differ}"


def one(pattern: str, parent: Path) -> Path:
    found = sorted(parent.glob(pattern))
    assert len(found) == 1, f"{pattern} in {parent}: {found}"
    return found[0]


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """An uninterrupted 30-step run with the plugin: its final weights, and its run directory."""
    out = tmp_path_factory.mktemp("swift-ref") / "out"
    rc, log = run(wrapped(tiny, out), out.parent / "log.txt")
    assert rc == 0, log[-4000:]
    assert "no committed checkpoint under --output_dir; starting afresh" in log
    return final_weights(one("v0-*", out)), one("v0-*", out)


@needs_swift
@pytest.mark.slow
def test_swift_kill9_mid_save_then_auto_resume_across_v_dirs_is_bitwise_exact(tiny, reference, tmp_path):
    ref_weights, ref_dir = reference
    # The plugin committed every checkpoint the Trainer wrote.
    steps = sorted(int(p.name.split("-")[1]) for p in ref_dir.glob("checkpoint-*"))
    assert steps == [4, 8, 12, 16, 20, 24, 28, 30]
    for step in steps:
        assert (ref_dir / f"checkpoint-{step}" / "manifest.json").exists()
        verify(ref_dir / f"checkpoint-{step}")

    out = tmp_path / "out"
    rc, log = run(wrapped(tiny, out, "--external_plugins", str(FAULT_PLUGIN), "--callbacks", "kill_in_save"),
                  tmp_path / "kill.txt", KILL_IN_SAVE="16")
    assert rc == -signal.SIGKILL, log[-4000:]
    v0 = one("v0-*", out)
    assert (v0 / "checkpoint-16" / "adapter_model.safetensors").exists()  # written by the Trainer...
    assert not (v0 / "checkpoint-16" / "manifest.json").exists()  # ...never committed
    with pytest.warns(SafepointWarning, match="checkpoint-16"):
        assert sp_swift.latest_swift_checkpoint(out) == str(v0 / "checkpoint-12")

    # Auto-resume: the wrapper finds v0-*/checkpoint-12; swift writes the resumed run into v1-*.
    # From step 12 it crosses the epoch boundary at step 20 (10 steps an epoch).
    rc, log = run(wrapped(tiny, out), tmp_path / "resume.txt")
    assert rc == 0, log[-4000:]
    assert f"safepoint: resuming from {v0 / 'checkpoint-12'}" in log
    v1 = one("v1-*", out)
    assert_bitwise_equal(final_weights(v1), ref_weights)
    assert not (v0 / "checkpoint-16").exists()  # the unfinished save was tidied away
    assert os.readlink(v0 / "last-checkpoint") == "checkpoint-12"  # and swift's symlink re-pointed
    for path in [*v0.glob("checkpoint-*"), *v1.glob("checkpoint-*")]:
        verify(path)
    assert sorted(p.name for p in v1.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (16, 20, 24, 28, 30)]


@needs_swift
@pytest.mark.slow
def test_swift_async_saves_commit_every_checkpoint_and_match_the_sync_run(tiny, reference, tmp_path):
    """SAFEPOINT_ASYNC_SAVE=1: the Trainer's saves are staged and committed in the background."""
    ref_weights, ref_dir = reference
    out = tmp_path / "out"
    rc, log = run(wrapped(tiny, out), tmp_path / "async.txt", SAFEPOINT_ASYNC_SAVE="1")
    assert rc == 0, log[-4000:]
    v0 = one("v0-*", out)
    events = [json.loads(line) for line in (v0 / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("async_save") == 1
    saved = sorted(e["step"] for e in events if e["event"] == "save")
    assert saved == [4, 8, 12, 16, 20, 24, 28, 30]
    for step in saved:
        verify(v0 / f"checkpoint-{step}")
    assert_bitwise_equal(final_weights(v0), ref_weights)


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"never reached the pause (rc {proc.returncode}):\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
    time.sleep(0.2)
    return path.read_text()


@needs_swift
@pytest.mark.slow
def test_swift_sigterm_through_the_wrapper_saves_stops_and_resumes_exactly(tiny, reference, tmp_path):
    ref_weights, _ = reference
    out, marker, log = tmp_path / "out", tmp_path / "paused", tmp_path / "term.txt"
    proc = launch(wrapped(tiny, out, "--external_plugins", str(tiny / "test_plugin.py"), "--callbacks",
                          "pause_for_signal"), log, TEST_PAUSE_AT="6", TEST_PAUSE_MARKER=str(marker))
    trainer_pid = int(_wait_for(marker, proc, log))
    assert trainer_pid == proc.pid  # the wrapper exec'd: the process a scheduler signals is the trainer
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0, log.read_text()[-4000:]
    v0 = one("v0-*", out)
    assert sorted(p.name for p in v0.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    verify(v0 / "checkpoint-6")
    assert '"event": "preempted"' in (v0 / "events.jsonl").read_text()

    rc, text = run(wrapped(tiny, out), tmp_path / "resume.txt")
    assert rc == 0 and f"resuming from {v0 / 'checkpoint-6'}" in text, text[-4000:]
    assert_bitwise_equal(final_weights(one("v1-*", out)), ref_weights)


@needs_swift
@pytest.mark.slow
def test_plain_swift_sft_trainer_saves_and_stops_when_its_parent_is_terminated(tiny, tmp_path):
    """``swift sft`` runs the trainer in a child and never forwards signals; a scheduler's SIGTERM kills
    only the parent. The plugin asks the kernel for SIGTERM when that parent dies: save, then stop."""
    out, marker, log = tmp_path / "out", tmp_path / "paused", tmp_path / "plain.txt"
    cmd = [sys.executable, "-m", "swift.cli.main", "sft",
           *_sft_args(tiny, out, "--external_plugins", str(tiny / "test_plugin.py"), str(sp_swift.PLUGIN_FILE),
                      "--callbacks", "pause_for_signal", "safepoint")]
    proc = launch(cmd, log, TEST_PAUSE_AT="6", TEST_PAUSE_MARKER=str(marker))
    child = int(_wait_for(marker, proc, log))
    assert child != proc.pid
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == -signal.SIGTERM
    deadline = time.time() + 120
    while _alive(child):
        assert time.time() < deadline, f"the orphaned trainer {child} kept running:\n{log.read_text()[-4000:]}"
        time.sleep(0.1)
    v0 = one("v0-*", out)
    assert sorted(p.name for p in v0.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"], log.read_text()[-4000:]
    verify(v0 / "checkpoint-6")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")
