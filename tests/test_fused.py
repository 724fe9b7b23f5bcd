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
from molf import _fused, _kernels  # noqa: E402
from test_reference import CASES, check_against_reference  # noqa: E402

# Several chunks per tensor, ragged tails, a scalar-like tensor.
SHAPES = [(40, 30), (7,), (_fused.CHUNK * 2 + 5,), (3, 5), (_fused.CHUNK + 1,)]


def tensors(dtype, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE) for s in SHAPES]


GROUPS = [
    {"betas": (0.9, 0.99), "eps": 1e-8, "lr": 1e-2, "weight_decay": 0.1},
    {"betas": (0.8, 0.999), "eps": 1e-6, "lr": 3e-3, "weight_decay": 0.0},
]
ROUTED = 3  # the first three tensors are routed (slots 0, 1, 2), the rest unrouted


def tol(dtype):
    if dtype == torch.bfloat16:  # both sides round the same float32 value: at most one bf16 ulp apart
        return dict(rtol=2**-7, atol=0.0)
    return dict(rtol=1e-12, atol=1e-15) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-7)


def make_plan(param_dtype, state_dtype, step=3.0):
    params = tensors(param_dtype, seed=4)
    for p, g in zip(params, tensors(param_dtype, seed=1)):
        p.grad = g
    m = tensors(state_dtype, 0.1, seed=5)
    v = [t.abs() * 0.01 for t in tensors(state_dtype, seed=6)]
    steps = [torch.tensor(step) for _ in params]
    entries = [
        (p, mi, vi, s, 0 if k < ROUTED else 1, k if k < ROUTED else -1)
        for k, (p, mi, vi, s) in enumerate(zip(params, m, v, steps))
    ]
    return _fused.FusedStep(entries), params, m, v


def expected_after(params, m, v, state_dtype, winners, score, step=3.0):
    """The foreach path's result: moments for all, AdamW for the unrouted and the winners."""
    grads = [p.grad.to(state_dtype) for p in params]
    params = [p.detach().clone() for p in params]
    m, v = [t.clone() for t in m], [t.clone() for t in v]
    sums = []
    for k in range(len(params)):
        g = GROUPS[0 if k < ROUTED else 1]
        _kernels.update_moments_([m[k]], [v[k]], [grads[k]], *g["betas"])
        if k < ROUTED:
            sums.append(_kernels.score_sums([m[k]], [v[k]], g["eps"], score)[0])
        if k >= ROUTED or winners[k]:
            target = [params[k].to(state_dtype)]
            _kernels.adamw_update_(target, [m[k]], [v[k]], step, g["lr"], g["weight_decay"], *g["betas"], g["eps"])
            params[k] = target[0].to(params[k].dtype)
    return params, m, v, torch.stack(sums)


@pytest.mark.parametrize(
    "param_dtype,state_dtype", [(torch.float32,) * 2, (torch.float64,) * 2, (torch.bfloat16, torch.float32)]
)
@pytest.mark.parametrize("score", ["epd", "pfn"])
@pytest.mark.parametrize("single_pass", [False, True])
def test_fused_step_matches_foreach(param_dtype, state_dtype, score, single_pass):
    """Two passes (exact mode: moments, then the winners), or one (lagged mode: winners known ahead)."""
    plan, params, m, v = make_plan(param_dtype, state_dtype)
    winners = np.array([True, False, True])
    want_p, want_m, want_v, want_sums = expected_after(params, m, v, state_dtype, winners, score)
    steps = np.full(len(params), 3.0)
    sums, flag, hyper = plan.moments(GROUPS, steps, score, True, winners if single_pass else None)
    assert flag.item() == 0 and sums.dtype == torch.float64 and sums.shape == (ROUTED,)
    # The plan orders tensors into launch batches; its `slots` say which sum is whose.
    torch.testing.assert_close(sums, want_sums[plan.slots[:ROUTED]], **tol(state_dtype))
    if not single_pass:
        plan.apply(winners, hyper, flag)
    for a, b in zip(m + v, want_m + want_v):
        torch.testing.assert_close(a, b, **tol(state_dtype))
    for a, b in zip(params, want_p):
        torch.testing.assert_close(a, b, **tol(param_dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 2, 4])
def test_nonfinite_flag_and_kernels_write_nothing(bad, where):
    plan, params, m, v = make_plan(torch.float32, torch.float32)
    params[where].grad.view(-1)[-1] = bad  # the last element: the ragged tail of the last chunk
    before = [t.clone() for t in params + m + v]
    sums, flag, hyper = plan.moments(GROUPS, np.full(len(params), 3.0), "epd", check_finite=True)
    assert flag.item() == 1
    plan.apply(np.array([True, True, True]), hyper, flag)
    assert all(torch.equal(a, b) for a, b in zip(params + m + v, before))


@pytest.fixture
def interpreter_chunks(monkeypatch):
    """Triton's interpreter pays per loop iteration, not per element, and a program loops over
    its whole chunk: on the CPU the optimizer-level tests split tensors in chunks of 2048
    elements (a multiple of every BLOCK) instead of 16384, 8x fewer iterations of the same
    kernel code. test_fused_step_matches_foreach checks the kernels at the production CHUNK."""
    if DEVICE == "cpu":
        monkeypatch.setattr(_fused, "CHUNK", 2048)


