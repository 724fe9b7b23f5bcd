"""Triton kernels for the MoLF step on CUDA: multi-tensor, a few launches per step.

Each launch walks a table of tensor pointers, so one launch covers every tensor
of one dtype combination. Work is split in chunks of CHUNK elements; a chunk's
partial score sum goes to its own slot and a second tiny kernel adds the
chunks of each tensor in a fixed order, so scores are bitwise reproducible
(no atomics), which routing, resume and distributed agreement rely on.

The math is SPEC §2 in the state dtype's compute precision (float32, or
float64 for float64 state); it matches the foreach path to rounding, not bit
for bit (fused multiply-adds).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

BLOCK = 1024
CHUNK = 16 * BLOCK

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}


@triton.jit
def _moments_kernel(
    g_ptrs, m_ptrs, v_ptrs, p_ptrs, numels, hyper, block_tensor, block_start, partial, flag,
    beta1, beta2, eps,
    G_DT: tl.constexpr, S_DT: tl.constexpr, P_DT: tl.constexpr, C_DT: tl.constexpr,
    EPD: tl.constexpr, SCORE: tl.constexpr, APPLY: tl.constexpr,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """m, v <- moments(g); SCORE: partial[pid] = chunk sum of the score term;
    APPLY: also the AdamW update of p (unrouted parameters: one pass).
    Writes nothing when `flag` is set (a non-finite gradient this step)."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + t) * (tl.load(flag) == 0)
    g_ptr = tl.load(g_ptrs + t).to(tl.pointer_type(G_DT))
    m_ptr = tl.load(m_ptrs + t).to(tl.pointer_type(S_DT))
    v_ptr = tl.load(v_ptrs + t).to(tl.pointer_type(S_DT))
    if APPLY:
        p_ptr = tl.load(p_ptrs + t).to(tl.pointer_type(P_DT))
        step_size = tl.load(hyper + 4 * t).to(C_DT)
        bc2_sqrt = tl.load(hyper + 4 * t + 1).to(C_DT)
        decay = tl.load(hyper + 4 * t + 2).to(C_DT)
        p_eps = tl.load(hyper + 4 * t + 3).to(C_DT)
    acc = tl.zeros([BLOCK], dtype=C_DT)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(C_DT)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(C_DT)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(C_DT)
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        # Round to the state dtype first: scores and updates see the stored moments.
        m = m.to(S_DT).to(C_DT)
        v = v.to(S_DT).to(C_DT)
        tl.store(m_ptr + offs, m.to(S_DT), mask=mask)
        tl.store(v_ptr + offs, v.to(S_DT), mask=mask)
        if SCORE:
            denom = tl.sqrt(v) + eps
            if EPD:
                term = m * m / denom
            else:
                q = m / denom
                term = q * q
            acc += tl.where(mask, term, 0.0)
        if APPLY:
            p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(C_DT)
            p = p * decay - step_size * m / (tl.sqrt(v) / bc2_sqrt + p_eps)
            tl.store(p_ptr + offs, p.to(P_DT), mask=mask)
    if SCORE:
        tl.store(partial + pid, tl.sum(acc, axis=0).to(tl.float64))


