"""The tensor math of one MoLF step, as functions over lists of tensors.

Op order follows torch's AdamW (lerp for the first moment, decay before the
step, `sqrt(v) / sqrt(bc2) + eps`), so the degenerate cases of the spec match
torch.optim.AdamW bit for bit.

On the CPU the score sums and the non-finite check run in the Rust core
(`molf._core.score_sums`, `molf._core.all_finite`), one pass over the tensors'
memory (read in place through numpy views) instead of a torch op per pass and
per tensor.
"""

from __future__ import annotations

import torch

from . import _core

Tensors = list[torch.Tensor]

_CORE_DTYPES = (torch.float32, torch.float64)


def core_reads(tensors: Tensors) -> bool:
    """Whether the Rust core can read every tensor in place: plain CPU tensors (no subclass
    such as a DTensor), contiguous, float32 or float64, outside autograd."""
    return all(
        type(t) is torch.Tensor and t.is_cpu and t.dtype in _CORE_DTYPES and t.is_contiguous() and not t.requires_grad
        for t in tensors
    )


def scores_in_core(exp_avgs: Tensors, exp_avg_sqs: Tensors) -> bool:
    """Whether `score_sums` runs in the Rust core: moments of one dtype that it `core_reads`."""
    return all(t.dtype == exp_avgs[0].dtype for t in exp_avg_sqs) and core_reads(exp_avgs + exp_avg_sqs)


def update_moments_(exp_avgs: Tensors, exp_avg_sqs: Tensors, grads: Tensors, beta1: float, beta2: float) -> None:
    """m <- b1 m + (1-b1) g ; v <- b2 v + (1-b2) g^2, for every tensor."""
    if not grads:
        return
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)


def score_sums(
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    eps: float,
    score: str,
    scratch: tuple[Tensors | None, Tensors | None] | None = None,
) -> torch.Tensor:
    """Per tensor, the float64 sum behind each score (raw moments, no bias correction).

    epd: sum m^2 / (sqrt(v) + eps);  pfn: sum (m / (sqrt(v) + eps))^2.
    Returned as one device tensor so the host reads all of them with one sync.
    Where `scores_in_core`: one pass in the Rust core, each term in the moments' dtype with
    IEEE (correctly rounded) sqrt and division, as numpy computes them, summed in float64.
    (torch's vectorised CPU sqrt is not correctly rounded: 1 ulp off for ~0.7% of float32
    inputs, so the torch ops below give CPU terms up to ~2^-22 apart from these.)
    Otherwise torch ops; `scratch`: lists of tensors shaped like the moments for the denominators and the terms
    (either may be None), computed in place: on the CPU fresh temporaries cost more than
    the arithmetic, since every large allocation faults its pages in anew.
    """
    if scores_in_core(exp_avgs, exp_avg_sqs):
        sums = _core.score_sums([t.numpy() for t in exp_avgs], [t.numpy() for t in exp_avg_sqs], eps, score)
        return torch.from_numpy(sums)
    denom_buf, terms = scratch if scratch is not None else (None, None)
    if denom_buf is None:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    else:
        denom = denom_buf
        torch._foreach_copy_(denom, exp_avg_sqs)
        torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    if score == "epd":
        if terms is None:
            terms = torch._foreach_mul(exp_avgs, exp_avgs)
        else:
            torch._foreach_copy_(terms, exp_avgs)
            torch._foreach_mul_(terms, exp_avgs)
        torch._foreach_div_(terms, denom)
    else:
        if terms is None:
            terms = torch._foreach_div(exp_avgs, denom)
        else:
            torch._foreach_copy_(terms, exp_avgs)
            torch._foreach_div_(terms, denom)
        torch._foreach_mul_(terms, terms)
    return torch.stack([t.sum(dtype=torch.float64) for t in terms])


def adamw_update_(
    params: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    step: float,
    lr: float,
    weight_decay: float,
    beta1: float,
    beta2: float,
    eps: float,
    scratch: Tensors | None = None,
) -> None:
    """Decoupled decay then the bias-corrected Adam step, all tensors sharing `step`
    (`scratch`: tensors shaped like the moments for the denominator, as in `score_sums`)."""
    if not params:
        return
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    if scratch is None:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    else:
        denom = scratch
        torch._foreach_copy_(denom, exp_avg_sqs)
        torch._foreach_sqrt_(denom)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, -(lr / bias_correction1))


def any_nonfinite(tensors: Tensors) -> bool:
    """True if any tensor holds a NaN or an infinity (one host read)."""
    if core_reads(tensors):
        return not _core.all_finite([t.numpy() for t in tensors])
    if tensors and tensors[0].device.type == "cpu":
        # A NaN or an infinity makes the sum non-finite, so finite sums prove the
        # tensors finite; a non-finite sum may be an overflow, so check exactly then.
        # On the CPU this is ~15x faster than the max-norm below.
        if bool(torch.stack([t.sum() for t in tensors]).isfinite().all()):
            return False
        return not all(bool(torch.isfinite(t).all()) for t in tensors)
    by_dtype: dict[torch.dtype, Tensors] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    finite = [torch.stack(torch._foreach_norm(ts, float("inf"))).isfinite().all() for ts in by_dtype.values()]
    return not bool(torch.stack(finite).all())
