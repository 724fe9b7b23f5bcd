"""The held-out probe's per-tensor sums (`molf.heldout`) as one Triton pass on CUDA.

Per expert tensor: the realized descent ½⟨g_prev + g, θ − θ_prev⟩, the potential
η/(1 − β1^t)·⟨g, m / (√v/√(1 − β2^t) + ε)⟩ and the movement ‖θ − θ_prev‖₁. The torch path
(`HeldoutProbe._batch_sums`) runs some twenty elementwise passes over float32 copies; this
kernel reads each operand once in its own dtype (16 bytes per element with bf16 weights
and float32 moments) and keeps nothing but one float64 partial per chunk and sum. Float32
math as on the torch path; per chunk in float32, then the chunks in float64 in a fixed
order (`_reduce_kernel`): the same to float32 rounding, and reproducible bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from . import _fused
from ._triton_kernels import _TL_DTYPES, _at, _block, _in_bounds, _reduce_kernel

__all__ = ["eligible", "heldout_sums"]


@triton.jit
def _sums_kernel(
    theta_ptrs,
    prev_ptrs,
    g_ptrs,
    gprev_ptrs,
    m_ptrs,
    v_ptrs,
    numels,
    hyper,
    block_tensor,
    block_start,
    partial,
    stride,
    P_DT: tl.constexpr,
    G_DT: tl.constexpr,
    S_DT: tl.constexpr,
    ADAM: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """partial[k * stride + pid], k = 0, 1, 2: this chunk's ⟨g_prev + g, θ − θ_prev⟩,
    ⟨g, m / (√v · hyper[2t] + hyper[2t + 1])⟩ (ADAM; else 0) and ‖θ − θ_prev‖₁."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + t)
    theta_ptr = tl.load(theta_ptrs + t).to(tl.pointer_type(P_DT))
    prev_ptr = tl.load(prev_ptrs + t).to(tl.pointer_type(P_DT))
    g_ptr = tl.load(g_ptrs + t).to(tl.pointer_type(G_DT))
    gprev_ptr = tl.load(gprev_ptrs + t).to(tl.pointer_type(P_DT))
    realized = tl.zeros([BLOCK], dtype=tl.float32)
    movement = tl.zeros([BLOCK], dtype=tl.float32)
    potential = tl.zeros([BLOCK], dtype=tl.float32)
    if ADAM:
        m_ptr = tl.load(m_ptrs + t).to(tl.pointer_type(S_DT))
        v_ptr = tl.load(v_ptrs + t).to(tl.pointer_type(S_DT))
        inv_sqrt_bc2 = tl.load(hyper + 2 * t).to(tl.float32)
        eps = tl.load(hyper + 2 * t + 1).to(tl.float32)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = _in_bounds(offs, n, ALIGNED)
        theta = tl.load(_at(theta_ptr, offs, ALIGNED, BLOCK), mask=mask, other=0.0).to(tl.float32)
        prev = tl.load(_at(prev_ptr, offs, ALIGNED, BLOCK), mask=mask, other=0.0).to(tl.float32)
        g = tl.load(_at(g_ptr, offs, ALIGNED, BLOCK), mask=mask, other=0.0).to(tl.float32)
        gprev = tl.load(_at(gprev_ptr, offs, ALIGNED, BLOCK), mask=mask, other=0.0).to(tl.float32)
        delta = theta - prev
        realized += (gprev + g) * delta
        movement += tl.abs(delta)
        if ADAM:
            m = tl.load(_at(m_ptr, offs, ALIGNED, BLOCK), mask=mask, other=0.0).to(tl.float32)
            v = tl.load(_at(v_ptr, offs, ALIGNED, BLOCK), mask=mask, other=0.0).to(tl.float32)
            potential += tl.where(mask, m * g / (tl.sqrt(v) * inv_sqrt_bc2 + eps), 0.0)
    tl.store(partial + pid, tl.sum(realized, axis=0).to(tl.float64))
    tl.store(partial + stride + pid, tl.sum(potential, axis=0).to(tl.float64))
    tl.store(partial + 2 * stride + pid, tl.sum(movement, axis=0).to(tl.float64))


def eligible(item: tuple, device: torch.device) -> bool:
    """Whether the kernel can sum `item` (see `heldout_sums`) with others on `device`:
    every operand there, contiguous (so element k of each is the same weight's), in a dtype
    the kernel reads, θ_prev and g_prev in θ's dtype, m and v in one dtype."""
    _, theta, prev, g, gprev, adam = item
    tensors = [theta, prev, g, gprev] + ([] if adam is None else [adam[0], adam[1]])
    return (
        all(t.device == device and t.is_contiguous() and t.dtype in _TL_DTYPES for t in tensors)
        and prev.dtype == gprev.dtype == theta.dtype
        and (adam is None or adam[0].dtype == adam[1].dtype)
    )


