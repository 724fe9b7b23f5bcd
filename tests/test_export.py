"""Export to and import from the Hugging Face ecosystem: merged vanilla models
(`AutoModelForCausalLM.from_pretrained`) and PEFT LoRA adapters
(`PeftModel.from_pretrained` on the unwrapped base), checked against real
transformers and peft on tiny Qwen2 and GPT-2 (Conv1D) models."""

from __future__ import annotations

import copy
import json

import peft  # noqa: E402  (test dependencies: a missing one fails, never skips)
import pytest
import safetensors.torch as safetensors_torch  # noqa: E402
import torch
import transformers  # noqa: E402

import molf
from molf.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS

VOCAB = 97


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here on one torch thread (conftest's `one_thread`)."""


def qwen2():
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.Qwen2ForCausalLM(cfg)


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg)


ARCHS = {"qwen2": qwen2, "gpt2": gpt2}


def batch(seed: int) -> dict:
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def probe() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1234))


def logits(model, ids=None) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=probe() if ids is None else ids).logits


def base_and_trained(arch: str, cfg: molf.MoLFConfig, steps: int = 4, seed: int = 0):
    """A fresh base model and a wrapped copy trained a few steps (so every B is non-zero)."""
    torch.manual_seed(seed)
    base = ARCHS[arch]().eval()
    model = molf.wrap(copy.deepcopy(base), cfg)
    # warmup_steps=1: every expert is updated once, so every B is non-zero.
    opt = molf.MoLFAdamW(model, lr=1e-2, lora_lr=1e-2, routing=molf.TopK(k=1, warmup_steps=1))
    model.train()
    for step in range(steps):
        model(**batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()
    return base, model


def manual_delta(layer: molf.MoLFLinear) -> torch.Tensor:
    """sum_i s_i B_i A_i in float64, in nn.Linear's (out, in) layout: the independent reference."""
    return sum(s * (b.double() @ a.double()) for a, b, s in zip(layer.lora_A, layer.lora_B, layer.scales))


# ------------------------------------------------------------------ merged model


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("fft", [True, False])
def test_merged_model_loads_with_auto_class_and_same_logits(arch, fft, tmp_path):
    _, model = base_and_trained(arch, molf.MoLFConfig(ranks=(2, 4) if not fft else (4,), fft=fft))
    want = logits(model)
    merged = molf.merge(model)
    assert not molf.is_wrapped(merged)
    merged.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(merged)
    assert not any(type(m).__name__ == "MoLFLinear" for m in loaded.modules())
    torch.testing.assert_close(logits(loaded), want, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------ PEFT export


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_export_peft_layout_and_logits(arch, tmp_path):
    base, model = base_and_trained(arch, molf.MoLFConfig(ranks=(2, 4), alphas=(8, 16), fft=False))
    layers = molf.routed_modules(model)
    assert all(torch.count_nonzero(b) > 0 for _, layer in layers for b in layer.lora_B)
    want = logits(model)
    assert not torch.allclose(want, logits(base), atol=1e-4), "training must have moved the adapters"

    molf.export_peft(model, tmp_path, base_model_name_or_path="tiny-base")
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 6 and config["lora_alpha"] == 6 and not config["use_rslora"]
    assert sorted(config["target_modules"]) == sorted(n for n, _ in layers)
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    assert config["base_model_name_or_path"] == "tiny-base"

    # The saved tensors are [s1 B1 | s2 B2] and [A1; A2]: their product is the experts' sum.
    tensors = safetensors_torch.load_file(str(tmp_path / ADAPTER_WEIGHTS))
    assert len(tensors) == 2 * len(layers)
    for name, layer in layers:
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape == (6, layer.in_features) and b.shape == (layer.out_features, 6)
        torch.testing.assert_close(b.double() @ a.double(), manual_delta(layer), atol=1e-6, rtol=1e-6)

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(loaded), want, atol=2e-5, rtol=1e-5)
    # The adapter sits on exactly the wrapped modules.
    adapted = sorted(
        n.removeprefix("base_model.model.")
        for n, m in loaded.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    )
    assert adapted == sorted(n for n, _ in layers)


def test_export_peft_single_expert_and_target_subset(tmp_path):
    """One LoRA expert (plain LoRA, as `molf train --mode lora` saves it), a
    subset of modules, rsLoRA off, and bf16 weights."""
    cfg = molf.MoLFConfig(ranks=(3,), alphas=(5,), rslora=False, fft=False, target_modules=("q_proj", "down_proj"))
    base, model = base_and_trained("qwen2", cfg)
    molf.export_peft(model, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 3
    assert len(config["target_modules"]) == 4
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), atol=2e-5, rtol=1e-5)

    half = molf.wrap(copy.deepcopy(base).to(torch.bfloat16), cfg)
    for _, layer in molf.routed_modules(half):
        torch.nn.init.normal_(layer.lora_B[0], std=0.05)
    molf.export_peft(half, tmp_path / "bf16")
    tensors = safetensors_torch.load_file(str(tmp_path / "bf16" / ADAPTER_WEIGHTS))
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())


