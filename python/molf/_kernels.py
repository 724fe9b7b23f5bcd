"""The tensor math of one MoLF step, as functions over lists of tensors.

Op order follows torch's AdamW (lerp for the first moment, decay before the
step, `sqrt(v) / sqrt(bc2) + eps`), so the degenerate cases of the spec match
torch.optim.AdamW bit for bit.
"""

from __future__ import annotations

import torch

Tensors = list[torch.Tensor]


def update_moments_(exp_avgs: Tensors, exp_avg_sqs: Tensors, grads: Tensors, beta1: float, beta2: float) -> None:
    """m <- b1 m + (1-b1) g ; v <- b2 v + (1-b2) g^2, for every tensor."""
    if not grads:
        return
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)


def score_sums(
    exp_avgs: Tensors, exp_avg_sqs: Tensors, eps: float, score: str, scratch: tuple[Tensors, Tensors] | None = None
) -> torch.Tensor:
    """Per tensor, the float64 sum behind each score (raw moments, no bias correction).

    epd: sum m^2 / (sqrt(v) + eps);  pfn: sum (m / (sqrt(v) + eps))^2.
    Returned as one device tensor so the host reads all of them with one sync.
    `scratch`: two lists of tensors shaped like the moments that the math runs in, in place
    (the same ops in the same order): on the CPU fresh temporaries cost more than the
    arithmetic, since every large allocation faults its pages in anew.
    """
    if scratch is None:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    else:
        denom, terms = scratch
        torch._foreach_copy_(denom, exp_avg_sqs)
        torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    if score == "epd":
        if scratch is None:
            terms = torch._foreach_mul(exp_avgs, exp_avgs)
        else:
            torch._foreach_copy_(terms, exp_avgs)
            torch._foreach_mul_(terms, exp_avgs)
        torch._foreach_div_(terms, denom)
    else:
        if scratch is None:
            terms = torch._foreach_div(exp_avgs, denom)
        else:
            torch._foreach_copy_(terms, exp_avgs)
            torch._foreach_div_(terms, denom)
        torch._foreach_mul_(terms, terms)
    return torch.stack([t.sum(dtype=torch.float64) for t in terms])


def adamw_update_(
    params: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, step: float, lr: float,
    weight_decay: float, beta1: float, beta2: float, eps: float, scratch: Tensors | None = None,
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
