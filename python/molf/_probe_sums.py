"""The held-out probe's per-tensor sums (`molf.heldout`) as one Triton pass on CUDA.

Per expert tensor: the realized descent ½⟨g_prev + g, θ − θ_prev⟩, the potential
η/(1 − β1^t)·⟨g, m / (√v/√(1 − β2^t) + ε)⟩ and the movement ‖θ − θ_prev‖₁. The torch path
(`molf._window_sums._batch_sums`) runs some twenty elementwise passes over float32 copies; this
kernel reads each operand once in its own dtype (16 bytes per element with bf16 weights
and float32 moments) and keeps nothing but one float64 partial per chunk and sum. Float32
math as on the torch path; per chunk in float32, then the chunks in float64 in a fixed
order (`_reduce_kernel`): the same to float32 rounding, and reproducible bit for bit.

A probe waits for this host work: a 1.5B model has ~90,000 chunks in ~700 tensors, so the
chunk tables stay on the device between probes of the same layout (`_Plan`), and each call
reads each tensor's pointers and dtypes once (issue #32: 47 → 20 ms a probe on one H100).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from . import _fused
from ._triton_kernels import _TL_DTYPES, _at, _block, _chunk, _in_bounds, _reduce_kernel

__all__ = ["eligible", "heldout_sums", "remembers"]


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
    t, start, n = _chunk(block_tensor, block_start, numels)
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
    if not (prev.dtype == gprev.dtype == theta.dtype in _TL_DTYPES and g.dtype in _TL_DTYPES):
        return False
    if adam is None:
        tensors = (theta, prev, g, gprev)
    elif adam[0].dtype == adam[1].dtype and adam[0].dtype in _TL_DTYPES:
        tensors = (theta, prev, g, gprev, adam[0], adam[1])
    else:
        return False
    return all(t.device == device and t.is_contiguous() for t in tensors)


@triton.jit
def _remember_kernel(
    theta_ptrs,
    prev_ptrs,
    g_ptrs,
    gprev_ptrs,
    numels,
    block_tensor,
    block_start,
    P_DT: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """θ_prev <- θ and g_prev <- g over one chunk (g in θ's dtype: `remembers`)."""
    t, start, n = _chunk(block_tensor, block_start, numels)
    theta_ptr = tl.load(theta_ptrs + t).to(tl.pointer_type(P_DT))
    prev_ptr = tl.load(prev_ptrs + t).to(tl.pointer_type(P_DT))
    g_ptr = tl.load(g_ptrs + t).to(tl.pointer_type(P_DT))
    gprev_ptr = tl.load(gprev_ptrs + t).to(tl.pointer_type(P_DT))
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = _in_bounds(offs, n, ALIGNED)
        theta = tl.load(_at(theta_ptr, offs, ALIGNED, BLOCK), mask=mask)
        tl.store(_at(prev_ptr, offs, ALIGNED, BLOCK), theta, mask=mask)
        g = tl.load(_at(g_ptr, offs, ALIGNED, BLOCK), mask=mask)
        tl.store(_at(gprev_ptr, offs, ALIGNED, BLOCK), g, mask=mask)


def remembers(item: tuple) -> bool:
    """Whether `heldout_sums`' `remember` copies the item: its gradient is in θ's dtype (a copy
    into g_prev would round it otherwise, which `copy_` does to nearest even and Triton's
    interpreter, which the CPU tests run, by truncation)."""
    return item[3].dtype == item[1].dtype


def heldout_sums(items: list[tuple], remember: list | None = None) -> torch.Tensor:
    """(realized, potential, movement) in float64, one row per item (slot, θ, θ_prev, g,
    g_prev, Adam's (m, v, step, (lr, β1, β2, ε)) or None), every tensor `eligible` and on
    one CUDA device (or the CPU under Triton's interpreter). One upload of the pointers and
    hyper-parameters (the chunk tables of the same tensor sizes come from the last call's
    `_Plan`), one launch per dtype combination, three of the fixed-order reduction.

    `remember`: a list to append a function to that, called later, copies θ into θ_prev and g
    into g_prev for every item that `remembers` over the same tables (the probe's commit: one
    launch per dtype combination instead of a multi-tensor copy of some 1,400 tensors; it
    keeps the items alive)."""
    device = items[0][1].device
    T = len(items)
    ptrs = np.empty((T, 6), dtype=np.int64)
    numels = np.empty(T, dtype=np.int64)
    kinds: dict[tuple, int] = {}
    kind_of = np.empty(T, dtype=np.int64)
    adam_rows, adam_hyper, steps = [], [], []
    # One pass over the items: the host's per-tensor work is what a probe waits for.
    for j, (_, theta, prev, g, gprev, adam) in enumerate(items):
        m, v = (theta, theta) if adam is None else adam[:2]
        row = (theta.data_ptr(), prev.data_ptr(), g.data_ptr(), gprev.data_ptr(), m.data_ptr(), v.data_ptr())
        ptrs[j] = row
        n = numels[j] = theta.numel()
        aligned = n % 16 == 0 and not any(x % 16 for x in row)
        kind_of[j] = kinds.setdefault((theta.dtype, g.dtype, m.dtype, adam is not None, aligned), len(kinds))
        if adam is not None:
            adam_rows.append(j)
            steps.append(adam[2])
            adam_hyper.append(adam[3])
    # Rounded to float32, as the torch path's hyper-parameters are.
    hyper = np.zeros((T, 2), dtype=np.float64)
    scale = np.zeros(T, dtype=np.float64)
    if adam_rows:  # (Python's float powers, as the torch path takes them)
        t = torch.stack(steps).tolist()  # (host step counters)
        scale[adam_rows] = np.float32([lr / (1 - b1**s) for s, (lr, b1, _, _) in zip(t, adam_hyper)])
        hyper[adam_rows] = np.float32([((1 - b2**s) ** -0.5, eps) for s, (_, _, b2, eps) in zip(t, adam_hyper)])
    plan = _Plan.of(device, kind_of, numels)
    order = plan.order
    T, B = len(order), plan.blocks
    floats = np.concatenate([hyper[order].reshape(-1), scale[order]])
    table = _fused._upload(np.concatenate([ptrs[order].T.reshape(-1), floats.view(np.int64)]), device)
    ptrs_d = [table[k * T : (k + 1) * T] for k in range(6)]
    hyper_d = table[6 * T : 8 * T].view(torch.float64)
    scale_d = table[8 * T :].view(torch.float64)
    partial = torch.empty(3 * max(B, 1), dtype=torch.float64, device=device)
    keys = {k: key for key, k in kinds.items()}
    for kind, lo, hi in plan.launches:
        theta_dt, g_dt, s_dt, adam, aligned = keys[kind]
        _sums_kernel[(hi - lo,)](
            *ptrs_d,
            plan.numels,
            hyper_d,
            plan.block_tensor[lo:],
            plan.block_start[lo:],
            partial[lo:],
            B,
            P_DT=_TL_DTYPES[theta_dt],
            G_DT=_TL_DTYPES[g_dt],
            S_DT=_TL_DTYPES[s_dt],
            ADAM=adam,
            ALIGNED=aligned,
            BLOCK=_block(theta_dt, g_dt, s_dt),
            CHUNK=_fused.CHUNK,
        )
    sums = torch.empty(3 * T, dtype=torch.float64, device=device)
    for k in range(3):
        _reduce_kernel[(T,)](partial[k * B :], plan.first, plan.nblocks, sums[k * T :], BLOCK=256)
    sums = sums.view(3, T)
    if remember is not None:

        def copy(_items: list[tuple] = items) -> None:  # (the pointers' tensors stay alive with it)
            for kind, lo, hi in plan.launches:
                theta_dt, g_dt, _, _, aligned = keys[kind]
                if g_dt == theta_dt:  # (`remembers`)
                    _remember_kernel[(hi - lo,)](
                        *ptrs_d[:4],
                        plan.numels,
                        plan.block_tensor[lo:],
                        plan.block_start[lo:],
                        P_DT=_TL_DTYPES[theta_dt],
                        ALIGNED=aligned,
                        BLOCK=_block(theta_dt),
                        CHUNK=_fused.CHUNK,
                    )

        remember.append(copy)
    return torch.stack([sums[0] * 0.5, sums[1] * scale_d, sums[2]], dim=1).index_select(0, plan.inverse)


class _Plan:
    """What a call's tables share with the last call's when its tensors have the same sizes
    and kinds in the same order (a probe's, every time): the order that puts tensors of one
    kind together, each kind's run of chunks, and the chunk tables on the device."""

    _last: _Plan | None = None

    def __init__(self, device: torch.device, kind_of: np.ndarray, numels: np.ndarray) -> None:
        self.signature = (device, kind_of.tobytes(), numels.tobytes())
        self.order = np.argsort(kind_of, kind="stable")
        ordered = numels[self.order]
        nblocks, block_tensor, block_start = _fused._chunks(ordered)
        first = np.concatenate(([0], np.cumsum(nblocks)[:-1])).astype(np.int64)
        self.blocks = len(block_tensor)
        kinds = kind_of[self.order]
        cuts = np.flatnonzero(np.diff(kinds)) + 1
        self.launches = [
            (int(kinds[lo]), int(first[lo]), int(first[hi - 1] + nblocks[hi - 1]))
            for lo, hi in zip(np.concatenate(([0], cuts)), np.concatenate((cuts, [len(kinds)])))
            if first[hi - 1] + nblocks[hi - 1] > first[lo]
        ]
        T, B = len(ordered), self.blocks
        table = _fused._upload(
            np.concatenate([ordered, block_tensor, block_start, first, nblocks, np.argsort(self.order)]), device
        )
        self.numels = table[:T]
        self.block_tensor, self.block_start = table[T : T + B], table[T + B : T + 2 * B]
        self.first, self.nblocks, self.inverse = (table[T + 2 * B + k * T : T + 2 * B + (k + 1) * T] for k in range(3))

    @classmethod
    def of(cls, device: torch.device, kind_of: np.ndarray, numels: np.ndarray) -> _Plan:
        last = cls._last
        if last is None or last.signature != (device, kind_of.tobytes(), numels.tobytes()):
            last = cls._last = cls(device, kind_of, numels)
        return last