def test_export_peft_through_a_wrapper_names_modules_as_the_base_model_does(tmp_path):
    """DDP / accelerate put the model under `module.`; the adapter must not carry that prefix."""
    base, model = base_and_trained("gpt2", molf.MoLFConfig(ranks=(2,), fft=False), steps=1)
    outer = torch.nn.Module()
    outer.module = model
    molf.export_peft(outer, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert sorted(config["target_modules"]) == sorted(n for n, _ in molf.routed_modules(model))
    assert config["task_type"] == "CAUSAL_LM"
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), atol=2e-5, rtol=1e-5)


def test_export_peft_refuses_fft_merged_and_unwrapped(tmp_path):
    _, model = base_and_trained("qwen2", molf.MoLFConfig(ranks=(4,), fft=True), steps=1)
    with pytest.raises(molf.ConfigError, match=r"fft=False.*molf\.merge"):
        molf.export_peft(model, tmp_path / "fft")
    assert not (tmp_path / "fft").exists(), "nothing is written when refused"
    merged = molf.merge(model)
    with pytest.raises(molf.ConfigError, match="no molf-wrapped layers"):
        molf.export_peft(merged, tmp_path / "merged")
    with pytest.raises(molf.ConfigError, match="no molf-wrapped layers"):
        molf.export_peft(qwen2(), tmp_path / "plain")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "plain").exists()


def test_export_peft_warns_on_trainable_parameters_outside_the_adapter(tmp_path):
    _, model = base_and_trained("qwen2", molf.MoLFConfig(ranks=(2,), fft=False), steps=1)
    model.lm_head.weight.requires_grad_(True)
    with pytest.warns(UserWarning, match="not part of the adapter"):
        molf.export_peft(model, tmp_path)


# ------------------------------------------------------------------ PEFT import


