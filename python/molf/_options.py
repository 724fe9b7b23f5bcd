"""The checks of `MoLFAdamW`'s constructor arguments that come before its param groups
are built, in the order the constructor runs them (the first bad value is the one named),
and the routing policy and dwell they resolve to."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ._core import ConfigError
from .heldout import HeldoutProbe

__all__ = ["SCORES", "check_number", "check_options"]

SCORES = ("epd", "pfn")


def check_number(name: str, value: Any, low: float = 0.0, high: float = math.inf, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value < low or value > high or (high_open and value == high):
        bracket = ")" if high_open else "]"
        raise ConfigError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")


def check_options(
    *,
    lr: float,
    lora_lr: float | None,
    weight_decay: float,
    lora_weight_decay: float | None,
    betas: Any,
    eps: float,
    score: str,
    policy: str | None,
    min_dwell: int | None,
    log_every: int,
    check_every: int,
    heldout: Callable | None,
    heldout_every: int,
    heldout_shrink_spectral: Any,
    heldout_min_span: Any,
) -> tuple[str, int, HeldoutProbe | None]:
    """Refuse (ConfigError) the first bad argument; return the routing policy, the minimum
    dwell and the held-out probe (None without `heldout`)."""
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
    if score not in SCORES:
        raise ConfigError(f"unknown score {score!r}; expected one of {', '.join(map(repr, SCORES))}")
    if policy is None:
        policy = "heldout" if heldout is not None else "topk"
    if policy == "heldout" and heldout is None:
        raise ConfigError("policy 'heldout' needs heldout=, a callable returning a loss on held-out data")
    if heldout is not None and policy != "heldout":
        raise ConfigError(f"heldout= is used by policy 'heldout' only; got policy {policy!r}")
    if not isinstance(heldout_shrink_spectral, bool):
        raise ConfigError(f"heldout_shrink_spectral must be True or False, got {heldout_shrink_spectral!r}")
    if heldout_min_span is not None and (
        isinstance(heldout_min_span, bool) or not isinstance(heldout_min_span, int) or heldout_min_span < 0
    ):
        raise ConfigError(f"heldout_min_span must be an integer >= 0 (or None), got {heldout_min_span!r}")
    probe = None if heldout is None else HeldoutProbe(heldout, heldout_every)
    if min_dwell is None:
        min_dwell = 3 * heldout_every if heldout is not None else 0
    if policy == "paper" and score != "epd":
        raise ConfigError(f"policy 'paper' is the published EPD top-1 routing: score must be 'epd', got {score!r}")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ConfigError(f"log_every must be an integer >= 1, got {log_every!r}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
        raise ConfigError(f"check_every must be an integer >= 0 (0: never), got {check_every!r}")
    return policy, min_dwell, probe
