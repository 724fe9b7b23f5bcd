"""MoLFConfig validation, the layer of SPEC §1, wrap and merge on plain torch models."""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import molf


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(4, 6)
        self.down = nn.Linear(6, 4, bias=False)
        self.lm_head = nn.Linear(4, 5)

    def forward(self, x):
        return self.lm_head(self.down(torch.relu(self.up(x))))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(ranks=(0,)), "ranks"),
        (dict(ranks=(-2,)), "ranks"),
        (dict(ranks=(2.5,)), "ranks"),
        (dict(ranks=(), fft=False), "ranks"),
        (dict(ranks=(4, 8), alphas=(16,)), "alphas"),
        (dict(ranks=(4,), alphas=(0,)), "alphas"),
        (dict(ranks=(4,), alphas=(math.nan,)), "alphas"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(target_modules=("",)), "target_modules"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(molf.ConfigError, match=match):
        molf.MoLFConfig(**kwargs)
    assert issubclass(molf.ConfigError, ValueError)


def test_scales_rslora_and_plain():
    assert molf.MoLFConfig(ranks=(16,), alphas=(32,)).scales == (8.0,)
    assert molf.MoLFConfig(ranks=(16,), alphas=(32,), rslora=False).scales == (2.0,)
    assert molf.MoLFConfig(ranks=(4, 16)).expert_names == ("dense", "lora0_r4", "lora1_r16")
    assert molf.MoLFConfig(ranks=(4, 16), fft=False).expert_names == ("lora0_r4", "lora1_r16")


def test_layer_forward_is_the_formula():
    torch.manual_seed(0)
    base = nn.Linear(5, 3)
    layer = molf.MoLFLinear(base, ranks=(2, 4), scales=(0.5, 2.0))
    # A: Kaiming-uniform(a=sqrt 5) bound = 1/sqrt(fan_in); B: zeros
    for a in layer.lora_A:
        assert a.abs().max() <= 1 / math.sqrt(5) + 1e-7 and a.std() > 0
    assert all(torch.count_nonzero(b) == 0 for b in layer.lora_B)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    x = torch.randn(7, 5, dtype=torch.float64)
    layer = layer.double()
    expected = x @ base.weight.T + base.bias
    for a, b, s in zip(layer.lora_A, layer.lora_B, layer.scales):
        expected = expected + s * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected)


def test_dropout_applies_to_lora_path_only():
    torch.manual_seed(0)
    layer = molf.MoLFLinear(nn.Linear(8, 8), ranks=(4,), scales=(1.0,), dropout=0.9).train()
    x = torch.randn(3, 8)
    # B = 0: the LoRA path is zero, so dropout must not touch the dense path.
    torch.testing.assert_close(layer(x), layer.base(x))


def test_wrap_excludes_head_and_freezes_for_efficient():
    model = molf.wrap(Tiny(), molf.MoLFConfig(ranks=(2,), fft=False))
    assert [n for n, _ in molf.routed_modules(model)] == ["up", "down"]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["down.lora_A.0", "down.lora_B.0", "up.lora_A.0", "up.lora_B.0"]


def test_wrap_errors():
    model = molf.wrap(Tiny(), molf.MoLFConfig(ranks=(2,)))
    with pytest.raises(molf.ConfigError, match="already wrapped"):
        molf.wrap(model, molf.MoLFConfig(ranks=(2,)))
    with pytest.raises(molf.ConfigError, match="matched no module"):
        molf.wrap(Tiny(), molf.MoLFConfig(target_modules=("q_proj",)))
    with pytest.raises(molf.ConfigError, match="MoLFConfig"):
        molf.wrap(Tiny(), {"ranks": (2,)})
    merged = molf.merge(model)
    with pytest.raises(molf.ConfigError, match="no molf-wrapped"):
        molf.merge(merged)
    with pytest.raises(molf.ConfigError, match="no molf-wrapped"):
        molf.MoLFAdamW(merged)


def test_merge_folds_experts_exactly():
    torch.manual_seed(0)
    model = molf.wrap(Tiny().double(), molf.MoLFConfig(ranks=(2, 3), alphas=(4, 9)))
    with torch.no_grad():
        for _, layer in molf.routed_modules(model):
            for b in layer.lora_B:
                b.normal_()
    x = torch.randn(4, 4, dtype=torch.float64)
    before = model(x)
    merged = molf.merge(model)
    assert isinstance(merged.up, nn.Linear) and isinstance(merged.down, nn.Linear)
    assert not hasattr(merged, "molf_config")
    torch.testing.assert_close(merged(x), before, rtol=1e-12, atol=1e-12)