@triton.jit
def _reduce_kernel(partial, first_block, num_blocks, out, BLOCK: tl.constexpr):
    """out[t] = sum of tensor t's chunk partials, in a fixed order."""
    t = tl.program_id(0)
    first = tl.load(first_block + t)
    nb = tl.load(num_blocks + t)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(0, nb, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(partial + first + offs, mask=offs < nb, other=0.0)
    tl.store(out + t, tl.sum(acc, axis=0))


@triton.jit
def _nonfinite_kernel(g_ptrs, numels, block_tensor, block_start, flag, G_DT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """flag <- 1 if any gradient element is NaN or infinite (racing writes all write 1)."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + t)
    g_ptr = tl.load(g_ptrs + t).to(tl.pointer_type(G_DT))
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        bad += ((g != g) | (tl.abs(g) == float("inf"))).to(tl.int32)
    if tl.sum(bad, axis=0) > 0:
        tl.store(flag, 1)


@triton.jit
def _apply_kernel(
    p_ptrs, m_ptrs, v_ptrs, numels, hyper, block_tensor, block_start, flag,
    S_DT: tl.constexpr, P_DT: tl.constexpr, C_DT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """The winners' update: p <- p (1 - lr wd) - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
    Writes nothing when `flag` is set (lagged mode learns of it only later)."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + t) * (tl.load(flag) == 0)
    p_ptr = tl.load(p_ptrs + t).to(tl.pointer_type(P_DT))
    m_ptr = tl.load(m_ptrs + t).to(tl.pointer_type(S_DT))
    v_ptr = tl.load(v_ptrs + t).to(tl.pointer_type(S_DT))
    step_size = tl.load(hyper + 4 * t).to(C_DT)
    bc2_sqrt = tl.load(hyper + 4 * t + 1).to(C_DT)
    decay = tl.load(hyper + 4 * t + 2).to(C_DT)
    eps = tl.load(hyper + 4 * t + 3).to(C_DT)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < n
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(C_DT)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(C_DT)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(C_DT)
        p = p * decay - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
        tl.store(p_ptr + offs, p.to(P_DT), mask=mask)


def _compute_dtype(state_dtype: torch.dtype):
    return tl.float64 if state_dtype == torch.float64 else tl.float32


def _blocks(numels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Chunk map: for every program its tensor and start offset; per tensor its first chunk and count."""
    nblocks = (numels + CHUNK - 1) // CHUNK
    first = np.concatenate(([0], np.cumsum(nblocks)[:-1])).astype(np.int64)
    block_tensor = np.repeat(np.arange(len(numels), dtype=np.int64), nblocks)
    block_start = (np.arange(int(nblocks.sum()), dtype=np.int64) - np.repeat(first, nblocks)) * CHUNK
    return block_tensor, block_start, first, nblocks.astype(np.int64)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":  # Triton's interpreter (TRITON_INTERPRET=1), used by the CPU tests
        return torch.from_numpy(array)
    # Through pinned memory: an asynchronous copy, no host sync; torch's caching
    # host allocator keeps the buffer until the copy is done.
    return torch.from_numpy(array).pin_memory().to(device, non_blocking=True)


def _hyper(step_sizes, bc2_sqrts, decays, eps) -> np.ndarray:
    return np.stack([step_sizes, bc2_sqrts, decays, np.broadcast_to(eps, len(step_sizes))], axis=1).reshape(-1)


def nonfinite_flag(grads: list[torch.Tensor]) -> torch.Tensor:
    """A device int32 [1]: 1 if any of `grads` holds a NaN or an infinity."""
    device = grads[0].device
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for dtype, gs in by_dtype.items():
        numels = np.fromiter((g.numel() for g in gs), dtype=np.int64, count=len(gs))
        block_tensor, block_start, _, _ = _blocks(numels)
        ptrs = np.fromiter((g.data_ptr() for g in gs), dtype=np.int64, count=len(gs))
        table = _to_device(np.concatenate([ptrs, numels, block_tensor, block_start]), device)
        T, B = len(gs), len(block_tensor)
        _nonfinite_kernel[(B,)](
            table[:T], table[T:2 * T], table[2 * T:2 * T + B], table[2 * T + B:], flag,
            G_DT=_TL_DTYPES[dtype], BLOCK=BLOCK, CHUNK=CHUNK,
        )
    return flag


def moments_and_scores(
    grads, exp_avgs, exp_avg_sqs, beta1: float, beta2: float, eps: float, score: str, flag: torch.Tensor,
    params=None, step_sizes=None, bc2_sqrts=None, decays=None,
) -> torch.Tensor | None:
    """Update the moments of every tensor in one launch (none if `flag` is set).
    Without `params`: return each tensor's float64 score sum (device tensor).
    With `params` (unrouted parameters): apply AdamW in the same pass, return None."""
    if not grads:
        return None
    device = grads[0].device
    numels = np.fromiter((g.numel() for g in grads), dtype=np.int64, count=len(grads))
    block_tensor, block_start, first, nblocks = _blocks(numels)
    apply = params is not None
    ptrs = [[t.data_ptr() for t in ts] for ts in (grads, exp_avgs, exp_avg_sqs, params if apply else grads)]
    table = _to_device(np.concatenate([np.asarray(ptrs, dtype=np.int64).reshape(-1), numels, block_tensor, block_start]), device)
    T, B = len(grads), len(block_tensor)
    g_ptrs, m_ptrs, v_ptrs, p_ptrs = (table[i * T:(i + 1) * T] for i in range(4))
    numels_d, block_tensor_d, block_start_d = table[4 * T:5 * T], table[5 * T:5 * T + B], table[5 * T + B:]
    hyper = _to_device(_hyper(step_sizes, bc2_sqrts, decays, eps), device) if apply else numels_d
    partial = torch.empty(B, dtype=torch.float64, device=device) if not apply else numels_d
    state_dtype = exp_avgs[0].dtype
    _moments_kernel[(B,)](
        g_ptrs, m_ptrs, v_ptrs, p_ptrs, numels_d, hyper, block_tensor_d, block_start_d, partial, flag,
        beta1, beta2, eps,
        G_DT=_TL_DTYPES[grads[0].dtype], S_DT=_TL_DTYPES[state_dtype],
        P_DT=_TL_DTYPES[params[0].dtype] if apply else tl.float32, C_DT=_compute_dtype(state_dtype),
        EPD=score == "epd", SCORE=not apply, APPLY=apply, BLOCK=BLOCK, CHUNK=CHUNK,
    )
    if apply:
        return None
    meta = _to_device(np.concatenate([first, nblocks]), device)
    sums = torch.empty(T, dtype=torch.float64, device=device)
    _reduce_kernel[(T,)](partial, meta[:T], meta[T:], sums, BLOCK=256)
    return sums


def adamw_apply(params, exp_avgs, exp_avg_sqs, step_sizes, bc2_sqrts, decays, eps: float, flag: torch.Tensor) -> None:
    """The winners' AdamW update in one launch (moments already updated; none if `flag` is set)."""
    if not params:
        return
    device = params[0].device
    numels = np.fromiter((p.numel() for p in params), dtype=np.int64, count=len(params))
    block_tensor, block_start, _, _ = _blocks(numels)
    ptrs = np.asarray([[t.data_ptr() for t in ts] for ts in (params, exp_avgs, exp_avg_sqs)], dtype=np.int64)
    table = _to_device(np.concatenate([ptrs.reshape(-1), numels, block_tensor, block_start]), device)
    T, B = len(params), len(block_tensor)
    hyper = _to_device(_hyper(step_sizes, bc2_sqrts, decays, eps), device)
    state_dtype = exp_avgs[0].dtype
    _apply_kernel[(B,)](
        table[:T], table[T:2 * T], table[2 * T:3 * T], table[3 * T:4 * T], hyper,
        table[4 * T:4 * T + B], table[4 * T + B:], flag,
        S_DT=_TL_DTYPES[state_dtype], P_DT=_TL_DTYPES[params[0].dtype], C_DT=_compute_dtype(state_dtype),
        BLOCK=BLOCK, CHUNK=CHUNK,
    )
