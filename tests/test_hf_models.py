"""Real transformers architectures from tiny configs: wrap, train, merge."""

from __future__ import annotations

import copy

import pytest
import torch

import molf

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, tie_word_embeddings=True))


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))


def gemma3():
    cfg = transformers.Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=16)
    return transformers.Gemma3ForCausalLM(cfg)


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg)


ARCHS = {"qwen2": qwen2, "llama": llama, "gemma3": gemma3, "gpt2": gpt2}
# Linear layers per transformer block that wrap must find.
EXPECTED_PER_LAYER = {"qwen2": 7, "llama": 7, "gemma3": 7, "gpt2": 4}


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (2, 12), generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.fixture(params=sorted(ARCHS))
def arch(request):
    return request.param


@pytest.mark.parametrize("fft,ranks", [(True, (4,)), (False, (2, 8))])
def test_wrap_train_merge(arch, fft, ranks):
    torch.manual_seed(0)
    original = ARCHS[arch]().eval()
    inputs = batch()
    with torch.no_grad():
        before = original(**inputs).logits
    model = molf.wrap(copy.deepcopy(original), molf.MoLFConfig(ranks=ranks, fft=fft))
    layers = molf.routed_modules(model)
    assert len(layers) == EXPECTED_PER_LAYER[arch] * 2
    assert not any(n.endswith("lm_head") for n, _ in layers)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before), "wrap must not change the function"

    model.train()
    opt = molf.MoLFAdamW(model, lr=1e-3, lora_lr=1e-3, routing=molf.TopK(k=1))
    losses = []
    for step in range(4):
        out = model(**batch(step))
        out.loss.backward()
        losses.append(out.loss.item())
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(torch.tensor(losses)))
    summary = opt.routing_summary()
    assert summary.step == 4 and len(summary.modules) == len(layers)
    assert abs(sum(summary.win_share.values()) - 1.0) < 1e-9
    assert not torch.equal(model(**inputs).logits, before), "training must change the model"

    model.eval()
    with torch.no_grad():
        wrapped_logits = model(**inputs).logits
    merged = molf.merge(model)
    assert not molf.is_wrapped(merged)
    assert all(type(m).__name__ != "MoLFLinear" for m in merged.modules())
    assert all(p.requires_grad for p in merged.parameters()), "merge must unfreeze what wrap froze"
    assert set(dict(merged.named_parameters())) == set(dict(original.named_parameters()))
    with torch.no_grad():
        merged_logits = merged(**inputs).logits
    torch.testing.assert_close(merged_logits, wrapped_logits, rtol=1e-4, atol=1e-4)


def test_gpt2_conv1d_is_wrapped_with_transposed_weight():
    torch.manual_seed(0)
    model = molf.wrap(gpt2(), molf.MoLFConfig(ranks=(4,), target_modules=("c_attn",)))
    (name, layer), *_ = molf.routed_modules(model)
    assert name.endswith("attn.c_attn") and layer.transposed
    assert (layer.in_features, layer.out_features) == (32, 96)


def test_target_modules_by_suffix():
    model = molf.wrap(qwen2(), molf.MoLFConfig(ranks=(4,), target_modules=("q_proj", "v_proj")))
    names = [n.rsplit(".", 1)[-1] for n, _ in molf.routed_modules(model)]
    assert sorted(set(names)) == ["q_proj", "v_proj"] and len(names) == 4
