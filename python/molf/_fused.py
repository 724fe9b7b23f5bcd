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
import triton.language as tl

from ._triton_kernels import (
    _TL_DTYPES,
    _apply_kernel,
    _block,
    _moments_kernel,
    _nonfinite_kernel,
    _reduce_kernel,
)
from .distributed import to_local

CHUNK = 16384  # elements per program


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


def hyper_rows(
    groups: list[dict], group_of: np.ndarray, steps: np.ndarray, apply: np.ndarray, lr_scale: np.ndarray | None = None
) -> np.ndarray:
    """The HYPER-wide float64 rows for tensors of the given groups and step counts
    (`lr_scale`: per tensor, the multiplier of its group's lr in the update; None: 1)."""
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
    if lr_scale is not None:
        lr *= lr_scale
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
        lr_scale: np.ndarray | None = None,
    ):
        """Every tensor's moments; unrouted parameters' whole AdamW update; the
        routed tensors' float64 score sums. With `winners` (bool per slot, lagged
        mode) the winners' updates happen in the same pass. `group` (FSDP2): the
        process group whose ranks hold the other shards; a non-finite gradient on
        any of them stops every rank's writes. `lr_scale` (per slot; None: 1): the
        multiplier of a routed tensor's group lr in its update (the hyper rows), not in
        its score. Returns (sums, flag, hyper rows)."""
        grads = [to_local(p.grad) for p in self.params]
        g_ptrs = np.fromiter((g.data_ptr() for g in grads), dtype=np.int64, count=len(grads))
        apply = self.slots < 0
        if winners is not None:
            apply[: self.num_routed] = winners[self.slots[: self.num_routed]]
        scale = None if lr_scale is None else np.where(self.slots >= 0, lr_scale[self.slots], 1.0)
        hyper = hyper_rows(groups, self.group_of, steps, apply, scale)
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
        self._launch_apply(_upload(rows.reshape(-1), self.device), flag, won)

    def upload(self, array: np.ndarray) -> torch.Tensor:
        """`array` on the plan's device, copied asynchronously."""
        return _upload(array, self.device)

    def apply_on_device(self, won: torch.Tensor, hyper: np.ndarray, flag: torch.Tensor) -> None:
        """The same where the device decided the winners: `won`, float64 per routed tensor
        (1: update), becomes the apply flags on the device; every routed batch is launched
        (a chunk whose tensor lost returns at once)."""
        if not self.num_routed:
            return
        hyper_d = _upload(hyper[: self.num_routed].reshape(-1), self.device)
        hyper_d.view(-1, 8)[:, 7] = won
        self._launch_apply(hyper_d, flag, None)

    def _launch_apply(self, hyper_d: torch.Tensor, flag: torch.Tensor, won: np.ndarray | None) -> None:
        for b in self.batches:
            if not b.routed or (won is not None and not won[b.lo : b.hi].any()):
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
