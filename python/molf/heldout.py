"""Policy "heldout": routing by what each expert's updates do to a held-out loss.

Every `every` routing steps the optimizer calls the user's `heldout()` closure
(a loss on held-out data), back-propagates it and, per module and expert:

* realized descent: the held-out loss decrease the expert's own parameter
  movement since the previous measurement caused, by the trapezoid rule
  ΔL ≈ ⟨(g_prev + g_now)/2, θ_now − θ_prev⟩ (exact on a quadratic, so the
  curvature cost of fitting noise is counted, which a first-order score
  misses), per step of the window;
* potential: the first-order held-out decrease one Adam step of the expert
  would buy now, η·⟨g_now, m̂/(√v̂+ε)⟩ — defined for experts that did not
  move, so a dropped expert can come back when the data says it would help.

Before each measurement, held-out shrinkage (`heldout_shrink` δ, default 0.1):
for each expert index in turn (all modules together), its update since the
start is shrunk, the closure is evaluated once more (no backward), and the
shrunk update is kept if the held-out loss fell (the Ledger decides and
counts). A dense expert's update — its weights' distance from where training
began — is scaled by 1 − δ: an L2 pull towards the starting point. A LoRA
expert's update, the product s·B·A, has its singular values soft-thresholded,
σ_j ← max(σ_j − δ·σ_1, 0) (B changes, A stays; `spectral_shrink_b`): the
largest shrinks by 1 − δ as under scaling, the others by the same amount, so
the weakest directions — where a low-rank update fits the training set's noise
— vanish first; a nuclear-norm proximal step towards a lower rank.
(`heldout_shrink_spectral=False` scales the product by 1 − δ instead.)
The held-out data chooses the strength per expert:
where an expert's update fits noise (little data, noisy labels), it shrinks
window after window while the other expert goes on learning; where it helps,
nothing is kept. A kept trial that shrinks a dropped expert does not count as
its movement: the expert stays unmoved for the Ledger (its record and span
pause).

The Ledger smooths the realized descent (EMA over windows, experts that moved
only; its span grows with the windows the expert has moved in since its last
pause, `heldout_horizon`, so a returning expert's old record fades fast) and
the Router's `regate` drops experts whose movement raised the loss and re-admits
dropped ones `min_dwell` steps after their drop (see `molf_rs` `Router::regate`).
A record judges its expert once it spans `heldout_min_span` windows (the
Ledger's `heldout_descent`). Where every expert is a LoRA expert the optimizer
asks for 10 (`LORA_ONLY_MIN_SPAN`): a LoRA pair's first fit can raise the
held-out loss for a while and still pay off (why: docs/algorithm.md, "Minimum
span"). Beside a dense expert, which carries a module while its LoRA expert is
out, it is 0.

Cost: one forward and backward of the closure per window, plus one forward
per expert index for the shrink trials; two extra copies of every routed expert
tensor (θ at the last measurement and the held-out gradient there) and, with
shrinkage on, a third of every dense expert tensor (where training began), kept
in the parameter dtype as per-parameter state `heldout_theta` / `heldout_grad` /
`heldout_origin`, so checkpoints resume the measurement exactly. During a
measurement, the values a kept shrink trial replaced (so that an exception can
undo it). The probe's own work is batched: the sums over tensors of one size at
once, the spectral trial's Gram products per shape and one float64 r x r
eigen-decomposition per module (on CUDA in worker threads, while the closure's
forwards run), multi-tensor writes.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import distributed
from ._core import ConfigError, Ledger, Router, StateError
from .wrap import expert_tag

if TYPE_CHECKING:
    from .optimizer import MoLFAdamW

__all__ = ["HeldoutProbe", "spectral_shrink_b", "LORA_ONLY_MIN_SPAN", "THETA_KEY", "GRAD_KEY", "ORIGIN_KEY"]

# heldout_min_span where every expert is a LoRA expert (see the module docstring).
LORA_ONLY_MIN_SPAN = 10

THETA_KEY = "heldout_theta"
GRAD_KEY = "heldout_grad"
ORIGIN_KEY = "heldout_origin"


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


class _Undo:
    """What a measurement may change, as it was before it began: the Router's and Ledger's
    bytes, `last_step`, every `.grad` (references: the measurement sets them None before its
    backward, which allocates new ones), which held-out state keys existed, the RNG states,
    and the saved values of the shrink trials not undone yet (`_shrink` appends them)."""

    def __init__(self, opt: MoLFAdamW, probe: HeldoutProbe, params: list[torch.Tensor]) -> None:
        self.router, self.ledger = opt.router.to_bytes(), opt.ledger.to_bytes()
        self.last_step = probe.last_step
        self.grads = [p.grad for p in params]
        # Tensors without held-out state (or without any state): `_sums` creates it.
        self.keys = {
            p: None if p not in opt.state else set(opt.state[p])
            for _, p, _ in HeldoutProbe._expert_tensors(opt)
            if THETA_KEY not in opt.state.get(p, ())
        }
        self.rng = torch.get_rng_state()
        self.cuda_rng = {d: torch.cuda.get_rng_state(d) for d in {p.device for p in params if p.is_cuda}}
        self.weights: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    @torch.no_grad()
    def restore(self, opt: MoLFAdamW, probe: HeldoutProbe, params: list[torch.Tensor]) -> None:
        for local, saved in reversed(self.weights):
            _copy(local, saved)
        for p, keys in self.keys.items():
            if keys is None:
                opt.state.pop(p, None)
            else:
                for k in set(opt.state[p]) - keys:
                    del opt.state[p][k]
        for p, g in zip(params, self.grads):
            p.grad = g
        opt._router, opt._ledger = Router.from_bytes(self.router), Ledger.from_bytes(self.ledger)
        probe.last_step = self.last_step
        torch.set_rng_state(self.rng)
        for d, state in self.cuda_rng.items():
            torch.cuda.set_rng_state(state, d)


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


class HeldoutProbe:
    """The measurement half of policy "heldout"; the decisions live in the Rust core."""

    def __init__(self, loss_fn: Callable[[], torch.Tensor], every: int) -> None:
        if not callable(loss_fn):
            raise ConfigError(f"heldout must be a callable returning a held-out loss tensor, got {loss_fn!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"heldout_every must be an integer >= 1, got {every!r}")
        self.loss_fn = loss_fn
        self.every = every
        self.last_step = 0  # router step of the last measurement (0: none yet)

    def due(self, router_step: int) -> bool:
        return router_step - self.last_step >= self.every

    def measure(self, opt: MoLFAdamW) -> None:
        """Shrink trials, then the held-out gradient, the window's realized descent and each
        expert's potential, then the Ledger's EMA and the Router's regate. Leaves every
        `.grad` None.

        All or nothing: on any exception (a KeyboardInterrupt, a CUDA out-of-memory error in
        the closure) the weights, the held-out state, every `.grad`, the Ledger, the Router,
        `last_step` and the RNG are as they were before (a checkpoint never saves a trial's
        shrunk weights), the exception propagates and the next step measures again. Nothing
        is copied for this but the Ledger's and Router's bytes and, until the measurement
        ends, the tensors of kept shrink trials (a trial already keeps those)."""
        params = [p for g in opt.param_groups for p in g["params"]]
        undo = _Undo(opt, self, params)
        commit = None
        try:
            for p in params:
                p.grad = None
            rebased = self._shrink(opt, undo) if opt.ledger.heldout_shrink > 0 else set()
            with torch.enable_grad():
                loss = self.loss_fn()
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                    raise ConfigError(
                        "heldout() must return a scalar loss tensor that requires grad (computed under the "
                        f"model's parameters), got {type(loss).__name__}"
                        + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
                    )
                # Gradients land in this optimizer's parameters only (another optimizer's stay as
                # they are), except under FSDP2, whose sharded parameters are not graph leaves.
                own = [p for p in params if p.requires_grad]
                loss.backward(inputs=None if any(distributed.is_sharded(p) for p in own) else own)
            window = opt.router.step - self.last_step
            remember: tuple[list, list] = ([], [])
            descent, potential, moved = self._sums(opt, window, rebased, remember)
            if descent is not None:  # None: the first measurement, nothing moved under observation yet
                opt.ledger.record_heldout(descent, moved)
                opt.router.regate(opt.ledger.heldout_descent(), potential)
            # The commit: past this point an interrupt completes the measurement (the commit is
            # idempotent) instead of undoing it.
            commit = functools.partial(self._commit, remember, params, opt.router.step)
            commit()
        except BaseException:
            if commit is not None:
                commit()
            else:
                undo.restore(opt, self, params)
            raise

    @torch.no_grad()
    def _commit(self, remember: tuple[list, list], params: list[torch.Tensor], step: int) -> None:
        """θ and the held-out gradient into the held-out state, the measurement's step, no `.grad`."""
        _copy(*remember)
        self.last_step = step
        for p in params:
            p.grad = None

    def _value(self) -> float:
        """The closure's held-out loss as a number, averaged over data-parallel ranks."""
        loss = self.loss_fn()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ConfigError(f"heldout() must return a scalar loss tensor, got {type(loss).__name__}")
        return distributed.world_mean(float(loss.detach()))

    @torch.no_grad()
    def _shrink(self, opt: MoLFAdamW, undo: _Undo) -> set[torch.Tensor]:
        """One shrink trial per expert index (see the module docstring): a dense expert's
        weight and bias scaled about where they started; a LoRA expert's B rewritten so that
        its product's spectrum is soft-thresholded (with ``shrink_spectral`` False: B scaled
        about zero, which scales the product). Returns the tensors of inactive
        experts that a kept trial moved: the window counts them as not moved (an inactive
        expert has not moved since the last measurement; its record takes in training movement
        only, and its span pauses)."""
        delta = opt.ledger.heldout_shrink
        spectral = opt.ledger.shrink_spectral
        E = opt._shape[1]
        active = opt.router.incumbents().reshape(-1)
        lora_a = {slot: p for _, p, slot in self._expert_tensors(opt) if spectral and expert_tag(p).part == "A"}
        # Per expert index: (parameter, its origin (dense; None: LoRA's B), its LoRA A (None:
        # dense), whether its expert is inactive and measured before).
        by_expert: list[list[tuple]] = [[] for _ in range(E)]
        for _, p, slot in self._expert_tensors(opt):
            tag = expert_tag(p)
            state = opt.state.get(p, {})
            inactive = not active[slot] and THETA_KEY in state
            if tag.kind == "dense":
                if THETA_KEY not in state:  # no state yet: it has not moved
                    continue
                if ORIGIN_KEY not in state:
                    raise StateError(
                        f"held-out shrinkage needs the starting point of {tag.module}'s dense weights, which "
                        "this optimizer state lacks (saved with heldout_shrink=0? pass heldout_shrink=0 again)"
                    )
                by_expert[slot % E].append((p, distributed.to_local(state[ORIGIN_KEY]), None, inactive))
            elif tag.part == "B":
                by_expert[slot % E].append((p, None, lora_a[slot] if spectral else None, inactive))
        # Every spectral trial starts now (on CUDA its r x r work runs while the closure does).
        trials = [_Trial(entries, delta) for entries in by_expert]
        rebased: set[torch.Tensor] = set()
        base = self._value()
        for e, (entries, trial) in enumerate(zip(by_expert, trials)):
            local = [distributed.to_local(p) for p, _, _, _ in entries]
            saved = [t.clone() for t in local]
            undo.weights.append((local, saved))  # before the trial writes: an exception restores them
            trial.apply(entries, local)
            value = self._value()
            if opt.ledger.record_shrink(e, base, value):
                base = value  # kept; `undo` keeps its saved values until the measurement ends
                rebased.update(p for p, _, _, inactive in entries if inactive)
            else:
                _copy(local, saved)
                undo.weights.pop()
        return rebased

    @staticmethod
    def _expert_tensors(opt: MoLFAdamW):
        """(group, parameter, its (module, expert) slot) of every routed expert tensor."""
        for group in opt.param_groups:
            if group["molf_role"] != "plain":
                for p, slot in zip(group["params"], group["molf_slots"]):
                    if expert_tag(p) is not None:
                        yield group, p, slot

    @torch.no_grad()
    def _sums(self, opt: MoLFAdamW, window: int, rebased: set[torch.Tensor], remember: tuple[list, list]):
        """Per (module, expert): realized descent per step, potential, and whether it moved
        ((None, None, None) at the first measurement: only remember). Appends to `remember`
        what `_commit` copies into the held-out state (destinations, sources); writes nothing
        but the held-out keys of a tensor that has none yet. Tensors of one size and device
        are summed together (`_batch_sums`); one device-to-host transfer."""
        shrink = opt.ledger.heldout_shrink > 0
        dst, src = remember
        batches: dict[tuple, list[tuple]] = {}
        for group, p, slot in self._expert_tensors(opt):
            state = opt.state[p]
            theta = distributed.to_local(p.detach())
            grad = self._grad(p, theta)
            if self.last_step:
                # The window's start: θ at the last measurement, or θ now where a kept trial
                # moved an inactive expert (not moved, for the window).
                prev = theta if p in rebased else distributed.to_local(state[THETA_KEY])
                if "exp_avg" in state:
                    adam = (
                        distributed.to_local(state["exp_avg"]),
                        distributed.to_local(state["exp_avg_sq"]),
                        state["step"],
                        (float(group["lr"]), *group["betas"], float(group["eps"])),
                    )
                else:  # no gradient so far: no Adam step to take
                    adam = None
                key = (theta.numel(), theta.device, adam is not None)
                batches.setdefault(key, []).append(
                    (slot, theta, prev, grad, distributed.to_local(state[GRAD_KEY]), adam)
                )
            if THETA_KEY not in state:
                # A tensor measured before its first gradient: it has not moved, and a shrink
                # trial skips a dense tensor without state, so its origin is θ now.
                self.init_state(state, p, shrink)
            dst += [distributed.to_local(state[THETA_KEY]), distributed.to_local(state[GRAD_KEY])]
            src += [theta, grad]
        if not self.last_step:  # nothing moved under observation yet
            return None, None, None
        M, E = opt._shape
        slots: list[int] = []
        rows: list[torch.Tensor] = []
        for (numel, device, _), items in batches.items():
            per = max(1, self._batch_elements(device) // numel)
            for start in range(0, len(items), per):
                part = items[start : start + per]
                slots += [item[0] for item in part]
                rows.append(self._batch_sums(part))
        flat = torch.cat([r.to(rows[0].device) for r in rows])
        group = opt._score_group()
        if group is not None:  # FSDP2: the shards' partial sums add up to the whole tensor's
            torch.distributed.all_reduce(flat, group=group)
        host = flat.cpu().numpy()
        idx = np.asarray(slots, dtype=np.int64)

        def per_slot(col: np.ndarray) -> np.ndarray:
            return np.bincount(idx, weights=col, minlength=M * E).reshape(M, E)

        # Non-finite values reach the Ledger as they are: it keeps only finite ones.
        return -per_slot(host[:, 0]) / window, per_slot(host[:, 1]), per_slot(host[:, 2]) > 0

    @staticmethod
    def _batch_elements(device: torch.device) -> int:
        """Elements of the tensors summed together at most (at least one tensor): on the CPU
        one tensor at a time (there are no kernel launches to save, and stacking copies)."""
        return 0 if device.type == "cpu" else 1 << 24

    @staticmethod
    def _batch_sums(items: list[tuple]) -> torch.Tensor:
        """(realized, potential, movement) in float64 of each of `items` (slot, θ, θ_prev, g,
        g_prev, Adam's (m, v, step, (lr, β1, β2, ε)) or None), tensors of one size and device:
        each operand stacked into one float32 (n, numel) matrix, so a few launches cover them
        all, and the temporaries stay bounded (`_batch_elements`). (One item: no stacking copy;
        so no operand is written to.)"""

        def operand(get: Callable[[tuple], torch.Tensor]) -> torch.Tensor:
            if len(items) == 1:
                return get(items[0]).reshape(1, -1).float()
            return torch.stack([get(item).reshape(-1) for item in items]).float()

        delta = operand(lambda item: item[1]) - operand(lambda item: item[2])
        g = operand(lambda item: item[3])
        # ⟨(g_prev + g)/2, θ − θ_prev⟩
        realized = (operand(lambda item: item[4]) + g).mul_(delta).sum(1).mul_(0.5)
        movement = torch.linalg.vector_norm(delta, ord=1, dim=1)
        if items[0][5] is None:
            potential = torch.zeros_like(realized)
        else:  # η ⟨g, m̂ / (√v̂ + ε)⟩ = η / (1 − β1^t) ⟨g, m / (√v / √(1 − β2^t) + ε)⟩
            steps = torch.stack([item[5][2] for item in items]).tolist()
            hyper = [
                (lr / (1 - beta1**t), (1 - beta2**t) ** -0.5, eps)
                for t, (_, _, _, _, _, (_, _, _, (lr, beta1, beta2, eps))) in zip(steps, items)
            ]
            scale, inv_sqrt_bc2, eps = torch.tensor(hyper, dtype=torch.float32).to(g.device).unsqueeze(-1).unbind(1)
            denom = torch.addcmul(eps, operand(lambda item: item[5][1]).sqrt(), inv_sqrt_bc2)
            potential = scale.squeeze(-1) * (operand(lambda item: item[5][0]) * g).div_(denom).sum(1)
        return torch.stack([realized, potential, movement], dim=1).double()

    @staticmethod
    def _grad(p: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(theta) if p.grad is None else distributed.to_local(p.grad)

    @staticmethod
    def init_state(state: dict, p: torch.Tensor, shrink: bool) -> None:
        """The held-out keys of a routed tensor's fresh optimizer state, so that every
        checkpoint template (torch.distributed.checkpoint loads only the keys a fresh
        optimizer's state has) carries them. θ as it is: a tensor without a gradient so
        far has not moved since the last measurement, nor since training began (the origin
        of a dense tensor, with shrinkage on)."""
        state[THETA_KEY] = p.detach().clone(memory_format=torch.preserve_format)
        state[GRAD_KEY] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if shrink and expert_tag(p).kind == "dense":
            state[ORIGIN_KEY] = p.detach().clone(memory_format=torch.preserve_format)