def _use_fused(opt):
    opt._fused = _fused


def _assert_fused(opt):
    assert opt._fused is _fused


@pytest.mark.usefixtures("interpreter_chunks")
@pytest.mark.parametrize("fft,ranks,topk,score", [CASES[0], CASES[1], CASES[5]])
@pytest.mark.parametrize("lagged", [False, True])
def test_optimizer_fused_path_matches_float64_reference(fft, ranks, topk, score, lagged):
    # On a GPU the optimizer picks the kernels itself; on the CPU the test switches them in.
    configure = _use_fused if DEVICE == "cpu" else _assert_fused
    check_against_reference(fft, ranks, topk, score, seed=0, lagged=lagged, configure=configure, device=DEVICE)


@pytest.mark.usefixtures("interpreter_chunks")
@pytest.mark.skipif(DEVICE != "cpu", reason="drives the fused path on CPU tensors through Triton's interpreter")
@pytest.mark.parametrize("lagged", [False, True])
def test_optimizer_fused_path_skips_nonfinite_steps(lagged):
    import molf
    from test_nonfinite import Net, good_step

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
        assert opt.routing_summary().skipped_steps == 1
    else:
        # The device decided the step (molf._device_routing); the host books it, and gives
        # the counters back, as soon as anything reads the routing state.
        assert opt.routing_summary().skipped_steps == 1
        assert all(torch.equal(s["step"], t) for s, (_, _, t) in zip(opt.state.values(), moments))


@pytest.mark.usefixtures("interpreter_chunks")
@pytest.mark.parametrize("lagged", [False, True])
def test_optimizer_fused_path_resumes_exactly(lagged, tmp_path):
    """The fused plan keeps the step counters in one shared buffer: they must count
    right, save through torch.save / weights_only load, and resume bitwise."""
    import molf
    from test_nonfinite import Net

    configure = _use_fused if DEVICE == "cpu" else _assert_fused

    def build():
        torch.manual_seed(0)
        model = molf.wrap(Net(), molf.MoLFConfig(ranks=(2,), exclude_modules=("head",))).to(DEVICE)
        opt = molf.MoLFAdamW(model, lr=1e-2, lagged=lagged)
        configure(opt)
        return model, opt

    def step(model, opt, seed):
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    model_a, opt_a = build()
    for s in range(5):
        step(model_a, opt_a, s)
    assert all(state["step"].item() == 5 for state in opt_a.state.values())

    model_b, opt_b = build()
    for s in range(2):
        step(model_b, opt_b, s)
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model_c, opt_c = build()
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    for s in range(2, 5):
        step(model_c, opt_c, s)
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_c.parameters()))
    assert opt_a.ledger.checksum == opt_c.ledger.checksum
    assert all(state["step"].item() == 5 for state in opt_c.state.values())


@pytest.mark.usefixtures("interpreter_chunks")
@pytest.mark.parametrize("lagged", [False, True])
def test_fused_path_routes_by_heldout_loss_like_the_foreach_path(lagged):
    """Policy "heldout" on the fused path (Triton on CUDA, its interpreter on CPU): the same
    active sets, held-out EMA and (within float tolerance) parameters as the foreach path."""
    import molf

    class Wide(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.head = torch.nn.Linear(5, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))

    gen = torch.Generator().manual_seed(1)
    xv = torch.randn(32, 5, generator=gen).to(DEVICE)
    yv = torch.randn(32, 2, generator=gen).to(DEVICE)  # unrelated to the training target: experts get dropped

    def build(fused):
        torch.manual_seed(0)
        model = molf.wrap(Wide(), molf.MoLFConfig(ranks=(2,), exclude_modules=("head",))).to(DEVICE)
        opt = molf.MoLFAdamW(
            model,
            lr=3e-2,
            lagged=lagged,
            fused=None if fused else False,
            routing=molf.Heldout(lambda: torch.nn.functional.mse_loss(model(xv), yv), min_dwell=4, every=2),
        )
        if fused:
            (_use_fused if DEVICE == "cpu" else _assert_fused)(opt)
        else:
            assert opt._fused is None
        return model, opt

    (mf, of), (mr, orf) = build(True), build(False)
    changed = False
    for s in range(16):
        x = torch.randn(16, 5, generator=torch.Generator().manual_seed(100 + s)).to(DEVICE)
        for model, opt in ((mf, of), (mr, orf)):
            torch.nn.functional.mse_loss(model(x), torch.sin(x[:, :2])).backward()
            opt.step()
            opt.zero_grad()
        assert np.array_equal(of.router.incumbents(), orf.router.incumbents()), f"step {s}"
        changed |= not of.router.incumbents().all()
    assert changed, "no expert was dropped: the comparison would be vacuous"
    assert of.ledger.heldout_windows == orf.ledger.heldout_windows > 0
    np.testing.assert_allclose(of.ledger.heldout_ema(), orf.ledger.heldout_ema(), rtol=1e-3, atol=1e-9)
    for p, q in zip(mf.parameters(), mr.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
