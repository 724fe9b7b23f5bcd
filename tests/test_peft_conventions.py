"""PEFT's conventions in molf: target_modules="all-linear", the trainable-parameter
line, the default ranks in one place, and a merged copy of a model that stays wrapped.
The references are PEFT itself and `molf.merge`. Tiny models, CPU."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import peft
import pytest
import torch
import transformers
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
from torch import nn

import molf
from molf.config import DEFAULT_RANKS

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here on one torch thread (conftest's `one_thread`)."""


def tiny_qwen2(tie: bool = False, cls=transformers.Qwen2ForCausalLM):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=61,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
        num_labels=3,
        pad_token_id=0,
    )
    return cls(cfg)


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=61, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg)  # Conv1D layers, lm_head tied to wte


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.lm_head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 5)


def peft_all_linear(model: nn.Module, task_type: str | None = None) -> set[str]:
    """The modules PEFT's own target_modules="all-linear" resolves to on `model`."""
    config = peft.LoraConfig(target_modules="all-linear", task_type=task_type)
    return set(_maybe_include_all_linear_layers(config, model).target_modules)


# ------------------------------------------------------------------ all-linear


@pytest.mark.parametrize(
    "build, task_type, count",
    [
        (tiny_qwen2, None, 14),  # 2 layers x q, k, v, o, gate, up, down
        (lambda: tiny_qwen2(tie=True), None, 14),
        (tiny_gpt2, None, 8),  # 2 layers x c_attn, attn.c_proj, c_fc, mlp.c_proj
        (lambda: tiny_qwen2(cls=transformers.Qwen2ForSequenceClassification), "SEQ_CLS", 14),
    ],
    ids=["qwen2", "qwen2-tied", "gpt2-conv1d-tied", "qwen2-classifier"],
)
def test_all_linear_wraps_what_peft_targets(build, task_type, count):
    """Every linear (and Conv1D) layer but the output head, as PEFT resolves it; a tied
    head is left out, so wrap needs no exclude for it."""
    want = peft_all_linear(build(), task_type)
    model = molf.wrap(build(), molf.MoLFConfig(ranks=(2,), target_modules="all-linear", exclude_modules=()))
    assert {name for name, _ in molf.routed_modules(model)} == want
    assert len(want) == count
    assert "lm_head" not in want and "score" not in want


def test_all_linear_spellings_and_exclusions():
    """Any case, alone or as the one entry of a sequence; exclude_modules still applies;
    a model without an output head of its own loses only its excluded layers."""
    for spelling in ("all-linear", "ALL-Linear", ["all-linear"], ("all-linear",)):
        config = molf.MoLFConfig(ranks=(2,), target_modules=spelling)
        assert config.target_modules == "all-linear"
        assert config.to_dict()["target_modules"] == "all-linear"
    model = molf.wrap(tiny_qwen2(), molf.MoLFConfig(ranks=(2,), target_modules="all-linear", exclude_modules="o_proj"))
    names = {n for n, _ in molf.routed_modules(model)}
    assert len(names) == 12 and not any(n.endswith("o_proj") for n in names)
    plain = molf.wrap(Plain(), molf.MoLFConfig(ranks=(2,), target_modules="all-linear"))
    assert [n for n, _ in molf.routed_modules(plain)] == ["fc1", "fc2"]  # the default exclude: lm_head
    plain = molf.wrap(Plain(), molf.MoLFConfig(ranks=(2,), target_modules="all-linear", exclude_modules=()))
    assert [n for n, _ in molf.routed_modules(plain)] == ["fc1", "fc2", "lm_head"]
    with pytest.raises(molf.ConfigError, match="give it alone"):
        molf.MoLFConfig(target_modules=("all-linear", "q_proj"))


# ------------------------------------------------------------------ trainable parameters


def printed_counts(text: str) -> tuple[int, int, float]:
    m = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)\n", text)
    assert m, text
    return int(m[1].replace(",", "")), int(m[2].replace(",", "")), float(m[3])


@pytest.mark.parametrize("build", [tiny_qwen2, tiny_gpt2], ids=["qwen2", "gpt2-tied"])
def test_print_trainable_parameters_matches_peft_for_molf_efficient(build, capsys):
    """MoLF-Efficient with experts of ranks 2 and 4 holds as many parameters, trainable and
    frozen, as a PEFT LoRA of rank 6 on the same modules: the two lines are equal."""
    lora = peft.get_peft_model(build(), peft.LoraConfig(r=6, target_modules="all-linear"))
    lora.print_trainable_parameters()
    want = capsys.readouterr().out
    model = molf.wrap(build(), molf.MoLFConfig(ranks=(2, 4), fft=False, target_modules="all-linear"))
    molf.print_trainable_parameters(model)
    assert capsys.readouterr().out == want
    trainable, total, share = printed_counts(want)
    assert 0 < trainable < total and share == pytest.approx(100 * trainable / total, abs=1e-4)


@pytest.mark.parametrize("build", [tiny_qwen2, tiny_gpt2], ids=["qwen2", "gpt2-tied"])
def test_print_trainable_parameters_counts_dense_weights_as_trainable_in_molf(build, capsys):
    """MoLF trains everything: trainable = all = the base model's parameters (a tied head
    counted once) + the LoRA experts."""
    base = sum(p.numel() for p in build().parameters())
    model = molf.wrap(build(), molf.MoLFConfig(ranks=(3,), target_modules="all-linear"))
    lora = sum(3 * (layer.in_features + layer.out_features) for _, layer in molf.routed_modules(model))
    molf.print_trainable_parameters(model)
    assert printed_counts(capsys.readouterr().out) == (base + lora, base + lora, 100.0)


# ------------------------------------------------------------------ default ranks


def test_default_ranks_live_in_one_place_and_the_readme_uses_them():
    assert molf.MoLFConfig().ranks == DEFAULT_RANKS["molf"] == (128,)
    assert DEFAULT_RANKS["molf-e"] == (16, 128)
    calls = re.findall(r"MoLFConfig\(ranks=(\([\d, ]+\))([^)]*)\)", README.read_text())
    assert calls, "the README shows MoLFConfig with ranks"
    for ranks, rest in calls:
        mode = "molf-e" if "fft=False" in rest else "molf"
        assert eval(ranks) == DEFAULT_RANKS[mode], (ranks, rest)


# ------------------------------------------------------------------ merged copy


@pytest.mark.parametrize("fft", [True, False])
@pytest.mark.parametrize("build", [tiny_qwen2, tiny_gpt2], ids=["qwen2", "gpt2-conv1d-tied"])
def test_merged_state_dict_is_what_merge_gives_and_changes_nothing(build, fft):
    model = molf.wrap(build(), molf.MoLFConfig(ranks=(2, 3), fft=fft, target_modules="all-linear"))
    with torch.no_grad():
        for _, layer in molf.routed_modules(model):
            for b in layer.lora_B:
                b.normal_()
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    got = molf.merged_state_dict(model)
    want = molf.merge(copy.deepcopy(model)).state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert molf.is_wrapped(model)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(after[n] is p and torch.equal(p, old) for n, (p, old) in before.items())
    with pytest.raises(molf.ConfigError, match="no molf-wrapped layers"):
        molf.merged_state_dict(build())
