"""Checks of param-group values and of optimizer checkpoints, run before anything changes,
and the molf meta (router, ledger, bookkeeping) that a checkpoint carries.

`MoLFAdamW` validates every group it is given (constructor, `add_param_group`) and every
checkpoint it loads against itself first, so a bad value or a checkpoint of another model
is refused with an error naming the first mismatch while the optimizer stays as it was.
"""

from __future__ import annotations

import base64
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from ._core import ConfigError, Ledger, Router, StateError
from .wrap import expert_tag

__all__ = [
    "check_group_values",
    "check_param_state",
    "check_meta_fields",
    "routing_settings_changed",
    "META_KEY",
    "encode_meta",
    "routing_from_meta",
    "split_state_dict",
    "decode_meta",
    "check_saved_group",
    "recast_moments",
    "own_state",
    "warn_settings_changed",
    "CheckedCheckpoint",
    "check_checkpoint",
    "is_state_init_step",
]

# Per-parameter state keys: Adam's, and the held-out probe's (molf.heldout).
ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")
HELDOUT_KEYS = ("heldout_theta", "heldout_grad", "heldout_origin")


def _number(value: Any) -> float | None:
    """`value` as a float when it is a real number (a one-element float tensor counts, as
    torch's optimizers accept tensor learning rates), else None."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not (value.dtype.is_floating_point or value.dtype == torch.int64):
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value)


def check_group_values(group: dict, where: str) -> None:
    """Refuse (ConfigError) a group whose hyper-parameters are not finite numbers in range."""
    for key in ("lr", "lora_lr", "weight_decay", "lora_weight_decay", "eps"):
        if key in group:
            value = _number(group[key])
            if value is None or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{where}: {key} must be a finite number >= 0, got {group[key]!r}")
    if "betas" in group:
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ConfigError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            value = _number(b)
            if value is None or not 0.0 <= value < 1.0:
                raise ConfigError(f"{where}: betas[{i}] must be in [0, 1), got {b!r}")


def check_param_state(state: Any, p: torch.Tensor, where: str, *, heldout: bool, origin: bool) -> None:
    """Refuse (StateError) a saved per-parameter state that does not fit the live parameter
    `p`: unknown or missing keys, non-tensors, other shapes, non-float moments, a step that
    is not a whole number >= 0. `heldout`: the optimizer routes by held-out loss, so a routed
    tensor's state must carry the probe's copies (`origin`: and a dense tensor its origin)."""
    if not isinstance(state, dict):
        raise StateError(f"{where}: state must be a dict, got {type(state).__name__}")
    unknown = sorted(set(state) - set(ADAM_KEYS) - set(HELDOUT_KEYS), key=str)
    if unknown:
        raise StateError(f"{where}: unknown state key {unknown[0]!r}")
    adam = [k for k in ADAM_KEYS if k in state]
    if adam and len(adam) != len(ADAM_KEYS):
        missing = next(k for k in ADAM_KEYS if k not in state)
        raise StateError(f"{where}: state has {adam} but lacks {missing!r}")
    if not heldout and any(k in state for k in HELDOUT_KEYS):
        raise StateError(f"{where}: state holds held-out probe copies, but this optimizer has no heldout=")
    if heldout and (adam or any(k in state for k in HELDOUT_KEYS)):
        needed = HELDOUT_KEYS if origin else HELDOUT_KEYS[:2]
        missing = [k for k in needed if k not in state]
        if missing == [HELDOUT_KEYS[2]]:
            raise StateError(
                f"{where}: held-out shrinkage needs the starting point of the dense weights ({missing[0]!r}), "
                "which the saved state lacks"
            )
        if missing:
            raise StateError(f"{where}: held-out routing needs {missing[0]!r} in the saved state, which lacks it")
    if "step" in state:
        step = _number(state["step"]) if isinstance(state["step"], torch.Tensor) else None
        if step is None or not math.isfinite(step) or step < 0 or step != int(step):
            raise StateError(
                f"{where}: step must be a one-element tensor holding a whole number >= 0, got {state['step']!r}"
            )
    for key in ("exp_avg", "exp_avg_sq", *HELDOUT_KEYS):
        if key not in state:
            continue
        t = state[key]
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise StateError(f"{where}: {key} must be a floating tensor, got {kind}")
        if tuple(t.shape) != tuple(p.shape):
            raise StateError(
                f"{where}: {key} has shape {tuple(t.shape)}, the parameter {tuple(p.shape)} "
                "(a checkpoint of a model of another size?)"
            )


def _whole(value: Any, name: str, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise StateError(f"checkpoint's {name} must be a whole number >= 0, got {value!r}")
    if high is not None and value > high:
        raise StateError(f"checkpoint's {name} is {value}, past the router's step {high}")
    return int(value)


def check_meta_fields(meta: dict, shape: tuple[int, int], router_step: int) -> tuple[int, np.ndarray | None, int]:
    """The checkpoint's skip count, lagged mode's pending scores and the held-out probe's
    last step, each checked (StateError) before anything is applied."""
    skipped = _whole(meta.get("skipped_steps", 0), "skipped_steps")
    heldout_step = _whole(meta.get("heldout_step") or 0, "heldout_step", router_step)
    pending = meta.get("pending")
    if pending is not None:
        try:
            pending = np.asarray(pending, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise StateError(f"checkpoint's pending scores are not a numeric matrix: {exc}") from None
        if pending.shape != shape:
            raise StateError(f"checkpoint's pending scores have shape {pending.shape}, this optimizer routes {shape}")
    return skipped, pending, heldout_step


_LEDGER_SETTINGS = (
    "ema_decay",
    "heldout_decay",
    "heldout_horizon",
    "heldout_shrink",
    "heldout_shrink_steps",
    "shrink_spectral",
    "heldout_min_span",
    "heldout_adapt_rate",
    "heldout_rate_up",
    "heldout_rate_down",
    "heldout_rate_cap",
    "heldout_rate_floor",
    "heldout_rate_trust",
)


def _policy(name: str) -> str:
    return "topk" if name == "paper" else name


def routing_settings_changed(live: tuple[Router, Ledger], saved: tuple[Router, Ledger]) -> list[str]:
    """The routing settings in which a checkpoint's router and ledger differ from the live
    optimizer's, as 'name saved / live' strings."""
    (router, ledger), (saved_router, saved_ledger) = live, saved
    mine, theirs = router.config(), saved_router.config()
    mine["policy"], theirs["policy"] = _policy(mine["policy"]), _policy(theirs["policy"])
    changed = [f"{k} {theirs[k]!r} / {mine[k]!r}" for k in mine if mine[k] != theirs.get(k)]
    changed += [
        f"{k} {getattr(saved_ledger, k)!r} / {getattr(ledger, k)!r}"
        for k in _LEDGER_SETTINGS
        if getattr(ledger, k) != getattr(saved_ledger, k)
    ]
    return changed


