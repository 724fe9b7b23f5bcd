"""The checks of `MoLFAdamW`'s constructor arguments that come before its param groups
are built, in the order the constructor runs them (the first bad value is the one named)
(the routing policy and the `LogSettings` check their own)."""

from __future__ import annotations

import math
from typing import Any

from ._core import ConfigError

__all__ = ["DEFAULT_LR", "check_number", "check_options"]

DEFAULT_LR = 1e-3  # torch.optim.AdamW's; MoLFAdamW's `lr` when not given


def check_number(name: str, value: Any, low: float = 0.0, high: float = math.inf, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value < low or value > high or (high_open and value == high):
        bracket = ")" if high_open else "]"
        raise ConfigError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")


def check_options(
    *,
    lr: float | None,
    lora_lr: float | None,
    weight_decay: float,
    lora_weight_decay: float | None,
    betas: Any,
    eps: float,
    check_every: int,
) -> None:
    """Refuse (ConfigError) the first bad argument (the routing policy and the log settings check their own)."""
    if lr is not None:
        check_number("lr", lr)
    check_number("weight_decay", weight_decay)
    check_number("eps", eps)
    if lora_lr is not None:
        check_number("lora_lr", lora_lr)
    if lora_weight_decay is not None:
        check_number("lora_weight_decay", lora_weight_decay)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ConfigError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    check_number("betas[0]", betas[0], 0.0, 1.0, high_open=True)
    check_number("betas[1]", betas[1], 0.0, 1.0, high_open=True)
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
        raise ConfigError(f"check_every must be an integer >= 0 (0: never), got {check_every!r}")
