"""The optimizer's param groups: the user's (a model, parameters or Trainer-style group
dicts) split by role (plain / dense expert / LoRA expert) and decay, the routed module and
expert names, and the dtype of the moments (SPEC §2, §5)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._core import ConfigError
from ._options import DEFAULT_LR
from .checkpoint import check_group_values
from .wrap import expert_tag, retag

__all__ = ["ROLES", "build_groups", "user_groups", "check_added_group", "resolve_state_dtype", "state_dtype_for"]

ROLES = ("plain", "dense", "lora")
LOW_PRECISION = (torch.bfloat16, torch.float16)


def resolve_state_dtype(state_dtype: Any) -> str | torch.dtype:
    if state_dtype in ("auto", "param"):
        return state_dtype
    if isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point:
        return state_dtype
    raise ConfigError(f"state_dtype must be 'auto', 'param' or a floating torch.dtype, got {state_dtype!r}")


def user_groups(params: Any) -> tuple[list[dict], bool]:
    """The param groups `params` stands for, and whether they were given as group dicts."""
    if isinstance(params, nn.Module):
        return [{"params": [p for p in params.parameters() if p.requires_grad]}], False
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
        return out, True
    if all(isinstance(p, torch.Tensor) for p in items):
        return [{"params": items}], False
    raise ConfigError("params must be a model, an iterable of parameters, or an iterable of param-group dicts")


def build_groups(params, lr, lora_lr, weight_decay, lora_weight_decay) -> tuple[list[dict], list[str], list[str]]:
    """Split each user group by role (plain / dense expert / LoRA expert) and
    decay; return the groups, the routed module names and the expert names.
    `lr` None: not given (DEFAULT_LR), refused for group dicts without their own."""
    groups_given, as_dicts = user_groups(params)
    for i, g in enumerate(groups_given):
        check_group_values(g, f"param group {i}")
    retag(params if isinstance(params, nn.Module) else None)  # FSDP2 may have dropped the tags
    seen: set[int] = set()
    tags = []
    places: dict[tuple, str] = {}
    for g in groups_given:
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
    if lr is None:
        if as_dicts and any("lr" not in g for g in groups_given):
            # How the HF Trainer calls optimizer_cls(groups, **kwargs): its learning_rate is not passed.
            raise ConfigError(
                "MoLFAdamW got param groups without an 'lr' and no lr argument, so the dense experts and "
                f"unrouted parameters would train at the default {DEFAULT_LR}. Give lr=...; under the Hugging Face "
                "Trainer's optimizer_cls_and_kwargs (which passes no learning rate) put "
                "lr=args.learning_rate in the kwargs"
            )
        lr = DEFAULT_LR

    groups: list[dict] = []
    for g in groups_given:
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
        groups.extend(split[k] for k in sorted(split, key=lambda k: (ROLES.index(k[0]), not k[1])))
    return groups, module_names, expert_names


def state_dtype_for(state_dtype: str | torch.dtype, p: torch.Tensor) -> torch.dtype:
    """The dtype of `p`'s moments under the optimizer's `state_dtype` (resolved)."""
    if state_dtype == "param":
        return p.dtype
    if state_dtype == "auto":
        return torch.float32 if p.dtype in LOW_PRECISION else p.dtype
    return state_dtype


def check_added_group(param_group: Any, defaults: dict) -> None:
    """Refuse (ConfigError) a group given to `add_param_group` that is not a dict of unrouted
    parameters with values in range (checked like the constructor's, over `defaults`); mark
    it a plain group."""
    if not isinstance(param_group, dict) or "params" not in param_group:
        raise ConfigError("add_param_group takes a dict with a 'params' key")
    params = param_group["params"]
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    if any(expert_tag(p) is not None for p in params if isinstance(p, torch.Tensor)):
        raise ConfigError(
            "add_param_group: experts of molf-wrapped layers can only be routed by the optimizer "
            "built over them; build the MoLFAdamW with every wrapped layer instead"
        )
    check_group_values({**defaults, **param_group}, "add_param_group")
    if param_group.get("molf_role", "plain") != "plain":
        raise ConfigError(f"add_param_group: molf_role must be 'plain', got {param_group['molf_role']!r}")
    param_group.setdefault("molf_role", "plain")
