"""`MoLFAdamW`: AdamW whose update goes, per wrapped module and step, to the
expert(s) that the Rust router picks from gradient-guided scores (SPEC §2).

Laid out like torch's `torch/optim/adam.py`: `__init__` checks the arguments
(`molf._options`) and builds the param groups (`molf._groups`), `_init_group`
creates state lazily, `step()` runs one of two cores — the foreach path
(`molf._foreach`) or the fused Triton path (`molf._fused_path`) — whose score
sums (`molf._score_sources`) go to the Rust router in one call. Checkpoint
encoding and checks live in `molf.checkpoint`."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from . import _kernels, distributed
from ._checkpointing import _Checkpointing
from ._core import ConfigError, Ledger, Router
from ._foreach import _GroupWork, foreach_moments, scratch_for
from ._fused_path import build_plan, device_decision, fused_device_step, fused_kernels, fused_moments, plan_signature
from ._groups import build_groups, check_added_group, resolve_state_dtype, state_dtype_for
from ._options import DEFAULT_LR, check_options
from ._routing import _Routing
from ._score_sources import _ScoreSources
from .heldout import THETA_KEY, HeldoutProbe
from .routing import SCORES, Policy, TopK, check_policy
from .routing_log import LogSettings
from .wrap import expert_tag

__all__ = ["MoLFAdamW", "SCORES"]


class MoLFAdamW(_Routing, _Checkpointing, torch.optim.Optimizer):
    """AdamW with per-module routing between the experts of molf-wrapped layers.

    `params` is the wrapped model, or parameters / param groups of it (as the
    HF Trainer passes them). Dense experts and unrouted parameters use `lr` (default
    1e-3; param groups without an 'lr' of their own need it given, so that the HF
    Trainer's `optimizer_cls_and_kwargs`, which passes no learning rate, cannot
    silently train at the default) and `weight_decay`; LoRA experts use `lora_lr`
    and `lora_weight_decay` (defaulting to `lr` and `weight_decay`; group keys of
    the same names override them per group). Tensors with fewer than 2 dimensions
    (biases, norm weights) get no decay; LoRA experts decay by `lora_weight_decay` even in a group whose
    `weight_decay` is 0 (as the HF Trainer's groups are by default).

    `routing`: a policy object (`molf.routing`): `molf.TopK(k=1, score="epd")`, the
    paper's routing and the default (the `k` experts with the highest score win each
    step); `molf.Hysteresis(k, margin, min_dwell)`, which keeps an incumbent unless a
    challenger beats it by `margin` and holds each choice `min_dwell` steps; or
    `molf.Heldout(loss_fn, every=10, ...)`, which updates every expert of a module until
    its own movement is measured (every `every` steps, on `loss_fn()`) to raise the
    held-out loss, drops it and brings it back once a step of it would help, and shrinks
    each expert's update where that lowers the held-out loss (see `molf.Heldout` and
    `molf.heldout`). Each policy owns its settings, defaults and validation, and has
    `warmup_steps` (every expert updated during the first steps), `freeze_after` (routing
    frozen from that step on) and `ema_decay` (the score EMA of the summaries).

    `state_dtype`: "auto" (default) keeps the moments in float32 for bf16/fp16
    parameters and in the parameter's dtype otherwise; "param" always uses the
    parameter's dtype (exactly what torch.optim.AdamW does); or a torch dtype.

    `log`: where and how to write the routing log, a `molf.LogSettings(path, every=1,
    scores_every=None, format="compact")` or a plain path (that with the defaults: the
    winners of every step as a bitmask, every 100th step's scores; see `molf.routing_log`).
    `set_log` sets it later; `log_path` says where it goes.

    `fused`: None (default) uses the Triton kernels when every parameter is on
    CUDA and triton is installed, the foreach path otherwise; True requires them.
    Either way a step makes one device-to-host transfer (the score sums).

    `lagged`: route step t on the scores computed at step t-1 (the first step
    routes on its own). The step then never waits for the device; moments
    still advance every step and the winners' updates use the current moments.
    The routing log and ledger record, at step t, the scores that were routed on.

    Distributed (DDP, FSDP2 `fully_shard`): every rank must take the same
    decision. Under FSDP2 the math runs on each rank's local shards and the
    flat score tensor is all-reduced (SUM) over the mesh's shard dimension once
    per step; under DDP the averaged gradients make every rank's scores equal
    bitwise. Every `check_every` steps (0: never) the ranks compare their
    ledger checksums and `molf.distributed.RankDivergenceError` names the first
    module that was routed differently.

    `skip_nonfinite` (default True): a step whose gradients hold a NaN or an
    infinity changes nothing (weights, moments, step counters, router) and is
    counted in `routing_summary().skipped_steps` and the log. The check runs in
    the step's own pass on CUDA (no extra sync). With `lagged=True` on CUDA the
    host learns of it one step later: the device still skipped every write,
    but the router had already recorded that step; the next step then routes
    on its own scores.
    """

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[dict],
        lr: float | None = None,
        lora_lr: float | None = None,
        weight_decay: float = 1e-2,
        lora_weight_decay: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        routing: Policy | None = None,
        state_dtype: str | torch.dtype = "auto",
        fused: bool | None = None,
        lagged: bool = False,
        skip_nonfinite: bool = True,
        log: LogSettings | str | os.PathLike | None = None,
        check_every: int = 100,
    ) -> None:
        check_options(
            lr=lr,
            lora_lr=lora_lr,
            weight_decay=weight_decay,
            lora_weight_decay=lora_weight_decay,
            betas=betas,
            eps=eps,
            check_every=check_every,
        )
        log = None if log is None else LogSettings.of(log)  # a bad log is refused before the groups are built
        self.routing = routing = TopK() if routing is None else check_policy(routing)
        self._probe: HeldoutProbe | None = routing.probe()
        score = routing.score
        self._check_every = check_every
        self._state_dtype = resolve_state_dtype(state_dtype)
        self.score = score

        groups, self.module_names, self.expert_names = build_groups(
            params, lr, lora_lr, weight_decay, lora_weight_decay
        )
        defaults = dict(lr=DEFAULT_LR if lr is None else lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self._constructing = True
        super().__init__(groups, defaults)
        self._constructing = False
        self._hold_meta_key()
        M, E = self._shape
        self._router = Router(M, E, **routing.router_settings())
        dense = self._has_dense_expert()  # expert 0 where there is one
        self._ledger = Ledger(M, E, **routing.ledger_settings(dense=[dense and e == 0 for e in range(E)]))
        if self._probe is None and routing.topk >= E:
            warnings.warn(
                f"topk={routing.topk} >= {E} experts per module: routing is off and every "
                "expert is updated every step (plain AdamW over all experts)",
                UserWarning,
                stacklevel=2,
            )
        self._skipped_steps = 0
        self._reset_caches()
        self.set_log(log)
        if fused not in (None, True, False):
            raise ConfigError(f"fused must be None, True or False, got {fused!r}")
        if not isinstance(lagged, bool) or not isinstance(skip_nonfinite, bool):
            raise ConfigError(f"lagged and skip_nonfinite must be booleans, got {lagged!r}, {skip_nonfinite!r}")
        self.skip_nonfinite = skip_nonfinite
        self._fused = fused_kernels(fused, self._params())
        if self._probe is not None and self._probe.offload and any(map(distributed.is_sharded, self._params())):
            raise ConfigError(
                "Heldout(offload=True) keeps whole tensors in host memory, which FSDP2-sharded parameters "
                "do not have on one rank: leave offload off (the shards already spread the copies over the ranks)"
            )
        self.lagged = lagged
        self._pending: _ScoreSources | np.ndarray | None = None  # lagged mode: the previous step's scores
        self._score_group()  # refuse a half-sharded model here rather than at the first step

    def _reset_caches(self) -> None:
        self._plan = None  # fused path: device tables, rebuilt when the tensors with gradients change
        self._plan_signature = None
        self._decision = None  # fused path: (plan, its DeviceDecision or None)
        self._unbooked = None  # fused path: the score sources of a step the device decided
        self._scratch: dict[int, tuple] = {}  # CPU foreach path: per group, see _foreach.scratch_for
        self._group_key = None  # (first routed parameter, its score group): see _score_group
        self._state_init_step = False

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _init_group(self, group: dict) -> _GroupWork:
        """Params with a gradient, their grads (in state dtype) and lazily created state."""
        w = _GroupWork(group, [], [], [], [], [], [], [])
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("MoLFAdamW does not support sparse gradients")
            state = self.state[p]
            if "step" not in state:  # (a held-out measurement may have created the state first)
                dtype = state_dtype_for(self._state_dtype, p)
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                if self._probe is not None and group["molf_role"] != "plain" and THETA_KEY not in state:
                    self._probe.init_state(state, p, any(self._ledger.heldout_shrink))
            # The math runs on the local shards of FSDP2's DTensors (views: writes land in them).
            w.idx.append(i)
            w.params.append(distributed.to_local(p))
            w.grads.append(distributed.to_local(p.grad))
            w.exp_avgs.append(distributed.to_local(state["exp_avg"]))
            w.exp_avg_sqs.append(distributed.to_local(state["exp_avg_sq"]))
            w.steps.append(state["step"])
        return w

    # -------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):
        """One MoLF step: moments for all experts, scores, route, update winners.

        A step whose gradients hold a NaN or an infinity is skipped whole
        (weights, moments, step counters and router untouched) and counted,
        unless `skip_nonfinite=False`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._settle()
        if self.lagged:
            self._resolve_pending()
        if self._fused:
            plan = self._fused_plan()
            if plan is None:
                return loss
            rule = None if self.lagged else self._device_rule(plan)
            if rule is not None:
                # The device decides this step; the host books it later (`_settle`).
                decision = self._decision[1]
                args = (self.param_groups, self.score, self.skip_nonfinite, self._lr_scale())
                self._unbooked = fused_device_step(plan, decision, rule, self._shape[1], *args)
                if self._probe is not None and self._probe.due(self._router.step + 1):
                    self._settle()
                self._measure_heldout()
                return loss
            if self.lagged and self._pending is not None:
                # The winners are known before the pass: one pass does moments,
                # scores and updates, and nothing waits for the device.
                mask = self._route(self._pending)
                self._pending, _ = self._fused_moments(plan, winners=mask.reshape(-1))
                self._pending.start_copy()
                self._measure_heldout()
                return loss
            sources, apply_winners = self._fused_moments(plan)
        else:
            work = [self._init_group(g) for g in self.param_groups]
            grads = [g for w in work for g in w.grads]
            if not grads:
                return loss
            if self.skip_nonfinite and distributed.any_on_group(_kernels.any_nonfinite(grads), self._score_group()):
                self._record_skip()
                return loss
            scratch = [scratch_for(self._scratch, gi, w) for gi, w in enumerate(work)]
            sources, apply_winners = foreach_moments(work, scratch, self.score, self._score_group(), self._lr_scale())

        scores = self._scores_to_route(sources)
        if scores is None:
            sources.give_back_steps()
            self._record_skip()
            return loss
        apply_winners(self._route(scores).reshape(-1))
        self._measure_heldout()
        return loss

    def _fused_plan(self):
        """The device tables for the tensors that have gradients now (built again
        only when that set changes); None when no tensor has a gradient."""
        signature = plan_signature(self.param_groups)
        if self._plan is None or self._plan_signature != signature:
            self._plan = build_plan(self._fused, self.param_groups, self._init_group, self.state)
            self._plan_signature = signature
        return self._plan

    def _device_rule(self, plan) -> tuple | None:
        """`Router.forecast()`'s rule where the device may decide this step: not the first
        step (torch.distributed.checkpoint's state-init step is told apart by its scores
        when it is booked, and its gradients are gone by then), no score reduction over a
        process group (FSDP2), at most two tensors per slot (`DeviceDecision.applies`)."""
        if self._ledger.step == 0 or self._score_group() is not None:
            return None
        if self._decision is None or self._decision[0] is not plan:
            self._decision = plan, device_decision(plan, self._shape[0] * self._shape[1])
        return None if self._decision[1] is None else self._router.forecast()

    def _fused_moments(self, plan, winners: np.ndarray | None = None):
        args = (self.score, self.skip_nonfinite, self._score_group, winners, self._lr_scale())
        return fused_moments(plan, self.param_groups, *args)

    def _lr_scale(self) -> np.ndarray | None:
        """Per (module, expert) slot, the multiplier of the expert's learning rate in its
        update (policy heldout's rate adaptation, `molf.RateRule`); None: 1 everywhere."""
        if self._probe is None or not self._ledger.heldout_adapt_rate:
            return None
        return self._ledger.heldout_rate().reshape(-1)

    def _has_dense_expert(self) -> bool:
        return any(
            (t := expert_tag(p)) is not None and t.kind == "dense" for g in self.param_groups for p in g["params"]
        )

    def add_param_group(self, param_group: dict) -> None:
        """Add a group of unrouted parameters (plain AdamW); its values are checked like the
        constructor's before anything changes. Experts of wrapped layers cannot be added:
        the routing structure is fixed when the optimizer is built."""
        if getattr(self, "_constructing", False):  # torch's __init__ adds the groups built above
            super().add_param_group(param_group)
            return
        check_added_group(param_group, self.defaults)
        super().add_param_group(param_group)
        self._plan = None