def peft_adapter(arch: str, tmp_path, *, r: int, alpha: int, rslora: bool, alpha_pattern=None, seed: int = 7):
    """A real PEFT adapter with random non-zero A and B, saved by peft itself."""
    torch.manual_seed(seed)
    base = ARCHS[arch]().eval()
    targets = ["q_proj", "v_proj", "down_proj"] if arch == "qwen2" else ["c_attn", "c_fc"]
    lcfg = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=rslora,
        target_modules=targets,
        alpha_pattern=alpha_pattern or {},
        fan_in_fan_out=arch == "gpt2",
    )
    pm = peft.get_peft_model(copy.deepcopy(base), lcfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.1)
    pm.save_pretrained(tmp_path / "adapter")
    return base, pm, targets


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("fft", [True, False])
def test_import_peft_computes_what_peft_computed(arch, fft, tmp_path):
    base, pm, targets = peft_adapter(
        arch, tmp_path, r=4, alpha=16, rslora=False, alpha_pattern={"v_proj": 3} if arch == "qwen2" else {"c_fc": 3}
    )
    want = logits(pm)
    assert not torch.allclose(want, logits(base), atol=1e-4)
    # The second LoRA expert has the adapter's rank; the first stays zero-B (no effect).
    cfg = molf.MoLFConfig(ranks=(2, 4), alphas=(8, 32), fft=fft, target_modules=tuple(targets))
    model = molf.wrap(copy.deepcopy(base), cfg)
    expert = 2 if fft else 1
    assert molf.import_peft(model, tmp_path / "adapter", expert=expert) is model
    torch.testing.assert_close(logits(model), want, atol=2e-5, rtol=1e-5)
    # A is copied verbatim; s_molf B_molf = s_peft B_peft.
    peft_modules = {
        n.removeprefix("base_model.model."): m
        for n, m in pm.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    for name, layer in molf.routed_modules(model):
        ref = peft_modules[name]
        assert torch.equal(layer.lora_A[1], ref.lora_A["default"].weight)
        torch.testing.assert_close(
            layer.scales[1] * layer.lora_B[1].double(), ref.scaling["default"] * ref.lora_B["default"].weight.double()
        )
    # And it trains on from there.
    opt = molf.MoLFAdamW(model, lr=1e-3, lora_lr=1e-3)
    model.train()
    model(**batch(0)).loss.backward()
    opt.step()


def test_import_peft_rslora_and_round_trip_through_export(tmp_path):
    base, pm, targets = peft_adapter("qwen2", tmp_path, r=4, alpha=8, rslora=True)
    cfg = molf.MoLFConfig(ranks=(4,), fft=False, target_modules=tuple(targets))
    model = molf.wrap(copy.deepcopy(base), cfg)
    molf.import_peft(model, tmp_path / "adapter", expert=0)
    torch.testing.assert_close(logits(model), logits(pm), atol=2e-5, rtol=1e-5)
    molf.export_peft(model, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again")
    torch.testing.assert_close(logits(again), logits(pm), atol=2e-5, rtol=1e-5)


def test_import_peft_refuses_bad_input_before_writing(tmp_path):
    base, _, targets = peft_adapter("qwen2", tmp_path, r=4, alpha=8, rslora=False)
    model = molf.wrap(copy.deepcopy(base), molf.MoLFConfig(ranks=(4,), fft=True, target_modules=tuple(targets)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = tmp_path / "adapter"
    with pytest.raises(molf.ConfigError, match="dense weight"):
        molf.import_peft(model, adapter, expert=0)
    with pytest.raises(molf.ConfigError, match=r"one of \[1\]"):
        molf.import_peft(model, adapter, expert=2)
    with pytest.raises(molf.ConfigError, match="no adapter_config.json"):
        molf.import_peft(model, tmp_path / "missing", expert=1)
    # Rank mismatch.
    other = molf.wrap(copy.deepcopy(base), molf.MoLFConfig(ranks=(2,), fft=True, target_modules=tuple(targets)))
    with pytest.raises(molf.ConfigError, match="do not fit expert 1"):
        molf.import_peft(other, adapter, expert=1)
    # An adapter module that is not wrapped: nothing may be written, not even the modules that fit.
    partial = molf.wrap(copy.deepcopy(base), molf.MoLFConfig(ranks=(4,), fft=True, target_modules=("q_proj",)))
    partial_before = {k: v.clone() for k, v in partial.state_dict().items()}
    with pytest.raises(molf.ConfigError, match="not a molf-wrapped module"):
        molf.import_peft(partial, adapter, expert=1)
    assert all(torch.equal(v, partial_before[k]) for k, v in partial.state_dict().items())
    # DoRA is more than y += s B A x.
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    config["use_dora"] = True
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(molf.ConfigError, match="use_dora"):
        molf.import_peft(model, adapter, expert=1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(molf.ConfigError, match="no molf-wrapped layers"):
        molf.import_peft(base, adapter, expert=1)
