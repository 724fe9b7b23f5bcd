"""The held-out probe's sums as one Triton pass (`molf._probe_sums`, the CUDA path), checked
on the CPU through Triton's interpreter (or on a GPU where one is present): against a plain
float64 reference written here, against the torch path, and inside a measurement."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import (tests/conftest.py sets it too)
pytest.importorskip("triton")
import molf  # noqa: E402
from molf import _fused, _probe_sums, _window_sums  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# The device the tensors land on ("cuda:0", not "cuda", which compares unequal to it):
# the probe asks `eligible` about its tensors' own device.
TENSOR_DEVICE = torch.empty(0, device=DEVICE).device

CHUNK = 2048  # several chunks per tensor at the interpreter's speed (a multiple of every BLOCK)
# Several chunks with a ragged tail, one element, an unaligned count, one chunk exactly.
SHAPES = [(40, 130), (1,), (7, 3), (CHUNK,), (3 * CHUNK + 17,)]
ADAM = (1e-3, 0.9, 0.999, 1e-8)  # lr, beta1, beta2, eps


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(_fused, "CHUNK", CHUNK)


def operands(shape, param_dtype, state_dtype, adam, seed, offset=0):
    """An item as `HeldoutProbe._sums` builds it: (slot, θ, θ_prev, g, g_prev, adam). With
    `offset`, every tensor starts `offset` elements into a larger buffer (unaligned)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(scale, dtype, positive=False):
        t = torch.randn((int(np.prod(shape)) + offset,), generator=gen, dtype=torch.float64) * scale
        return (t.abs() if positive else t).to(dtype).to(DEVICE)[offset:].view(shape)

    theta = rand(1.0, param_dtype)
    prev = (theta.double() + rand(1e-2, torch.float64)).to(param_dtype)
    g, gprev = rand(1.0, param_dtype), rand(1.0, param_dtype)
    if adam:
        step = torch.tensor(float(3 + seed))
        adam = (rand(0.1, state_dtype), rand(1e-2, state_dtype, positive=True), step, ADAM)
    return (seed, theta, prev, g, gprev, adam or None)


def reference(item, magnitude=False):
    """(½⟨g_prev + g, θ − θ_prev⟩, η/(1 − β1^t) ⟨g, m/(√v/√(1 − β2^t) + ε)⟩, ‖θ − θ_prev‖₁) in
    float64; with `magnitude`, the same sums of the terms' absolute values (what each sum's
    float32 rounding scales with)."""
    _, theta, prev, g, gprev, adam = (x.double().cpu() if isinstance(x, torch.Tensor) else x for x in item)
    size = torch.abs if magnitude else (lambda t: t)
    delta = theta - prev
    realized = 0.5 * float(size((gprev + g) * delta).sum())
    potential = 0.0
    if adam is not None:
        m, v, step, (lr, beta1, beta2, eps) = adam
        t = float(step)
        denom = v.double().cpu().sqrt() / (1 - beta2**t) ** 0.5 + eps
        potential = lr / (1 - beta1**t) * float(size(g * m.double().cpu() / denom).sum())
    return [realized, potential, float(delta.abs().sum())]


DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]


@pytest.mark.parametrize("param_dtype,state_dtype", DTYPES)
def test_sums_match_a_float64_reference_and_the_torch_path(param_dtype, state_dtype):
    # Aligned and unaligned starts, with and without Adam's moments: several launches.
    items = [
        operands(shape, param_dtype, state_dtype, adam=k % 3 != 1, seed=k, offset=3 if k % 2 else 0)
        for k, shape in enumerate(SHAPES * 2)
    ]
    assert all(_probe_sums.eligible(item, TENSOR_DEVICE) for item in items)
    got = _probe_sums.heldout_sums(items)
    assert got.dtype == torch.float64 and got.shape == (len(items), 3)
    want = torch.tensor([reference(item) for item in items], dtype=torch.float64)
    # Float32 math on both paths: each sum to float32 rounding of its terms' magnitudes.
    scale = torch.tensor([reference(item, magnitude=True) for item in items], dtype=torch.float64)
    assert (got.cpu() - want).abs().le(1e-5 * scale + 1e-12).all()
    torch_path = torch.cat([_window_sums._batch_sums([item]) for item in items]).cpu()
    torch.testing.assert_close(got.cpu(), torch_path, rtol=1e-5, atol=1e-6 * float(scale.max()))


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_remember_copies_theta_and_the_gradient_over_the_sums_tables(param_dtype):
    """The probe's commit over the sums' tables (`heldout_sums(..., remember)`): nothing is
    written until the function it appends is called; then θ_prev is θ and g_prev is g, bit for
    bit, for every item that `remembers` (aligned or not); an item whose gradient is in another
    dtype is left to the probe's own copy."""
    items = []
    for k, shape in enumerate(SHAPES * 2):
        slot, theta, prev, g, gprev, adam = operands(shape, param_dtype, torch.float32, k % 2 == 0, k, 3 * (k % 2))
        other = torch.float64 if param_dtype == torch.float32 else torch.float32
        items.append((slot, theta, prev, g.to(other) if k % 3 == 2 else g, gprev, adam))
    before = [(item[2].clone(), item[4].clone()) for item in items]
    remember: list = []
    sums = _probe_sums.heldout_sums(items, remember)
    assert torch.equal(sums, _probe_sums.heldout_sums(items))  # the same sums
    assert all(torch.equal(item[2], prev) and torch.equal(item[4], gprev) for item, (prev, gprev) in zip(items, before))
    (copy,) = remember
    copy()
    assert [_probe_sums.remembers(item) for item in items] == [k % 3 != 2 for k in range(len(items))]
    for item, (prev, gprev) in zip(items, before):
        if _probe_sums.remembers(item):
            assert torch.equal(item[2], item[1]) and torch.equal(item[4], item[3])
        else:
            assert torch.equal(item[2], prev) and torch.equal(item[4], gprev)


