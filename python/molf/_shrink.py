"""Held-out shrinkage's tensor work (see `molf.heldout`): the spectral soft-threshold of a
LoRA product through r x r transforms, started in worker threads so it overlaps the closure,
and one expert index's shrink trial."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from . import distributed
from ._offload import fetch

__all__ = ["spectral_shrink_b", "run_trials"]


def spectral_shrink_b(b: torch.Tensor, a: torch.Tensor, delta: float) -> torch.Tensor:
    """B' with B'·A = the product B·A with its singular values soft-thresholded by
    δ x its largest, σ_j ← max(σ_j − δ σ_1, 0): the largest shrinks by the factor 1 − δ, as
    scaling would shrink it, and every other by the same amount, so the weakest directions
    vanish first (a nuclear-norm proximal step). B' = B + (ΔW' − ΔW) A⁺ = B − B T with T an
    r x r matrix (`_shrink_transform`) from the Gram matrices BᵀB and A Aᵀ: no decomposition
    of an out x r or r x in matrix, nor of the out x in product. Batched over leading
    dimensions; b: (..., out, r), a: (..., r, in); float64 math, the result in b's dtype."""
    b64, a64 = b.double(), a.double()
    t = _shrink_transform(a64 @ a64.mT, b64.mT @ b64, delta, _rtol(b.dtype, a.shape[-2]))
    return (b64 - b64 @ t).to(b.dtype)


def _rtol(dtype: torch.dtype, rank: int) -> float:
    """Relative cut-off under which a singular value of A counts as zero: torch.linalg.pinv's
    in the dtype the math used to run in (rank x its eps; float32 for 16-bit tensors), but
    never under what float64 Gram matrices resolve."""
    work = torch.promote_types(dtype, torch.float32)
    return rank * max(torch.finfo(work).eps, torch.finfo(torch.float64).eps ** 0.5)


def _shrink_transform(ga: torch.Tensor, gb: torch.Tensor, delta: float, rtol: float) -> torch.Tensor:
    """T (float64, batched r x r) such that B − B T is `spectral_shrink_b(B, A, δ)`, from
    G_A = A Aᵀ and G_B = BᵀB.

    With any S such that S Sᵀ = G_A, A = S Q for some Q with orthonormal rows on A's row
    space, so B A = (B S) Q: the singular values and right singular vectors of the product
    are those of D = B S, the eigen-pairs (σ², Z) of H = DᵀD = Sᵀ G_B S. Soft-thresholding
    keeps D Z diag(s) Zᵀ, s = max(1 − τ/σ, 0), τ = δ σ_1, and B' = B − B S (I − Z diag(s) Zᵀ)
    S⁺ = B + (ΔW' − ΔW) A⁺. S is the Cholesky factor of G_A (S⁺ = S⁻¹ by a triangular solve);
    where A is rank-deficient (r > in, say) S = W Γ^½ from G_A's eigen-decomposition, with
    the singular values under `rtol` x the largest taken as zero, as torch.linalg.pinv does.
    B = 0 gives s = 0 and B' = B exactly; only σ > τ enter, which the Gram matrices resolve
    to float64 precision."""
    eye = torch.eye(ga.shape[-1], dtype=ga.dtype, device=ga.device)
    s, info = torch.linalg.cholesky_ex(ga)
    s_pinv = torch.linalg.solve_triangular(s, eye, upper=False)
    diag = s.diagonal(dim1=-2, dim2=-1)
    singular = (info != 0) | (diag <= rtol * diag.amax(-1, keepdim=True)).any(-1)
    if singular.any():
        gamma, w = torch.linalg.eigh(ga[singular])
        sv = gamma.clamp_min(0).sqrt()
        kept = sv > rtol * sv.amax(-1, keepdim=True)
        s[singular] = w * torch.where(kept, sv, 0).unsqueeze(-2)
        s_pinv[singular] = (w * torch.where(kept, 1 / sv, 0).unsqueeze(-2)).mT
    lam, z = torch.linalg.eigh(s.mT @ gb @ s)
    sv = lam.clamp_min(0).sqrt()
    tau = delta * sv.amax(-1, keepdim=True)
    keep = torch.where(sv > tau, 1 - tau / sv, 0)
    return s @ (eye - (z * keep.unsqueeze(-2)) @ z.mT) @ s_pinv


