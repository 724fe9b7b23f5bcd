"""The dense shrink trial's save and pull (`molf._shrink.run_trials`) as one Triton pass on CUDA.

The trial pulls each dense tensor by δ towards its origin, θ ← θ + δ (origin − θ), after
saving θ so that a rejected trial can be undone. As a multi-tensor copy and a multi-tensor
lerp that is five passes over the dense weights (3.9 and 3.0 ms for a 1.5B model's 2.6 GB on
one H100, issue #32); this kernel reads θ and the origin once and writes the copy and θ:
four. The chunk tables are the probe sums' (`molf._probe_sums._Plan`), kept between probes.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from . import _fused
from ._probe_sums import _Plan
from ._shrink import buffers
from ._triton_kernels import _TL_DTYPES, _at, _block, _chunk, _in_bounds

__all__ = ["eligible", "save_and_pull"]


@triton.jit
def _pull_kernel(
    theta_ptrs,
    origin_ptrs,
    saved_ptrs,
    numels,
    block_tensor,
    block_start,
    weight,
    P_DT: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """saved <- θ, θ <- lerp(θ, origin, weight) over one chunk, as torch's lerp computes it in
    float32 (weight < 0.5: θ + w (o − θ); else o − (o − θ)(1 − w))."""
    t, start, n = _chunk(block_tensor, block_start, numels)
    theta_ptr = tl.load(theta_ptrs + t).to(tl.pointer_type(P_DT))
    origin_ptr = tl.load(origin_ptrs + t).to(tl.pointer_type(P_DT))
    saved_ptr = tl.load(saved_ptrs + t).to(tl.pointer_type(P_DT))
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = _in_bounds(offs, n, ALIGNED)
        theta = tl.load(_at(theta_ptr, offs, ALIGNED, BLOCK), mask=mask)
        tl.store(_at(saved_ptr, offs, ALIGNED, BLOCK), theta, mask=mask)
        x = theta.to(tl.float32)
        o = tl.load(_at(origin_ptr, offs, ALIGNED, BLOCK), mask=mask).to(tl.float32)
        if tl.abs(weight) < 0.5:
            x = x + weight * (o - x)
        else:
            x = o - (o - x) * (1.0 - weight)
        tl.store(_at(theta_ptr, offs, ALIGNED, BLOCK), x.to(P_DT), mask=mask)


def eligible(theta: torch.Tensor, origin: torch.Tensor) -> bool:
    """Whether the kernel can pull `theta` towards `origin`: on one device, both contiguous, of
    one shape and a dtype the kernel reads."""
    return (
        theta.device == origin.device
        and theta.dtype == origin.dtype in _TL_DTYPES
        and theta.shape == origin.shape
        and theta.is_contiguous()
        and origin.is_contiguous()
    )


def save_and_pull(thetas: list[torch.Tensor], origins: list[torch.Tensor], weight: float) -> list[torch.Tensor]:
    """Copies of `thetas` (`molf._shrink.buffers`), and each θ then pulled by `weight` towards its
    origin in place, as `torch._foreach_lerp_(thetas, origins, weight)` would: one launch per
    dtype, every pair `eligible`, all on one device (CUDA, or the CPU under Triton's
    interpreter)."""
    device = thetas[0].device
    saved = buffers(thetas)
    T = len(thetas)
    ptrs = np.empty((T, 3), dtype=np.int64)
    numels = np.empty(T, dtype=np.int64)
    kind_of = np.empty(T, dtype=np.int64)
    kinds: dict[tuple, int] = {}
    for j, (theta, origin, copy) in enumerate(zip(thetas, origins, saved)):
        row = (theta.data_ptr(), origin.data_ptr(), copy.data_ptr())
        ptrs[j] = row
        n = numels[j] = theta.numel()
        aligned = n % 16 == 0 and not any(x % 16 for x in row)
        kind_of[j] = kinds.setdefault((theta.dtype, aligned), len(kinds))
    plan = _Plan.of(device, kind_of, numels)
    table = _fused._upload(ptrs[plan.order].T.reshape(-1), device)
    keys = {k: key for key, k in kinds.items()}
    for kind, lo, hi in plan.launches:
        dtype, aligned = keys[kind]
        _pull_kernel[(hi - lo,)](
            table[:T],
            table[T : 2 * T],
            table[2 * T :],
            plan.numels,
            plan.block_tensor[lo:],
            plan.block_start[lo:],
            float(weight),
            P_DT=_TL_DTYPES[dtype],
            ALIGNED=aligned,
            BLOCK=_block(dtype),
            CHUNK=_fused.CHUNK,
        )
    return saved