def test_wrap_and_merge_refuse_what_is_not_a_module():
    with pytest.raises(molf.ConfigError, match="wrap: model must be a torch.nn.Module, got str"):
        molf.wrap("str")
    with pytest.raises(molf.ConfigError, match="merge: model must be a torch.nn.Module, got str"):
        molf.merge("str")


@pytest.mark.parametrize(
    ("ranks", "alphas", "want_ranks", "want_alphas"),
    [
        (np.int64(8), None, (8,), (32.0,)),
        (np.array(8), np.float32(16), (8,), (16.0,)),
        (np.array([4, 8]), np.array([16.0, 8.0], dtype=np.float32), (4, 8), (16.0, 8.0)),
        ([np.int32(4), 8], [np.float64(2), 3], (4, 8), (2.0, 3.0)),
    ],
    ids=["int64", "0-d", "arrays", "mixed-list"],
)
def test_config_accepts_numpy_numbers(ranks, alphas, want_ranks, want_alphas):
    config = molf.MoLFConfig(ranks=ranks, alphas=alphas)
    assert config.ranks == want_ranks and config.alphas == want_alphas
    # Stored as plain Python numbers: to_dict() stays JSON-serialisable.
    assert all(type(r) is int for r in config.ranks) and all(type(a) is float for a in config.alphas)
    json.dumps(config.to_dict())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(ranks=None), "ranks must be positive integers or a sequence of them, got None"),
        (dict(ranks=np.bool_(True)), "ranks must be positive integers"),
        (dict(ranks=np.array(True)), "ranks must be positive integers, got True"),
        (dict(ranks=(4,), alphas=np.bool_(True)), "alphas must be positive finite numbers"),
        (dict(dropout=False), "dropout must be in"),
    ],
    ids=["None", "numpy-bool", "0-d-bool", "numpy-bool-alpha", "bool-dropout"],
)
def test_config_refuses_bools_and_non_numbers_with_config_error(kwargs, match):
    with pytest.raises(molf.ConfigError, match=match):
        molf.MoLFConfig(**kwargs)


def test_optimizer_refuses_a_bool_topk():
    model = molf.wrap(Tiny(), molf.MoLFConfig(ranks=(2,)))
    with pytest.raises(molf.ConfigError, match="topk must be an integer, got the bool True"):
        molf.MoLFAdamW(model, routing=molf.TopK(k=True))


def _state(model):
    return (
        [(n, id(m)) for n, m in model.named_modules()],
        [(n, p.requires_grad, hasattr(p, "_molf_expert")) for n, p in model.named_parameters()],
        sorted(k for k in vars(model) if k.startswith(("molf", "_molf"))),
    )


@pytest.mark.parametrize("fft", [True, False])
@pytest.mark.parametrize("where", ["build", "allocation", "swap"])
def test_wrap_is_all_or_nothing(monkeypatch, where, fft):
    """A failure at the second layer (building it, allocating its experts, or putting it
    in place) leaves the model exactly as it was, and the error propagates."""
    wrap_module = importlib.import_module("molf.wrap")
    model = Tiny()
    model.lm_head.weight.requires_grad_(False)  # a flag wrap must restore as it was, not to True
    before = _state(model)
    calls = []

    def second_fails(real, error):
        def fake(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise error
            return real(*args, **kwargs)

        return fake

    if where == "build":

        class Failing(molf.MoLFLinear):  # a subclass: wrap's isinstance checks keep working
            def __init__(self, *args, **kwargs):
                second_fails(lambda: None, RuntimeError("boom"))()
                super().__init__(*args, **kwargs)

        monkeypatch.setattr(wrap_module, "MoLFLinear", Failing)
    elif where == "allocation":
        # MoLFLinear allocates each A with torch.empty: the second layer's runs out of memory.
        monkeypatch.setattr(torch, "empty", second_fails(torch.empty, torch.cuda.OutOfMemoryError("boom")))
    else:
        swap = second_fails(wrap_module._set_submodule, RuntimeError("boom"))
        monkeypatch.setattr(wrap_module, "_set_submodule", swap)
    with pytest.raises((RuntimeError, torch.cuda.OutOfMemoryError), match="boom"):
        molf.wrap(model, molf.MoLFConfig(ranks=(2,), fft=fft))
    assert len(calls) >= 2
    monkeypatch.undo()
    assert _state(model) == before
    assert not molf.is_wrapped(model)
    # The model is whole: it wraps now.
    molf.wrap(model, molf.MoLFConfig(ranks=(2,), fft=fft))
    assert [n for n, _ in molf.routed_modules(model)] == ["up", "down"]