def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if dst:  # (torch's foreach ops refuse empty lists)
        torch._foreach_copy_(dst, src)


def _backup(tensors: list[torch.Tensor], pinned: bool = False) -> list[torch.Tensor]:
    """Copies of `tensors` (what `_copy` can write back): per dtype and device one buffer
    and one multi-tensor copy, instead of one clone per tensor. `pinned`: in pinned host
    memory, copied asynchronously on the current stream (a later copy back on it reads them
    complete, and the device memory of `tensors` is free for what follows once dropped)."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    out: list[torch.Tensor] = [torch.Tensor()] * len(tensors)
    for (dtype, device), idx in groups.items():
        n = sum(tensors[i].numel() for i in idx)
        flat = torch.empty(n, dtype=dtype, pin_memory=True) if pinned else torch.empty(n, dtype=dtype, device=device)
        views = [v.view(tensors[i].shape) for i, v in zip(idx, flat.split([tensors[i].numel() for i in idx]))]
        if pinned:  # (device to host: one asynchronous copy each)
            for v, i in zip(views, idx):
                v.copy_(tensors[i], non_blocking=True)
        else:
            _copy(views, [tensors[i] for i in idx])
        for i, v in zip(idx, views):
            out[i] = v
    return out


_POOL: tuple[int, ThreadPoolExecutor] | None = None
_STREAMS = threading.local()  # a worker thread's own CUDA stream, per device
_PIECE = 4  # matrices per worker task


def _start(fn: Callable[..., torch.Tensor], ga: torch.Tensor, gb: torch.Tensor, *args) -> Callable[[], torch.Tensor]:
    """Start fn(ga, gb, *args), batched over the leading dimension, where ga is; the returned
    function waits for the result. On CUDA in worker threads, `_PIECE` matrices per task, each
    thread on its own stream: cuSOLVER's eigen-decomposition of a matrix larger than 32 x 32
    is one synchronous call per matrix (~1.6 ms at r = 128 on an H100), so a few threads
    overlap them, and the work overlaps the closure's forward on the main stream. On the CPU
    at once (threads would compete for the cores MKL already uses)."""
    if not ga.is_cuda:
        out = fn(ga, gb, *args)
        return lambda: out
    main = torch.cuda.current_stream(ga.device)
    ready = main.record_event()

    def task(ga: torch.Tensor, gb: torch.Tensor) -> torch.Tensor:
        streams = _STREAMS.__dict__
        if ga.device not in streams:
            streams[ga.device] = torch.cuda.Stream(ga.device)
        stream = streams[ga.device]
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            out = fn(ga, gb, *args)
        out.record_stream(main)  # used, then freed, on the main stream
        stream.synchronize()  # done when the task is (the inputs are freed after it)
        return out

    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():  # (a forked process has none of its parent's threads)
        # torch loads its CUDA linear algebra on first use, not safely from several threads at
        # once (pytorch/pytorch#90613): load it here.
        torch.linalg.cholesky_ex(torch.ones(1, 1, dtype=ga.dtype, device=ga.device))
        _POOL = os.getpid(), ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="molf-heldout")
    tasks = [_POOL[1].submit(task, ga[j : j + _PIECE], gb[j : j + _PIECE]) for j in range(0, len(ga), _PIECE)]
    return lambda: torch.cat([t.result() for t in tasks])


class _Trial:
    """One expert index's shrink trial (see `HeldoutProbe._shrink`) over its entries (parameter,
    origin or None, LoRA A or None, inactive): dense tensors pulled by δ towards their origin,
    LoRA B's scaled by 1 − δ (no A given) or spectrally shrunk. The spectral trial starts at
    construction: per shape, one batched product for the Gram matrices, then the r x r
    transforms (`_shrink_transform`, `_start`), so they run while the closure does; `apply`
    computes B − B T."""

    BATCH_BYTES = 1 << 28  # float64 copies of one batch of B's and A's at most (at least one pair)

    def __init__(self, entries: list[tuple], delta: float) -> None:
        self.delta = delta
        groups: dict[tuple, list[int]] = {}
        for i, (p, _, a, _) in enumerate(entries):
            if a is not None:
                groups.setdefault((tuple(p.shape), tuple(a.shape), p.dtype), []).append(i)
        self.jobs: list[tuple[list[int], Callable[[], torch.Tensor]]] = []
        for (b_shape, a_shape, dtype), idx in groups.items():
            rtol = _rtol(dtype, a_shape[0])
            per = max(1, self.BATCH_BYTES // (8 * (math.prod(b_shape) + math.prod(a_shape))))
            for start in range(0, len(idx), per):
                part = idx[start : start + per]
                b, a = self._stack(entries, part, 0), self._stack(entries, part, 2)
                self.jobs.append((part, _start(_shrink_transform, a @ a.mT, b.mT @ b, delta, rtol)))

    @staticmethod
    def _stack(entries: list[tuple], part: list[int], k: int) -> torch.Tensor:
        """Entry k (the B's: 0, the A's: 2) of the entries `part`, whole, stacked in float64."""
        return torch.stack([distributed.full(entries[i][k].detach()) for i in part]).double()

    def apply(self, entries: list[tuple], local: list[torch.Tensor]) -> None:
        """Write the trial's values into `local` (the entries' local tensors)."""
        dense = [i for i, (_, origin, _, _) in enumerate(entries) if origin is not None]
        if dense:  # θ + δ (origin − θ) = origin + (1 − δ)(θ − origin)
            torch._foreach_lerp_([local[i] for i in dense], [entries[i][1] for i in dense], self.delta)
        scaled = [local[i] for i, (_, origin, a, _) in enumerate(entries) if origin is None and a is None]
        if scaled:
            torch._foreach_mul_(scaled, 1 - self.delta)
        for part, transform in self.jobs:
            b = self._stack(entries, part, 0)
            t = transform()
            # Whole tensors: every rank computes the same result and keeps its own shard.
            shrunk = (b - b @ t).to(entries[part[0]][0].dtype)
            _copy([local[i] for i in part], [distributed.local_part(s, entries[i][0]) for i, s in zip(part, shrunk)])


def run_trials(
    by_expert: list[list[tuple]],
    delta: float,
    value: Callable[[], float],
    keep: Callable[[int, float, float], bool],
    undo: list[tuple[list[torch.Tensor], list[torch.Tensor]]],
    offload: bool,
) -> set[torch.Tensor]:
    """Each expert index's shrink trial in turn (`HeldoutProbe._shrink`): `by_expert[e]` its
    entries (parameter, origin or None, LoRA A or None, inactive), `value()` the closure's
    held-out loss, `keep(e, base, trial)` the Ledger's decision. Appends to `undo` the tensors
    and saved values of every kept trial (undone by an exception until the measurement ends);
    with `offload`, the saved values go to host memory. Returns the tensors of inactive
    experts that a kept trial moved."""
    # Origins in host memory (`offload`) start on their way to the device now, and so does
    # every spectral trial (on CUDA its r x r work runs while the closure does).
    hosted = sorted(
        (e, i)
        for e, entries in enumerate(by_expert)
        for i, (p, origin, _, _) in enumerate(entries)
        if origin is not None and origin.device != p.device
    )
    fetched = fetch([(by_expert[e][i][1], by_expert[e][i][0].device) for e, i in hosted]) if hosted else None
    trials = [_Trial(entries, delta) for entries in by_expert]
    rebased: set[torch.Tensor] = set()
    base = value()
    if fetched is not None:
        for (e, i), origin in zip(hosted, fetched()):
            p, _, a, inactive = by_expert[e][i]
            by_expert[e][i] = (p, origin, a, inactive)
        del fetched
    for e, (entries, trial) in enumerate(zip(by_expert, trials)):
        local = [distributed.to_local(p) for p, _, _, _ in entries]
        saved = _backup(local)
        undo.append((local, saved))  # before the trial writes: an exception restores them
        trial.apply(entries, local)
        for i in [i for h, i in hosted if h == e]:  # their device copies have served: the memory goes
            p, _, a, inactive = entries[i]
            entries[i] = (p, None, a, inactive)
        trial_value = value()
        if keep(e, base, trial_value):
            base = trial_value  # kept; `undo` keeps its saved values until the measurement ends
            rebased.update(p for p, _, _, inactive in entries if inactive)
            if offload and any(t.is_cuda for t in saved):
                # (in host memory, so they are not on the device at the held-out backward's peak)
                undo[-1] = (local, _backup(saved, pinned=True))
        else:
            _copy(local, saved)
            undo.pop()
        del saved
    return rebased
