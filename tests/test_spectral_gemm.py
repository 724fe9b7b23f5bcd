"""The spectral shrink trial's CUDA path (`molf._shrink._gemm_transform`: the soft-threshold
by Newton–Schulz matrix products, no eigen-decomposition, no host sync) against plain
references written here: the SVD of the whole product and the eigen-decomposition of the
r x r matrix, on spectra made to be hard (an eigenvalue within 1e-14 of the threshold,
clustered top eigenvalues, rank one, zero). It runs on any device; on CUDA `_start` uses it."""

from __future__ import annotations

import math

import pytest
import torch

from molf import _shrink


def soft_threshold_reference(h: torch.Tensor, delta: float) -> torch.Tensor:
    """Z diag(max(1 − δ σ_1 / σ, 0)) Zᵀ for H = Z diag(σ²) Zᵀ, one matrix at a time."""
    out = torch.zeros_like(h)
    for k in range(h.shape[0]):
        lam, z = torch.linalg.eigh(h[k])
        sv = lam.clamp_min(0).sqrt()
        keep = [max(1 - delta * float(sv.max()) / float(s), 0.0) if s > 0 else 0.0 for s in sv]
        out[k] = z @ torch.diag(torch.tensor(keep, dtype=h.dtype)) @ z.T
    return out


def with_spectrum(eigenvalues: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(*eigenvalues.shape, eigenvalues.shape[-1], generator=gen, dtype=torch.float64))
    return (q * eigenvalues.unsqueeze(-2)) @ q.mT


@pytest.mark.parametrize("delta", [0.01, 0.1, 0.5, 0.9])
def test_soft_threshold_by_products_is_the_eigen_decompositions(delta):
    """Every eigenvalue resolved to float64 precision, also those 1e-14 .. 1e-2 (relative)
    above and below the threshold τ² = δ² σ_1², and where the top eigenvalues cluster."""
    gen = torch.Generator().manual_seed(int(delta * 100))
    r, n = 48, 12
    lam = torch.rand(n, r, generator=gen, dtype=torch.float64)
    lam[:, 0] = 1
    near = torch.logspace(-14, -2, n, dtype=torch.float64)
    lam[:, 1], lam[:, 2] = delta**2 * (1 + near), delta**2 * (1 - near)
    lam[:, 3] = 1 - near  # clustered with the largest
    h = with_spectrum(lam * 1e-5, seed=1)  # (the scale of a LoRA B's Gram matrix)
    got = _shrink._soft_threshold_gemm(h, delta)
    want = soft_threshold_reference(h, delta)
    assert (got - want).abs().max() <= 1e-12


def test_soft_threshold_by_products_of_degenerate_matrices():
    """Zero (nothing learned: F = 0, no NaN), rank one, one matrix without a batch dimension."""
    zero = torch.zeros(2, 6, 6, dtype=torch.float64)
    assert torch.equal(_shrink._soft_threshold_gemm(zero, 0.1), zero)
    v = torch.randn(3, 6, 1, dtype=torch.float64)
    rank_one = v @ v.mT
    torch.testing.assert_close(
        _shrink._soft_threshold_gemm(rank_one, 0.1), soft_threshold_reference(rank_one, 0.1), rtol=0, atol=1e-13
    )
    single = rank_one[0] + torch.eye(6, dtype=torch.float64) * 0.3
    torch.testing.assert_close(
        _shrink._soft_threshold_gemm(single, 0.2), soft_threshold_reference(single[None], 0.2)[0], rtol=0, atol=1e-13
    )


@pytest.mark.parametrize("out,r,inp", [(96, 16, 48), (200, 32, 64), (40, 8, 40)])
def test_gemm_transform_soft_thresholds_the_product(out, r, inp):
    """B − B T with the product path's T is B + (ΔW' − ΔW) A⁺ of the SVD-thresholded product."""
    gen = torch.Generator().manual_seed(out + r)
    a = torch.randn(4, r, inp, generator=gen, dtype=torch.float64) / math.sqrt(inp)
    b = torch.randn(4, out, r, generator=gen, dtype=torch.float64) * torch.logspace(0, -3, r, dtype=torch.float64)
    b[0] = 0
    t, singular = _shrink._gemm_transform(a @ a.mT, b.mT @ b, 0.1, _shrink._rtol(torch.float32, r))
    assert not singular.any()
    got = b - b @ t
    assert torch.equal(got[0], b[0])
    for k in range(1, 4):
        dw = b[k] @ a[k]
        u, sv, vh = torch.linalg.svd(dw, full_matrices=False)
        want = u @ torch.diag((sv - 0.1 * sv[0]).clamp_min(0)) @ vh
        torch.testing.assert_close(got[k] @ a[k], want, rtol=0, atol=1e-12 * float(sv[0]))
        torch.testing.assert_close(got[k], b[k] + (want - dw) @ torch.linalg.pinv(a[k]), rtol=0, atol=1e-11)


def test_gemm_transform_flags_rank_deficient_factors():
    """r > in: G_A is singular, the Cholesky factor fails, and the flag says so (`_start` then
    takes the reference path for that matrix only)."""
    a = torch.randn(2, 8, 5, dtype=torch.float64)
    a[1] = torch.randn(8, 20, dtype=torch.float64)[:, :5]
    full = torch.randn(8, 20, dtype=torch.float64)
    ga = torch.stack([a[0] @ a[0].T, full @ full.T])
    b = torch.randn(2, 10, 8, dtype=torch.float64)
    _, singular = _shrink._gemm_transform(ga, b.mT @ b, 0.1, _shrink._rtol(torch.float32, 8))
    assert singular.tolist() == [True, False]


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: elsewhere the trial takes the reference path; the products are tested above anywhere",
)
def test_trial_on_cuda_matches_the_reference_also_where_a_factor_is_singular():
    """The spectral trial on CUDA (Gram matrices, transforms and shrunk B's on a side stream
    from the weights' event) writes the reference's B − B T, also for a rank-deficient A."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(6, 16, 24, generator=gen, dtype=torch.float64)
    a[2, :, 8:] = 0  # rank 8 < r = 16: the reference path
    b = torch.randn(6, 32, 16, generator=gen, dtype=torch.float64) * 1e-2
    b[4] = 0
    want = b - b @ _shrink._shrink_transform(a @ a.mT, b.mT @ b, 0.1, _shrink._rtol(torch.float64, 16))
    local = [x.clone().cuda() for x in b]
    entries = [(bk, None, ak.cuda(), False) for bk, ak in zip(local, a)]
    ready = _shrink.weights_mark(local)
    _shrink._Trial(entries, 0.1, ready).apply(entries, local)
    torch.testing.assert_close(torch.stack(local).cpu(), want, rtol=0, atol=1e-12)
