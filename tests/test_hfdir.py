"""``safepoint ls/verify/prune`` on a Hugging Face Trainer output directory.

The directory is made by a real ``transformers.Trainer`` run (a tiny random Llama, no downloads),
so the tests follow what Trainer actually writes, not a hand-made imitation of it. Damage is then
done to copies, to prove the completeness check fails where a resume would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install 'safepoint[hf]')")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install 'safepoint[hf]')")

from typer.testing import CliRunner, Result  # noqa: E402

from safepoint import hfdir, layout  # noqa: E402
from safepoint.cli import app  # noqa: E402
from safepoint.commit import dump_json, hash_file  # noqa: E402
from safepoint.hashing import default_algorithm  # noqa: E402
from safepoint.manifest import Manifest, utc_now  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = [2, 4, 6]


def cli(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


class Tokens(torch.utils.data.Dataset):
    """Random token sequences, built by hand: no tokenizer, nothing to download."""

    def __init__(self, n: int = 32, length: int = 16) -> None:
        self.ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


@pytest.fixture(scope="module")
def hf_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = tmp_path_factory.mktemp("hf") / "output"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    args = TrainingArguments(
        output_dir=str(out), max_steps=6, save_steps=2, eval_strategy="steps", eval_steps=2, logging_steps=1,
        per_device_train_batch_size=4, per_device_eval_batch_size=8, report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, metric_for_best_model="eval_loss",
        # Frozen weights give equal eval losses, and Trainer's best only moves on a strict
        # improvement: its best stays checkpoint-2, a best that is not the newest.
        learning_rate=0.0)
    Trainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens()).train()
    assert [s for s, _ in hfdir.checkpoint_dirs(out)] == STEPS
    return out


@pytest.fixture
def output(hf_output: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "output"
    shutil.copytree(hf_output, dst)
    return dst


def logged(out: Path, step: int) -> dict[str, float]:
    history = json.loads((out / f"checkpoint-{STEPS[-1]}" / hfdir.TRAINER_STATE).read_text())["log_history"]
    return {k: v for e in history if e["step"] == step for k, v in e.items() if k in ("loss", "eval_loss")}


def checkpoints_left(out: Path) -> list[int]:
    return [s for s, _ in hfdir.checkpoint_dirs(out)]


def test_ls_lists_trainer_checkpoints_with_metrics(hf_output: Path) -> None:
    result = cli("ls", hf_output, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kind"] == "hf"
    assert [c["step"] for c in data["checkpoints"]] == STEPS
    for c in data["checkpoints"]:
        assert c["metrics"] == logged(hf_output, c["step"]) and set(c["metrics"]) == {"loss", "eval_loss"}
        assert not c["committed"] and "committed" not in c["flags"]
        assert c["size"] > (hf_output / f"checkpoint-{c['step']}" / "model.safetensors").stat().st_size
    assert "best(trainer)" in data["checkpoints"][0]["flags"]
    table = cli("ls", hf_output).stdout
    assert "Hugging Face output" in table and "eval_loss" in table and "best(trainer)" in table


def test_verify_without_manifest_checks_completeness(hf_output: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, "-m", "safepoint", "verify", str(hf_output)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for step, line in zip(STEPS, lines):
        assert line.startswith(f"step {step}: no manifest (not committed by safepoint); complete (")
        for name in ("trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt"):
            assert name in line
    assert lines[-1] == "3 checkpoints verified"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _shard(ckpt: Path) -> None:
    """Turn the weights into a two-shard index whose second shard is missing."""
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "model.safetensors").unlink(), "has no model weights"),
    (lambda c: _truncate(c / "model.safetensors"), "its safetensors header describes"),
    (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    (lambda c: (c / "optimizer.pt").write_bytes(b""), "optimizer.pt is empty"),
    (lambda c: (c / hfdir.TRAINER_STATE).unlink(), "trainer_state.json is missing"),
    (_shard, "lists shards that are missing: model-00002-of-00002.safetensors"),
])
def test_verify_fails_an_incomplete_checkpoint(output: Path, damage, message: str) -> None:
    damage(output / "checkpoint-4")
    result = cli("verify", output)
    assert result.exit_code == 1, result.output
    failed = [line for line in result.stdout.splitlines() if "FAILED" in line or "INCOMPLETE" in line]
    assert len(failed) == 1 and failed[0].startswith("step 4:") and message in failed[0], result.stdout
    assert "steps 4" in result.stderr


def test_prune_keep_last_keeps_newest_and_trainers_best(output: Path) -> None:
    dry = cli("prune", output, "--keep-last", 1, "--dry-run")
    assert dry.exit_code == 0 and checkpoints_left(output) == STEPS
    assert "not kept by KeepLast(n=1)" in dry.stdout
    result = cli("prune", output, "--keep-last", 1, "--yes")
    assert result.exit_code == 0, result.output
    assert checkpoints_left(output) == [2, 6]
    assert "2 (best(trainer))" in result.stdout and "6 (newest)" in result.stdout
    assert not (output / layout.TRASH_DIR).exists() and not (output / layout.EVENTS_FILE).exists()


def test_pin_in_an_output_dir_protects_from_prune(output: Path) -> None:
    assert cli("pin", output, 4).exit_code == 0
    assert cli("prune", output, "--keep-last", 1, "--max-disk", "1TB", "--yes").exit_code == 0
    assert checkpoints_left(output) == STEPS
    assert cli("unpin", output, 4).exit_code == 0
    assert cli("prune", output, "--keep-last", 1, "--yes").exit_code == 0
    assert checkpoints_left(output) == [2, 6]


def test_a_safepoint_manifest_in_a_checkpoint_dir_is_verified_by_hash(output: Path) -> None:
    ckpt = output / "checkpoint-6"
    files = {p.name: hash_file(p) for p in sorted(ckpt.iterdir()) if p.is_file()}
    manifest = Manifest(step=6, run_id="test", files=files, hash_algorithm=default_algorithm(), created=utc_now(),
                        committed=utc_now(), metrics={"loss": 1.0})
    (ckpt / layout.MANIFEST).write_bytes(dump_json(manifest.to_json()))
    flags = {c["step"]: c["flags"] for c in json.loads(cli("ls", output, "--json").stdout)["checkpoints"]}
    assert "committed" in flags[6] and "committed" not in flags[4]
    ok = cli("verify", output, "--step", 6)
    assert ok.exit_code == 0 and f"{len(files)} files" in ok.stdout and f"{default_algorithm()} verified" in ok.stdout
    data = bytearray((ckpt / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 1
    (ckpt / "optimizer.pt").write_bytes(bytes(data))
    bad = cli("verify", output)
    assert bad.exit_code == 1
    assert f"step 6: FAILED: {ckpt / 'optimizer.pt'} fails its hash check" in bad.stdout


def test_completeness_of_a_peft_adapter_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-10"
    ckpt.mkdir()
    (ckpt / hfdir.TRAINER_STATE).write_text(json.dumps({"global_step": 10, "log_history": []}))
    (ckpt / "adapter_model.bin").write_bytes(b"weights")
    assert "adapter_config.json" in " ".join(hfdir.check_complete(ckpt).problems)
    (ckpt / "adapter_config.json").write_text("{}")
    assert hfdir.check_complete(ckpt).ok
    (ckpt / "rng_state.pth").write_bytes(b"rng")  # a resumable checkpoint needs its optimizer too
    assert [p.split("/")[-1].split(" ")[0] for p in hfdir.check_complete(ckpt).problems] == ["optimizer.pt", "scheduler.pt"]


def test_metrics_are_loss_and_eval_metrics_at_that_step() -> None:
    state = {"log_history": [
        {"step": 4, "loss": 2.0, "grad_norm": 1.0, "learning_rate": 1e-4},
        {"step": 4, "eval_loss": 1.5, "eval_accuracy": 0.7, "eval_runtime": 0.1, "eval_samples_per_second": 9.0},
        {"step": 5, "loss": 1.0},
        {"step": 4, "train_loss": 3.0, "eval_nan": float("nan")},
    ]}
    assert hfdir.metrics_at(state, 4) == {"loss": 2.0, "eval_loss": 1.5, "eval_accuracy": 0.7}
