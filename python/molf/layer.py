"""`MoLFLinear`: a linear layer whose dense weight and LoRA adapters are all experts.

    y = W x + b + sum_i s_i * B_i A_i dropout(x)

Every expert sits in the forward pass, so every expert receives its exact
gradient each step; the optimizer decides which of them is updated.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .routed_linear import routed_apply

__all__ = ["MoLFLinear", "is_linear_like"]


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: y = x @ W + b with W of shape (in, out).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear_like(module: nn.Module) -> bool:
    """True for torch Linear layers and HF Conv1D (transposed weight)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


class MoLFLinear(nn.Module):
    """A wrapped linear layer: expert 0 is the dense weight (when `fft`), the
    others are LoRA pairs (A_i: r_i x in, B_i: out x r_i)."""

    def __init__(
        self,
        base: nn.Module,
        ranks: tuple[int, ...],
        scales: tuple[float, ...],
        dropout: float = 0.0,
        fft: bool = True,
    ) -> None:
        super().__init__()
        if not is_linear_like(base):
            raise TypeError(f"MoLFLinear wraps nn.Linear or HF Conv1D, got {type(base).__name__}")
        self.base = base
        self.transposed = _is_conv1d(base)
        weight = base.weight
        self.in_features, self.out_features = (
            (weight.shape[0], weight.shape[1]) if self.transposed else (weight.shape[1], weight.shape[0])
        )
        self.fft = fft
        self.ranks = tuple(ranks)
        self.scales = tuple(float(s) for s in scales)
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A = nn.ParameterList([nn.Parameter(torch.empty(r, self.in_features, **kw)) for r in self.ranks])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(self.out_features, r, **kw)) for r in self.ranks])
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def num_experts(self) -> int:
        return len(self.ranks) + int(self.fft)

    def experts(self) -> list[list[nn.Parameter]]:
        """The parameters of each expert, in expert order."""
        lora = [[a, b] for a, b in zip(self.lora_A, self.lora_B)]
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
            )
        y = base(x)
        h = self.lora_dropout(x)
        for a, b, s in zip(self.lora_A, self.lora_B, self.scales):
            y = y + s * F.linear(F.linear(h, a), b)
        return y

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """sum_i s_i B_i A_i, shaped like `base.weight`, in at least float32."""
        dtype = torch.promote_types(self.base.weight.dtype, torch.float32)
        delta = sum(s * (b.to(dtype) @ a.to(dtype)) for a, b, s in zip(self.lora_A, self.lora_B, self.scales))
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
        )
