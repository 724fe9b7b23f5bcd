"""Policy "heldout": routing by what each expert's updates do to a held-out loss.

Every `every` routing steps the optimizer calls the user's `heldout()` closure
(a loss on held-out data), back-propagates it and, per module and expert:

* realized descent: the held-out loss decrease the expert's own parameter
  movement since the previous measurement caused, by the trapezoid rule
  ΔL ≈ ⟨(g_prev + g_now)/2, θ_now − θ_prev⟩ (exact on a quadratic, so the
  curvature cost of fitting noise is counted, which a first-order score
  misses), per step of the window;
* potential: the first-order held-out decrease one Adam step of the expert
  would buy now, η·⟨g_now, m̂/(√v̂+ε)⟩ (η: the expert's rate, its group's lr
  times its multiplier below) — defined for experts that did not move, so a
  dropped expert can come back when the data says it would help.

After each window the Ledger adapts each expert's learning-rate multiplier c
(`heldout_adapt_rate`, on by default; `Heldout(adapt_rate=False)`: off): ×`up` (to `cap`)
where the window's realized descent is positive and at least `trust` × the
expert's potential (the loss near linear along the update), ×`down` (to `floor`,
by default the set rate) where negative; the optimizer's every step path scales
the expert's AdamW update by c.

Before each measurement, held-out shrinkage (`heldout_shrink` δ, per expert; by default
0.1 for a dense expert, `DENSE_SHRINK`, and 0.05 for a LoRA expert, `LORA_SHRINK`):
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
A kept trial is followed by another from where it left the update, up to
`heldout_shrink_steps` per expert (by default 2 for a LoRA expert beside a dense
expert, `LORA_SHRINK_STEPS`, else 1), stopping at the first refused.
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
per expert index for the shrink trials (and per repeated trial); two extra copies of every routed expert
tensor (θ at the last measurement and the held-out gradient there) and, with
shrinkage on, a third of every dense expert tensor (where training began), kept
in the parameter dtype as per-parameter state `heldout_theta` / `heldout_grad` /
`heldout_origin`, so checkpoints resume the measurement exactly. During a
measurement, the values a kept shrink trial replaced (so that an exception can
undo it), in one buffer per dtype. With `offload`, all of them in pinned host
memory on CUDA (`molf._offload`). The probe's own work is batched: the sums in one
Triton pass on CUDA (`molf._probe_sums`, whose tables also serve the commit's copies;
elsewhere over tensors of one size at once), the spectral trial's Gram products per shape,
float64 r x r transforms and shrunk B's (on CUDA batched matrix products on a side stream,
beside the trials' baseline forward, which is launched first), multi-tensor writes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import distributed
from ._core import ConfigError, Ledger, Router, StateError
from ._expert_view import ExpertView
from ._offload import copy_to_host, host_copy, host_zeros
from ._shrink import _copy, run_trials, spectral_shrink_b, weights_mark
from ._window_sums import tensor_sums
from .wrap import expert_tag

__all__ = [
    "HeldoutProbe",
    "spectral_shrink_b",
    "LORA_ONLY_MIN_SPAN",
    "DENSE_SHRINK",
    "LORA_SHRINK",
    "LORA_SHRINK_STEPS",
    "THETA_KEY",
    "GRAD_KEY",
    "ORIGIN_KEY",
]

# heldout_min_span where every expert is a LoRA expert, and each kind of expert's heldout_shrink
# (see the module docstring).
LORA_ONLY_MIN_SPAN = 10
DENSE_SHRINK = 0.1
LORA_SHRINK = 0.05
LORA_SHRINK_STEPS = 2  # a LoRA expert's trials per measurement beside a dense expert

THETA_KEY = "heldout_theta"
GRAD_KEY = "heldout_grad"
ORIGIN_KEY = "heldout_origin"


class _Undo:
    """What a measurement may change, as it was before it began: the Router's and Ledger's
    bytes, `last_step`, which held-out state keys existed, the RNG states, and the saved
    values of the shrink trials not undone yet (`_shrink` appends them). Not the training
    gradients: the step has used them, and the measurement frees them as it begins."""

    def __init__(self, view: ExpertView, probe: HeldoutProbe, params: list[torch.Tensor]) -> None:
        self.router, self.ledger = view.router.to_bytes(), view.ledger.to_bytes()
        self.last_step = probe.last_step
        # Tensors without held-out state (or without any state): `_sums` creates it.
        self.keys = {
            p: None if p not in view.state else set(view.state[p])
            for _, p, _ in view.expert_tensors()
            if THETA_KEY not in view.state.get(p, ())
        }
        self.rng = torch.get_rng_state()
        self.cuda_rng = {d: torch.cuda.get_rng_state(d) for d in {p.device for p in params if p.is_cuda}}
        self.weights: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    @torch.no_grad()
    def restore(self, view: ExpertView, probe: HeldoutProbe, params: list[torch.Tensor]) -> None:
        for local, saved in reversed(self.weights):
            _copy(local, saved)
        for p, keys in self.keys.items():
            if keys is None:
                view.state.pop(p, None)
            else:
                for k in set(view.state[p]) - keys:
                    del view.state[p][k]
        for p in params:
            p.grad = None  # a partial held-out gradient
        view.restore_routing(Router.from_bytes(self.router), Ledger.from_bytes(self.ledger))
        probe.last_step = self.last_step
        torch.set_rng_state(self.rng)
        for d, state in self.cuda_rng.items():
            torch.cuda.set_rng_state(state, d)


class HeldoutProbe:
    """The measurement half of policy "heldout"; the decisions live in the Rust core."""

    offload = False  # (what a probe pickled before the setting existed did)
    _copies = None  # the events after the last commit's copies into host memory (`offload`)

    def __init__(self, loss_fn: Callable[[], torch.Tensor], every: int, offload: bool = False) -> None:
        if not callable(loss_fn):
            raise ConfigError(f"heldout must be a callable returning a held-out loss tensor, got {loss_fn!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"heldout_every must be an integer >= 1, got {every!r}")
        self.loss_fn = loss_fn
        self.every = every
        self.offload = offload  # the probe's copies of CUDA tensors in host memory
        self.last_step = 0  # router step of the last measurement (0: none yet)

    def due(self, router_step: int) -> bool:
        return router_step - self.last_step >= self.every

    def measure(self, source: Any) -> None:
        """Shrink trials, then the held-out gradient, the window's realized descent and each
        expert's potential, then the Ledger's EMA and the Router's regate. Leaves every
        `.grad` None. `source`: the optimizer (the probe works through the `ExpertView` its
        `expert_view()` hands out), or such a view.

        The training gradients are freed as it begins (the step has used them; kept, they
        would sit beside the held-out gradient at the probe's peak memory). Otherwise all or
        nothing: on any exception (a KeyboardInterrupt, a CUDA out-of-memory error in the
        closure) the weights, the held-out state, the Ledger, the Router, `last_step` and the
        RNG are as they were before (a checkpoint never saves a trial's shrunk weights), every
        `.grad` is None, the exception propagates and the next step measures again. Nothing
        is copied for this but the Ledger's and Router's bytes and, until the measurement
        ends, the tensors of kept shrink trials (a trial already keeps those)."""
        view: ExpertView = source if isinstance(source, ExpertView) else source.expert_view()
        params = view.params()
        for p in params:
            p.grad = None
        undo = _Undo(view, self, params)
        commit = None
        try:
            if any(view.ledger.heldout_shrink):
                # The trials' baseline, the held-out loss as it is, launched first: the trials' setup
                # runs while the device computes it (on CUDA their tensor work too, from `ready`).
                ready = weights_mark(params)
                rebased = self._shrink(view, undo, self._launch_value(), ready)
            else:
                rebased = set()
            with torch.enable_grad():
                loss = self.loss_fn()
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                    raise ConfigError(
                        "heldout() must return a scalar loss tensor that requires grad (computed under the "
                        f"model's parameters), got {type(loss).__name__}"
                        + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
                    )
                # Gradients land in this optimizer's expert tensors only, the sums' operands (not a
                # tied embedding: 0.5 GB at the probe's peak in a 1.5B model); none if all are frozen;
                # under FSDP2 (sharded parameters are no graph leaves) in all.
                own = [p for _, p, _ in view.expert_tensors() if p.requires_grad]
                if own:
                    loss.backward(inputs=None if any(distributed.is_sharded(p) for p in own) else own)
            window = view.router.step - self.last_step
            remember: tuple[list, list, list] = ([], [], [])
            descent, potential, moved = self._sums(view, window, rebased, remember)
            if descent is not None:  # None: the first measurement, nothing moved under observation yet
                view.ledger.record_heldout(descent, moved)
                view.ledger.adapt_heldout_rate(descent, potential)
                view.router.regate(view.ledger.heldout_descent(), potential)
            # The commit: past this point an interrupt completes the measurement (the commit is
            # idempotent) instead of undoing it.
            commit = functools.partial(self._commit, remember, params, view.router.step)
            commit()
        except BaseException:
            if commit is not None:
                commit()
            else:
                undo.restore(view, self, params)
            raise

    @torch.no_grad()
    def _commit(self, remember: tuple[list, list, list], params: list[torch.Tensor], step: int) -> None:
        """θ and the held-out gradient into the held-out state, the measurement's step, no `.grad`.
        `remember`: destinations, sources, and functions that copy the rest (`_sums`). Into host
        memory (`offload`) without a host wait: the copies run on the current stream, before
        anything later on it writes θ or reuses the gradients' memory, and `settle` waits for
        them before the host reads them."""
        dst, src, copies = remember
        for copy in copies:
            copy()
        self._copies = copy_to_host(dst, src) or self._copies
        self.last_step = step
        for p in params:
            p.grad = None

    def _value(self) -> float:
        """The closure's held-out loss as a number, averaged over data-parallel ranks."""
        return self._launch_value()()

    def _launch_value(self) -> Callable[[], float]:
        """Call the closure now (its work queued on the device); the returned function waits
        for the loss and gives `_value`'s number."""
        loss = self.loss_fn()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ConfigError(f"heldout() must return a scalar loss tensor, got {type(loss).__name__}")
        return lambda: distributed.world_mean(float(loss.detach()))

    @torch.no_grad()
    def _shrink(self, view: ExpertView, undo: _Undo, base: Callable[[], float], ready: dict) -> set[torch.Tensor]:
        """One shrink trial per expert index (see the module docstring), `base` the held-out
        loss before them (`_launch_value`), `ready` the weights' events (`weights_mark`): a dense expert's
        weight and bias scaled about where they started; a LoRA expert's B rewritten so that
        its product's spectrum is soft-thresholded (with ``shrink_spectral`` False, and for an
        expert in the "svd" form, whose product is not B·A: B scaled about zero, which scales
        the product). Returns the tensors of inactive
        experts that a kept trial moved: the window counts them as not moved (an inactive
        expert has not moved since the last measurement; its record takes in training movement
        only, and its span pauses)."""
        deltas = view.ledger.heldout_shrink
        spectral = view.ledger.shrink_spectral
        E = view.shape[1]
        active = view.router.incumbents().reshape(-1)
        tensors = list(view.expert_tensors())
        svd_form = {slot for _, p, slot in tensors if expert_tag(p).part == "E"}
        lora_a = {slot: p for _, p, slot in tensors if spectral and slot not in svd_form and expert_tag(p).part == "A"}
        # Per expert index: (parameter, its origin (dense; None: LoRA's B), its LoRA A (None:
        # dense), whether its expert is inactive and measured before).
        by_expert: list[list[tuple]] = [[] for _ in range(E)]
        for _, p, slot in tensors:
            tag = expert_tag(p)
            state = view.state.get(p, {})
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
                by_expert[slot % E].append((p, None, lora_a.get(slot), inactive))
        steps = view.ledger.heldout_shrink_steps
        return run_trials(
            by_expert, deltas, steps, base, self._value, view.ledger.record_shrink, undo.weights, self.offload, ready
        )

    @torch.no_grad()
    def _sums(self, view: ExpertView, window: int, rebased: set[torch.Tensor], remember: tuple[list, list, list]):
        """Per (module, expert): realized descent per step, potential, and whether it moved
        ((None, None, None) at the first measurement: only remember). Appends to `remember`
        what `_commit` copies into the held-out state (destinations, sources, and functions
        that copy the Triton pass's items over its tables); writes nothing but the held-out
        keys of a tensor that has none yet. The sums: `molf._window_sums`. One device-to-host
        transfer."""
        shrink = any(view.ledger.heldout_shrink)
        rate = view.ledger.heldout_rate().reshape(-1)  # the potential is a step at the expert's rate
        dst, src, copies = remember
        pairs: list[tuple] = []  # (θ, g, their held-out state's tensors, whether the window starts at θ)
        items: list[tuple] = []
        for group, p, slot in view.expert_tensors():
            state = view.state[p]
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
                        (float(group["lr"]) * float(rate[slot]), *group["betas"], float(group["eps"])),
                    )
                else:  # no gradient so far: no Adam step to take
                    adam = None
                items.append((slot, theta, prev, grad, distributed.to_local(state[GRAD_KEY]), adam))
            if THETA_KEY not in state:
                # A tensor measured before its first gradient: it has not moved, and a shrink
                # trial skips a dense tensor without state, so its origin is θ now.
                self.init_state(state, p, shrink)
            pairs.append((theta, grad, state[THETA_KEY], state[GRAD_KEY], p in rebased))
        slots, flat, covered = tensor_sums(items, copies) if self.last_step else ([], None, set())
        for theta, grad, theta_state, grad_state, at_theta in pairs:
            if theta not in covered or at_theta:  # (where the window starts at θ, the pass copied θ onto itself)
                dst.append(distributed.to_local(theta_state))
                src.append(theta)
            if theta not in covered:
                dst.append(distributed.to_local(grad_state))
                src.append(grad)
        if not self.last_step:  # nothing moved under observation yet
            return None, None, None
        M, E = view.shape
        group = view.score_group()
        if group is not None:  # FSDP2: the shards' partial sums add up to the whole tensor's
            torch.distributed.all_reduce(flat, group=group)
        host = flat.cpu().numpy()
        idx = np.asarray(slots, dtype=np.int64)

        def per_slot(col: np.ndarray) -> np.ndarray:
            return np.bincount(idx, weights=col, minlength=M * E).reshape(M, E)

        # Non-finite values reach the Ledger as they are: it keeps only finite ones.
        return -per_slot(host[:, 0]) / window, per_slot(host[:, 1]), per_slot(host[:, 2]) > 0

    @staticmethod
    def _grad(p: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(theta) if p.grad is None else distributed.to_local(p.grad)

    def init_state(self, state: dict, p: torch.Tensor, shrink: bool) -> None:
        """The held-out keys of a routed tensor's fresh optimizer state, so that every
        checkpoint template (torch.distributed.checkpoint loads only the keys a fresh
        optimizer's state has) carries them. θ as it is: a tensor without a gradient so
        far has not moved since the last measurement, nor since training began (the origin
        of a dense tensor, with shrinkage on). With `offload`, in pinned host memory."""
        hosted = self.offload and p.is_cuda
        theta = p.detach()
        state[THETA_KEY] = host_copy(theta) if hosted else theta.clone(memory_format=torch.preserve_format)
        state[GRAD_KEY] = host_zeros(theta) if hosted else torch.zeros_like(p, memory_format=torch.preserve_format)
        if shrink and expert_tag(p).kind == "dense":
            state[ORIGIN_KEY] = host_copy(theta) if hosted else theta.clone(memory_format=torch.preserve_format)

    def place_state(self, state: dict) -> None:
        """After a load (torch moves every state tensor to its parameter's device): the held-out
        copies of CUDA parameters back into pinned host memory, with `offload`."""
        if not self.offload:
            return
        for p, s in state.items():
            for key in (THETA_KEY, GRAD_KEY, ORIGIN_KEY):
                t = s.get(key)
                if t is not None and p.is_cuda and (t.is_cuda or not t.is_pinned()):
                    s[key] = host_copy(t)

    def settle(self) -> None:
        """Wait for the last commit's copies into host memory (`offload`): before anything
        on the host reads the held-out state (a state dict, pickling)."""
        for event in self._copies or ():
            event.synchronize()
        self._copies = None

    def __getstate__(self) -> dict:
        self.settle()
        return self.__dict__.copy()
