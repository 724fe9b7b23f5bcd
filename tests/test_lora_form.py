"""`MoLFConfig(lora_form="svd")`: LoRA experts in AdaLoRA's form, ΔW = s·B·diag(λ)·A.

Checked against a float64 reference written out here, torch's AdamW (the degenerate case:
one expert alone is that parametrization trained by AdamW), merging, and PEFT's own loader."""

from __future__ import annotations

import copy
import io
import pickle

import peft
import pytest
import torch
import transformers
from torch import nn

import molf
from molf.routed_linear import routed_apply
from molf.wrap import expert_tag
from test_degenerate import Net, assert_bitwise_equal, train_pair
from test_export import ARCHS, base_and_trained, logits, peft_adapter

SVD = dict(lora_form="svd")


def reference_forward(x, w, bias, experts):
    """y = x Wᵀ + b + Σ s·((x Aᵀ) ⊙ λ) Bᵀ, written out."""
    y = x @ w.T + bias
    for a, b, lam, s in experts:
        y = y + s * ((x @ a.T) * lam) @ b.T
    return y


def test_config_validates_and_records_the_form():
    with pytest.raises(molf.ConfigError, match="lora_form"):
        molf.MoLFConfig(lora_form="dora")
    assert molf.MoLFConfig().lora_form == "ba"
    assert molf.MoLFConfig(**SVD).to_dict()["lora_form"] == "svd"
    with pytest.raises(molf.ConfigError, match="form"):
        molf.MoLFLinear(nn.Linear(3, 2), (1,), (1.0,), form="SVD")


def test_wrap_starts_at_the_base_model_with_three_tensors_per_expert():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(6, 5)
    want = net(x)
    model = molf.wrap(net, molf.MoLFConfig(ranks=(2, 3), fft=False, exclude_modules=(), **SVD))
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    for _, layer in molf.routed_modules(model):
        assert layer._fused(layer.base)  # one autograd node, as the B·A form
        for expert, r in zip(layer.experts(), layer.ranks):
            a, b, lam = expert
            assert [expert_tag(p).part for p in expert] == ["A", "B", "E"]
            assert lam.shape == (r,) and torch.count_nonzero(lam) == 0
            assert torch.count_nonzero(a) == a.numel() and torch.count_nonzero(b) == b.numel()
            assert 0.01 < a.std().item() < 0.04  # N(0, 0.02), as AdaLoRA draws them


def test_forward_and_gradients_match_a_float64_reference():
    torch.manual_seed(1)
    lin = nn.Linear(7, 4).double()
    layer = molf.MoLFLinear(lin, (2, 3), (1.5, 0.5), fft=True, form="svd")
    with torch.no_grad():
        for lam in layer.lora_E:
            lam.normal_()
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(5, 4, dtype=torch.float64)
    layer(x).backward(gy)
    got = [x.grad] + [p.grad for expert in layer.experts() for p in expert]

    leaves = [t.detach().clone().requires_grad_(True) for t in [x] + [p for e in layer.experts() for p in e]]
    xr, w, bias, *lora = leaves
    experts = [(*lora[3 * i : 3 * i + 3], s) for i, s in enumerate(layer.scales)]
    y = reference_forward(xr, w, bias, experts)
    torch.testing.assert_close(layer(x.detach()), y.detach(), rtol=1e-12, atol=1e-12)
    y.backward(gy)
    for g, r in zip(got, leaves):
        torch.testing.assert_close(g, r.grad, rtol=1e-12, atol=1e-12)


def svd_layer(arch: str, fft: bool, dtype=torch.float64) -> molf.MoLFLinear:
    torch.manual_seed(3)
    base = nn.Linear(6, 5) if arch == "linear" else transformers.pytorch_utils.Conv1D(5, 6)
    layer = molf.MoLFLinear(base.to(dtype), (2, 3), (1.5, 0.5), fft=fft, form="svd")
    with torch.no_grad():
        for lam in layer.lora_E:
            lam.normal_()
    return layer


def unfused(layer: molf.MoLFLinear):
    """The layer's plain composition: a hook on its base (it does nothing) keeps the Function out."""
    return layer.base.register_forward_hook(lambda *args: None)


def outputs_and_grads(layer, x, gy):
    for p in layer.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = layer(x)
    y.backward(gy)
    grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("arch", ["linear", "conv1d"])
