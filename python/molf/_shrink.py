"""Held-out shrinkage's tensor work (see `molf.heldout`): the spectral soft-threshold of a
LoRA product through r x r transforms (on CUDA by matrix products on a side stream, so they
overlap the closure), and one expert index's shrink trial."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from . import distributed
from ._offload import fetch, side_stream

__all__ = ["spectral_shrink_b", "run_trials", "weights_mark"]


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
    to float64 precision. The reference: decompositions throughout (`_soft_threshold`);
    on CUDA `_Trial` runs the same math with `_soft_threshold_gemm`."""
    s, s_pinv, singular = _factor(ga, rtol)
    if singular.any():
        s[singular], s_pinv[singular] = _factor_deficient(ga[singular], rtol)
    return _transform(s, s_pinv, gb, _soft_threshold, delta)


def _factor(ga: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S with S Sᵀ = G_A (Cholesky), S⁻¹, and where that fails the `rtol` test (a flag per
    matrix, on the device: no host sync)."""
    eye = torch.eye(ga.shape[-1], dtype=ga.dtype, device=ga.device)
    s, info = torch.linalg.cholesky_ex(ga)
    s_pinv = torch.linalg.solve_triangular(s, eye, upper=False)
    diag = s.diagonal(dim1=-2, dim2=-1)
    singular = (info != 0) | (diag <= rtol * diag.amax(-1, keepdim=True)).any(-1)
    return s, s_pinv, singular


def _factor_deficient(ga: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """S = W Γ^½ and its pseudo-inverse from G_A = W Γ Wᵀ, singular values of A under `rtol`
    x the largest taken as zero."""
    gamma, w = torch.linalg.eigh(ga)
    sv = gamma.clamp_min(0).sqrt()
    kept = sv > rtol * sv.amax(-1, keepdim=True)
    return w * torch.where(kept, sv, 0).unsqueeze(-2), (w * torch.where(kept, 1 / sv, 0).unsqueeze(-2)).mT


def _transform(s, s_pinv, gb, soft_threshold: Callable, delta: float) -> torch.Tensor:
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
    return s @ (eye - soft_threshold(s.mT @ gb @ s, delta)) @ s_pinv


def _gemm_transform(ga: torch.Tensor, gb: torch.Tensor, delta: float, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`_shrink_transform` with `_soft_threshold_gemm`, no host sync: T, and the flags of the
    matrices whose G_A is rank-deficient, for which T is not valid (`_Trial` redoes them)."""
    s, s_pinv, singular = _factor(ga, rtol)
    return _transform(s, s_pinv, gb, _soft_threshold_gemm, delta), singular


def _soft_threshold(h: torch.Tensor, delta: float) -> torch.Tensor:
    """F = Z diag(max(1 − τ/σ, 0)) Zᵀ for H = Z diag(σ²) Zᵀ (batched, positive semi-definite),
    τ = δ σ_1, by eigen-decomposition."""
    lam, z = torch.linalg.eigh(h)
    sv = lam.clamp_min(0).sqrt()
    tau = delta * sv.amax(-1, keepdim=True)
    keep = torch.where(sv > tau, 1 - tau / sv, 0)
    return (z * keep.unsqueeze(-2)) @ z.mT


# Newton–Schulz steps of `_soft_threshold_gemm`, fixed so that no step waits for the host:
# squarings for σ_1² (relative error at most 1 / (e·2^45) where the top eigenvalues cluster);
# quintic steps that take every |x| ≥ 1e-13 δ² into [0.68, 1.21] (x grows 3.44-fold a step
# while small: an eigenvalue resolved to 1e-13 of τ², where its factor 1 − τ/σ is ~1e-13);
# cubic steps that converge from there to machine precision.
_SQUARINGS, _CUBIC = 45, 8
_QUINTIC = (3.4445, -4.7750, 2.0315)


def _soft_threshold_gemm(h: torch.Tensor, delta: float) -> torch.Tensor:
    """`_soft_threshold` by batched matrix products alone (on CUDA one eigen-decomposition of
    an r x r matrix is a synchronous cuSOLVER call: 196 at r = 128 take 320 ms on an H100,
    the transforms by products, Cholesky factors included, 16.6 ms). With H scaled to
    Ĥ = H / ‖H‖_F and λ = σ_1² / ‖H‖_F: P = (I + sign(Ĥ − δ²λ I)) / 2 projects onto the
    σ > τ, and on its range F = I − δ (Ĥ/λ)^-½, the inverse root taken of Ĥ/λ on P's range
    and δ² beside it (eigenvalues in [δ², 1]). A σ within ~1e-13 of τ may be left partly on
    either side, where its factor 1 − τ/σ is ~0 anyway: F agrees with the eigen-
    decomposition's to a few float64 roundings x the matrices' size."""
    shape = h.shape
    h = h.reshape(-1, *shape[-2:])
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)

    def safe(x: torch.Tensor) -> torch.Tensor:  # (zero for B = 0)
        return torch.where(x > 0, x, 1)

    def trace(x: torch.Tensor) -> torch.Tensor:
        return x.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]

    hn = h / safe(torch.linalg.matrix_norm(h)[..., None, None])
    x = hn
    for _ in range(_SQUARINGS):  # → the projector onto the top eigenvector(s), trace 1
        x = x @ x
        x = x / safe(trace(x))
    lam = trace(x @ hn) / safe(trace(x))
    y = hn - (delta**2 * lam) * eye  # eigenvalues in [−1, 1]
    a, b, c = _QUINTIC
    for _ in range(math.ceil(math.log(1e13 / delta**2) / math.log(a))):
        y2 = y @ y
        y = y @ torch.baddbmm(torch.add(eye * a, y2, alpha=b), y2, y2, alpha=c)
    for _ in range(_CUBIC):
        y = torch.baddbmm(y, y, y @ y, beta=1.5, alpha=-0.5)
    p = 0.5 * (eye + y)
    g = (hn @ p + (delta**2 * lam) * (eye - p)) / safe(lam)
    g = 0.5 * (g + g.mT)
    # Coupled Newton–Schulz: r → g^½, z → g^-½; an eigenvalue e of z r grows as e (3 − e)² / 4.
    r, z = g, eye.expand_as(g)
    for _ in range(math.ceil(math.log(delta**-2) / math.log(2.25)) + 6):
        t = torch.baddbmm(1.5 * eye, z, r, alpha=-0.5)
        r, z = r @ t, t @ z
    return torch.where(lam > 0, p - delta * (p @ z), 0).reshape(shape)


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


