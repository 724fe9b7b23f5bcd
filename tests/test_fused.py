"""The Triton kernels of the CUDA path, checked on the CPU through Triton's
interpreter (or on a GPU where one is present)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    # Triton's interpreter runs the kernels on the CPU; it must be on before triton
    # is first imported (tests/conftest.py sets it for the whole run for that reason).
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
from molf import _fused  # noqa: E402

from molf import _kernels  # noqa: E402
from test_reference import CASES, check_against_reference  # noqa: E402

# Several chunks per tensor, ragged tails, a scalar-like tensor.
SHAPES = [(40, 30), (7,), (_fused.CHUNK * 2 + 5,), (3, 5), (1,)]


def tensors(dtype, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE) for s in SHAPES]


def ok():
    return torch.zeros(1, dtype=torch.int32, device=DEVICE)


def tol(dtype):
    if dtype == torch.bfloat16:  # both sides round the same float32 value: at most one bf16 ulp apart
        return dict(rtol=2**-7, atol=0.0)
    return dict(rtol=1e-12, atol=1e-15) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grad_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("score", ["epd", "pfn"])
def test_moments_and_scores_match_foreach(state_dtype, grad_dtype, score):
    grads = tensors(grad_dtype or state_dtype, seed=1)
    m = tensors(state_dtype, 0.1, seed=2)
    v = [t.abs() * 0.01 for t in tensors(state_dtype, seed=3)]
    m_ref, v_ref = [t.clone() for t in m], [t.clone() for t in v]
    sums = _fused.moments_and_scores(grads, m, v, 0.9, 0.99, 1e-8, score, _fused.nonfinite_flag(grads))
    _kernels.update_moments_(m_ref, v_ref, [g.to(state_dtype) for g in grads], 0.9, 0.99)
    expected = _kernels.score_sums(m_ref, v_ref, 1e-8, score)
    for a, b in zip(m + v, m_ref + v_ref):
        torch.testing.assert_close(a, b, **tol(state_dtype))
    assert sums.dtype == torch.float64 and sums.shape == (len(SHAPES),)
    torch.testing.assert_close(sums, expected, **tol(state_dtype))


@pytest.mark.parametrize("param_dtype,state_dtype", [(torch.float32,) * 2, (torch.float64,) * 2, (torch.bfloat16, torch.float32)])
def test_apply_and_full_update_match_foreach(param_dtype, state_dtype):
    p = tensors(param_dtype, seed=4)
    m = tensors(state_dtype, 0.1, seed=5)
    v = [t.abs() * 0.01 for t in tensors(state_dtype, seed=6)]
    step, lr, wd = 3.0, 1e-2, 0.1
    hyper = (np.full(len(p), lr / (1 - 0.9**step)), np.full(len(p), (1 - 0.99**step) ** 0.5), np.full(len(p), 1 - lr * wd))
    expected = [t.to(state_dtype) for t in p]
    _kernels.adamw_update_(expected, [t.clone() for t in m], [t.clone() for t in v], step, lr, wd, 0.9, 0.99, 1e-8)
    _fused.adamw_apply(p, m, v, *hyper, 1e-8, ok())
    for a, b in zip(p, expected):
        torch.testing.assert_close(a, b.to(param_dtype), **tol(param_dtype))

    # APPLY: moments and update in one pass, for unrouted parameters
    grads = tensors(state_dtype, seed=7)
    p2, m2, v2 = [t.clone() for t in p], [t.clone() for t in m], [t.clone() for t in v]
    expected = [t.to(state_dtype) for t in p2]
    m_ref, v_ref = [t.clone() for t in m2], [t.clone() for t in v2]
    _kernels.update_moments_(m_ref, v_ref, grads, 0.9, 0.99)
    _kernels.adamw_update_(expected, m_ref, v_ref, step, lr, wd, 0.9, 0.99, 1e-8)
    assert _fused.moments_and_scores(grads, m2, v2, 0.9, 0.99, 1e-8, "epd", ok(), params=p2, step_sizes=hyper[0],
                                     bc2_sqrts=hyper[1], decays=hyper[2]) is None
    for a, b in zip(p2 + m2 + v2, [t.to(param_dtype) for t in expected] + m_ref + v_ref):
        torch.testing.assert_close(a, b, **tol(a.dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 2, 4])
def test_nonfinite_flag_and_kernels_write_nothing(bad, where):
    grads = tensors(torch.float32, seed=8) + tensors(torch.bfloat16, seed=9)
    assert _fused.nonfinite_flag(grads).item() == 0
    grads[where].view(-1)[-1] = bad  # the last element: the ragged tail of the last chunk
    flag = _fused.nonfinite_flag(grads)
    assert flag.item() == 1
    p, m, v = tensors(torch.float32, seed=10), tensors(torch.float32, seed=11), tensors(torch.float32, seed=12)
    before = [t.clone() for t in p + m + v]
    hyper = (np.full(len(p), 0.1), np.full(len(p), 0.5), np.full(len(p), 0.99))
    _fused.moments_and_scores(grads[: len(p)], m, v, 0.9, 0.99, 1e-8, "epd", flag)
    _fused.moments_and_scores(grads[: len(p)], m, v, 0.9, 0.99, 1e-8, "epd", flag, params=p, step_sizes=hyper[0],
                              bc2_sqrts=hyper[1], decays=hyper[2])
    _fused.adamw_apply(p, m, v, *hyper, 1e-8, flag)
    assert all(torch.equal(a, b) for a, b in zip(p + m + v, before))


def _use_fused(opt):
    opt._fused = _fused


def _assert_fused(opt):
    assert opt._fused is _fused


@pytest.mark.parametrize("fft,ranks,topk,score", [CASES[0], CASES[1], CASES[5]])
@pytest.mark.parametrize("lagged", [False, True])
def test_optimizer_fused_path_matches_float64_reference(fft, ranks, topk, score, lagged):
    # On a GPU the optimizer picks the kernels itself; on the CPU the test switches them in.
    configure = _use_fused if DEVICE == "cpu" else _assert_fused
    check_against_reference(fft, ranks, topk, score, seed=0, lagged=lagged, configure=configure, device=DEVICE)


@pytest.mark.skipif(DEVICE != "cpu", reason="drives the fused path on CPU tensors through Triton's interpreter")
@pytest.mark.parametrize("lagged", [False, True])
def test_optimizer_fused_path_skips_nonfinite_steps(lagged):
    from test_nonfinite import Net, good_step

    import molf

    torch.manual_seed(0)
    model = molf.wrap(Net(), molf.MoLFConfig(ranks=(2,), exclude_modules=("head",)))
    opt = molf.MoLFAdamW(model, lr=1e-2, lagged=lagged)
    _use_fused(opt)
    for s in range(2):
        good_step(model, opt, s)
    params = [p.detach().clone() for p in model.parameters()]
    moments = [(s["exp_avg"].clone(), s["exp_avg_sq"].clone(), s["step"].clone()) for s in opt.state.values()]
    model(torch.randn(4, 5)).pow(2).mean().backward()
    model.fc1.lora_B[0].grad.view(-1)[0] = float("nan")
    opt.step()
    opt.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    for s, (m, v, _) in zip(opt.state.values(), moments):
        assert torch.equal(s["exp_avg"], m) and torch.equal(s["exp_avg_sq"], v)
    if lagged:  # the host learns of it at the next step, which gives the step counters back
        good_step(model, opt, 5)
        assert all(s["step"].item() == t.item() + 1 for s, (_, _, t) in zip(opt.state.values(), moments))
    else:
        assert all(torch.equal(s["step"], t) for s, (_, _, t) in zip(opt.state.values(), moments))
    assert opt.routing_summary().skipped_steps == 1
