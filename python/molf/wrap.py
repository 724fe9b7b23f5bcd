"""Turning a model's linear layers into routed modules, and back (`merge`)."""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch import nn

from ._core import ConfigError
from .config import MoLFConfig
from .distributed import is_sharded, merged_sharded
from .layer import MoLFLinear, is_linear_like

__all__ = ["wrap", "merge", "routed_modules", "is_wrapped", "ExpertTag", "expert_tag", "retag"]

_CONFIG_ATTR = "molf_config"
_FROZEN_ATTR = "_molf_frozen_by_wrap"
_TAG_ATTR = "_molf_expert"
# Every model wrap() returned and still alive: `retag` finds them when the
# optimizer is given bare parameters that FSDP2 has swapped (HF Trainer, accelerate).
_WRAPPED_MODELS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class ExpertTag(NamedTuple):
    """Where a parameter sits in the routing structure, fixed at wrap time.

    The optimizer reads these tags to build its param groups, so it works the
    same whether it is given the model or plain parameter groups (HF Trainer).
    """

    order: int  # position of the module among the wrapped ones
    module: str  # module name at wrap time
    expert: int  # expert index within the module
    num_experts: int
    kind: str  # "dense" or "lora"
    name: str  # expert name, e.g. "dense", "lora0_r16"
    part: str  # "weight" or "bias" (dense), "A" or "B" (LoRA)


def expert_tag(p: torch.Tensor) -> ExpertTag | None:
    return getattr(p, _TAG_ATTR, None)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def routed_modules(model: nn.Module) -> list[tuple[str, MoLFLinear]]:
    """The wrapped layers of `model`, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoLFLinear)]


def is_wrapped(model: nn.Module) -> bool:
    return any(isinstance(m, MoLFLinear) for m in model.modules())


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _tag_experts(name: str, order: int, layer: MoLFLinear, expert_names: tuple[str, ...]) -> None:
    for e, params in enumerate(layer.experts()):
        kind = "dense" if layer.fft and e == 0 else "lora"
        for p, part in zip(params, ("weight", "bias") if kind == "dense" else ("A", "B")):
            setattr(p, _TAG_ATTR, ExpertTag(order, name, e, layer.num_experts, kind, expert_names[e], part))


def wrap(model: nn.Module, config: MoLFConfig | None = None) -> nn.Module:
    """Wrap the selected linear layers of `model` in place and return it.

    With `config.fft=False` (MoLF-Efficient) every parameter of the model except
    the LoRA experts is frozen; `merge` unfreezes them again.
    """
    config = config or MoLFConfig()
    if not isinstance(config, MoLFConfig):
        raise ConfigError(f"config must be a MoLFConfig, got {type(config).__name__}")
    if is_wrapped(model):
        raise ConfigError("model is already wrapped by molf; merge it first or wrap the original model")
    candidates = [(n, m) for n, m in model.named_modules() if n and is_linear_like(m)]
    chosen = [
        (n, m)
        for n, m in candidates
        if (config.target_modules is None or _matches(n, config.target_modules))
        and not _matches(n, config.exclude_modules)
    ]
    if not chosen:
        shown = ", ".join(n for n, _ in candidates[:8]) or "none"
        raise ConfigError(
            f"wrap matched no module: target_modules={config.target_modules}, "
            f"exclude_modules={config.exclude_modules}; linear layers in the model: {shown}"
        )
    frozen: list[str] = []
    if not config.fft:
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen.append(n)
    for order, (name, base) in enumerate(chosen):
        layer = MoLFLinear(base, config.ranks, config.scales, config.dropout, config.fft)
        _set_submodule(model, name, layer)
        _tag_experts(name, order, layer, config.expert_names)
    setattr(model, _CONFIG_ATTR, config)
    setattr(model, _FROZEN_ATTR, frozen)
    _WRAPPED_MODELS.add(model)
    return model


def retag(model: nn.Module | None = None) -> None:
    """Attach the expert tags again to the current parameter objects of `model`'s
    wrapped layers (default: of every wrapped model alive). FSDP2's `fully_shard`
    replaces each parameter by a new DTensor parameter without the tag; the
    routing structure is recovered from the layers, whose names and order do
    not change. `MoLFAdamW` calls this itself."""
    roots = [model] if model is not None else list(_WRAPPED_MODELS)
    for root in roots:
        # The wrapped model may sit inside a wrapper (DDP's `module.`): name layers from it.
        wrapped = next((m for m in root.modules() if hasattr(m, _CONFIG_ATTR)), None)
        if wrapped is None:
            continue
        expert_names = getattr(wrapped, _CONFIG_ATTR).expert_names
        for order, (name, layer) in enumerate(routed_modules(wrapped)):
            _tag_experts(name, order, layer, expert_names)


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every expert into its dense weight and restore plain linear layers.

    The result is a vanilla model (`save_pretrained` gives weights any loader
    reads); parameters that `wrap` froze for MoLF-Efficient are trainable again.
    """
    layers = routed_modules(model)
    if not layers:
        raise ConfigError("merge: the model has no molf-wrapped layers (already merged, or never wrapped)")
    for name, layer in layers:
        base = merged_sharded(layer) if is_sharded(layer.base.weight) else layer.merged()
        for p in base.parameters():
            if hasattr(p, _TAG_ATTR):
                delattr(p, _TAG_ATTR)
        _set_submodule(model, name, base)
    params = dict(model.named_parameters())
    for n in getattr(model, _FROZEN_ATTR, ()):
        if n in params:
            params[n].requires_grad_(True)
    for attr in (_CONFIG_ATTR, _FROZEN_ATTR):
        if attr in model.__dict__:
            delattr(model, attr)
    return model