# ------------------------------------------------------------------ molf meta

# The router, ledger and bookkeeping ride in one routed param group under this key.
META_KEY = "molf_meta"
META_VERSION = 1


def encode_meta(
    *,
    skipped_steps: int,
    pending: np.ndarray | None,
    modules: list[str],
    experts: list[str],
    score: str,
    heldout_step: int | None,
    router: Router,
    ledger: Ledger,
) -> dict:
    """The optimizer's routing state as plain data (`torch.load(weights_only=True)` reads it)."""
    return {
        "skipped_steps": skipped_steps,
        "pending": None if pending is None else pending.tolist(),
        "version": META_VERSION,
        "modules": list(modules),
        "experts": list(experts),
        "score": score,
        "heldout_step": heldout_step,
        "router": base64.b64encode(router.to_bytes()).decode("ascii"),
        "ledger": base64.b64encode(ledger.to_bytes()).decode("ascii"),
    }


def routing_from_meta(meta: dict) -> tuple[Router, Ledger]:
    """The Router and Ledger of a meta dict `encode_meta` made (no checks: pickling)."""
    return Router.from_bytes(base64.b64decode(meta["router"])), Ledger.from_bytes(base64.b64decode(meta["ledger"]))


def split_state_dict(state_dict: Any) -> tuple[list[dict], dict, Any]:
    """A saved optimizer state_dict's param groups, per-parameter state and molf meta,
    refused (StateError) when it is not one."""
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise StateError("not an optimizer state_dict: no 'param_groups' list of dicts")
    saved_state = state_dict.get("state")
    if not isinstance(saved_state, dict):
        raise StateError("not an optimizer state_dict: no 'state' dict")
    metas = [g[META_KEY] for g in groups if META_KEY in g]
    if len(metas) != 1:
        raise StateError(f"expected the molf routing state in exactly one param group, found {len(metas)}")
    return groups, saved_state, metas[0]