@pytest.mark.parametrize("fft", [True, False])
@pytest.mark.parametrize("shape", [(7, 6), (2, 7, 6)])
@pytest.mark.parametrize("x_grad", [True, False])
def test_the_fused_function_matches_the_composition(arch, fft, shape, x_grad):
    layer = svd_layer(arch, fft)
    if not fft:
        layer.base.requires_grad_(False)
    x = torch.randn(*shape, dtype=torch.float64).requires_grad_(x_grad)
    gy = torch.randn(*shape[:-1], 5, dtype=torch.float64)
    assert layer._fused(layer.base)
    got = outputs_and_grads(layer, x, gy)
    hook = unfused(layer)
    assert not layer._fused(layer.base)
    want = outputs_and_grads(layer, x, gy)
    hook.remove()
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    assert (got[1] is None) == (want[1] is None) == (not x_grad)
    if x_grad:
        torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    assert got[2].keys() == want[2].keys() and any("lora_E" in n for n in got[2])
    for n in got[2]:
        torch.testing.assert_close(got[2][n], want[2][n], rtol=1e-12, atol=1e-12, msg=n)
    with torch.no_grad():  # without grad: the Function's forward without its machinery
        torch.testing.assert_close(layer(x), got[0], rtol=1e-12, atol=1e-12)


def test_the_fused_function_gradchecks_and_skips_a_frozen_lambda():
    layer = svd_layer("linear", fft=True)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    params = [layer.base.weight, layer.base.bias, *layer.lora_A, *layer.lora_B, *layer.lora_E]

    def f(x, *ps):
        w, b, *lora = ps
        return routed_apply(x, w, b, False, layer.scales, *lora)

    assert torch.autograd.gradcheck(f, (x, *params))
    layer.lora_E[1].requires_grad_(False)
    layer(x).sum().backward()
    assert layer.lora_E[1].grad is None and layer.lora_E[0].grad is not None


def test_autocast_matches_the_composition():
    layer = svd_layer("linear", fft=True, dtype=torch.float32)
    x, gy = torch.randn(2, 7, 6), torch.randn(2, 7, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = outputs_and_grads(layer, x, gy)
        hook = unfused(layer)
        want = outputs_and_grads(layer, x, gy)
        hook.remove()
    assert got[0].dtype == torch.bfloat16
    for a, b in [(got[0], want[0])] + [(got[2][n], want[2][n]) for n in got[2]]:
        err = (a.double() - b.double()).norm() / b.double().norm()
        assert err < 2e-2, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_expert_alone_is_its_parametrization_trained_by_adamw(dtype):
    torch.manual_seed(2)
    model = molf.wrap(Net().to(dtype), molf.MoLFConfig(ranks=(4,), fft=False, **SVD))
    twin = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="routing is off"):
        opt = molf.MoLFAdamW(model, lr=1.0, lora_lr=2e-2, weight_decay=0.5, lora_weight_decay=0.01, state_dtype="param")
    params = [p for p in twin.parameters() if p.requires_grad]
    assert sorted(p.dim() for p in params) == [1] * 3 + [2] * 6
    # λ is a vector: no decay on it, as on biases (A and B decay).
    ref = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() == 2], "weight_decay": 0.01},
            {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0},
        ],
        lr=2e-2,
    )
    train_pair(model, opt, twin, ref, dtype)
    assert_bitwise_equal(model, twin)
    assert all(torch.count_nonzero(lam) > 0 for _, layer in molf.routed_modules(model) for lam in layer.lora_E)


def trained_svd(arch: str):
    return base_and_trained(arch, molf.MoLFConfig(ranks=(2, 4), alphas=(8, 16), fft=False, **SVD))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_merge_and_peft_export_compute_what_the_wrapped_model_does(arch, tmp_path):
    base, model = trained_svd(arch)
    assert all(torch.count_nonzero(lam) > 0 for _, layer in molf.routed_modules(model) for lam in layer.lora_E)
    want = logits(model)
    assert not torch.allclose(want, logits(base), atol=1e-4), "training must have moved the adapters"
    for _, layer in molf.routed_modules(model):
        manual = sum(
            s * (b.double() * lam.double()) @ a.double()
            for a, b, lam, s in zip(layer.lora_A, layer.lora_B, layer.lora_E, layer.scales)
        )
        delta = layer.delta_weight()
        torch.testing.assert_close(delta.T.double() if layer.transposed else delta.double(), manual)

    molf.export_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(loaded), want, atol=2e-5, rtol=1e-5)
    state = molf.merged_state_dict(model)
    torch.testing.assert_close(logits(molf.merge(model)), want, atol=2e-5, rtol=1e-5)
    plain = copy.deepcopy(base)
    plain.load_state_dict(state)
    torch.testing.assert_close(logits(plain), want, atol=2e-5, rtol=1e-5)


