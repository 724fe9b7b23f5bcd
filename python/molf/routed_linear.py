"""The routed layer's forward and backward as one autograd Function.

    y = x Wᵀ + b + Σ_i s_i (x A_iᵀ) B_iᵀ        (the "ba" form)
    y = x Wᵀ + b + Σ_i s_i ((x A_iᵀ) ⊙ λ_i) B_iᵀ  (the "svd" form, `MoLFConfig(lora_form="svd")`)

The plain composition `base(x) + s * F.linear(F.linear(x, A), B)` costs, per
LoRA expert, a scalar multiply and an add over the whole tokens × out
activation in the forward, a MulBackward over it and an add of two tokens × in
input gradients in the backward, and half a dozen autograd nodes; on a GPU a
wrapped model's step is then bound by launching them (issue #32). Here the
dense GEMM writes y, each expert adds into y in place with its scale in the
GEMM's alpha, the backward reuses gy B_i for both dA_i and dx, and every
gradient nobody needs (MoLF-Efficient's frozen W and b, a first layer's input)
is skipped: one autograd node, GEMMs and one sum.

Not done: LoRAFusion's [W | B]·[x ; A x]. A concatenated operand is a fresh
copy of W (or of x) every step, more memory traffic than the second, skinny
GEMM (K = r) it saves; `benches/layer_bench.py` measures it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

__all__ = ["RoutedLinearFunction", "routed_apply", "routed_linear"]


def _autocast_operands(x: torch.Tensor, tensors: tuple) -> tuple:
    """`tensors` as F.linear would see them under autocast on x's device: floating
    tensors other than float64 in the autocast dtype. Casting here (and saving
    the casts) makes the backward independent of the autocast state it runs under."""
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors
    )


class RoutedLinearFunction(torch.autograd.Function):
    """apply(x, weight, bias, transposed, scales, A_0, …, A_{n-1}, B_0, …, B_{n-1}[, λ_0, …, λ_{n-1}]).

    `weight` is (out, in), or (in, out) with `transposed` (HF Conv1D); `bias` may be
    None; `scales` holds the n floats s_i; the λ_i (r_i) are given for the "svd" form.
    x is (..., in) and may be non-contiguous.
    """

    # The step is bound by the host (issue #32): each torch call from Python costs
    # microseconds, so the bodies below make as few as the math allows.

    @staticmethod
    def forward(ctx, x, weight, bias, transposed, scales, *lora):
        y, saved = _forward(x, weight, bias, transposed, scales, lora)
        ctx.save_for_backward(*saved)
        ctx.meta = transposed, scales, x.shape
        return y

    @staticmethod
    def backward(ctx, gy):
        # Under create_graph the gradients would be differentiated again, but t_i is
        # saved without its graph: there a double backward must raise, not be wrong.
        # once_differentiable's no_grad context costs microseconds, so only then.
        if torch.is_grad_enabled():
            return _backward_once(ctx, gy)
        return _backward(ctx, gy)


def _forward(x, weight, bias, transposed, scales, lora) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """y (shaped like x) and what the backward reads: x as a matrix, W, the A_i, B_i (and λ_i)
    as the GEMMs saw them (cast under autocast) and the t_i = x A_iᵀ."""
    if torch.is_autocast_enabled(x.device.type):
        x, weight, bias, *lora = _autocast_operands(x, (x, weight, bias, *lora))
    n = len(scales)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if not transposed:
        y = F.linear(x2, weight, bias)
    else:
        y = x2.mm(weight) if bias is None else torch.addmm(bias, x2, weight)
    ts = [F.linear(x2, a) for a in lora[:n]]
    bs = lora[n : 2 * n] if len(lora) == 2 * n else [b * lam for b, lam in zip(lora[n : 2 * n], lora[2 * n :])]
    for t, b, s in zip(ts, bs, scales):
        y.addmm_(t, b.t(), alpha=s)
    return (y if x2 is x else y.view(*x.shape[:-1], y.shape[-1])), (x2, weight, *lora, *ts)


def _backward(ctx, gy):
    transposed, scales, x_shape = ctx.meta
    n = len(scales)
    x2, weight, *rest = ctx.saved_tensors
    svd = len(rest) == 4 * n  # A, B, λ and t per expert ("ba": A, B, t)
    need_x, need_w, need_bias, _, _, *need = ctx.needs_input_grad
    gy2 = gy if gy.dim() == 2 else gy.reshape(-1, gy.shape[-1])
    gy2t = gy2.t()
    dx = dw = dbias = None
    if need_x:
        dx = gy2.mm(weight.t() if transposed else weight)
    if need_w:
        dw = x2.t().mm(gy2) if transposed else gy2t.mm(x2)
    if need_bias:
        dbias = gy2.sum(0)
    grads = [None] * len(need)
    for i, s in enumerate(scales):
        a, b, t = rest[i], rest[n + i], rest[(3 if svd else 2) * n + i]
        lam = rest[2 * n + i] if svd else None
        # svd: the expert is s (t_i B_iλᵀ) with B_iλ = B_i diag(λ_i), products of out × r
        # (B_iλ again rather than saved: out × r more activation memory per expert).
        # beta=0: the first operand only lends its shape (never read), and the
        # scale rides in the GEMM instead of a separate multiply.
        if need[n + i] or (svd and need[2 * n + i]):
            db = torch.addmm(b, gy2t, t, beta=0, alpha=s)  # (svd: the gradient of B_iλ)
            if svd:
                if need[2 * n + i]:
                    grads[2 * n + i] = torch.linalg.vecdot(db, b, dim=0)
                db = db.mul_(lam) if need[n + i] else None
            grads[n + i] = db
        if need[i] or need_x:
            g = gy2.mm(b if lam is None else b * lam)  # the gradient of t_i, divided by s_i
            if need[i]:
                grads[i] = torch.addmm(a, g.t(), x2, beta=0, alpha=s)
            if need_x:
                dx.addmm_(g, a, alpha=s)
    if dx is not None and len(x_shape) != 2:
        dx = dx.view(x_shape)
    return (dx, dw, dbias, None, None, *grads)


_backward_once = once_differentiable(_backward)


def routed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    scales: Sequence[float],
    transposed: bool = False,
) -> torch.Tensor:
    """x Wᵀ + b + Σ_i s_i B_i A_i x (x W + b + … for a transposed (in, out) weight), one autograd node."""
    return routed_apply(x, weight, bias, transposed, tuple(scales), *lora_A, *lora_B)


def routed_apply(x, weight, bias, transposed, scales, *lora) -> torch.Tensor:
    """`RoutedLinearFunction.apply`'s arguments and result. Where no graph is recorded
    (evaluation, the held-out probe's shrink trials) the same kernels run without the
    Function's machinery, which costs as much host time as the layer's GEMMs launch."""
    if torch.is_grad_enabled():
        return RoutedLinearFunction.apply(x, weight, bias, transposed, scales, *lora)
    return _forward(x, weight, bias, transposed, scales, lora)[0]
