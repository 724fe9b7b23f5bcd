"""The embedded stand-ins of `molf train` (no download): a tiny random Qwen2 with a
byte-level tokenizer and a generated arithmetic dataset. The tests use them too."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

__all__ = ["CHAT_TEMPLATE", "byte_tokenizer", "save_tiny_model", "write_arithmetic_data"]

# A plain-text chat format (no added tokens): each turn "role: content\n", assistant turns ended
# by eos so a model learns to stop; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def byte_tokenizer():
    """A byte-level tokenizer built locally (256 byte tokens, pad and eos, a chat template): no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|endoftext|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=specials[0], eos_token=specials[1])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_model(path: Path, seed: int) -> None:
    """A tiny random Qwen2 and its byte-level tokenizer, saved to `path`."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    tokenizer = byte_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def write_arithmetic_data(path: Path, rows: int = 256, seed: int = 0) -> None:
    """Prompt/completion pairs "12+34=" -> "46": a task a tiny model learns in minutes."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            a, b = rng.randrange(100), rng.randrange(100)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")
