"""`MoLFAdamW`: AdamW whose update goes, per wrapped module and step, to the
expert(s) that the Rust router picks from gradient-guided scores (SPEC §2)."""

from __future__ import annotations

import base64
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from . import _kernels, distributed
from ._core import ConfigError, Ledger, Router, StateError
from .checkpoint import check_group_values, check_meta_fields, check_param_state, routing_settings_changed
from .heldout import LORA_ONLY_MIN_SPAN, THETA_KEY, HeldoutProbe
from .routing_log import RoutingLog
from .summary import RoutingSummary
from .wrap import expert_tag, retag

__all__ = ["MoLFAdamW", "SCORES"]

SCORES = ("epd", "pfn")
_ROLES = ("plain", "dense", "lora")
_META_KEY = "molf_meta"
_META_VERSION = 1
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _check_number(name: str, value: Any, low: float = 0.0, high: float = math.inf, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value < low or value > high or (high_open and value == high):
        bracket = ")" if high_open else "]"
        raise ConfigError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")


def _resolve_state_dtype(state_dtype: Any) -> str | torch.dtype:
    if state_dtype in ("auto", "param"):
        return state_dtype
    if isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point:
        return state_dtype
    raise ConfigError(f"state_dtype must be 'auto', 'param' or a floating torch.dtype, got {state_dtype!r}")


def _fused_kernels(option: bool | None, params: list[torch.Tensor]) -> ModuleType | None:
    """The Triton kernels when they apply (every parameter on CUDA, triton
    importable, `fused` not False), else None for the foreach path."""
    if option is False:
        return None
    kernels = None
    if params and all(p.is_cuda for p in params):
        try:
            from . import _fused as kernels
        except ImportError:
            kernels = None
    if option is True and kernels is None:
        raise ConfigError("fused=True needs every parameter on a CUDA device and triton installed")
    return kernels


class _GroupWork(NamedTuple):
    """One param group's tensors that have a gradient this step (positions in `idx`)."""

    group: dict
    idx: list[int]
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    steps: list[torch.Tensor]
    step_values: list[float]  # the steps as floats, after this step's increment


class _ScoreSources:
    """One step's per-tensor score sums on the device, the non-finite flag of its
    gradients, and what turns them into the [modules x experts] score matrix on
    the host (slot, lr and element count per tensor); also the step counters the
    step advanced, so a skipped step can give them back."""

    def __init__(self, flag: torch.Tensor | None, group=None) -> None:
        self.flag = flag
        self.group = group  # FSDP2: the shard group whose ranks' sums add up to the global ones
        self.sums: list[torch.Tensor] = []
        self.slots: list[int] = []
        self.lrs: list[float] = []
        self.numels: list[int] = []
        self.steps: list[torch.Tensor] = []
        self._host: torch.Tensor | None = None
        self._event = None

    def add(self, sums: torch.Tensor, slots: Sequence[int], lrs: Sequence[float], numels: Sequence[int]) -> None:
        self.sums.append(sums)
        self.slots.extend(slots)
        self.lrs.extend(lrs)
        self.numels.extend(numels)

    def _flat(self) -> torch.Tensor:
        parts = list(self.sums)
        if self.flag is not None:
            parts.append(self.flag.to(torch.float64))
        flat = torch.cat(parts)
        if self.group is not None:
            # Global numerators (and the non-finite flag of any rank), identical on every rank.
            torch.distributed.all_reduce(flat, group=self.group)
        return flat

    def start_copy(self) -> None:
        """Begin the device-to-host copy without waiting for it (lagged mode)."""
        if not self.sums or self.sums[0].device.type != "cuda":
            return
        flat = self._flat()
        self._host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        self._host.copy_(flat, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def resolve(self, shape: tuple[int, int], score: str) -> np.ndarray | None:
        """The score matrix, or None when the step's gradients were not finite."""
        M, E = shape
        if not self.sums:
            return np.full(shape, np.nan)
        if self._host is not None:
            if not self._event.query():
                self._event.synchronize()
            flat = self._host.numpy()
        else:
            flat = self._flat().cpu().numpy()  # the step's one device-to-host transfer
        if self.flag is not None:
            if flat[-1] != 0:
                return None
            flat = flat[:-1]
        slots = np.asarray(self.slots, dtype=np.int64)
        numel = np.bincount(slots, weights=np.asarray(self.numels, dtype=np.float64), minlength=M * E)
        with np.errstate(divide="ignore", invalid="ignore"):
            if score == "epd":
                num = np.bincount(slots, weights=np.asarray(self.lrs) * flat, minlength=M * E)
                scores = num / numel
            else:
                num = np.bincount(slots, weights=flat, minlength=M * E)
                scores = np.sqrt(num) / np.sqrt(numel)
        scores[numel == 0] = np.nan  # an expert without gradients this step never wins
        return scores.reshape(M, E)

    def give_back_steps(self) -> None:
        if self.steps:
            torch._foreach_sub_(self.steps, 1)


class MoLFAdamW(torch.optim.Optimizer):
    """AdamW with per-module routing between the experts of molf-wrapped layers.

    `params` is the wrapped model, or parameters / param groups of it (as the
    HF Trainer passes them). Dense experts and unrouted parameters use `lr` and
    `weight_decay`; LoRA experts use `lora_lr` and `lora_weight_decay` (defaulting
    to `lr` and `weight_decay`; group keys of the same names override them per
    group). Tensors with fewer than 2 dimensions (biases, norm weights) get no
    decay; LoRA experts decay by `lora_weight_decay` even in a group whose
    `weight_decay` is 0 (as the HF Trainer's groups are by default).

    Routing: with `heldout` (a callable returning a loss on held-out data) the
    default policy is "heldout": every expert of a module is updated until its
    own movement is measured to raise the held-out loss; every `heldout_every`
    steps the optimizer calls `heldout()`, back-propagates it, attributes the
    held-out loss change since the last call to each expert's movement
    (trapezoid rule), smooths it (an EMA whose mean age grows to about
    `heldout_horizon` of the windows the expert has moved in since its last
    pause, never shorter than a decay of `heldout_decay` per window gives: late
    in a long run one window's change is noise around a small drift, a longer
    average resolves it), drops the experts that hurt and brings a dropped one
    back, `min_dwell` steps (default 3 x `heldout_every`) after its drop, once a
    step of it would lower the held-out loss (first order); a returning
    expert's record from before its drop then fades within a few windows.
    A drop needs a record of `heldout_min_span` windows since the start or the
    expert's last return (default: 10 where every expert is a LoRA expert, as
    in MoLF-E; 0, from the first window, beside a dense expert).
    Before each measurement, held-out shrinkage: each expert's update since the
    start (all modules together) is shrunk and kept if the held-out loss falls:
    a dense weight's distance from its start scaled by 1 - `heldout_shrink`
    (default 0.1; 0: off), a LoRA product's singular values soft-thresholded by
    `heldout_shrink` x its largest, so its weakest directions go first
    (`heldout_shrink_spectral=False`: scaled like the dense update). The closure
    is called 1 + E more times, without a gradient, for E experts; a copy of the
    dense weights' starting point is kept in the optimizer state. See
    `molf.heldout`.
    Without `heldout` the default is the paper's: `topk` experts per module win
    each step by `score` ("epd", the expected preconditioned descent, or
    "pfn"); `policy` "topk" ("paper" names it explicitly and requires score
    "epd"); "hysteresis" keeps an incumbent unless a challenger beats it by
    `margin` (relative) and holds each choice at least `min_dwell` steps.
    During the first `warmup_steps` steps every expert is updated; after
    `freeze_after` steps the routing is frozen.

    `state_dtype`: "auto" (default) keeps the moments in float32 for bf16/fp16
    parameters and in the parameter's dtype otherwise; "param" always uses the
    parameter's dtype (exactly what torch.optim.AdamW does); or a torch dtype.

    `log_path`: append one JSON line per `log_every` steps with every module's
    scores and winners (see `molf.routing_log`).

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
        lr: float = 1e-3,
        lora_lr: float | None = None,
        weight_decay: float = 1e-2,
        lora_weight_decay: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        topk: int = 1,
        score: str = "epd",
        policy: str | None = None,
        margin: float = 0.0,
        min_dwell: int | None = None,
        warmup_steps: int = 0,
        freeze_after: int | None = None,
        ema_decay: float = 0.9,
        state_dtype: str | torch.dtype = "auto",
        log_path: str | os.PathLike | None = None,
        log_every: int = 1,
        fused: bool | None = None,
        lagged: bool = False,
        skip_nonfinite: bool = True,
        check_every: int = 100,
        heldout: Callable[[], torch.Tensor] | None = None,
        heldout_every: int = 10,
        heldout_decay: float = 0.5,
        heldout_horizon: float = 0.25,
        heldout_shrink: float = 0.1,
        heldout_shrink_spectral: bool = True,
        heldout_min_span: int | None = None,
    ) -> None:
        _check_number("lr", lr)
        _check_number("weight_decay", weight_decay)
        _check_number("eps", eps)
        if lora_lr is not None:
            _check_number("lora_lr", lora_lr)
        if lora_weight_decay is not None:
            _check_number("lora_weight_decay", lora_weight_decay)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ConfigError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        _check_number("betas[0]", betas[0], 0.0, 1.0, high_open=True)
        _check_number("betas[1]", betas[1], 0.0, 1.0, high_open=True)
        if score not in SCORES:
            raise ConfigError(f"unknown score {score!r}; expected one of {', '.join(map(repr, SCORES))}")
        if policy is None:
            policy = "heldout" if heldout is not None else "topk"
        if policy == "heldout" and heldout is None:
            raise ConfigError("policy 'heldout' needs heldout=, a callable returning a loss on held-out data")
        if heldout is not None and policy != "heldout":
            raise ConfigError(f"heldout= is used by policy 'heldout' only; got policy {policy!r}")
        if not isinstance(heldout_shrink_spectral, bool):
            raise ConfigError(f"heldout_shrink_spectral must be True or False, got {heldout_shrink_spectral!r}")
        if heldout_min_span is not None and (
            isinstance(heldout_min_span, bool) or not isinstance(heldout_min_span, int) or heldout_min_span < 0
        ):
            raise ConfigError(f"heldout_min_span must be an integer >= 0 (or None), got {heldout_min_span!r}")
        self._probe = None if heldout is None else HeldoutProbe(heldout, heldout_every)
        self._state_init_step = False
        if min_dwell is None:
            min_dwell = 3 * heldout_every if heldout is not None else 0
        if policy == "paper" and score != "epd":
            raise ConfigError(f"policy 'paper' is the published EPD top-1 routing: score must be 'epd', got {score!r}")
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
            raise ConfigError(f"log_every must be an integer >= 1, got {log_every!r}")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
            raise ConfigError(f"check_every must be an integer >= 0 (0: never), got {check_every!r}")
        self._check_every = check_every
        self._state_dtype = _resolve_state_dtype(state_dtype)
        self.score = score

        groups, self.module_names, self.expert_names = self._build_groups(
            params, lr, lora_lr, weight_decay, lora_weight_decay
        )
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self._constructing = True
        super().__init__(groups, defaults)
        self._constructing = False
        self._hold_meta_key()
        self._router = Router(
            len(self.module_names),
            len(self.expert_names),
            topk=topk,
            policy=policy,
            margin=margin,
            min_dwell=min_dwell,
            warmup_steps=warmup_steps,
            freeze_after=freeze_after,
        )
        if heldout_min_span is None:
            heldout_min_span = 0 if self._has_dense_expert() else LORA_ONLY_MIN_SPAN
        self._ledger = Ledger(
            len(self.module_names),
            len(self.expert_names),
            ema_decay=ema_decay,
            heldout_decay=heldout_decay,
            heldout_horizon=heldout_horizon,
            heldout_shrink=heldout_shrink,
            shrink_spectral=heldout_shrink_spectral,
            heldout_min_span=heldout_min_span,
        )
        if topk >= len(self.expert_names) and self._probe is None:
            warnings.warn(
                f"topk={topk} >= {len(self.expert_names)} experts per module: routing is off and every "
                "expert is updated every step (plain AdamW over all experts)",
                UserWarning,
                stacklevel=2,
            )
        self._log = None if log_path is None else RoutingLog(log_path, self.module_names, self.expert_names, log_every)
        if fused not in (None, True, False):
            raise ConfigError(f"fused must be None, True or False, got {fused!r}")
        if not isinstance(lagged, bool) or not isinstance(skip_nonfinite, bool):
            raise ConfigError(f"lagged and skip_nonfinite must be booleans, got {lagged!r}, {skip_nonfinite!r}")
        self.skip_nonfinite = skip_nonfinite
        self._skipped_steps = 0
        self._fused = _fused_kernels(fused, [p for g in self.param_groups for p in g["params"]])
        self.lagged = lagged
        self._plan = None  # fused path: device tables, rebuilt when the tensors with gradients change
        self._scratch: dict[int, tuple] = {}  # CPU foreach path: per group, see _scratch_for
        self._plan_signature = None
        self._pending: _ScoreSources | np.ndarray | None = None  # lagged mode: the previous step's scores
        self._group_key = None  # (first routed parameter, its score group): see _score_group
        self._score_group()  # refuse a half-sharded model here rather than at the first step

    # ------------------------------------------------------------------ groups

    @staticmethod
    def _user_groups(params: Any) -> list[dict]:
        if isinstance(params, nn.Module):
            return [{"params": [p for p in params.parameters() if p.requires_grad]}]
        if isinstance(params, torch.Tensor):
            raise ConfigError("params must be a model, an iterable of parameters or of param-group dicts, not a tensor")
        items = list(params)
        if not items:
            raise ConfigError("MoLFAdamW got an empty parameter list")
        if all(isinstance(g, dict) for g in items):
            out = []
            for g in items:
                if "params" not in g:
                    raise ConfigError(f"param group without a 'params' key: keys {sorted(g)}")
                ps = g["params"]
                ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
                out.append({**g, "params": ps})
            return out
        if all(isinstance(p, torch.Tensor) for p in items):
            return [{"params": items}]
        raise ConfigError("params must be a model, an iterable of parameters, or an iterable of param-group dicts")

    def _build_groups(self, params, lr, lora_lr, weight_decay, lora_weight_decay):
        """Split each user group by role (plain / dense expert / LoRA expert) and
        decay; return the groups, the routed module names and the expert names."""
        user_groups = self._user_groups(params)
        for i, g in enumerate(user_groups):
            check_group_values(g, f"param group {i}")
        retag(params if isinstance(params, nn.Module) else None)  # FSDP2 may have dropped the tags
        seen: set[int] = set()
        tags = []
        places: dict[tuple, str] = {}
        for g in user_groups:
            for p in g["params"]:
                if not isinstance(p, torch.Tensor):
                    raise ConfigError(f"param groups must hold tensors, got {type(p).__name__}")
                if id(p) in seen:
                    raise ConfigError("a parameter appears in more than one param group (or twice in one)")
                seen.add(id(p))
                tag = expert_tag(p)
                if tag is None:
                    continue
                # Tags number the modules of one wrapped model; a second tensor at the same
                # place is another model's, whose modules would share this one's decisions.
                place = (tag.order, tag.expert, tag.part)
                if place in places:
                    raise ConfigError(
                        f"the parameters given hold two tensors for {tag.module} ({tag.name} {tag.part}): "
                        "parameters of more than one wrapped model? Build one MoLFAdamW per model"
                    )
                places[place] = tag.module
                tags.append(tag)
        if not tags:
            raise ConfigError(
                "MoLFAdamW found no molf-wrapped parameters to route: call molf.wrap(model, config) "
                "before building the optimizer (or pass the wrapped model's parameters)"
            )
        # Compact module indices, in wrap order, over the modules this optimizer sees.
        orders = sorted({t.order for t in tags})
        index_of = {o: i for i, o in enumerate(orders)}
        num_experts = {t.num_experts for t in tags}
        if len(num_experts) != 1:
            raise ConfigError(f"all routed modules must carry the same number of experts, got {sorted(num_experts)}")
        (E,) = num_experts
        module_names = [""] * len(orders)
        expert_names = [""] * E
        for t in tags:
            module_names[index_of[t.order]] = t.module
            expert_names[t.expert] = t.name
        if not all(expert_names):
            raise ConfigError(f"the parameters given cover only experts {expert_names} of every module")

        groups: list[dict] = []
        for g in user_groups:
            extra = {k: v for k, v in g.items() if k not in ("params", "lora_lr", "lora_weight_decay")}
            group_lr = g.get("lr", lr)
            group_wd = g.get("weight_decay", weight_decay)
            g_lora_lr = g.get("lora_lr", lora_lr if lora_lr is not None else group_lr)
            g_lora_wd = g.get("lora_weight_decay", lora_weight_decay if lora_weight_decay is not None else group_wd)
            split: dict[tuple[str, bool], dict] = {}
            for p in g["params"]:
                tag = expert_tag(p)
                role = "plain" if tag is None else tag.kind
                is_lora = role == "lora"
                # Each expert kind has its own decay (SPEC §2): a group's weight_decay=0 (the
                # HF Trainer's no-decay group, or TrainingArguments' default) spares its
                # dense and plain tensors, not LoRA experts given a lora_weight_decay.
                wd = g_lora_wd if is_lora else group_wd
                decay = p.dim() >= 2 and wd != 0
                key = (role, decay)
                if key not in split:
                    split[key] = {
                        **extra,
                        "params": [],
                        "lr": g_lora_lr if is_lora else group_lr,
                        "weight_decay": wd if decay else 0.0,
                        "molf_role": role,
                    }
                    if role != "plain":
                        split[key]["molf_slots"] = []
                split[key]["params"].append(p)
                if tag is not None:
                    split[key]["molf_slots"].append(index_of[tag.order] * E + tag.expert)
            groups.extend(split[k] for k in sorted(split, key=lambda k: (_ROLES.index(k[0]), not k[1])))
        return groups, module_names, expert_names

    def _state_dtype_for(self, p: torch.Tensor) -> torch.dtype:
        if self._state_dtype == "param":
            return p.dtype
        if self._state_dtype == "auto":
            return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype
        return self._state_dtype

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
                dtype = self._state_dtype_for(p)
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                if self._probe is not None and group["molf_role"] != "plain" and THETA_KEY not in state:
                    HeldoutProbe.init_state(state, p, self._ledger.heldout_shrink > 0)
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
        if self.lagged:
            self._resolve_pending()
        if self._fused:
            plan = self._fused_plan()
            if plan is None:
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
            sources, apply_winners = self._foreach_moments(
                work, [self._scratch_for(gi, w) for gi, w in enumerate(work)]
            )

        scores = self._scores_to_route(sources)
        if scores is None:
            sources.give_back_steps()
            self._record_skip()
            return loss
        apply_winners(self._route(scores).reshape(-1))
        self._measure_heldout()
        return loss

    def _measure_heldout(self) -> None:
        # Not on torch.distributed.checkpoint's state-init step: a load replaces it.
        if self._probe is not None and self._probe.due(self._router.step) and not self._state_init_step:
            self._probe.measure(self)

    def _route(self, scores: np.ndarray) -> np.ndarray:
        """One call into the Rust router for all modules; book and log it."""
        mask = self._router.route(scores)
        self._ledger.record(scores, mask)
        # Only what keeps records (the log, the held-out probe) needs to know.
        keeps_records = self._log is not None or self._probe is not None
        self._state_init_step = keeps_records and self._is_state_init_step(scores)
        if self._check_every and self._ledger.step % self._check_every == 0:
            distributed.check_ranks_agree(self)
        if self._log is not None and not self._state_init_step:
            self._log.write(self._ledger.step, self._router_phase_of_last_step(), scores, mask)
        return mask

    def _is_state_init_step(self, scores: np.ndarray) -> bool:
        """Whether this is the step torch.distributed.checkpoint's `get_state_dict` runs on a
        fresh optimizer to create its state (the first step, every lr 0, every gradient
        zero): a checkpoint load replaces what it did, so it stays out of the routing log (and
        does not start the log afresh under the run about to be resumed). A real first step
        at lr 0 (a warm-up from 0) has non-zero gradients; the gradient check runs only once
        the cheap conditions hold."""
        return (
            self._ledger.step == 1
            and not np.any(scores)
            and all(float(g["lr"]) == 0 for g in self.param_groups)
            and all(
                p.grad is not None and not p.grad.any()
                for g in self.param_groups
                for p in g["params"]
                if p.requires_grad
            )
        )

    def _record_skip(self) -> None:
        self._skipped_steps += 1
        if self._log is not None:
            self._log.write_skip(self._ledger.step, "non-finite gradient")

    def _resolve_pending(self) -> None:
        """Lagged mode: read the previous step's scores before this step counts.
        If its gradients were not finite its device work was skipped: give its
        step counters back and route this step on its own scores."""
        if isinstance(self._pending, _ScoreSources):
            matrix = self._pending.resolve(self._shape, self.score)
            if matrix is None:
                self._pending.give_back_steps()
                self._record_skip()
            self._pending = matrix

    # ---------------------------------------------------------- foreach path

    def _scratch_for(self, gi: int, w: _GroupWork) -> tuple[list, list | None] | None:
        """CPU only: tensors shaped like group `gi`'s moments for the step's temporaries,
        kept across steps (on the CPU a fresh large temporary costs more than the arithmetic
        done in it): the AdamW denominators, and for a routed group whose score sums the Rust
        core does not compute (`_kernels.scores_in_core`: e.g. bf16 moments) the terms
        of `_kernels.score_sums`' torch path; else None. None on other devices, whose
        allocators cache."""
        if not w.params or w.exp_avgs[0].device.type != "cpu":
            return None
        key = tuple(w.idx)
        cached = self._scratch.get(gi)
        if cached is None or cached[0] != key:
            torch_scores = w.group["molf_role"] != "plain" and not _kernels.scores_in_core(w.exp_avgs, w.exp_avg_sqs)
            cached = (
                key,
                [torch.empty_like(m) for m in w.exp_avgs],
                [torch.empty_like(m) for m in w.exp_avgs] if torch_scores else None,
            )
            self._scratch[gi] = cached
        return cached[1], cached[2]

    def _foreach_moments(self, work: list[_GroupWork], scratch: list):
        """Moments of every tensor, unrouted parameters' AdamW, routed tensors'
        score sums; returns the sources and the function applying the winners."""
        sources = _ScoreSources(None, self._score_group())
        for w, tmp in zip(work, scratch):
            if not w.params:
                continue
            torch._foreach_add_(w.steps, 1)
            sources.steps.extend(w.steps)
            w.step_values.extend(torch.stack(w.steps).tolist())
            beta1, beta2 = w.group["betas"]
            exp_avgs = w.exp_avgs
            grads = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(w.grads, exp_avgs)]
            _kernels.update_moments_(exp_avgs, w.exp_avg_sqs, grads, beta1, beta2)
            if w.group["molf_role"] == "plain":
                self._foreach_update(w, range(len(w.params)), None if tmp is None else tmp[0])
                continue
            sums = _kernels.score_sums(exp_avgs, w.exp_avg_sqs, w.group["eps"], self.score, tmp)
            slots = w.group["molf_slots"]
            numels = [w.group["params"][i].numel() for i in w.idx]  # global element counts under FSDP2
            sources.add(sums, [slots[i] for i in w.idx], [float(w.group["lr"])] * len(w.idx), numels)

        def apply_winners(winner_slots: np.ndarray) -> None:
            for w, tmp in zip(work, scratch):
                if w.group["molf_role"] != "plain" and w.params:
                    slots = np.asarray(w.group["molf_slots"], dtype=np.int64)[w.idx]
                    self._foreach_update(w, np.flatnonzero(winner_slots[slots]), None if tmp is None else tmp[0])

        return sources, apply_winners

    @staticmethod
    def _foreach_update(w: _GroupWork, positions: Iterable[int], scratch: list | None = None) -> None:
        """AdamW from the (already advanced) moments for the tensors at `positions`,
        batched by (step count, parameter dtype) for torch's foreach ops (`scratch`: a
        tensor shaped like each moment for the denominator, see `_scratch_for`)."""
        beta1, beta2 = w.group["betas"]
        batches: dict[tuple, list[int]] = defaultdict(list)
        for k in positions:
            batches[(w.step_values[k], w.params[k].dtype)].append(k)
        for (step, _p_dtype), ks in batches.items():
            ps, ms, vs = [w.params[k] for k in ks], [w.exp_avgs[k] for k in ks], [w.exp_avg_sqs[k] for k in ks]
            upcast = [p.dtype != m.dtype for p, m in zip(ps, ms)]
            targets = [p.to(m.dtype) if u else p for p, m, u in zip(ps, ms, upcast)]
            _kernels.adamw_update_(
                targets,
                ms,
                vs,
                step,
                float(w.group["lr"]),
                w.group["weight_decay"],
                beta1,
                beta2,
                w.group["eps"],
                None if scratch is None else [scratch[k] for k in ks],
            )
            for p, t, u in zip(ps, targets, upcast):
                if u:
                    p.copy_(t)

    # ------------------------------------------------------------ fused path

    def _fused_plan(self):
        """The device tables for the tensors that have gradients now (built again
        only when that set changes); None when no tensor has a gradient."""
        signature = tuple(tuple(i for i, p in enumerate(g["params"]) if p.grad is not None) for g in self.param_groups)
        if self._plan is not None and self._plan_signature == signature:
            return self._plan
        entries = []
        for gi, group in enumerate(self.param_groups):
            w = self._init_group(group)
            slots = group.get("molf_slots")
            for k, i in enumerate(w.idx):
                slot = -1 if slots is None else slots[i]
                entries.append((group["params"][i], w.exp_avgs[k], w.exp_avg_sqs[k], w.steps[k], gi, slot))
        self._plan = self._fused.FusedStep(entries) if entries else None
        if self._plan is not None:
            for p, step in zip(self._plan.params, self._plan.steps):
                self.state[p]["step"] = step
        self._plan_signature = signature
        return self._plan

    def _fused_moments(self, plan, winners: np.ndarray | None = None):
        plan.step_buffer.add_(1)
        steps = plan.step_buffer.numpy().astype(np.float64)
        group = self._score_group()
        sums, flag, hyper = plan.moments(self.param_groups, steps, self.score, self.skip_nonfinite, winners, group)
        sources = _ScoreSources(flag if self.skip_nonfinite else None, group)
        sources.steps = [plan.step_buffer]
        routed = slice(0, plan.num_routed)
        group_lr = np.array([float(g["lr"]) for g in self.param_groups])
        sources.add(sums, plan.slots[routed], group_lr[plan.group_of[routed]], plan.global_numels[routed])
        return sources, lambda winner_slots: plan.apply(winner_slots, hyper, flag)

    def _scores_to_route(self, sources: _ScoreSources) -> np.ndarray | None:
        """This step's score matrix (exact mode: one device-to-host transfer), or in
        lagged mode the previous step's while this step's copies in the background.
        None when the scores to route on came from non-finite gradients."""
        if not self.lagged:
            return sources.resolve(self._shape, self.score)
        previous, self._pending = self._pending, sources
        sources.start_copy()
        if previous is None:  # the first step, or the one after a skipped step: its own scores
            previous = self._pending = sources.resolve(self._shape, self.score)
        return previous

    def _score_group(self):
        """The process group the score sums are all-reduced over (None: no
        reduction), looked up again whenever the first routed parameter object
        changes (accelerate and FSDP2 swap parameters after construction)."""
        first = next(g["params"][0] for g in self.param_groups if g["molf_role"] != "plain" and g["params"])
        if self._group_key is None or self._group_key[0] is not first:
            routed = [p for g in self.param_groups if g["molf_role"] != "plain" for p in g["params"]]
            self._group_key = (first, distributed.score_group(routed))
        return self._group_key[1]

    @property
    def _shape(self) -> tuple[int, int]:
        return len(self.module_names), len(self.expert_names)

    def _router_phase_of_last_step(self) -> str:
        # The router's `phase` is that of its next call; the step just routed was call step-1.
        s = self._router.step - 1
        r = self._router
        if s < r.warmup_steps:
            return "warmup"
        if r.freeze_after is not None and s >= r.freeze_after:
            return "frozen"
        return "routing"

    # ---------------------------------------------------------------- insight

    @property
    def router(self) -> Router:
        """The Rust router (read it, don't step it: the optimizer does)."""
        return self._router

    @property
    def ledger(self) -> Ledger:
        """The Rust ledger of scores, wins and switches."""
        return self._ledger

    def routing_summary(self) -> RoutingSummary:
        """Per-expert shares, switches and per-module statistics so far."""
        return RoutingSummary.from_ledger(
            self._ledger,
            self._router.incumbents(),
            self.module_names,
            self.expert_names,
            self._router.phase,
            self._skipped_steps,
        )

    # ------------------------------------------------------------- checkpoint

    def _pending_scores(self) -> np.ndarray | None:
        """Lagged mode's scores waiting for the next step, as a host matrix."""
        self._resolve_pending()
        return self._pending

    def _meta(self) -> dict:
        pending = self._pending_scores()
        return {
            "skipped_steps": self._skipped_steps,
            "pending": None if pending is None else pending.tolist(),
            "version": _META_VERSION,
            "modules": list(self.module_names),
            "experts": list(self.expert_names),
            "score": self.score,
            "heldout_step": None if self._probe is None else self._probe.last_step,
            "router": base64.b64encode(self._router.to_bytes()).decode("ascii"),
            "ledger": base64.b64encode(self._ledger.to_bytes()).decode("ascii"),
        }

    def state_dict(self) -> dict:
        """torch's optimizer state, plus the router and ledger as plain data in
        the first routed param group (group scalars only, so
        torch.distributed.checkpoint and `torch.load(weights_only=True)` accept it)."""
        sd = super().state_dict()
        sd["param_groups"][self._meta_group_index()][_META_KEY] = self._meta()
        return sd

    def _has_dense_expert(self) -> bool:
        return any(
            (t := expert_tag(p)) is not None and t.kind == "dense" for g in self.param_groups for p in g["params"]
        )

    def _hold_meta_key(self) -> None:
        # The live group carries the key (as None; `state_dict` fills it in): torch.distributed
        # .checkpoint's flattened optimizer state dicts rebuild each group from the keys of the
        # live group, and would drop a key only the saved group has.
        self.param_groups[self._meta_group_index()][_META_KEY] = None

    def _meta_group_index(self) -> int:
        return next(i for i, g in enumerate(self.param_groups) if g["molf_role"] != "plain")

    def _decode_meta(self, meta: Any) -> tuple[Router, Ledger]:
        if not isinstance(meta, dict) or meta.get("version") != _META_VERSION:
            version = meta.get("version") if isinstance(meta, dict) else None
            raise StateError(f"unsupported molf optimizer state version {version!r}; this molf reads {_META_VERSION}")
        if meta.get("modules") != self.module_names or meta.get("experts") != self.expert_names:
            raise StateError(
                "optimizer checkpoint is for a different routing structure: "
                f"{len(meta.get('modules', []))} modules x experts {meta.get('experts')} saved, "
                f"{len(self.module_names)} modules x experts {self.expert_names} here"
            )
        if meta.get("score") != self.score:
            raise StateError(
                f"checkpoint was saved with score={meta.get('score')!r}, this optimizer uses {self.score!r}"
            )
        try:
            router = Router.from_bytes(base64.b64decode(meta["router"], validate=True))
            ledger = Ledger.from_bytes(base64.b64decode(meta["ledger"], validate=True))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, StateError):
                raise
            raise StateError(f"corrupt molf router state in checkpoint: {exc}") from exc
        if (router.num_modules, router.num_experts) != (ledger.num_modules, ledger.num_experts) or (
            router.num_modules,
            router.num_experts,
        ) != (len(self.module_names), len(self.expert_names)):
            raise StateError("router and ledger state do not match this optimizer's routing structure")
        if (router.policy == "heldout") != (self._probe is not None):
            raise StateError(
                f"checkpoint was saved with routing policy {router.policy!r}; this optimizer "
                + ("routes by held-out loss (heldout= given)" if self._probe is not None else "has no heldout=")
            )
        return router, ledger

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a `state_dict()`. Everything is checked against this optimizer first: the
        routing structure and settings, every group's values, every state tensor's keys and
        shape, the routing state. A mismatch raises `StateError` naming the first one and
        changes nothing. Reloading the optimizer's own current state (as accelerate does
        when it wraps the optimizer) leaves the routing log alone."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise StateError("not an optimizer state_dict: no 'param_groups' list of dicts")
        saved_state = state_dict.get("state")
        if not isinstance(saved_state, dict):
            raise StateError("not an optimizer state_dict: no 'state' dict")
        metas = [g[_META_KEY] for g in groups if _META_KEY in g]
        if len(metas) != 1:
            raise StateError(f"expected the molf routing state in exactly one param group, found {len(metas)}")
        meta = metas[0]
        router, ledger = self._decode_meta(meta)
        changed = routing_settings_changed((self._router, self._ledger), (router, ledger))
        skipped, pending, heldout_step = check_meta_fields(meta, self._shape, router.step)
        if len(groups) != len(self.param_groups):
            raise StateError(f"checkpoint has {len(groups)} param groups, this optimizer {len(self.param_groups)}")
        stripped = dict(state_dict)
        stripped["param_groups"] = [{k: v for k, v in g.items() if k != _META_KEY} for g in groups]
        for gi, (mine, saved) in enumerate(zip(self.param_groups, stripped["param_groups"])):
            self._check_saved_group(gi, mine, saved, saved_state, ledger.heldout_shrink > 0)
        own = router == self._router and ledger == self._ledger and skipped == self._skipped_steps
        super().load_state_dict(stripped)
        self._hold_meta_key()
        # torch casts loaded state to each parameter's dtype; restore the state dtype we chose.
        saved_ids = [i for g in stripped["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            saved = saved_state.get(pid)
            if saved is None:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved:  # absent: a tensor held-out-measured before its first gradient
                    self.state[p][key] = saved[key].to(device=p.device, dtype=self._state_dtype_for(p), copy=True)
        if changed:
            # The run resumes as it was saved: its router and ledger carry their settings.
            warnings.warn(
                "the checkpoint was saved with other routing settings than this optimizer was built with; "
                "the checkpoint's are used (checkpoint / this optimizer's): " + "; ".join(changed),
                UserWarning,
                stacklevel=2,
            )
        self._router, self._ledger = router, ledger
        self._plan = None
        self._pending = pending
        self._skipped_steps = skipped
        if self._probe is not None:
            self._probe.last_step = heldout_step
        if self._log is not None and not own:
            self._log.resume(self._ledger.step, self._skipped_steps)

    def _check_saved_group(self, gi: int, mine: dict, saved: dict, saved_state: dict, shrink: bool) -> None:
        if mine["molf_role"] != saved.get("molf_role") or mine.get("molf_slots") != saved.get("molf_slots"):
            raise StateError("optimizer checkpoint's param groups do not match this model's routing structure")
        ids = saved.get("params")
        if not isinstance(ids, list) or len(ids) != len(mine["params"]):
            count = len(ids) if isinstance(ids, list) else ids
            raise StateError(
                f"checkpoint's param group {gi} holds {count} parameters, this optimizer's {len(mine['params'])}"
            )
        try:
            check_group_values(saved, f"checkpoint's param group {gi}")
        except ConfigError as exc:
            raise StateError(str(exc)) from None
        heldout = self._probe is not None and mine["molf_role"] != "plain"
        origin = heldout and mine["molf_role"] == "dense" and shrink  # shrinkage as the checkpoint's ledger says
        for k, (pid, p) in enumerate(zip(ids, mine["params"])):
            if pid in saved_state:
                tag = expert_tag(p)
                where = (
                    f"checkpoint state of param group {gi} tensor {k}"
                    if tag is None
                    else (f"checkpoint state of {tag.module} ({tag.name} {tag.part})")
                )
                check_param_state(saved_state[pid], p, where, heldout=heldout, origin=origin)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group of unrouted parameters (plain AdamW); its values are checked like the
        constructor's before anything changes. Experts of wrapped layers cannot be added:
        the routing structure is fixed when the optimizer is built."""
        if getattr(self, "_constructing", False):  # torch's __init__ adds the groups built above
            super().add_param_group(param_group)
            return
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise ConfigError("add_param_group takes a dict with a 'params' key")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if any(expert_tag(p) is not None for p in params if isinstance(p, torch.Tensor)):
            raise ConfigError(
                "add_param_group: experts of molf-wrapped layers can only be routed by the optimizer "
                "built over them; build the MoLFAdamW with every wrapped layer instead"
            )
        check_group_values({**self.defaults, **param_group}, "add_param_group")
        if param_group.get("molf_role", "plain") != "plain":
            raise ConfigError(f"add_param_group: molf_role must be 'plain', got {param_group['molf_role']!r}")
        param_group.setdefault("molf_role", "plain")
        super().add_param_group(param_group)
        self._plan = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update(
            score=self.score,
            _state_dtype=self._state_dtype,
            module_names=self.module_names,
            expert_names=self.expert_names,
            _log=self._log,
            lagged=self.lagged,
            skip_nonfinite=self.skip_nonfinite,
            _fused=self._fused is not None,
            _molf_meta=self._meta(),
            _check_every=self._check_every,
            _probe=self._probe,
        )
        return state

    def __setstate__(self, state: dict) -> None:
        # torch's load_state_dict also comes through here, with state and groups only.
        meta = state.pop("_molf_meta", None)
        super().__setstate__(state)
        self._plan = None
        self._scratch = {}
        self._group_key = None
        self._state_init_step = False
        if meta is None:
            return
        self._router = Router.from_bytes(base64.b64decode(meta["router"]))
        self._ledger = Ledger.from_bytes(base64.b64decode(meta["ledger"]))
        self._pending = None if meta["pending"] is None else np.asarray(meta["pending"], dtype=np.float64)
        self._skipped_steps = meta["skipped_steps"]
        self._fused = _fused_kernels(True, [p for g in self.param_groups for p in g["params"]]) if self._fused else None
