"""Build a tiny local Qwen2 model and a JSONL chat dataset, so ``swift sft`` runs offline on a CPU.

The model is built from a config (random weights, no download); its tokenizer is a byte-level BPE
trained on the dataset with the ``tokenizers`` library and carries Qwen's special tokens, so
``--model_type qwen2 --template qwen`` works on it.

    python examples/swift/make_tiny.py runs/tiny     # writes runs/tiny/model and runs/tiny/data.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
         "tau upsilon phi chi psi omega red green blue cyan magenta yellow black white one two three four "
         "five six seven eight nine ten").split()


def make_dataset(path: Path, rows: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    data = []
    for i in range(rows):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
        data.append({"messages": [{"role": "user", "content": f"{i}: {q}?"},
                                  {"role": "assistant", "content": a}]})
    path.write_text("".join(json.dumps(row) + "\n" for row in data))
    return data


def make_model(out: Path, texts: list[str], seed: int = 0) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL[1:])
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, bos_token_id=None, torch_dtype="float32")
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--rows", type=int, default=40)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = make_dataset(args.out / "data.jsonl", args.rows)
    texts = [m["content"] for row in data for m in row["messages"]] + WORDS
    make_model(args.out / "model", texts)
    print(args.out / "model", args.out / "data.jsonl")


if __name__ == "__main__":
    main()
