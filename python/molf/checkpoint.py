"""Checks of param-group values and of optimizer checkpoints, run before anything changes.

`MoLFAdamW` validates every group it is given (constructor, `add_param_group`) and every
checkpoint it loads against itself first, so a bad value or a checkpoint of another model
is refused with an error naming the first mismatch while the optimizer stays as it was.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ._core import ConfigError, Ledger, Router, StateError

__all__ = ["check_group_values", "check_param_state", "check_meta_fields", "routing_settings_changed"]

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
    "shrink_spectral",
    "heldout_min_span",
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
