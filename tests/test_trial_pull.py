"""The dense shrink trial's save and pull as one Triton pass (`molf._trial_pull`, the CUDA
path), checked on the CPU through Triton's interpreter (or on a GPU where one is present):
the saved copy is θ bit for bit and θ is pulled as torch's lerp pulls it; inside a
measurement (patched in on the CPU) its trials decide as the torch path's, and an exception
after the pull undoes it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import (tests/conftest.py sets it too)
pytest.importorskip("triton")
import molf  # noqa: E402
from molf import _fused, _shrink, _trial_pull  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CHUNK = 2048  # several chunks per tensor at the interpreter's speed (a multiple of every BLOCK)
SHAPES = [(40, 130), (1,), (7, 3), (CHUNK,), (3 * CHUNK + 17,)]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(_fused, "CHUNK", CHUNK)


def tensor(shape, dtype, seed, offset=0):
    """A tensor of `shape` starting `offset` elements into a larger buffer (unaligned)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(int(np.prod(shape)) + offset, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    return t[offset:].view(shape)


def lerped(theta, origin, w):
    """torch's lerp of θ towards the origin: on CUDA torch's own multi-tensor lerp; on the CPU
    (where torch's vectorised lerp may fuse the multiply-add and the interpreter does not) its
    formula op by op in float32, rounded to θ's dtype as the interpreter rounds (towards zero;
    on CUDA Triton rounds to nearest even, as torch does, and the comparison there is torch's)."""
    if DEVICE == "cuda":
        out = [t.clone() for t in theta]
        torch._foreach_lerp_(out, origin, w)
        return out
    w32 = torch.tensor(w, dtype=torch.float32)
    result = []
    for t, o in zip(theta, origin):
        x, e = t.float(), o.float()
        x = x + w32 * (e - x) if abs(w) < 0.5 else e - (e - x) * (1 - w32)
        result.append(x if t.dtype == torch.float32 else _towards_zero_bf16(x))
    return result


def _towards_zero_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 to bfloat16 by dropping the low 16 bits (round towards zero)."""
    return (x.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


@pytest.mark.parametrize("weight", [0.1, 0.7])  # both of lerp's formulas
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 3])
def test_saves_theta_and_pulls_it_as_lerp_does(dtype, weight, offset):
    theta = [tensor(s, dtype, k, offset) for k, s in enumerate(SHAPES)]
    origin = [tensor(s, dtype, 100 + k, offset) for k, s in enumerate(SHAPES)]
    before, origin_before = [t.clone() for t in theta], [o.clone() for o in origin]
    want = lerped(before, origin, weight)
    saved = _trial_pull.save_and_pull(theta, origin, weight)
    assert all(torch.equal(s, b) for s, b in zip(saved, before))
    assert all(torch.equal(t, w) for t, w in zip(theta, want))
    assert all(torch.equal(o, b) for o, b in zip(origin, origin_before))
    assert not any(torch.equal(t, b) for t, b in zip(theta, before) if t.numel() > 1)  # pulled
    # One buffer for the copies, none sharing a tensor's memory.
    assert len({s.untyped_storage().data_ptr() for s in saved}) == 1


def test_mixed_dtypes_launch_per_kind():
    theta = [tensor((33,), torch.float32, 0), tensor((50,), torch.bfloat16, 1), tensor((9,), torch.float32, 2)]
    origin = [tensor(t.shape, t.dtype, 10 + k) for k, t in enumerate(theta)]
    before = [t.clone() for t in theta]
    want = lerped(before, origin, 0.25)
    saved = _trial_pull.save_and_pull(theta, origin, 0.25)
    assert all(torch.equal(s, b) and s.dtype == b.dtype for s, b in zip(saved, before))
    assert all(torch.equal(t, w) for t, w in zip(theta, want))


def test_not_eligible():
    t = tensor((6, 5), torch.float32, 0)
    assert _trial_pull.eligible(t, t.clone())
    assert not _trial_pull.eligible(t, t.double())  # another dtype
    assert not _trial_pull.eligible(t.t(), t.t().clone())  # not contiguous
    assert not _trial_pull.eligible(t, t.reshape(5, 6).clone())  # another shape
    assert not _trial_pull.eligible(t.int(), t.int())  # a dtype the kernel does not read


def _kernel(patch, on: bool) -> list:
    """`run_trials` with the kernel (`on`; on the CPU for CPU tensors too, through the
    interpreter) or the torch path; returns the list of its dense entry counts per call."""
    calls: list = []

    def pullable(entries, local):
        idx = [i for i, (_, origin, _, _) in enumerate(entries) if origin is not None]
        calls.append(len(idx))
        return [i for i in idx if _trial_pull.eligible(local[i], entries[i][1])] if on else []

    patch.setattr(_shrink, "_pullable", pullable)
    return calls


def _run(patch, on: bool, fft: bool, ranks: tuple):
    """A wrapped MLP on DEVICE under policy "heldout", trained on noisy labels of a linear
    teacher and measured on clean ones: dense trials kept and rejected."""
    calls = _kernel(patch, on)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.Tanh(), torch.nn.Linear(40, 5)).to(DEVICE)
    molf.wrap(model, molf.MoLFConfig(ranks=ranks, fft=fft, exclude_modules=()))
    teacher = torch.randn(6, 5, device=DEVICE)
    x, xh = torch.randn(16, 6, device=DEVICE), torch.randn(16, 6, device=DEVICE)
    y = x @ teacher + torch.randn(16, 5, device=DEVICE)  # noisy labels: a trial may help or not
    opt = molf.MoLFAdamW(
        model, lr=3e-2, routing=molf.Heldout(lambda: (model(xh) - xh @ teacher).square().mean(), every=2, min_span=0)
    )
    for _ in range(24):
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt, calls


@pytest.mark.parametrize("ranks", [(2,), (2, 3)])
def test_measurements_with_the_pull_kernel_match_the_torch_path(monkeypatch, ranks):
    """Whole runs whose dense trials are kept and rejected: the Ledger's records and the Router's
    choices are the torch path's whether the kernel pulls or not (on CUDA, where it computes as
    torch's lerp does, the weights too, bit for bit)."""
    with monkeypatch.context() as patch:
        model, fused, calls = _run(patch, True, True, ranks)
    with monkeypatch.context() as patch:
        plain_model, plain, _ = _run(patch, False, True, ranks)
    probes = len(calls) // (1 + len(ranks))  # (a trial per expert index: the dense one first)
    assert probes > 2 and calls[:: 1 + len(ranks)] == [4] * probes  # the dense trials' 4 tensors
    shrinks = fused.ledger.shrinks()  # kept trials per expert index
    assert 0 < shrinks[0] < fused.ledger.shrink_trials()[0]  # dense trials kept, and rejected
    assert np.array_equal(shrinks, plain.ledger.shrinks())
    np.testing.assert_allclose(fused.ledger.heldout_ema(), plain.ledger.heldout_ema(), rtol=1e-5)
    assert (fused.router.incumbents() == plain.router.incumbents()).all()
    if DEVICE == "cuda":
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain_model.parameters()))


@pytest.mark.skipif(DEVICE == "cuda", reason="test_heldout_interrupt's runs are on the CPU")
@pytest.mark.parametrize("where", [2, 3])  # the dense trial's closure call, and the next trial's
def test_an_exception_after_the_pull_restores_the_dense_weights(monkeypatch, where):
    from test_heldout_interrupt import K, Run, assert_as_before, batch

    calls = _kernel(monkeypatch, True)
    run = Run(True, (2,))
    for s in range(1, 3 * K):
        run.step(s)
    calls.clear()
    run.armed = (where, KeyboardInterrupt())
    x, y = batch(3 * K)
    ((run.model(x) - y) ** 2).mean().backward()
    with pytest.raises(KeyboardInterrupt):
        run.opt.step()
    assert calls  # the kernel pulled before the closure raised
    assert_as_before(run, run.snapshots[-1])
