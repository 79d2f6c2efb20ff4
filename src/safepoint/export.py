"""Turn a training checkpoint into an inference checkpoint: weights only, safetensors.

Training checkpoints carry optimizer moments (2x the weights for Adam), RNG and trainer files
that inference never needs. ``export`` keeps the model's tensors, optionally casts floating
tensors to bf16/fp16/fp32, optionally merges a LoRA adapter into its base model, shards the
output past a size in the Hugging Face layout (``model-00001-of-00002.safetensors`` plus
``model.safetensors.index.json``), and copies config and tokenizer files, so
``AutoModel.from_pretrained(out)`` loads it.

Sources: a safepoint checkpoint (``step_N`` with a manifest, in any encoding: compressed, delta,
8-bit moments; verified before it is read), or a
Hugging Face ``checkpoint-N`` / model directory (``model.safetensors``, sharded safetensors, or
``pytorch_model.bin`` read with ``weights_only=True``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from . import layout
from .catalog import verify
from .compact import load_entry
from .disk import parse_size
from .encoding import is_encoded, stored_file
from .errors import SafepointError
from .tensors import read_tensors, write_tensors

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Files an inference checkpoint keeps next to its weights, when the source has them.
SIDECAR_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                 "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json")


def load_weights(source: Path, *, entry: str = "model") -> dict[str, torch.Tensor]:
    """The model tensors of a safepoint or Hugging Face checkpoint, on the CPU."""
    if (source / layout.MANIFEST).exists():
        manifest = verify(source)
        if is_encoded(manifest) and stored_file(manifest, entry):  # compressed, delta, 8-bit: decoded there
            return load_entry(source, manifest, entry)
    safepoint_file = source / layout.tensor_file_name(entry)
    candidates = [safepoint_file, source / "model.safetensors", source / "adapter_model.safetensors"]
    for file in candidates:
        if file.exists():
            return read_tensors(file)
    index = source / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(read_tensors(source / shard))
        return out
    legacy = source / "pytorch_model.bin"
    if legacy.exists():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise SafepointError(f"{source} holds no model weights: looked for {', '.join(c.name for c in candidates)}, "
                         "model.safetensors.index.json and pytorch_model.bin")


def merged_lora_weights(source: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Merge the LoRA adapter in ``source`` into its base model (needs peft and the base locally)."""
    try:
        from peft import PeftConfig, PeftModel
        from transformers import AutoConfig
    except ImportError as err:
        raise SafepointError("--merge-lora needs the hf extra: pip install 'safepoint[hf]'") from err
    config = PeftConfig.from_pretrained(str(source))
    base_path = config.base_model_name_or_path
    if not base_path or not Path(base_path).exists():
        raise SafepointError(f"the adapter in {source} names base model {base_path!r}, which is not a local "
                             "directory; merging needs the base weights on disk")
    import transformers

    task = str(getattr(config, "task_type", "") or "").split(".")[-1]
    kwargs = {}
    if task in _TASK_CLASSES:
        model_cls = getattr(transformers, _TASK_CLASSES[task])
    else:
        arch = AutoConfig.from_pretrained(base_path).architectures or ["AutoModel"]
        model_cls = getattr(transformers, arch[0], transformers.AutoModel)
    if task == "SEQ_CLS":  # the head is new: its size comes from the adapter's saved copy
        heads = [t for k, t in load_weights(source).items() if k.endswith(".weight") and "classifier" in k]
        if heads:
            kwargs["num_labels"] = heads[-1].shape[0]
    base = model_cls.from_pretrained(base_path, **kwargs)
    merged = PeftModel.from_pretrained(base, str(source)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}, Path(base_path)


_TASK_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                 "TOKEN_CLS": "AutoModelForTokenClassification", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
                 "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return tensors
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def export(source: str | Path, out: str | Path, *, dtype: str | None = None, merge_lora: bool = False,
           shard_size: int | str = "5GB", config_from: str | Path | None = None, entry: str = "model",
           on_file: Callable[[Path], None] | None = None) -> list[Path]:
    """Write an inference checkpoint of ``source`` into ``out``; return the files written."""
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise SafepointError(f"{source} is not a checkpoint directory")
    if dtype is not None and dtype not in DTYPES:
        raise SafepointError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if out.exists() and any(out.iterdir()):
        raise SafepointError(f"{out} exists and is not empty; export into a new directory")
    if merge_lora:
        tensors, base = merged_lora_weights(source)
        config_from = config_from or base
    else:
        tensors = load_weights(source, entry=entry)
    tensors = _cast(tensors, DTYPES.get(dtype) if dtype else None)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    adapter = (source / "adapter_model.safetensors").exists() and not merge_lora
    stem = "adapter_model" if adapter else "model"

    tmp = out.with_name(out.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written: list[Path] = []
    shards = _shards(tensors, parse_size(shard_size, what="shard_size"))
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        name = f"{stem}.safetensors" if len(shards) == 1 else f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        write_tensors(tmp / name, shard)
        weight_map.update({k: name for k in shard})
        written.append(out / name)
        if on_file:
            on_file(out / name)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (tmp / f"{stem}.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for directory in [Path(config_from)] if config_from else [source, source.parent]:
        for name in SIDECAR_FILES + (("adapter_config.json",) if adapter else ()):
            if (directory / name).exists() and not (tmp / name).exists():
                shutil.copy2(directory / name, tmp / name)
    if dtype is not None and (tmp / "config.json").exists():
        config = json.loads((tmp / "config.json").read_text())
        config["torch_dtype"] = config["dtype"] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return written
