"""The optimizer's side of the fused path (`molf._fused`, Triton on CUDA): whether it
applies, the device tables for the tensors that have gradients, and one pass of moments
and score sums whose winners' updates are applied after routing."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ._core import ConfigError
from ._device_routing import DeviceDecision
from ._score_sources import _ScoreSources

__all__ = ["fused_kernels", "plan_signature", "build_plan", "fused_moments", "device_decision", "fused_device_step"]


def fused_kernels(option: bool | None, params: list[torch.Tensor]) -> ModuleType | None:
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


def plan_signature(param_groups: list[dict]) -> tuple:
    """Which tensors have a gradient now: a plan is built again only when this changes."""
    return tuple(tuple(i for i, p in enumerate(g["params"]) if p.grad is not None) for g in param_groups)


def build_plan(kernels: ModuleType, param_groups: list[dict], init_group: Callable[[dict], Any], state: dict):
    """The device tables (`kernels.FusedStep`) for the tensors that have gradients now
    (`init_group` creates their state lazily); None when no tensor has a gradient. The
    plan's step buffer becomes the tensors' `step` state."""
    entries = []
    for gi, group in enumerate(param_groups):
        w = init_group(group)
        slots = group.get("molf_slots")
        for k, i in enumerate(w.idx):
            slot = -1 if slots is None else slots[i]
            entries.append((group["params"][i], w.exp_avgs[k], w.exp_avg_sqs[k], w.steps[k], gi, slot))
    plan = kernels.FusedStep(entries) if entries else None
    if plan is not None:
        for p, step in zip(plan.params, plan.steps):
            state[p]["step"] = step
    return plan


def _moments_pass(plan, param_groups: list[dict], score: str, skip_nonfinite: bool, group, winners, lr_scale):
    """Moments of every tensor and the routed ones' score sums (the winners' updates too
    where `winners` is given; `lr_scale`: per slot, the multiplier of the expert's lr in
    its update, None: 1); the score sources and the hyper rows."""
    plan.step_buffer.add_(1)
    steps = plan.step_buffer.numpy().astype(np.float64)
    sums, flag, hyper = plan.moments(param_groups, steps, score, skip_nonfinite, winners, group, lr_scale)
    sources = _ScoreSources(flag if skip_nonfinite else None, group)
    sources.steps = [plan.step_buffer]
    routed = slice(0, plan.num_routed)
    group_lr = np.array([float(g["lr"]) for g in param_groups])
    sources.add(sums, plan.slots[routed], group_lr[plan.group_of[routed]], plan.global_numels[routed])
    return sources, flag, hyper


def fused_moments(
    plan,
    param_groups: list[dict],
    score: str,
    skip_nonfinite: bool,
    score_group: Callable[[], Any],
    winners: np.ndarray | None = None,
    lr_scale: np.ndarray | None = None,
) -> tuple[_ScoreSources, Callable[[np.ndarray], None]]:
    """One pass: moments of every tensor, score sums of the routed ones (and, with
    `winners` known in advance, their updates too); returns the score sources and the
    function applying the winners (`score_group`: returns the process group the sums are
    all-reduced over; `lr_scale`: per slot, the multiplier of the expert's lr in its
    update, None: 1)."""
    sources, flag, hyper = _moments_pass(plan, param_groups, score, skip_nonfinite, score_group(), winners, lr_scale)
    return sources, lambda winner_slots: plan.apply(winner_slots, hyper, flag)


def device_decision(plan, num_slots: int) -> DeviceDecision | None:
    """A `DeviceDecision` for the plan's routed tensors, None where it does not apply."""
    slots = plan.slots[: plan.num_routed]
    if not DeviceDecision.applies(slots, num_slots):
        return None
    return DeviceDecision(slots, plan.global_numels[: plan.num_routed], num_slots, plan.device)


def fused_device_step(
    plan,
    decision: DeviceDecision,
    rule: tuple,
    num_experts: int,
    param_groups: list[dict],
    score: str,
    skip_nonfinite: bool,
    lr_scale: np.ndarray | None = None,
) -> _ScoreSources:
    """An exact step that the device decides (`molf._device_routing`): moments and score
    sums, the winners by `rule` (`Router.forecast`'s, on scores at the groups' lr), their
    updates (at lr × `lr_scale` per slot; None: 1), and the copy of the sums and winners to
    the host started; returns the sources the host books the step from. No reduction over
    a process group (the caller checks there is none)."""
    sources, flag, hyper = _moments_pass(plan, param_groups, score, skip_nonfinite, None, None, lr_scale)
    lrs = plan.upload(np.asarray(sources.lrs, dtype=np.float64))
    won = decision.winners(decision.scores(sources.sums[0], lrs, score), rule, num_experts)
    plan.apply_on_device(decision.per_tensor(won), hyper, flag)
    sources.won = won
    sources.start_copy()
    return sources