def test_sums_are_bitwise_reproducible_and_order_free():
    """A fixed reduction order: the same sums whatever else is summed in the same call."""
    items = [operands(shape, torch.bfloat16, torch.float32, adam=True, seed=k) for k, shape in enumerate(SHAPES)]
    a = _probe_sums.heldout_sums(items)
    b = _probe_sums.heldout_sums(items[::-1]).flip(0)
    c = _probe_sums.heldout_sums(items[2:3])
    assert torch.equal(a, b) and torch.equal(a[2:3], c)


def test_a_repeated_layout_reuses_its_tables_and_sums_the_new_values():
    """A probe's calls share sizes and kinds: the second call takes the first's chunk tables
    (`_Plan`) and must still read its own tensors, and a call of other sizes, or of the same
    pattern of kinds in other dtypes, must not take them."""

    def check(items):
        got = _probe_sums.heldout_sums(items).cpu()
        want = torch.tensor([reference(item) for item in items], dtype=torch.float64)
        scale = torch.tensor([reference(item, magnitude=True) for item in items], dtype=torch.float64)
        assert (got - want).abs().le(1e-5 * scale + 1e-12).all()

    def layout(dtype, seed, shapes=SHAPES):
        return [operands(shape, dtype, dtype, adam=k % 2 == 0, seed=seed + k) for k, shape in enumerate(shapes)]

    check(layout(torch.float32, 0))
    plan = _probe_sums._Plan._last
    check(layout(torch.float32, 10))  # other values, the same layout
    assert _probe_sums._Plan._last is plan
    check(layout(torch.bfloat16, 20))  # the same kinds pattern in another dtype
    assert _probe_sums._Plan._last is plan
    check(layout(torch.float32, 30, SHAPES[::-1]))  # other sizes in order
    assert _probe_sums._Plan._last is not plan


def test_not_eligible():
    item = operands((6, 5), torch.float32, torch.float32, adam=True, seed=0)
    device = TENSOR_DEVICE
    assert _probe_sums.eligible(item, device)
    strided = (item[0], item[1].t(), *item[2:])  # element k of θ is not element k of the others
    assert not _probe_sums.eligible(strided, device)
    mixed = (*item[:4], item[4].double(), item[5])  # g_prev not in θ's dtype
    assert not _probe_sums.eligible(mixed, device)
    assert not _probe_sums.eligible(item, torch.device("meta"))


@pytest.mark.parametrize("fft,ranks", [(True, (2,)), (False, (2, 3))])
def test_measurements_with_the_kernel_match_the_torch_path(monkeypatch, fft, ranks):
    """Whole runs of policy "heldout": the Ledger's records and the Router's choices are the
    torch path's whether the kernel sums (patched in on the CPU) or not."""

    def run(kernel):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 5)).to(DEVICE)
        molf.wrap(model, molf.MoLFConfig(ranks=ranks, fft=fft, exclude_modules=()))
        for _, layer in molf.routed_modules(model):
            with torch.no_grad():
                for b in layer.lora_B:
                    b.normal_(0, 0.1)
        x, y = torch.randn(16, 6, device=DEVICE), torch.randn(16, 5, device=DEVICE)
        xh = torch.randn(16, 6, device=DEVICE)
        opt = molf.MoLFAdamW(
            model, lr=1e-2, routing=molf.Heldout(lambda: model(xh).square().mean(), every=2, min_span=0)
        )
        calls = []
        with monkeypatch.context() as patch:
            sums = _probe_sums.heldout_sums

            def spy(items, remember=None):
                calls.append(len(items))
                return sums(items, remember)

            patch.setattr(_probe_sums, "heldout_sums", spy)
            patch.setattr(_window_sums, "_fused_sums", lambda device: _probe_sums if kernel else None)
            for _ in range(8):
                ((model(x) - y) ** 2).mean().backward()
                opt.step()
                opt.zero_grad()
        return opt, calls

    (fused, calls), (plain, none) = run(True), run(False)
    assert calls and not none  # the kernel summed every measurement after the first
    np.testing.assert_allclose(fused.ledger.heldout_ema(), plain.ledger.heldout_ema(), rtol=1e-5)
    assert (fused.router.incumbents() == plain.router.incumbents()).all()
    # The held-out state the kernel's commit copied is the torch path's copies' (the runs' routing
    # alike, their weights are too).
    for (p, a), (q, b) in zip(fused.state.items(), plain.state.items()):
        assert torch.equal(p, q)
        for key in (molf.heldout.THETA_KEY, molf.heldout.GRAD_KEY):
            assert torch.equal(a[key], b[key]), key
