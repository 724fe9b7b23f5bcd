"""The step's foreach path (CPU, or CUDA without triton): per param group, the moments
of every tensor, plain AdamW for unrouted parameters, the routed tensors' score sums, and
the winners' AdamW, as torch foreach ops over the group's tensors (the tensor math is
`molf._kernels`')."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
import torch

from . import _kernels
from ._score_sources import _ScoreSources

__all__ = ["_GroupWork", "foreach_moments", "foreach_update", "scratch_for"]


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


def scratch_for(cache: dict, gi: int, w: _GroupWork) -> tuple[list, list | None] | None:
    """CPU only: tensors shaped like group `gi`'s moments for the step's temporaries,
    kept across steps in `cache` (on the CPU a fresh large temporary costs more than the arithmetic
    done in it): the AdamW denominators, and for a routed group whose score sums the Rust
    core does not compute (`_kernels.scores_in_core`: e.g. bf16 moments) the terms
    of `_kernels.score_sums`' torch path; else None. None on other devices, whose
    allocators cache."""
    if not w.params or w.exp_avgs[0].device.type != "cpu":
        return None
    key = tuple(w.idx)
    cached = cache.get(gi)
    if cached is None or cached[0] != key:
        torch_scores = w.group["molf_role"] != "plain" and not _kernels.scores_in_core(w.exp_avgs, w.exp_avg_sqs)
        cached = (
            key,
            [torch.empty_like(m) for m in w.exp_avgs],
            [torch.empty_like(m) for m in w.exp_avgs] if torch_scores else None,
        )
        cache[gi] = cached
    return cached[1], cached[2]


def foreach_moments(
    work: list[_GroupWork], scratch: list, score: str, score_group: Any, lr_scale: np.ndarray | None = None
):
    """Moments of every tensor, unrouted parameters' AdamW, routed tensors'
    score sums; returns the sources and the function applying the winners (`lr_scale`:
    per slot, the multiplier of the expert's learning rate in its update, None: 1; the
    scores keep the group's)."""
    sources = _ScoreSources(None, score_group)
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
            foreach_update(w, range(len(w.params)), None if tmp is None else tmp[0])
            continue
        sums = _kernels.score_sums(exp_avgs, w.exp_avg_sqs, w.group["eps"], score, tmp)
        slots = w.group["molf_slots"]
        numels = [w.group["params"][i].numel() for i in w.idx]  # global element counts under FSDP2
        sources.add(sums, [slots[i] for i in w.idx], [float(w.group["lr"])] * len(w.idx), numels)

    def apply_winners(winner_slots: np.ndarray) -> None:
        for w, tmp in zip(work, scratch):
            if w.group["molf_role"] != "plain" and w.params:
                slots = np.asarray(w.group["molf_slots"], dtype=np.int64)[w.idx]
                scale = None if lr_scale is None else lr_scale[slots]
                foreach_update(w, np.flatnonzero(winner_slots[slots]), None if tmp is None else tmp[0], scale)

    return sources, apply_winners


def foreach_update(
    w: _GroupWork, positions: Iterable[int], scratch: list | None = None, lr_scale: np.ndarray | None = None
) -> None:
    """AdamW from the (already advanced) moments for the tensors at `positions`,
    batched by (step count, parameter dtype, learning rate) for torch's foreach ops
    (`scratch`: a tensor shaped like each moment for the denominator, see `scratch_for`;
    `lr_scale`: per tensor of `w`, the multiplier of the group's lr, None: 1)."""
    beta1, beta2 = w.group["betas"]
    group_lr = float(w.group["lr"])
    batches: dict[tuple, list[int]] = defaultdict(list)
    for k in positions:
        lr = group_lr if lr_scale is None else group_lr * float(lr_scale[k])
        batches[(w.step_values[k], w.params[k].dtype, lr)].append(k)
    for (step, _p_dtype, lr), ks in batches.items():
        ps, ms, vs = [w.params[k] for k in ks], [w.exp_avgs[k] for k in ks], [w.exp_avg_sqs[k] for k in ks]
        upcast = [p.dtype != m.dtype for p, m in zip(ps, ms)]
        targets = [p.to(m.dtype) if u else p for p, m, u in zip(ps, ms, upcast)]
        _kernels.adamw_update_(
            targets,
            ms,
            vs,
            step,
            lr,
            w.group["weight_decay"],
            beta1,
            beta2,
            w.group["eps"],
            None if scratch is None else [scratch[k] for k in ks],
        )
        for p, t, u in zip(ps, targets, upcast):
            if u:
                p.copy_(t)
