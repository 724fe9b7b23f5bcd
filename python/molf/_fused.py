"""The MoLF step on CUDA as a few multi-tensor Triton launches.

Each launch walks a table of tensor pointers, so one launch covers every tensor
of one dtype combination. `FusedStep` builds those tables once for a set of
tensors (parameters, moments, element counts, chunk maps) and keeps them on the
device; a step then uploads only the gradient pointers and the per-tensor
hyper-parameters (one copy), and for the winners one more small table.

Work is split in chunks of CHUNK elements; a chunk's partial score sum goes to
its own slot and a second kernel adds each tensor's chunks in a fixed order, so
scores are bitwise reproducible (no atomics), which routing, resume and
distributed agreement rely on. The math is SPEC §2 in float32 (float64 for
float64 state); it matches the foreach path to rounding, not bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import triton
import triton.language as tl

from .distributed import to_local

CHUNK = 16384  # elements per program


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
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + t)
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


def _compute_dtype(state_dtype: torch.dtype):
    return tl.float64 if state_dtype == torch.float64 else tl.float32


def _chunks(numels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chunk counts per tensor, and for every chunk its tensor (index into
    `numels`) and start offset."""
    nblocks = (numels + CHUNK - 1) // CHUNK
    first = np.concatenate(([0], np.cumsum(nblocks)[:-1])).astype(np.int64)
    block_tensor = np.repeat(np.arange(len(numels), dtype=np.int64), nblocks)
    block_start = (np.arange(int(nblocks.sum()), dtype=np.int64) - np.repeat(first, nblocks)) * CHUNK
    return nblocks.astype(np.int64), block_tensor, block_start


def _upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":  # Triton's interpreter (TRITON_INTERPRET=1), used by the CPU tests
        return torch.from_numpy(array)
    # Through pinned memory: an asynchronous copy, no host sync; torch's caching
    # host allocator keeps the buffer until the copy is done.
    return torch.from_numpy(array).pin_memory().to(device, non_blocking=True)


def hyper_rows(groups: list[dict], group_of: np.ndarray, steps: np.ndarray, apply: np.ndarray) -> np.ndarray:
    """The HYPER-wide float64 rows for tensors of the given groups and step counts."""
    per_group = np.array(
        [
            [
                1 - g["betas"][0],
                g["betas"][1],
                1 - g["betas"][1],
                g["eps"],
                float(g["lr"]),
                g["betas"][0],
                g["weight_decay"],
                0.0,
            ]
            for g in groups
        ],
        dtype=np.float64,
    )
    rows = per_group[group_of]
    lr, beta1, wd = rows[:, 4].copy(), rows[:, 5].copy(), rows[:, 6].copy()
    rows[:, 4] = lr / (1 - beta1**steps)
    rows[:, 5] = np.sqrt(1 - rows[:, 1] ** steps)
    rows[:, 6] = 1 - lr * wd
    rows[:, 7] = apply
    return rows


@dataclass
class _Batch:
    """Tensors [lo, hi) of the plan sharing one dtype combination and role; chunks [clo, chi)."""

    lo: int
    hi: int
    clo: int
    chi: int
    g_dtype: torch.dtype
    s_dtype: torch.dtype
    p_dtype: torch.dtype
    routed: bool
    aligned: bool  # parameters and moments 16-byte aligned, element counts multiples of 16