def _shrunk(bs: list[torch.Tensor], t: torch.Tensor) -> list[torch.Tensor]:
    """B − B T in float64 for each stack of `bs`, T's rows taken in turn, in B's dtype."""
    out, offset = [], 0
    for b in bs:
        b64 = b.double()
        out.append((b64 - b64 @ t[offset : offset + len(b)]).to(b.dtype))
        offset += len(b)
    return out


def weights_mark(tensors: list[torch.Tensor]) -> dict[torch.device, torch.cuda.Event]:
    """An event on each CUDA device's current stream of `tensors`: recorded where the probe
    begins, so that a spectral trial's work (`_Trial`) waits for the weights as they are there
    and not for the closure's forward launched next."""
    return {d: torch.cuda.current_stream(d).record_event() for d in {t.device for t in tensors if t.is_cuda}}


class _Trial:
    """One expert index's shrink trial (see `HeldoutProbe._shrink`) over its entries (parameter,
    origin or None, LoRA A or None, inactive): dense tensors pulled by δ towards their origin,
    LoRA B's scaled by 1 − δ (no A given) or spectrally shrunk. The spectral trial starts at
    construction: per shape, one batched product for the Gram matrices, then the r x r
    transforms of all shapes at once and the shrunk B's; `apply` copies them in. On CUDA all
    of it runs on a side stream from `ready` (`weights_mark`), beside the closure's forwards,
    by matrix products alone (`_soft_threshold_gemm`), so nothing waits for the host; where
    G_A is rank-deficient (a Cholesky factor fails the `rtol` test, which `apply` reads after
    the closure has synchronised anyway) those matrices take the reference path."""

    BATCH_BYTES = 1 << 28  # float64 copies of one batch of B's and A's at most (at least one pair)

    def __init__(self, entries: list[tuple], delta: float, ready: dict | None = None) -> None:
        self.delta = delta
        groups: dict[tuple, list[int]] = {}
        for i, (p, _, a, _) in enumerate(entries):
            if a is not None:
                groups.setdefault((tuple(p.shape), tuple(a.shape), p.dtype, p.device), []).append(i)
        # Whole tensors (a collective for sharded ones, on the current stream: every rank in order).
        whole = {(i, k): distributed.full(entries[i][k].detach()) for v in groups.values() for i in v for k in (0, 2)}
        if any(distributed.is_sharded(entries[i][k]) for i, k in whole):
            ready = None  # the side stream reads what the gathers write: it waits for them
        # (part, the shrunk B's of its rank, device and rtol (a function waiting for them), its place there)
        self.jobs: list[tuple[list[int], Callable[[], list[torch.Tensor]], int]] = []
        keys: dict[tuple, list[tuple]] = {}
        for (b_shape, a_shape, dtype, device), idx in groups.items():
            per = max(1, self.BATCH_BYTES // (8 * (math.prod(b_shape) + math.prod(a_shape))))
            for start in range(0, len(idx), per):
                keys.setdefault((a_shape[0], device, _rtol(dtype, a_shape[0])), []).append(idx[start : start + per])
        for (_, device, rtol), parts in keys.items():
            # The transforms of every shape with the same rank in one sequence, not one per shape.
            wait = functools.cache(self._start(parts, whole, delta, rtol, device, (ready or {}).get(device)))
            self.jobs += [(part, wait, k) for k, part in enumerate(parts)]

    @staticmethod
    def _start(parts, whole, delta, rtol, device, ready) -> Callable[[], list[torch.Tensor]]:
        def work() -> tuple:  # (B's shrunk, B's, G_A, G_B, T, flags of the singular G_A's)
            bs, ga, gb = [], [], []
            for part in parts:
                b = torch.stack([whole[i, 0] for i in part])
                a64, b64 = torch.stack([whole[i, 2] for i in part]).double(), b.double()
                bs.append(b)
                ga.append(a64 @ a64.mT)
                gb.append(b64.mT @ b64)
            ga, gb = torch.cat(ga), torch.cat(gb)
            if device.type != "cuda":
                t, singular = _shrink_transform(ga, gb, delta, rtol), None
            else:
                t, singular = _gemm_transform(ga, gb, delta, rtol)
            return _shrunk(bs, t), bs, ga, gb, t, singular

        if device.type != "cuda":
            out = work()[0]
            return lambda: out
        main = torch.cuda.current_stream(device)
        side = side_stream("spectral", device)
        if ready is None:
            side.wait_stream(main)
        else:
            side.wait_event(ready)
        with torch.cuda.stream(side):
            shrunk, bs, ga, gb, t, singular = work()
        for part in parts:
            for i in part:
                for k in (0, 2):
                    whole[i, k].record_stream(side)  # (a gathered one is freed on the main stream)
        done = side.record_event()

        def wait() -> list[torch.Tensor]:
            main.wait_event(done)
            for x in (*shrunk, *bs, ga, gb, t, singular):
                x.record_stream(main)  # (made on the side stream, read on the main one)
            if singular.any():
                t[singular] = _shrink_transform(ga[singular], gb[singular], delta, rtol)
                return _shrunk(bs, t)
            return shrunk

        return wait

    def apply(self, entries: list[tuple], local: list[torch.Tensor]) -> None:
        """Write the trial's values into `local` (the entries' local tensors)."""
        dense = [i for i, (_, origin, _, _) in enumerate(entries) if origin is not None]
        if dense:  # θ + δ (origin − θ) = origin + (1 − δ)(θ − origin)
            torch._foreach_lerp_([local[i] for i in dense], [entries[i][1] for i in dense], self.delta)
        scaled = [local[i] for i, (_, origin, a, _) in enumerate(entries) if origin is None and a is None]
        if scaled:
            torch._foreach_mul_(scaled, 1 - self.delta)
        for part, wait, k in self.jobs:
            # Whole tensors: every rank computes the same result and keeps its own shard.
            shrunk = wait()[k]
            _copy([local[i] for i in part], [distributed.local_part(s, entries[i][0]) for i, s in zip(part, shrunk)])


def run_trials(
    by_expert: list[list[tuple]],
    deltas: list[float],
    steps: list[int],
    base: Callable[[], float],
    value: Callable[[], float],
    keep: Callable[[int, float, float], bool],
    undo: list[tuple[list[torch.Tensor], list[torch.Tensor]]],
    offload: bool,
    ready: dict | None = None,
) -> set[torch.Tensor]:
    """Each expert index's shrink trials in turn (`HeldoutProbe._shrink`): `by_expert[e]` its
    entries (parameter, origin or None, LoRA A or None, inactive), `deltas[e]` its shrink
    fraction (0: no trial), `steps[e]` its most trials (each from where the last kept one
    left the update, stopping at the first refused), `base()` the held-out loss before any
    trial (already under way), `value()` the closure's held-out loss now, `keep(e, base,
    trial)` the Ledger's decision, `ready` the weights' events (`weights_mark`; None: the
    spectral trials' side stream waits for all the current stream's work). Appends to `undo`
    the tensors and saved values of every kept trial (undone by an exception until the
    measurement ends, the last first); with `offload`, the saved values go to host memory.
    Returns the tensors of inactive experts that a kept trial moved."""
    # Origins in host memory (`offload`) start on their way to the device now, and so does
    # every first spectral trial (on CUDA its work runs beside the baseline's forward).
    hosted = sorted(
        (e, i)
        for e, entries in enumerate(by_expert)
        for i, (p, origin, _, _) in enumerate(entries)
        if origin is not None and origin.device != p.device
    )
    fetched = fetch([(by_expert[e][i][1], by_expert[e][i][0].device) for e, i in hosted]) if hosted else None
    trials = [_Trial(entries, d, ready) if d else None for entries, d in zip(by_expert, deltas)]
    rebased: set[torch.Tensor] = set()
    current = base()
    if fetched is not None:
        for (e, i), origin in zip(hosted, fetched()):
            p, _, a, inactive = by_expert[e][i]
            by_expert[e][i] = (p, origin, a, inactive)
        del fetched
    for e, (entries, trial, delta) in enumerate(zip(by_expert, trials, deltas)):
        if trial is None:  # shrink 0: this expert has no trials
            continue
        local = [distributed.to_local(p) for p, _, _, _ in entries]
        for step in range(steps[e]):
            if step:  # the next trial starts from the update the kept one left
                trial = _Trial(entries, delta)
            saved = _backup(local)
            undo.append((local, saved))  # before the trial writes: an exception restores them
            trial.apply(entries, local)
            if step == steps[e] - 1:
                _drop_hosted(entries, hosted, e)
            trial_value = value()
            kept = keep(e, current, trial_value)
            if kept:
                current = trial_value  # `undo` keeps its saved values until the measurement ends
                rebased.update(p for p, _, _, inactive in entries if inactive)
                if offload and any(t.is_cuda for t in saved):
                    # (in host memory, so they are not on the device at the held-out backward's peak)
                    undo[-1] = (local, _backup(saved, pinned=True))
            else:
                _copy(local, saved)
                undo.pop()
            del saved
            if not kept:
                break
        _drop_hosted(entries, hosted, e)
    return rebased


def _drop_hosted(entries: list[tuple], hosted: list[tuple[int, int]], e: int) -> None:
    """Forget the device copies of expert `e`'s origins fetched from host memory: its trials
    have applied them, and the memory goes before the closure runs again."""
    for i in [i for h, i in hosted if h == e]:
        p, _, a, inactive = entries[i]
        entries[i] = (p, None, a, inactive)
