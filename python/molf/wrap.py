"""Turning a model's linear layers into routed modules, and back (`merge`)."""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch import nn

from ._core import ConfigError
from .config import ALL_LINEAR, MoLFConfig
from .distributed import full, is_sharded, merged_sharded
from .layer import MoLFLinear, is_linear_like

__all__ = ["wrap", "merge", "merged_state_dict", "routed_modules", "is_wrapped", "ExpertTag", "expert_tag", "retag"]

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


def _output_head(model: nn.Module) -> str | None:
    """The name of the output head that target_modules="all-linear" leaves out, by PEFT's
    rule: the module `get_output_embeddings()` returns, else a top-level `score` or
    `classifier` (classification heads); None if the model has neither."""
    head = None
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if callable(get_output_embeddings):
        try:
            head = get_output_embeddings()
        except (AttributeError, NotImplementedError):
            head = None
    if not isinstance(head, nn.Module):
        head = next((m for n in ("score", "classifier") if isinstance(m := getattr(model, n, None), nn.Module)), None)
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _slot_name(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


def _span(t: torch.Tensor) -> tuple[tuple[str, int], int, int] | None:
    """(storage key, first byte, end byte) of the memory `t` reads; None where there
    is none to compare (meta, empty, sharded, or a tensor subclass without storage)."""
    if is_sharded(t) or t.device.type == "meta" or t.numel() == 0:
        return None
    try:
        storage = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    start = t.data_ptr()
    extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return (str(t.device), storage), start, start + extent * t.element_size()


def _check_unshared(
    model: nn.Module, layers: list[tuple[str, nn.Module, nn.Module]], what: str, tie_advice: str, alias_advice: str
) -> None:
    """Refuse, naming both places, a layer whose module object sits at two places of
    `model`, or whose `owner`'s weight or bias is also registered elsewhere (tied
    weights: the same Parameter, or memory shared with another parameter).

    `layers`: (name, module at that name, module owning the weight and bias). An
    aliased parent (one module object under two names) is no sharing: the slots
    compared are (module object, attribute) pairs, each counted once. The
    advice strings end the messages (`{name}`: the layer's name).
    """
    homes: dict[int, list[str]] = {}
    params: dict[int, list[tuple[nn.Module, str]]] = {}
    spans: dict[tuple[str, int], list[tuple[nn.Module, str, int, int]]] = {}
    for mname, module in model.named_modules():
        for attr, child in module._modules.items():
            if child is not None:
                homes.setdefault(id(child), []).append(_slot_name(mname, attr))
        for attr, p in module._parameters.items():
            if p is None:
                continue
            params.setdefault(id(p), []).append((module, _slot_name(mname, attr)))
            span = _span(p)
            if span is not None:
                spans.setdefault(span[0], []).append((module, _slot_name(mname, attr), *span[1:]))
    embedding = None  # HF models: a head tied to the input embedding is the common case, name it
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        try:
            embedding = model.get_input_embeddings().weight
        except (AttributeError, NotImplementedError):
            pass
    for name, module, owner in layers:
        for m in dict.fromkeys((module, owner)):
            places = homes.get(id(m), [])
            if len(places) > 1:
                raise ConfigError(
                    f"{what}: the layer {places[0]} is also used as {', '.join(places[1:])} (one module object "
                    "at two places); molf adapts a layer at one place, while merge would change it at every "
                    f"place; {alias_advice.format(name=name)}"
                )
        for attr in ("weight", "bias"):
            p = getattr(owner, attr, None)
            if p is None:
                continue
            others = [n for m, n in params.get(id(p), []) if m is not owner]
            how = "tie_word_embeddings" if p is embedding else "the same tensor"
            span = _span(p)
            if not others and span is not None:
                others = [n for m, n, lo, hi in spans[span[0]] if m is not owner and lo < span[2] and span[1] < hi]
                how = "they share memory"
            if others:
                tensor = _slot_name(name, attr if owner is module else "base." + attr)
                raise ConfigError(
                    f"{what}: {tensor} is tied to {others[0]} ({how}), so merging {name}'s experts "
                    f"would change {others[0]} too; {tie_advice.format(name=name)}"
                )


def _tag_experts(name: str, order: int, layer: MoLFLinear, expert_names: tuple[str, ...]) -> None:
    for e, params in enumerate(layer.experts()):
        kind = "dense" if layer.fft and e == 0 else "lora"
        for p, part in zip(params, ("weight", "bias") if kind == "dense" else ("A", "B", "E")):
            setattr(p, _TAG_ATTR, ExpertTag(order, name, e, layer.num_experts, kind, expert_names[e], part))


def wrap(model: nn.Module, config: MoLFConfig | None = None) -> nn.Module:
    """Wrap the selected linear layers of `model` in place and return it.

    With `config.fft=False` (MoLF-Efficient) every parameter of the model except
    the LoRA experts is frozen; `merge` unfreezes them again.

    All or nothing: every check runs and every wrapped layer is built before the
    model is touched, so on any error the model is exactly as it was. Refused: a
    chosen layer whose weight or bias is tied to another parameter (e.g. `lm_head`
    under `tie_word_embeddings`), or whose module object sits at two places:
    `merge` would fold its experts into the other place too.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"wrap: model must be a torch.nn.Module, got {type(model).__name__}")
    config = config or MoLFConfig()
    if not isinstance(config, MoLFConfig):
        raise ConfigError(f"config must be a MoLFConfig, got {type(config).__name__}")
    if is_wrapped(model):
        raise ConfigError("model is already wrapped by molf; merge it first or wrap the original model")
    candidates = [(n, m) for n, m in model.named_modules() if n and is_linear_like(m)]
    targets = config.target_modules
    head = _output_head(model) if targets == ALL_LINEAR else None
    chosen = [
        (n, m)
        for n, m in candidates
        if (n != head if targets == ALL_LINEAR else targets is None or _matches(n, targets))
        and not _matches(n, config.exclude_modules)
    ]
    if not chosen:
        shown = ", ".join(n for n, _ in candidates[:8]) or "none"
        raise ConfigError(
            f"wrap matched no module: target_modules={config.target_modules}, "
            f"exclude_modules={config.exclude_modules}; linear layers in the model: {shown}"
        )
    _check_unshared(
        model,
        [(n, m, m) for n, m in chosen],
        "wrap",
        "exclude {name} (exclude_modules; the default excludes lm_head) or untie the weights first",
        "give each place its own layer, or exclude every name of it (exclude_modules)",
    )
    built = [
        (name, base, MoLFLinear(base, config.ranks, config.scales, config.dropout, config.fft, config.lora_form))
        for name, base in chosen
    ]
    frozen = [(n, p) for n, p in model.named_parameters() if p.requires_grad] if not config.fft else []
    swapped = 0
    try:
        for _, p in frozen:
            p.requires_grad_(False)
        for order, (name, _, layer) in enumerate(built):
            _set_submodule(model, name, layer)
            swapped += 1
            _tag_experts(name, order, layer, config.expert_names)
        setattr(model, _CONFIG_ATTR, config)
        setattr(model, _FROZEN_ATTR, [n for n, _ in frozen])
    except BaseException:
        # A module's own __setattr__ (or an interrupt) failed midway: put everything back.
        for name, base, _layer in built[:swapped]:
            _set_submodule(model, name, base)
        for _, _, layer in built:
            for p in layer.parameters():
                if hasattr(p, _TAG_ATTR):
                    delattr(p, _TAG_ATTR)
        for _, p in frozen:
            p.requires_grad_(True)
        for attr in (_CONFIG_ATTR, _FROZEN_ATTR):
            model.__dict__.pop(attr, None)
        raise
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

    Every layer is checked before any is changed: a wrapped layer whose dense
    weight or bias has become tied to another parameter since `wrap` (e.g. by
    `tie_weights()`) is refused, as folding its experts would change that
    parameter too.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"merge: model must be a torch.nn.Module, got {type(model).__name__}")
    layers = routed_modules(model)
    if not layers:
        raise ConfigError("merge: the model has no molf-wrapped layers (already merged, or never wrapped)")
    _check_unshared(
        model,
        [(n, layer, layer.base) for n, layer in layers],
        "merge",
        "nothing was changed; untie them first (give {name} a weight of its own)",
        "nothing was changed; give each place its own layer",
    )
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


def _merged_weight(layer: MoLFLinear) -> torch.Tensor:
    """The weight `merge` gives `layer` (as `MoLFLinear.merged` and `merged_sharded` compute
    it), as a new whole tensor; FSDP2 shards are gathered."""
    w = full(layer.base.weight.detach())
    if not layer.ranks:
        return w
    delta = layer.delta_weight(full)
    return (w.to(delta.dtype) + delta).to(w.dtype)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict `merge(model)` would leave, without changing `model`: training goes
    on with the wrapped model. A merged copy mid-training, loadable by any loader:
    `model.save_pretrained(dir, state_dict=molf.merged_state_dict(model))`.

    Keys are the unwrapped model's. Each wrapped layer's weight is bit for bit what `merge`
    writes, computed one layer at a time and kept on the CPU (a training run leaves no room
    on the device for a second copy of the model); every other entry is the model's own
    tensor. Under FSDP2 the shards are gathered (a collective: call it on every rank, each
    gets the whole dict on the CPU). `model` may sit inside a DDP or accelerate wrapper.
    """
    root = next((m for m in model.modules() if hasattr(m, _CONFIG_ATTR)), model)
    layers = routed_modules(root)
    if not layers:
        raise ConfigError("merged_state_dict: the model has no molf-wrapped layers (already merged, or never wrapped)")
    renamed: dict[str, tuple[str, torch.Tensor]] = {}
    dropped: set[str] = set()
    for name, layer in layers:
        for key, value in layer.state_dict().items():
            if key == "base.weight":
                renamed[f"{name}.{key}"] = (f"{name}.weight", _merged_weight(layer).cpu())
            elif key.startswith("base."):
                renamed[f"{name}.{key}"] = (f"{name}.{key[len('base.') :]}", value)
            else:
                dropped.add(f"{name}.{key}")  # the LoRA experts, folded into the weight
    out = {}
    for key, value in root.state_dict().items():
        if key in dropped:
            continue
        key, value = renamed.get(key, (key, value))
        out[key] = full(value).cpu() if is_sharded(value) else value
    return out