@dataclass
class FusedStep:
    """Device tables for one fixed set of tensors with gradients.

    `entries`: per tensor (param, exp_avg, exp_avg_sq, step tensor, group index,
    slot), slot -1 for unrouted parameters. Build it again when that set changes.
    FSDP2 DTensor parameters are worked on through their local shards; the
    moments come already local."""

    entries: list[tuple]
    device: torch.device = field(init=False)

    def __post_init__(self) -> None:
        # Routed tensors first (their chunks then form one prefix of the partial
        # buffer), then by dtype combination: one launch per batch.
        def key(e):
            p, m, v, _, _, slot = e
            local = to_local(p)
            aligned = local.numel() % 16 == 0 and all(t.data_ptr() % 16 == 0 for t in (local, m, v))
            return (slot < 0, str(p.dtype), str(p.grad.dtype if p.grad is not None else p.dtype), str(m.dtype), aligned)

        self.entries = sorted(self.entries, key=key)
        params = [e[0] for e in self.entries]
        self.params = params
        self.exp_avgs = [e[1] for e in self.entries]
        self.exp_avg_sqs = [e[2] for e in self.entries]
        # The step counters live in one host buffer whose elements the optimizer
        # installs as each parameter's state["step"]: a step advances them all
        # with one add and reads them without stacking a thousand scalars.
        self.step_buffer = torch.stack([e[3].detach().to("cpu", torch.float32) for e in self.entries])
        self.steps = list(self.step_buffer.unbind())
        self.group_of = np.array([e[4] for e in self.entries], dtype=np.int64)
        self.slots = np.array([e[5] for e in self.entries], dtype=np.int64)
        self.device = params[0].device
        local_params = [to_local(p) for p in params]
        self.numels = np.array([p.numel() for p in local_params], dtype=np.int64)
        self.global_numels = np.array([p.numel() for p in params], dtype=np.int64)  # what scores divide by
        nblocks, block_tensor, block_start = _chunks(self.numels)
        self.num_routed = int((self.slots >= 0).sum())
        self.routed_blocks = int(nblocks[: self.num_routed].sum())
        first = np.concatenate(([0], np.cumsum(nblocks)[:-1])).astype(np.int64)
        self.batches: list[_Batch] = []
        lo = 0
        for hi in range(1, len(params) + 1):
            if hi == len(params) or key(self.entries[hi]) != key(self.entries[lo]):
                p, m = params[lo], self.exp_avgs[lo]
                g = p.grad if p.grad is not None else p
                clo = int(first[lo])
                chi = int(first[hi - 1] + nblocks[hi - 1])
                self.batches.append(
                    _Batch(
                        lo,
                        hi,
                        clo,
                        chi,
                        g.dtype,
                        m.dtype,
                        p.dtype,
                        bool(self.slots[lo] >= 0),
                        key(self.entries[lo])[-1],
                    )
                )
                lo = hi
        self.ptrs = np.array(
            [[t.data_ptr() for t in ts] for ts in (local_params, self.exp_avgs, self.exp_avg_sqs)], dtype=np.int64
        )
        T = len(params)
        table = _upload(
            np.concatenate(
                [
                    self.ptrs.reshape(-1),
                    self.numels,
                    block_tensor,
                    block_start,
                    first[: self.num_routed],
                    nblocks[: self.num_routed],
                ]
            ),
            self.device,
        )
        B = len(block_tensor)
        self._p, self._m, self._v = table[:T], table[T : 2 * T], table[2 * T : 3 * T]
        self._numels = table[3 * T : 4 * T]
        self._block_tensor, self._block_start = table[4 * T : 4 * T + B], table[4 * T + B : 4 * T + 2 * B]
        rest = table[4 * T + 2 * B :]
        self._first, self._nblocks = rest[: self.num_routed], rest[self.num_routed :]

    def moments(
        self,
        groups: list[dict],
        steps: np.ndarray,
        score: str,
        check_finite: bool,
        winners: np.ndarray | None = None,
        group=None,
    ):
        """Every tensor's moments; unrouted parameters' whole AdamW update; the
        routed tensors' float64 score sums. With `winners` (bool per slot, lagged
        mode) the winners' updates happen in the same pass. `group` (FSDP2): the
        process group whose ranks hold the other shards; a non-finite gradient on
        any of them stops every rank's writes. Returns (sums, flag, hyper rows)."""
        grads = [to_local(p.grad) for p in self.params]
        g_ptrs = np.fromiter((g.data_ptr() for g in grads), dtype=np.int64, count=len(grads))
        apply = self.slots < 0
        if winners is not None:
            apply[: self.num_routed] = winners[self.slots[: self.num_routed]]
        hyper = hyper_rows(groups, self.group_of, steps, apply)
        T = len(grads)
        upload = _upload(np.concatenate([g_ptrs, hyper.reshape(-1).view(np.int64)]), self.device)
        g_d, hyper_d = upload[:T], upload[T:].view(torch.float64)
        flag = torch.zeros(1, dtype=torch.int32, device=self.device)
        aligned = [b.aligned and not (g_ptrs[b.lo : b.hi] % 16).any() for b in self.batches]
        if check_finite:
            for b, al in zip(self.batches, aligned):
                _nonfinite_kernel[(b.chi - b.clo,)](
                    g_d,
                    self._numels,
                    self._block_tensor[b.clo :],
                    self._block_start[b.clo :],
                    flag,
                    G_DT=_TL_DTYPES[b.g_dtype],
                    ALIGNED=al,
                    BLOCK=_block(b.g_dtype),
                    CHUNK=CHUNK,
                )
            if group is not None:  # on the device's stream: no host sync
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
        partial = torch.empty(max(self.routed_blocks, 1), dtype=torch.float64, device=self.device)
        for b, al in zip(self.batches, aligned):
            _moments_kernel[(b.chi - b.clo,)](
                g_d,
                self._m,
                self._v,
                self._p,
                self._numels,
                hyper_d,
                self._block_tensor[b.clo :],
                self._block_start[b.clo :],
                partial[b.clo :] if b.routed else partial,
                flag,
                G_DT=_TL_DTYPES[b.g_dtype],
                S_DT=_TL_DTYPES[b.s_dtype],
                P_DT=_TL_DTYPES[b.p_dtype],
                C_DT=_compute_dtype(b.s_dtype),
                EPD=score == "epd",
                SCORE=b.routed,
                ALIGNED=al,
                BLOCK=_block(b.g_dtype, b.s_dtype, b.p_dtype),
                CHUNK=CHUNK,
            )
        sums = torch.empty(self.num_routed, dtype=torch.float64, device=self.device)
        if self.num_routed:
            _reduce_kernel[(self.num_routed,)](partial, self._first, self._nblocks, sums, BLOCK=256)
        return sums, flag, hyper

    def apply(self, winners: np.ndarray, hyper: np.ndarray, flag: torch.Tensor) -> None:
        """AdamW for the routed tensors whose slot won (`winners`: bool per slot).
        One upload of the routed tensors' hyper rows with their apply flags set;
        the launches reuse the plan's chunk tables."""
        won = winners[self.slots[: self.num_routed]]
        if not won.any():
            return
        rows = hyper[: self.num_routed].copy()
        rows[:, 7] = won
        hyper_d = _upload(rows.reshape(-1), self.device)
        for b in self.batches:
            if not b.routed or not won[b.lo : b.hi].any():
                continue
            _apply_kernel[(b.chi - b.clo,)](
                self._p,
                self._m,
                self._v,
                self._numels,
                hyper_d,
                self._block_tensor[b.clo :],
                self._block_start[b.clo :],
                flag,
                S_DT=_TL_DTYPES[b.s_dtype],
                P_DT=_TL_DTYPES[b.p_dtype],
                C_DT=_compute_dtype(b.s_dtype),
                ALIGNED=b.aligned,
                BLOCK=_block(b.s_dtype, b.p_dtype),
                CHUNK=CHUNK,
            )