def test_import_peft_sets_lambda_to_one(tmp_path):
    base, pm, targets = peft_adapter("qwen2", tmp_path, r=4, alpha=8, rslora=True)
    cfg = molf.MoLFConfig(ranks=(2, 4), fft=False, target_modules=tuple(targets), **SVD)
    model = molf.wrap(copy.deepcopy(base), cfg)
    molf.import_peft(model, tmp_path / "adapter", expert=1)
    torch.testing.assert_close(logits(model), logits(pm), atol=2e-5, rtol=1e-5)
    for _, layer in molf.routed_modules(model):
        assert torch.equal(layer.lora_E[1], torch.ones(4)) and torch.count_nonzero(layer.lora_E[0]) == 0


def test_heldout_routing_trains_and_scales_an_svd_expert_in_its_shrink_trial():
    """The spectral trial's B·A is not an "svd"-form expert's product: its trial scales B (so
    the product) about zero. Between two closure calls of one probe every B that changed was
    halved (a trial at shrink 0.5) or doubled back (its undo), nothing else."""
    torch.manual_seed(4)
    model = molf.wrap(Net(), molf.MoLFConfig(ranks=(2, 3), fft=False, **SVD))
    x, y = torch.randn(16, 5), torch.randn(16, 2)
    held_x, held_y = torch.randn(16, 5), torch.randn(16, 2)

    def heldout():
        return ((model(held_x) - held_y) ** 2).mean()

    opt = molf.MoLFAdamW(model, lr=5e-2, routing=molf.Heldout(heldout, every=2, shrink=0.5, min_span=0))
    start = heldout().item()
    calls, step = [], [0]
    real = molf.heldout.HeldoutProbe._launch_value

    def spy(self):
        calls.append((step[0], {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}))
        return real(self)

    molf.heldout.HeldoutProbe._launch_value = spy
    try:
        for step[0] in range(20):
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
    finally:
        molf.heldout.HeldoutProbe._launch_value = real
    assert heldout().item() < start
    halved = 0
    for (s0, before), (s1, after) in zip(calls, calls[1:]):
        if s0 != s1:
            continue  # a training step in between
        for n, b in after.items():
            if not torch.equal(b, before[n]):
                assert torch.equal(b, 0.5 * before[n]) or torch.equal(b, 2.0 * before[n]), n
                halved += torch.equal(b, 0.5 * before[n])
    assert halved > 0


def test_a_checkpoint_resumes_the_same_run():
    """Model and optimizer state (λ and its moments included) through torch.save / torch.load
    (weights_only): the resumed run equals the uninterrupted one bit for bit."""
    cfg = molf.MoLFConfig(ranks=(2, 3), fft=False, **SVD)
    data = [(torch.randn(8, 5, generator=torch.Generator().manual_seed(i)), torch.randn(8, 2)) for i in range(12)]

    def build(seed=5):
        torch.manual_seed(seed)
        model = molf.wrap(Net(), cfg)
        held = data[0][0]
        return model, molf.MoLFAdamW(model, lr=3e-2, routing=molf.Heldout(lambda: model(held).pow(2).mean(), every=3))

    def train(model, opt, batches):
        for x, y in batches:
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()

    whole, opt = build()
    train(whole, opt, data)
    first, opt = build()
    train(first, opt, data[:7])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    blob = torch.load(buf, weights_only=True)
    resumed, opt = build(seed=6)
    resumed.load_state_dict(blob["model"])
    opt.load_state_dict(blob["opt"])
    train(resumed, opt, data[7:])
    assert_bitwise_equal(resumed, whole)


def test_a_layer_pickled_before_the_form_existed_loads_as_ba():
    torch.manual_seed(7)
    layer = molf.MoLFLinear(nn.Linear(5, 3), (2,), (1.0,))
    with torch.no_grad():
        layer.lora_B[0].normal_()
    x = torch.randn(4, 5)
    old = {k: v for k, v in layer.__dict__.items() if k not in ("form", "lora_E")}
    loaded = molf.MoLFLinear.__new__(molf.MoLFLinear)
    loaded.__setstate__(old)
    assert loaded.form == "ba" and loaded.lora_E is None and len(loaded.experts()[1]) == 2
    torch.testing.assert_close(loaded(x), layer(x), rtol=0, atol=0)
    again = pickle.loads(pickle.dumps(molf.MoLFLinear(nn.Linear(5, 3), (2,), (1.0,), form="svd")))
    assert again.form == "svd" and len(again.lora_E) == 1