def decode_meta(
    meta: Any, module_names: list[str], expert_names: list[str], score: str, heldout: bool
) -> tuple[Router, Ledger]:
    """The checkpoint's Router and Ledger, checked (StateError) against the live optimizer's
    routing structure, score and policy (`heldout`: it has a held-out probe)."""
    if not isinstance(meta, dict) or meta.get("version") != META_VERSION:
        version = meta.get("version") if isinstance(meta, dict) else None
        raise StateError(f"unsupported molf optimizer state version {version!r}; this molf reads {META_VERSION}")
    if meta.get("modules") != module_names or meta.get("experts") != expert_names:
        raise StateError(
            "optimizer checkpoint is for a different routing structure: "
            f"{len(meta.get('modules', []))} modules x experts {meta.get('experts')} saved, "
            f"{len(module_names)} modules x experts {expert_names} here"
        )
    if meta.get("score") != score:
        raise StateError(f"checkpoint was saved with score={meta.get('score')!r}, this optimizer uses {score!r}")
    try:
        router = Router.from_bytes(base64.b64decode(meta["router"], validate=True))
        ledger = Ledger.from_bytes(base64.b64decode(meta["ledger"], validate=True))
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, StateError):
            raise
        raise StateError(f"corrupt molf router state in checkpoint: {exc}") from exc
    if (router.num_modules, router.num_experts) != (ledger.num_modules, ledger.num_experts) or (
        router.num_modules,
        router.num_experts,
    ) != (len(module_names), len(expert_names)):
        raise StateError("router and ledger state do not match this optimizer's routing structure")
    if (router.policy == "heldout") != heldout:
        raise StateError(
            f"checkpoint was saved with routing policy {router.policy!r}; this optimizer "
            + ("routes by held-out loss (heldout= given)" if heldout else "has no heldout=")
        )
    return router, ledger


def check_saved_group(gi: int, mine: dict, saved: dict, saved_state: dict, *, heldout: bool, shrink: bool) -> None:
    """Refuse (StateError) saved param group `gi` and its tensors' state where they do not
    fit the live group `mine` (`heldout`: the optimizer has a held-out probe; `shrink`: the
    checkpoint's ledger shrinks, so dense tensors carry their origin)."""
    if mine["molf_role"] != saved.get("molf_role") or mine.get("molf_slots") != saved.get("molf_slots"):
        raise StateError("optimizer checkpoint's param groups do not match this model's routing structure")
    ids = saved.get("params")
    if not isinstance(ids, list) or len(ids) != len(mine["params"]):
        count = len(ids) if isinstance(ids, list) else ids
        raise StateError(
            f"checkpoint's param group {gi} holds {count} parameters, this optimizer's {len(mine['params'])}"
        )
    try:
        check_group_values(saved, f"checkpoint's param group {gi}")
    except ConfigError as exc:
        raise StateError(str(exc)) from None
    heldout = heldout and mine["molf_role"] != "plain"
    origin = heldout and mine["molf_role"] == "dense" and shrink  # shrinkage as the checkpoint's ledger says
    for k, (pid, p) in enumerate(zip(ids, mine["params"])):
        if pid in saved_state:
            tag = expert_tag(p)
            where = (
                f"checkpoint state of param group {gi} tensor {k}"
                if tag is None
                else (f"checkpoint state of {tag.module} ({tag.name} {tag.part})")
            )
            check_param_state(saved_state[pid], p, where, heldout=heldout, origin=origin)


def recast_moments(
    state: dict, saved_groups: list[dict], param_groups: list[dict], saved_state: dict, dtype_for: Callable
) -> None:
    """Undo torch's cast of loaded state to each parameter's dtype: the moments go back to
    the state dtype the optimizer chose (`dtype_for(p)`), from the saved tensors."""
    saved_ids = [i for g in saved_groups for i in g["params"]]
    params = [p for g in param_groups for p in g["params"]]
    for pid, p in zip(saved_ids, params):
        saved = saved_state.get(pid)
        if saved is None:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            if key in saved:  # absent: a tensor held-out-measured before its first gradient
                state[p][key] = saved[key].to(device=p.device, dtype=dtype_for(p), copy=True)


