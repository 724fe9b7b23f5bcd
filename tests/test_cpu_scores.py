"""The CPU score sums and non-finite check in the Rust core (`molf._core.score_sums`,
`molf._core.all_finite`) and how `molf._kernels` dispatches to them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import molf
from molf import _core, _kernels
from molf._core import ConfigError, ScoreError

DTYPES = (np.float32, np.float64)
SCORES = ("epd", "pfn")
SHAPES = ((0,), (1,), (17,), (5, 33), (70001,), (256, 256))  # 70001: past several blocks


def reference(m: np.ndarray, v: np.ndarray, eps: float, score: str) -> float:
    """The definition in numpy: terms in the moments' dtype (IEEE sqrt and division), summed
    exactly (math.fsum) in float64, so +inf where the exact sum is past float64's range;
    a non-finite term makes the sum non-finite."""
    eps = m.dtype.type(eps)
    with np.errstate(all="ignore"):
        denom = np.sqrt(v) + eps
        if score == "epd":
            terms = (m * m) / denom
        else:
            q = m / denom
            terms = q * q
    terms = terms.astype(np.float64).ravel()
    if not np.isfinite(terms).all():
        return float(terms.sum())
    try:
        return math.fsum(terms)
    except OverflowError:  # every term is >= 0: the exact sum is past the largest float64
        return math.inf


def moments(shape, dtype, seed, special=True):
    """Random moments with zeros, subnormals and values whose square overflows the dtype."""
    rng = np.random.default_rng(seed)
    m = (rng.standard_normal(shape) * 1e-3).astype(dtype)
    v = (rng.random(shape) * 1e-6).astype(dtype)
    if special and m.size:
        info = np.finfo(dtype)
        flat_m, flat_v = m.reshape(-1), v.reshape(-1)
        pick = rng.random(flat_m.size)
        flat_m[pick < 0.05] = 0
        flat_v[(pick >= 0.05) & (pick < 0.1)] = 0
        flat_m[(pick >= 0.1) & (pick < 0.15)] = info.smallest_subnormal * 3
        flat_v[(pick >= 0.15) & (pick < 0.2)] = info.smallest_subnormal * 7
        flat_m[(pick >= 0.2) & (pick < 0.21)] = info.max / 4  # with v: a huge, finite PFN term
        flat_v[(pick >= 0.2) & (pick < 0.21)] = info.max / 2
    return m, v


def close(got: float, want: float) -> bool:
    if math.isnan(want):
        return math.isnan(got)
    if math.isinf(want):
        return got == want
    return math.isclose(got, want, rel_tol=1e-12, abs_tol=0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("eps", [1e-8, 0.0, 1e-3])
def test_sums_match_the_float64_reference(dtype, score, eps):
    pairs = [moments(shape, dtype, seed) for seed, shape in enumerate(SHAPES)]
    got = _core.score_sums([m for m, _ in pairs], [v for _, v in pairs], eps, score)
    assert got.dtype == np.float64 and got.shape == (len(SHAPES),)
    for k, (m, v) in enumerate(pairs):
        want = reference(m, v, eps, score)
        assert close(float(got[k]), want), (SHAPES[k], got[k], want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score", SCORES)
def test_terms_are_rounded_in_the_moments_dtype(dtype, score):
    """Not computed in float64 and rounded once: the reference in float64 differs."""
    m, v = moments((4096,), dtype, 7, special=False)
    got = float(_core.score_sums([m], [v], 1e-8, score)[0])
    assert close(got, reference(m, v, 1e-8, score))
    if dtype == np.float32:
        assert not close(got, reference(m.astype(np.float64), v.astype(np.float64), 1e-8, score))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["m", "v"])
def test_nonfinite_moments_propagate_as_in_torch(dtype, score, bad, where):
    m, v = moments((3, 50), dtype, 3, special=False)
    (m if where == "m" else v)[1, 7] = bad
    got = float(_core.score_sums([m], [v], 1e-8, score)[0])
    want = reference(m, v, 1e-8, score)
    # v = +inf makes the denominator infinite and the term 0; anything else, a NaN or inf term.
    assert math.isfinite(want) == (where == "v" and bad == math.inf)
    assert close(got, want)
    # torch's ops on the same tensors (non-contiguous views: the torch path) agree, to what
    # `_kernels.score_sums` promises of them: CPU float32 terms up to ~2^-22 apart (torch's
    # vectorised sqrt is not correctly rounded; which elements take it depends on the CPU).
    tm, tv = torch.from_numpy(m).t(), torch.from_numpy(v).t()
    old = float(_kernels.score_sums([tm], [tv], 1e-8, score)[0])
    tol = 1e-12 if dtype == np.float64 else 2.0**-21
    assert (math.isnan(got) and math.isnan(old)) or math.isclose(got, old, rel_tol=tol, abs_tol=0.0), (got, old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("score", SCORES)
def test_kernels_use_the_core_for_plain_cpu_tensors(monkeypatch, dtype, score):
    calls = []
    real = _core.score_sums
    monkeypatch.setattr(_core, "score_sums", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(0)
    m = [torch.randn(s, generator=gen, dtype=dtype) * 1e-3 for s in ((64, 32), (32,), (0,))]
    v = [torch.rand(t.shape, generator=gen, dtype=dtype) * 1e-6 for t in m]
    sums = _kernels.score_sums(m, v, 1e-8, score)
    assert calls == [1]
    assert sums.dtype == torch.float64 and sums.device.type == "cpu" and sums.shape == (3,)
    for k in range(3):
        assert close(float(sums[k]), reference(m[k].numpy(), v[k].numpy(), 1e-8, score))


def test_the_torch_path_serves_what_the_core_does_not_read(monkeypatch):
    monkeypatch.setattr(_core, "score_sums", lambda *a: pytest.fail("the Rust core was called"))
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(16, 8, generator=gen) * 1e-3
    v = torch.rand(16, 8, generator=gen) * 1e-6
    want = reference(m.numpy(), v.numpy(), 1e-8, "epd")
    cases = {
        "non-contiguous": ([m.t()], [v.t()]),
        "bfloat16": ([m.bfloat16()], [v.bfloat16()]),
        "mixed dtypes": ([m, m.double()], [v, v.double()]),
        "m and v of different dtypes": ([m], [v.double()]),
        "requires grad": ([m.clone().requires_grad_()], [v]),
        "a subclass": ([nn.Parameter(m, requires_grad=False)], [v]),
    }
    for name, (ms, vs) in cases.items():
        assert not _kernels.scores_in_core(ms, vs), name
        with torch.no_grad():
            sums = _kernels.score_sums(ms, vs, 1e-8, "epd")
        assert sums.dtype == torch.float64, name
        tol = 2**-7 if name == "bfloat16" else 2**-21  # bf16 rounding; torch's CPU sqrt (below)
        assert math.isclose(float(sums[0]), want, rel_tol=tol), (name, float(sums[0]), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("score", SCORES)
def test_core_and_torch_paths_agree_within_torchs_sqrt(dtype, score):
    """torch's CPU sqrt (MKL's) may be 1 ulp off the correctly rounded one, so each term of
    the torch path is within ~2 ulp of the core's: the sums agree to 2^-21 (float32)
    relative, all terms being >= 0; with a correctly rounded sqrt they would agree to 1e-12."""
    gen = torch.Generator().manual_seed(2)
    m = torch.randn(300, 300, generator=gen, dtype=dtype) * 1e-3
    v = torch.rand(300, 300, generator=gen, dtype=dtype) * 1e-6
    core = float(_kernels.score_sums([m], [v], 1e-8, score)[0])
    old = float(_kernels.score_sums([m.t()], [v.t()], 1e-8, score)[0])
    ulp = 2.0**-23 if dtype == torch.float32 else 2.0**-52
    assert math.isclose(core, old, rel_tol=4 * ulp)
    with_exact_sqrt = reference(m.numpy(), v.numpy(), 1e-8, score)
    assert close(core, with_exact_sqrt)


def test_binding_validates_its_arguments():
    m = np.ones((4, 3), dtype=np.float32)
    cases = [
        (([m], []), ScoreError, "equal length"),
        (([m], [np.ones((3, 4), np.float32)]), ScoreError, "shape"),
        (([m], [m.astype(np.float64)]), ScoreError, "dtype"),
        (([m, m.astype(np.float64)], [m, m.astype(np.float64)]), ScoreError, "dtype"),
        (([m.astype(np.int32)], [m.astype(np.int32)]), ScoreError, "dtype int32"),
        (([m.astype(np.float16)], [m.astype(np.float16)]), ScoreError, "float16"),
        (([np.asfortranarray(np.ones((4, 3), np.float32))], [m]), ScoreError, "non-contiguous"),
        (([m[:, ::2]], [m[:, ::2]]), ScoreError, "non-contiguous"),
        (([m.tolist()], [m]), ScoreError, "type list"),
        (([torch.ones(4, 3)], [m]), ScoreError, "type Tensor"),
        (([np.ma.masked_array(m)], [m]), ScoreError, "MaskedArray"),
    ]
    for args, exc, message in cases:
        with pytest.raises(exc, match=message):
            _core.score_sums(*args, 1e-8, "epd")
    with pytest.raises(ConfigError, match="unknown score"):
        _core.score_sums([m], [m], 1e-8, "EPD")
    assert _core.score_sums([], [], 1e-8, "pfn").shape == (0,)
    # A read-only array is read as it is.
    ro = m.copy()
    ro.setflags(write=False)
    assert _core.score_sums([ro], [ro], 0.0, "epd")[0] == 12.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_finite(dtype):
    arrays = [np.ones(n, dtype=dtype) for n in (0, 1, 40000)]
    arrays.append(np.full((3, 3), np.finfo(dtype).max, dtype=dtype))
    assert _core.all_finite(arrays)
    assert _core.all_finite([])
    for bad in (np.nan, np.inf, -np.inf):
        for k, at in ((1, 0), (2, 0), (2, 39999)):
            arrays[k][at] = bad
            assert not _core.all_finite(arrays), (bad, k, at)
            arrays[k][at] = 1
    assert _core.all_finite([np.ones(3, np.float32), np.ones(3, np.float64)])
    with pytest.raises(ScoreError, match="non-contiguous"):
        _core.all_finite([np.ones((4, 4), dtype)[:, ::2]])
    with pytest.raises(ScoreError, match="float16"):
        _core.all_finite([np.ones(4, np.float16)])


def test_any_nonfinite_uses_the_core_on_plain_cpu_tensors(monkeypatch):
    calls = []
    real = _core.all_finite
    monkeypatch.setattr(_core, "all_finite", lambda a: calls.append(1) or real(a))
    grads = [torch.randn(5, 5), torch.randn(7, dtype=torch.float64)]
    assert not _kernels.any_nonfinite(grads)
    grads[1][3] = math.inf
    assert _kernels.any_nonfinite(grads)
    assert calls == [1, 1]
    assert _kernels.any_nonfinite([torch.randn(4), torch.tensor([math.nan]).bfloat16()])  # torch path
    assert calls == [1, 1]


def wrapped(seed=0, state_dtype="auto"):
    torch.manual_seed(seed)
    layers = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    model = molf.wrap(layers, molf.MoLFConfig(ranks=(4,), exclude_modules=()))
    return model, molf.MoLFAdamW(model, lr=1e-2, state_dtype=state_dtype)


def test_scratch_holds_torch_path_terms_only_where_the_core_does_not_serve():
    for state_dtype, routed_terms in (("auto", False), (torch.bfloat16, True)):
        model, opt = wrapped(state_dtype=state_dtype)
        model(torch.randn(3, 16)).sum().backward()
        opt.step()
        for gi, (_, denom, terms) in opt._scratch.items():
            routed = opt.param_groups[gi]["molf_role"] != "plain"
            assert denom is not None
            assert (terms is not None) == (routed and routed_terms), (state_dtype, gi)


def test_the_step_routes_and_updates_alike_on_both_paths(monkeypatch):
    """Steps through the Rust core and through the torch ops: same winners, same weights."""
    runs = []
    for core in (True, False):
        with monkeypatch.context() as patch:
            if not core:
                patch.setattr(_kernels, "core_reads", lambda tensors: False)
            model, opt = wrapped()
            gen = torch.Generator().manual_seed(3)
            for _ in range(5):
                model(torch.randn(8, 16, generator=gen)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
            runs.append((opt.ledger.wins(), opt.ledger.last_scores(), [p.detach().clone() for p in model.parameters()]))
    (wins, scores, params), (wins_t, scores_t, params_t) = runs
    np.testing.assert_array_equal(wins, wins_t)
    np.testing.assert_allclose(scores, scores_t, rtol=2**-21)
    for a, b in zip(params, params_t):
        assert torch.equal(a, b)
