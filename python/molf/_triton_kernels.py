"""The Triton kernels of the fused MoLF step (`molf._fused` builds their tables and
launches them): the non-finite check, moments with per-chunk score sums, the fixed-order
reduction of the chunks' sums, and the winners' AdamW update."""

import torch
import triton
import triton.language as tl


def _block(*dtypes: torch.dtype) -> int:
    """Elements per loop iteration: 4 KiB of the narrowest operand, so 16-bit
    tensors keep as many bytes in flight as float32 ones."""
    return 4096 // min(d.itemsize for d in dtypes)


# Per-tensor hyper-parameters, one row of HYPER float64 values each.
HYPER = 8  # 1-beta1, beta2, 1-beta2, eps, lr/bc1, sqrt(bc2), 1-lr*wd, apply (1.0: update p too)

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


@triton.jit
def _at(base, offs, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """The pointers base + offs. ALIGNED promises (the host checked it) that the
    tensor starts 16-byte aligned: loads and stores can then be vectorised."""
    ptrs = base + offs
    if ALIGNED:
        ptrs = tl.max_contiguous(tl.multiple_of(ptrs, 16), BLOCK)
    return ptrs


@triton.jit
def _in_bounds(offs, n, ALIGNED: tl.constexpr):
    """offs < n; with ALIGNED, n and the chunk starts are multiples of 16, so
    the mask is constant over runs of 16 elements."""
    mask = offs < n
    if ALIGNED:
        mask = tl.max_constancy(mask, 16)
    return mask


@triton.jit
def _chunk(block_tensor, block_start, numels):
    """This program's chunk: its tensor's index, its first element and the tensor's size."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    return t, tl.load(block_start + pid), tl.load(numels + t)


@triton.jit
def _nonfinite_kernel(
    g_ptrs,
    numels,
    block_tensor,
    block_start,
    flag,
    G_DT: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """flag <- 1 if any gradient element is NaN or infinite (racing writes all write 1)."""
    t, start, n = _chunk(block_tensor, block_start, numels)
    g_ptr = tl.load(g_ptrs + t).to(tl.pointer_type(G_DT))
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        g = tl.load(_at(g_ptr, offs, ALIGNED, BLOCK), mask=_in_bounds(offs, n, ALIGNED), other=0.0).to(tl.float32)
        bad += ((g != g) | (tl.abs(g) == float("inf"))).to(tl.int32)
    if tl.sum(bad, axis=0) > 0:
        tl.store(flag, 1)


@triton.jit
def _moments_kernel(
    g_ptrs,
    m_ptrs,
    v_ptrs,
    p_ptrs,
    numels,
    hyper,
    block_tensor,
    block_start,
    partial,
    flag,
    G_DT: tl.constexpr,
    S_DT: tl.constexpr,
    P_DT: tl.constexpr,
    C_DT: tl.constexpr,
    EPD: tl.constexpr,
    SCORE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """m, v <- moments(g); SCORE: partial[pid] = chunk sum of the score term.
    Tensors whose `apply` hyper value is set also get their AdamW update in the
    same pass (unrouted parameters; in lagged mode the winners, known ahead).
    Writes nothing when `flag` is set (a non-finite gradient this step)."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + t) * (tl.load(flag) == 0)
    g_ptr = tl.load(g_ptrs + t).to(tl.pointer_type(G_DT))
    m_ptr = tl.load(m_ptrs + t).to(tl.pointer_type(S_DT))
    v_ptr = tl.load(v_ptrs + t).to(tl.pointer_type(S_DT))
    h = hyper + 8 * t  # HYPER values per tensor
    one_minus_beta1 = tl.load(h).to(C_DT)
    beta2 = tl.load(h + 1).to(C_DT)
    one_minus_beta2 = tl.load(h + 2).to(C_DT)
    eps = tl.load(h + 3).to(C_DT)
    p_ptr = tl.load(p_ptrs + t).to(tl.pointer_type(P_DT))
    step_size = tl.load(h + 4).to(C_DT)
    bc2_sqrt = tl.load(h + 5).to(C_DT)
    decay = tl.load(h + 6).to(C_DT)
    apply = tl.load(h + 7) != 0
    acc = tl.zeros([BLOCK], dtype=C_DT)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = _in_bounds(offs, n, ALIGNED)
        g = tl.load(_at(g_ptr, offs, ALIGNED, BLOCK), mask=mask, other=0.0).to(C_DT)
        m = tl.load(_at(m_ptr, offs, ALIGNED, BLOCK), mask=mask, other=0.0).to(C_DT)
        v = tl.load(_at(v_ptr, offs, ALIGNED, BLOCK), mask=mask, other=0.0).to(C_DT)
        m = m + one_minus_beta1 * (g - m)
        v = v * beta2 + one_minus_beta2 * g * g
        # Round to the state dtype first: scores and updates see the stored moments.
        m = m.to(S_DT).to(C_DT)
        v = v.to(S_DT).to(C_DT)
        tl.store(_at(m_ptr, offs, ALIGNED, BLOCK), m.to(S_DT), mask=mask)
        tl.store(_at(v_ptr, offs, ALIGNED, BLOCK), v.to(S_DT), mask=mask)
        if SCORE:
            denom = tl.sqrt(v) + eps
            if EPD:
                term = m * m / denom
            else:
                q = m / denom
                term = q * q
            acc += tl.where(mask, term, 0.0)
        if apply:
            p = tl.load(_at(p_ptr, offs, ALIGNED, BLOCK), mask=mask, other=0.0).to(C_DT)
            p = p * decay - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
            tl.store(_at(p_ptr, offs, ALIGNED, BLOCK), p.to(P_DT), mask=mask)
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
def _apply_kernel(
    p_ptrs,
    m_ptrs,
    v_ptrs,
    numels,
    hyper,
    block_tensor,
    block_start,
    flag,
    S_DT: tl.constexpr,
    P_DT: tl.constexpr,
    C_DT: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """The winners' update: p <- p (1 - lr wd) - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps),
    for the tensors whose `apply` hyper value is set (the grid covers every routed
    chunk: the host never builds per-step chunk lists). Writes nothing when `flag`
    is set (lagged mode learns of it only later)."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    h = hyper + 8 * t  # HYPER values per tensor
    n = tl.load(numels + t) * (tl.load(flag) == 0) * (tl.load(h + 7) != 0)
    p_ptr = tl.load(p_ptrs + t).to(tl.pointer_type(P_DT))
    m_ptr = tl.load(m_ptrs + t).to(tl.pointer_type(S_DT))
    v_ptr = tl.load(v_ptrs + t).to(tl.pointer_type(S_DT))
    eps = tl.load(h + 3).to(C_DT)
    step_size = tl.load(h + 4).to(C_DT)
    bc2_sqrt = tl.load(h + 5).to(C_DT)
    decay = tl.load(h + 6).to(C_DT)
    for i in range(0, CHUNK if n > 0 else 0, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = _in_bounds(offs, n, ALIGNED)
        m = tl.load(_at(m_ptr, offs, ALIGNED, BLOCK), mask=mask, other=0.0).to(C_DT)
        v = tl.load(_at(v_ptr, offs, ALIGNED, BLOCK), mask=mask, other=0.0).to(C_DT)
        p = tl.load(_at(p_ptr, offs, ALIGNED, BLOCK), mask=mask, other=0.0).to(C_DT)
        p = p * decay - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
        tl.store(_at(p_ptr, offs, ALIGNED, BLOCK), p.to(P_DT), mask=mask)
