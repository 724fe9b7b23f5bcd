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
— vanish first; a nuclear-norm proximal step towards a lower rank. (Ledgers
saved before format version 6, or `heldout_shrink_spectral=False`, scale the
product by 1 − δ instead.) The held-out data chooses the strength per expert:
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
asks for 10 (`LORA_ONLY_MIN_SPAN`): a LoRA pair's first fit of the training
data can raise the held-out loss for a while and still pay off, since a pair
trained off B = 0 learns what comes next faster than a frozen one (on the
quality suite's quick shift regime, dropping from the first window cost MoLF-E
10% against waiting ten; `benches/policy_lab.py`, ninth round). Beside a dense
expert, which carries a module while its LoRA expert is out, it is 0.

Cost: one forward and backward of the closure per window, plus one forward
per expert index for the shrink trials; two extra copies of every routed expert
tensor (θ at the last measurement and the held-out gradient there) and, with
shrinkage on, a third of every dense expert tensor (where training began), kept
in the parameter dtype as per-parameter state `heldout_theta` / `heldout_grad` /
`heldout_origin`, so checkpoints resume the measurement exactly.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

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
    vanish first (a nuclear-norm proximal step). B' = B + (ΔW' − ΔW) A⁺, through thin QR
    factors of B and Aᵀ: the SVD is of an r x r core, never of the out x in product.
    Batched over leading dimensions; b: (..., out, r), a: (..., r, in)."""
    qb, rb = torch.linalg.qr(b)  # B = Q_B R_B
    ra = torch.linalg.qr(a.mT, mode="r").R  # Aᵀ = Q_A R_A, so B A = Q_B (R_B R_Aᵀ) Q_Aᵀ
    u, sv, vh = torch.linalg.svd(rb @ ra.mT, full_matrices=False)
    change = (sv - delta * sv[..., :1]).clamp_min(0) - sv
    # Q_Aᵀ A⁺ = (R_Aᵀ)⁺ (A = R_Aᵀ Q_Aᵀ with Q_A orthonormal).
    return b + qb @ (u * change.unsqueeze(-2)) @ vh @ torch.linalg.pinv(ra.mT)


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
            (descent, potential, moved), remember = self._sums(opt, window, rebased)
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
        its product's spectrum is soft-thresholded (a ledger saved before format version 6:
        B scaled about zero, which scales the product). Returns the tensors of inactive
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
        rebased: set[torch.Tensor] = set()
        base = self._value()
        for e, entries in enumerate(by_expert):
            local = [distributed.to_local(p) for p, _, _, _ in entries]
            saved = [t.clone() for t in local]
            undo.weights.append((local, saved))  # before the trial writes: an exception restores them
            _copy(local, self._shrunk(entries, saved, delta))
            trial = self._value()
            if opt.ledger.record_shrink(e, base, trial):
                base = trial  # kept; `undo` keeps its saved values until the measurement ends
                rebased.update(p for p, _, _, inactive in entries if inactive)
            else:
                _copy(local, saved)
                undo.weights.pop()
        return rebased

    @staticmethod
    def _shrunk(entries: list[tuple], saved: list[torch.Tensor], delta: float) -> list[torch.Tensor]:
        """The trial's local value of each entry's tensor: scaled by 1 - δ about its origin
        (zero for a LoRA B without its A), or a LoRA B spectrally shrunk with its A (whole
        tensors: every rank computes the same result and keeps its own shard)."""
        out: list[torch.Tensor | None] = [None] * len(entries)
        groups: dict[tuple, list[int]] = {}
        for i, ((p, origin, a, _), s) in enumerate(zip(entries, saved)):
            if a is None:
                out[i] = (1 - delta) * s if origin is None else origin + (1 - delta) * (s - origin)
            else:
                groups.setdefault((tuple(p.shape), tuple(a.shape), p.dtype), []).append(i)
        for idx in groups.values():  # one batched decomposition per shape
            bs = torch.stack([distributed.full(entries[i][0].detach()) for i in idx])
            as_ = torch.stack([distributed.full(entries[i][2].detach()) for i in idx])
            work = torch.promote_types(bs.dtype, torch.float32)
            shrunk = spectral_shrink_b(bs.to(work), as_.to(work), delta).to(bs.dtype)
            for i, b in zip(idx, shrunk):
                out[i] = distributed.local_part(b, entries[i][0])
        return out

    @staticmethod
    def _expert_tensors(opt: MoLFAdamW):
        """(group, parameter, its (module, expert) slot) of every routed expert tensor."""
        for group in opt.param_groups:
            if group["molf_role"] != "plain":
                for p, slot in zip(group["params"], group["molf_slots"]):
                    if expert_tag(p) is not None:
                        yield group, p, slot

    @torch.no_grad()
    def _sums(self, opt: MoLFAdamW, window: int, rebased: set[torch.Tensor]):
        """Per (module, expert): realized descent per step, potential, and whether it moved
        ((None, None, None) at the first measurement: only remember; one device-to-host
        transfer), and what `_commit` copies into the held-out state: (destinations, sources).
        Writes nothing but the held-out keys of a tensor that has none yet."""
        shrink = opt.ledger.heldout_shrink > 0
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        slots: list[int] = []
        for group, p, slot in self._expert_tensors(opt):
            state = opt.state[p]
            theta = distributed.to_local(p.detach())
            grad = self._grad(p, theta)
            if self.last_step:
                g32 = grad.float().reshape(-1)
                # The window's start: θ at the last measurement, or θ now where a kept trial
                # moved an inactive expert (not moved, for the window).
                prev = theta if p in rebased else distributed.to_local(state[THETA_KEY])
                # float32 math one tensor at a time: bounded temporaries on large models.
                delta = (theta.float() - prev.float()).reshape(-1)
                mean_grad = (distributed.to_local(state[GRAD_KEY]).float().reshape(-1) + g32) * 0.5
                realized, movement = torch.dot(mean_grad, delta), delta.abs().sum()
                if "exp_avg" in state:
                    (beta1, beta2), t = group["betas"], float(state["step"])
                    m_hat = distributed.to_local(state["exp_avg"]).float().reshape(-1) / (1 - beta1**t)
                    v_hat = distributed.to_local(state["exp_avg_sq"]).float().reshape(-1) / (1 - beta2**t)
                    potential = float(group["lr"]) * torch.dot(g32, m_hat / (v_hat.sqrt() + group["eps"]))
                else:  # no gradient so far: no Adam step to take
                    potential = torch.zeros_like(realized)
                rows.append(torch.stack([realized, potential, movement]).double())
                slots.append(slot)
            if THETA_KEY not in state:
                # A tensor measured before its first gradient: it has not moved, and a shrink
                # trial skips a dense tensor without state, so its origin is θ now.
                self.init_state(state, p, shrink)
            dst += [distributed.to_local(state[THETA_KEY]), distributed.to_local(state[GRAD_KEY])]
            src += [theta, grad]
        if not self.last_step:  # nothing moved under observation yet
            return (None, None, None), (dst, src)
        M, E = opt._shape
        flat = torch.stack(rows)
        group = opt._score_group()
        if group is not None:  # FSDP2: the shards' partial sums add up to the whole tensor's
            torch.distributed.all_reduce(flat, group=group)
        host = flat.cpu().numpy()
        idx = np.asarray(slots, dtype=np.int64)

        def per_slot(col: np.ndarray) -> np.ndarray:
            return np.bincount(idx, weights=col, minlength=M * E).reshape(M, E)

        # Non-finite values reach the Ledger as they are: it keeps only finite ones.
        sums = -per_slot(host[:, 0]) / window, per_slot(host[:, 1]), per_slot(host[:, 2]) > 0
        return sums, (dst, src)

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