def own_state(state: dict, saved_groups: list[dict], param_groups: list[dict], saved_state: dict) -> None:
    """Copies of the loaded state tensors that are the saved ones themselves: torch keeps a
    tensor already on its parameter's device and in its dtype (and every `step` counter), so
    state loaded from a live optimizer's state dict would be shared with it, each writing
    into the other's (step counters counted twice, held-out state overwritten)."""
    saved_ids = [i for g in saved_groups for i in g["params"]]
    params = [p for g in param_groups for p in g["params"]]
    for pid, p in zip(saved_ids, params):
        saved = saved_state.get(pid)
        if saved is not None:
            for key, value in state[p].items():
                if value is saved.get(key):
                    state[p][key] = value.clone()


def warn_settings_changed(changed: list[str]) -> None:
    """Warn (at the caller of `load_state_dict`) that the checkpoint's routing settings,
    `routing_settings_changed`'s list, replace the optimizer's."""
    # The run resumes as it was saved: its router and ledger carry their settings.
    warnings.warn(
        "the checkpoint was saved with other routing settings than this optimizer was built with; "
        "the checkpoint's are used (checkpoint / this optimizer's): " + "; ".join(changed),
        UserWarning,
        stacklevel=3,
    )


class CheckedCheckpoint(NamedTuple):
    """A saved state_dict checked against the live optimizer (`check_checkpoint`)."""

    router: Router
    ledger: Ledger
    changed: list[str]  # routing settings the checkpoint's router and ledger carry otherwise
    skipped: int
    pending: np.ndarray | None
    heldout_step: int
    stripped: dict  # the state_dict without the molf meta, for torch's load_state_dict
    saved_state: dict


def check_checkpoint(
    state_dict: Any,
    param_groups: list[dict],
    module_names: list[str],
    expert_names: list[str],
    score: str,
    heldout: bool,
    live: tuple[Router, Ledger],
) -> CheckedCheckpoint:
    """Check a saved state_dict against the live optimizer — routing structure and settings,
    every group's values, every state tensor's keys and shape, the routing state — raising
    StateError at the first mismatch (`heldout`: the optimizer has a held-out probe; `live`:
    its router and ledger)."""
    groups, saved_state, meta = split_state_dict(state_dict)
    router, ledger = decode_meta(meta, module_names, expert_names, score, heldout)
    changed = routing_settings_changed(live, (router, ledger))
    skipped, pending, heldout_step = check_meta_fields(meta, (len(module_names), len(expert_names)), router.step)
    if len(groups) != len(param_groups):
        raise StateError(f"checkpoint has {len(groups)} param groups, this optimizer {len(param_groups)}")
    stripped = dict(state_dict)
    stripped["param_groups"] = [{k: v for k, v in g.items() if k != META_KEY} for g in groups]
    shrink = any(ledger.heldout_shrink)
    for gi, (mine, saved) in enumerate(zip(param_groups, stripped["param_groups"])):
        check_saved_group(gi, mine, saved, saved_state, heldout=heldout, shrink=shrink)
    return CheckedCheckpoint(router, ledger, changed, skipped, pending, heldout_step, stripped, saved_state)


def is_state_init_step(ledger_step: int, scores: np.ndarray, param_groups: list[dict]) -> bool:
    """Whether this is the step torch.distributed.checkpoint's `get_state_dict` runs on a
    fresh optimizer to create its state (the first step, every lr 0, every gradient
    zero): a checkpoint load replaces what it did, so it stays out of the routing log (and
    does not start the log afresh under the run about to be resumed). A real first step
    at lr 0 (a warm-up from 0) has non-zero gradients; the gradient check runs only once
    the cheap conditions hold."""
    return (
        ledger_step == 1
        and not np.any(scores)
        and all(float(g["lr"]) == 0 for g in param_groups)
        and all(p.grad is not None and not p.grad.any() for g in param_groups for p in g["params"] if p.requires_grad)
    )