def heldout_sums(items: list[tuple]) -> torch.Tensor:
    """(realized, potential, movement) in float64, one row per item (slot, θ, θ_prev, g,
    g_prev, Adam's (m, v, step, (lr, β1, β2, ε)) or None), every tensor `eligible` and on
    one CUDA device (or the CPU under Triton's interpreter). One upload of the pointer
    tables, one launch per dtype combination, three of the fixed-order reduction."""
    device = items[0][1].device

    def key(i: int) -> tuple:
        _, theta, _, g, _, adam = items[i]
        s_dtype = theta.dtype if adam is None else adam[0].dtype
        operands = list(items[i][1:5]) + ([] if adam is None else list(adam[:2]))
        aligned = theta.numel() % 16 == 0 and all(t.data_ptr() % 16 == 0 for t in operands)
        return (theta.dtype, g.dtype, s_dtype, adam is not None, aligned)

    keys = [key(i) for i in range(len(items))]
    order = sorted(range(len(items)), key=lambda i: str(keys[i]))
    T = len(order)
    ordered = [items[i] for i in order]
    rows = np.zeros((6, T), dtype=np.int64)
    hyper = np.zeros((T, 2), dtype=np.float64)
    scale = np.zeros(T, dtype=np.float64)
    adams = [item[5] for item in ordered if item[5] is not None]
    steps = iter(torch.stack([adam[2] for adam in adams]).tolist() if adams else [])  # (host step counters)
    for j, (_, theta, prev, g, gprev, adam) in enumerate(ordered):
        m, v = (theta, theta) if adam is None else adam[:2]
        rows[:, j] = [t.data_ptr() for t in (theta, prev, g, gprev, m, v)]
        if adam is not None:
            _, _, _, (lr, beta1, beta2, eps) = adam
            t = next(steps)
            # Rounded to float32, as the torch path's hyper-parameters are.
            scale[j], hyper[j] = np.float32(lr / (1 - beta1**t)), np.float32([(1 - beta2**t) ** -0.5, eps])
    numels = np.array([item[1].numel() for item in ordered], dtype=np.int64)
    chunk = _fused.CHUNK
    nblocks, block_tensor, block_start = _fused._chunks(numels)
    first = np.concatenate(([0], np.cumsum(nblocks)[:-1])).astype(np.int64)
    B = len(block_tensor)
    table = _fused._upload(
        np.concatenate(
            [rows.reshape(-1), numels, block_tensor, block_start, first, nblocks, np.argsort(order)]
            + [a.view(np.int64) for a in (hyper.reshape(-1), scale)]
        ),
        device,
    )
    ptrs = [table[k * T : (k + 1) * T] for k in range(6)]
    at = 6 * T
    numels_d = table[at : at + T]
    block_tensor_d, block_start_d = table[at + T : at + T + B], table[at + T + B : at + T + 2 * B]
    at += T + 2 * B
    first_d, nblocks_d, inverse = (table[at + k * T : at + (k + 1) * T] for k in range(3))
    hyper_d = table[at + 3 * T : at + 5 * T].view(torch.float64)
    scale_d = table[at + 5 * T :].view(torch.float64)
    partial = torch.empty(3 * max(B, 1), dtype=torch.float64, device=device)
    lo = 0
    for hi in range(1, T + 1):
        if hi < T and keys[order[hi]] == keys[order[lo]]:
            continue
        *dtypes, adam, aligned = keys[order[lo]]
        clo, chi = int(first[lo]), int(first[hi - 1] + nblocks[hi - 1])
        if chi > clo:
            _sums_kernel[(chi - clo,)](
                *ptrs,
                numels_d,
                hyper_d,
                block_tensor_d[clo:],
                block_start_d[clo:],
                partial[clo:],
                B,
                P_DT=_TL_DTYPES[dtypes[0]],
                G_DT=_TL_DTYPES[dtypes[1]],
                S_DT=_TL_DTYPES[dtypes[2]],
                ADAM=adam,
                ALIGNED=aligned,
                BLOCK=_block(*dtypes),
                CHUNK=chunk,
            )
        lo = hi
    sums = torch.empty(3 * T, dtype=torch.float64, device=device)
    for k in range(3):
        _reduce_kernel[(T,)](partial[k * B :], first_d, nblocks_d, sums[k * T :], BLOCK=256)
    sums = sums.view(3, T)
    return torch.stack([sums[0] * 0.5, sums[1] * scale_d, sums[2]], dim=1).index_select(0, inverse)
