"""`MoLFLinear`: a linear layer whose dense weight and LoRA adapters are all experts.

    y = W x + b + sum_i s_i * B_i A_i dropout(x)

(with `MoLFConfig(lora_form="svd")`: s_i * B_i diag(λ_i) A_i, AdaLoRA's form).

Every expert sits in the forward pass, so every expert receives its exact
gradient each step; the optimizer decides which of them is updated.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ._core import ConfigError
from .config import LORA_FORMS
from .routed_linear import routed_apply

__all__ = ["MoLFLinear", "is_linear_like"]

SVD_INIT_STD = 0.02  # A and B of a "svd"-form expert, as peft's AdaLoRA draws them


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: y = x @ W + b with W of shape (in, out).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear_like(module: nn.Module) -> bool:
    """True for torch Linear layers and HF Conv1D (transposed weight)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


class MoLFLinear(nn.Module):
    """A wrapped linear layer: expert 0 is the dense weight (when `fft`), the
    others are LoRA pairs (A_i: r_i x in, B_i: out x r_i), in the "svd" form with
    λ_i (r_i) between them."""

    def __init__(
        self,
        base: nn.Module,
        ranks: tuple[int, ...],
        scales: tuple[float, ...],
        dropout: float = 0.0,
        fft: bool = True,
        form: str = "ba",
    ) -> None:
        super().__init__()
        if not is_linear_like(base):
            raise TypeError(f"MoLFLinear wraps nn.Linear or HF Conv1D, got {type(base).__name__}")
        if form not in LORA_FORMS:
            raise ConfigError(f"form must be one of {LORA_FORMS}, got {form!r}")
        self.base = base
        self.transposed = _is_conv1d(base)
        weight = base.weight
        self.in_features, self.out_features = (
            (weight.shape[0], weight.shape[1]) if self.transposed else (weight.shape[1], weight.shape[0])
        )
        self.fft = fft
        self.form = form
        self.ranks = tuple(ranks)
        self.scales = tuple(float(s) for s in scales)
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A = nn.ParameterList([nn.Parameter(torch.empty(r, self.in_features, **kw)) for r in self.ranks])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(self.out_features, r, **kw)) for r in self.ranks])
        if form == "svd":  # λ = 0: the layer computes what the base does, and A and B get gradients
            self.lora_E = nn.ParameterList([nn.Parameter(torch.zeros(r, **kw)) for r in self.ranks])
            for p in (*self.lora_A, *self.lora_B):
                nn.init.normal_(p, 0.0, SVD_INIT_STD)
        else:
            self.lora_E = None
            for a in self.lora_A:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def __setstate__(self, state: dict) -> None:
        if "form" not in state:  # pickled before `lora_form` existed: the B·A form
            state["form"], state["lora_E"] = "ba", None
        super().__setstate__(state)

    @property
    def num_experts(self) -> int:
        return len(self.ranks) + int(self.fft)

    def experts(self) -> list[list[nn.Parameter]]:
        """The parameters of each expert, in expert order."""
        lora = [[a, b] for a, b in zip(self.lora_A, self.lora_B)]
        if self.form == "svd":
            lora = [pair + [e] for pair, e in zip(lora, self.lora_E)]
        if not self.fft:
            return lora
        dense = [self.base.weight] + ([self.base.bias] if self.base.bias is not None else [])
        return [dense] + lora

    def _fused(self, base: nn.Module) -> bool:
        """Whether forward may run as one `routed_linear` node. Not with LoRA dropout
        live (the composition draws the mask), nor without a LoRA expert (the base is
        one node already), nor where calling `base` does more than its GEMM: a subclass
        (quantized layers) or hooks on it (e.g. FSDP2's `fully_shard(base)` gathers
        its weight in a pre-forward hook)."""
        return (
            bool(self.ranks)
            and not (self.training and isinstance(self._modules["lora_dropout"], nn.Dropout))
            and (type(base) is nn.Linear or self.transposed)
            and not (base._forward_pre_hooks or base._forward_hooks or base._backward_pre_hooks or base._backward_hooks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Submodules and parameters through their dicts, not attribute access (nn.Module's
        # __getattr__) nor the ParameterLists' iterators: each of those costs about a
        # microsecond per layer and step, and the step is bound by the host (issue #32).
        # Read afresh each call: FSDP2 swaps the parameter objects.
        modules = self._modules
        base = modules["base"]
        if self._fused(base):
            params = base._parameters
            return routed_apply(
                x,
                params["weight"],
                params.get("bias"),
                self.transposed,
                self.scales,
                *modules["lora_A"]._parameters.values(),
                *modules["lora_B"]._parameters.values(),
                *(modules["lora_E"]._parameters.values() if self.form == "svd" else ()),
            )
        y = base(x)
        h = self.lora_dropout(x)
        for a, b, lam, s in zip(self.lora_A, self.lora_B, self._lambdas(), self.scales):
            t = F.linear(h, a)
            y = y + s * F.linear(t if lam is None else t * lam, b)
        return y

    def lora_pairs(self, get: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> list[tuple]:
        """(A_i, B_i, s_i) of each LoRA expert as a plain LoRA pair, ΔW_i = s_i B_i A_i: in the
        "svd" form λ_i is folded into B_i (B_i diag(λ_i)). `get` maps each tensor first (a cast,
        the gathering of an FSDP2 shard), so the fold happens in what it returns."""
        return [
            (get(a), get(b) if lam is None else get(b) * get(lam), s)
            for a, b, lam, s in zip(self.lora_A, self.lora_B, self._lambdas(), self.scales)
        ]

    def _lambdas(self) -> list:
        """λ_i of each LoRA expert in the "svd" form, None for each in the B·A form."""
        return list(self.lora_E) if self.form == "svd" else [None] * len(self.ranks)

    @torch.no_grad()
    def delta_weight(self, get: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
        """sum_i s_i B_i A_i, shaped like `base.weight`, in at least float32. `get` maps each
        expert tensor first (under FSDP2: gathers its shard)."""
        dtype = torch.promote_types(self.base.weight.dtype, torch.float32)
        delta = sum(s * (b @ a) for a, b, s in self.lora_pairs(lambda t: get(t).to(dtype)))
        return delta.T if self.transposed else delta

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base layer with every LoRA expert folded into its weight."""
        if not self.ranks:
            return self.base
        w = self.base.weight
        delta = self.delta_weight()
        w.copy_((w.to(delta.dtype) + delta).to(w.dtype))
        return self.base

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, fft={self.fft}, "
            f"ranks={self.ranks}, scales={tuple(round(s, 4) for s in self.scales)}"
            + (f", form={self.form}" if self.form != "ba" else "")
        )
