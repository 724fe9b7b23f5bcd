"""Routing policies: what `MoLFAdamW(routing=...)` takes (SPEC §6).

A policy is a small frozen dataclass that owns its settings, their defaults and their
validation (`__post_init__` raises `molf.ConfigError`); the optimizer builds the Rust
Router and Ledger (and, for `Heldout`, the held-out probe) from it.

* `TopK(k=1, score="epd")`: the paper's routing (the default): per module and step the
  `k` experts with the highest scores win. `policy="paper"` of earlier versions is
  `TopK(k=1, score="epd")`.
* `Hysteresis(k=1, margin=..., min_dwell=...)`: keeps an incumbent unless a challenger
  beats it by `margin` (relative), and holds each choice at least `min_dwell` steps.
* `Heldout(loss_fn, every=10, ...)`: every expert is updated until its own movement is
  measured to raise a held-out loss (`molf.heldout`); its `adapt_rate` (a `RateRule`)
  scales each expert's learning rate by what its movement did to that loss.

Every policy has `warmup_steps` (every expert is updated during the first ones),
`freeze_after` (the routing is frozen from that step on; None: never) and `ema_decay`
(the decay of the per-expert score EMA kept for `routing_summary()`, default 0.9: it
is bookkeeping, not routing, but each policy's ledger keeps it, so it sits beside the
other settings of the run). The range checks shared with the Rust core (k, margin,
min_dwell, warmup_steps, freeze_after, ema_decay, the held-out decays) are the core's
own: a policy validates by building a 1-module Router and Ledger, so the messages name
the core's settings (`topk` for `k`, `heldout_decay` for `decay`, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ._core import ConfigError, Ledger, Router
from .heldout import DENSE_SHRINK, LORA_ONLY_MIN_SPAN, LORA_SHRINK, LORA_SHRINK_STEPS, HeldoutProbe

__all__ = ["SCORES", "TopK", "Hysteresis", "Heldout", "RateRule", "Policy", "POLICY_CLASSES", "policy_by_name"]

SCORES = ("epd", "pfn")


def _check_score(score: Any) -> None:
    if score not in SCORES:
        raise ConfigError(f"unknown score {score!r}; expected one of {', '.join(map(repr, SCORES))}")


def _check_core(policy: Any, router: dict, ledger: dict) -> None:
    """The Rust core's checks of these settings (one module, two experts)."""
    try:
        Router(1, 2, **router)
        Ledger(1, 2, **ledger)
    except ConfigError as exc:
        raise ConfigError(f"{type(policy).__name__}: {exc}") from None


def _repr(self: Any) -> str:
    """Fields that differ from their defaults only (the loss function always)."""
    shown = []
    for f in dataclasses.fields(self):
        value = getattr(self, f.name)
        if f.default is dataclasses.MISSING or value != f.default:
            shown.append(f"{f.name}={value!r}" if f.default is not dataclasses.MISSING else repr(value))
    return f"molf.{type(self).__name__}({', '.join(shown)})"


class _TrainingScoreRouting:
    """What TopK and Hysteresis share: routing on the training scores, with no probe."""

    k: int
    score: str
    ema_decay: float

    def __post_init__(self) -> None:
        _check_score(self.score)
        _check_core(self, self.router_settings(), dict(ema_decay=self.ema_decay))

    __repr__ = _repr

    @property
    def topk(self) -> int:
        return self.k

    def ledger_settings(self, dense: Sequence[bool]) -> dict:
        return dict(ema_decay=self.ema_decay)

    def probe(self) -> HeldoutProbe | None:
        return None


@dataclass(frozen=True, repr=False)
class TopK(_TrainingScoreRouting):
    """The paper's routing (the default): per module, the `k` experts with the highest
    `score` ("epd", the expected preconditioned descent, or "pfn") win each step."""

    k: int = 1
    score: str = "epd"
    warmup_steps: int = 0
    freeze_after: int | None = None
    ema_decay: float = 0.9

    name: ClassVar[str] = "topk"

    def router_settings(self) -> dict:
        return dict(topk=self.k, policy="topk", warmup_steps=self.warmup_steps, freeze_after=self.freeze_after)


@dataclass(frozen=True, repr=False)
class Hysteresis(_TrainingScoreRouting):
    """Top-k routing that keeps an incumbent unless a challenger's score beats it by
    `margin` (relative, >= 0) and holds each choice at least `min_dwell` steps."""

    k: int = 1
    margin: float = 0.1
    min_dwell: int = 20
    score: str = "epd"
    warmup_steps: int = 0
    freeze_after: int | None = None
    ema_decay: float = 0.9

    name: ClassVar[str] = "hysteresis"

    def router_settings(self) -> dict:
        return dict(
            topk=self.k,
            policy="hysteresis",
            margin=self.margin,
            min_dwell=self.min_dwell,
            warmup_steps=self.warmup_steps,
            freeze_after=self.freeze_after,
        )


@dataclass(frozen=True)
class RateRule:
    """Policy heldout's learning-rate adaptation, a "bold driver" per (module, expert): a
    multiplier c of the expert's learning rate, 1 at the start, becomes min(c·`up`, `cap`)
    after each held-out window in which the expert's movement lowered the held-out loss and
    max(c·`down`, `floor`) after one in which it raised it (unchanged where it did not move).
    The expert's whole AdamW update (Adam step and decoupled decay) uses the group's lr × c;
    the scores keep the group's lr. `up` >= 1, `down` in (0, 1], `cap` >= 1, `floor` in
    [0, 1] (ConfigError otherwise). The default floor 1 keeps c at or above the set rate, so
    `down` only undoes earlier ups: without it one window of noise halves a rate that seven
    good windows must win back, and over a long run a dense expert's rate decays where it
    should not (docs/algorithm.md, "Rate adaptation"); `floor=0` is the rule without one.
    `trust` (finite, >= 0): a rate goes up only where the held-out loss fell by at least
    `trust` × what a first-order model of the step predicted (the expert's potential), i.e.
    where the loss is near linear along the update; `trust=0` raises it on any descent."""

    up: float = 1.1
    down: float = 0.5
    cap: float = 2.0
    floor: float = 1.0
    trust: float = 0.8

    def __post_init__(self) -> None:
        _check_core(self, {}, self.ledger_settings(adapt=True))

    def ledger_settings(self, adapt: bool) -> dict:
        return dict(
            heldout_adapt_rate=adapt,
            heldout_rate_up=self.up,
            heldout_rate_down=self.down,
            heldout_rate_cap=self.cap,
            heldout_rate_floor=self.floor,
            heldout_rate_trust=self.trust,
        )


@dataclass(frozen=True, repr=False)
class Heldout:
    """Routing by held-out loss (`molf.heldout`): every `every` steps the optimizer calls
    `loss_fn()` (a scalar loss on held-out data), attributes the held-out loss change to
    each expert's movement, smooths it (per window a decay of at least `decay`; the
    smoothing spans about `horizon` of the windows the expert has moved in), drops the
    experts that hurt (once their record spans `min_span` windows) and brings a dropped
    one back `min_dwell` steps after its drop, once a step of it would lower the held-out
    loss. Before each measurement each expert's update is shrunk by `shrink` (0: off;
    `shrink_spectral`: a LoRA product's singular values soft-thresholded, else scaled)
    and kept if the held-out loss falls, then shrunk again while kept, up to `shrink_steps`
    trials (so the held-out data chooses the strength per window). Scores ("epd") are still computed for the log
    and the summary.

    `adapt_rate` (on by default): after each window, each expert's learning rate is scaled up
    where its movement lowered the held-out loss by about what a first-order model predicted
    and down where it raised it (a `RateRule`; True, the default: `RateRule()`, ×1.1 up to 2×
    the set rate where the loss fell by at least 0.8 × the prediction, ×0.5 down to the set
    rate; False: off, every expert at its group's rate; why: docs/algorithm.md, "Rate
    adaptation").

    `offload` (off by default): on CUDA, keep what the probe alone reads in pinned host memory —
    θ and the held-out gradient at the last measurement (`heldout_theta`, `heldout_grad`: two
    copies of every routed tensor), the dense experts' starting point (`heldout_origin`) and,
    during a measurement, a kept shrink trial's undo copy — so between probes the GPU holds
    none of them, and four weight copies less at the probe's peak; each probe then copies θ
    and the gradient to the host and back and the origin to the device (overlapping the
    first held-out forward), a kept trial's undo copy to the host. Results are bitwise the
    same. Not for FSDP2-sharded parameters.

    Defaults resolved here and nowhere else: `min_dwell` None is 3 x `every`
    (`default_min_dwell`); `min_span` None is 10 where every expert is a LoRA expert, 0
    beside a dense expert (`default_min_span`); `shrink` None is, per expert, 0.1 for a
    dense expert and 0.05 for a LoRA expert (`default_shrink`), a number every expert's;
    `shrink_steps` None is 2 for a LoRA expert beside a dense expert, 1 otherwise
    (`default_shrink_steps`), a number every expert's."""

    loss_fn: Callable[[], Any]
    every: int = 10
    decay: float = 0.5
    horizon: float = 0.25
    shrink: float | None = None
    shrink_steps: int | None = None
    shrink_spectral: bool = True
    min_span: int | None = None
    min_dwell: int | None = None
    warmup_steps: int = 0
    freeze_after: int | None = None
    ema_decay: float = 0.9
    adapt_rate: RateRule | bool = True
    offload: bool = False

    name: ClassVar[str] = "heldout"
    score: ClassVar[str] = "epd"
    topk: ClassVar[int] = 1  # not used by the policy (the Router's topk setting)

    def __post_init__(self) -> None:
        if not callable(self.loss_fn):
            raise ConfigError(f"heldout must be a callable returning a held-out loss tensor, got {self.loss_fn!r}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"heldout_every must be an integer >= 1, got {self.every!r}")
        if not isinstance(self.shrink_spectral, bool):
            raise ConfigError(f"heldout_shrink_spectral must be True or False, got {self.shrink_spectral!r}")
        steps = self.shrink_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ConfigError(f"heldout_shrink_steps must be an integer >= 1 (or None), got {steps!r}")
        span = self.min_span
        if span is not None and (isinstance(span, bool) or not isinstance(span, int) or span < 0):
            raise ConfigError(f"heldout_min_span must be an integer >= 0 (or None), got {span!r}")
        if not isinstance(self.offload, bool):
            raise ConfigError(f"heldout offload must be True or False, got {self.offload!r}")
        if not isinstance(self.adapt_rate, RateRule | bool):
            raise ConfigError(f"heldout adapt_rate must be a molf.RateRule, True or False, got {self.adapt_rate!r}")
        _check_core(self, self.router_settings(), self.ledger_settings(dense=(True, False)))

    __repr__ = _repr

    @staticmethod
    def default_min_dwell(every: int) -> int:
        return 3 * every

    @staticmethod
    def default_min_span(lora_only: bool) -> int:
        # A LoRA pair's first fit can raise the held-out loss for a while and still pay off
        # (docs/algorithm.md, "Minimum span"); beside a dense expert, from the first window.
        return LORA_ONLY_MIN_SPAN if lora_only else 0

    @staticmethod
    def default_shrink(dense: bool) -> float:
        # Per kind of expert, chosen on the generalization suite's tuning instances
        # (research/results/generalization-tuning/policy-35.md §20–21): a LoRA expert's
        # spectral trial at 0.05, with or without a dense expert beside it; a dense expert's
        # pull towards its start at 0.1 (0.05 there lost on scarce noisy data).
        return DENSE_SHRINK if dense else LORA_SHRINK

    @staticmethod
    def default_shrink_steps(dense: bool, lora_only: bool) -> int:
        # A LoRA expert's trial beside a dense expert, again while kept: the strength found
        # per window, 0.05 where a second step hurts and about 0.1 where both help (chosen on
        # the tuning instances, policy-35.md §22). Models of LoRA experts only keep the one
        # trial their defaults were chosen with (§20); a dense expert's pull, once.
        return 1 if dense or lora_only else LORA_SHRINK_STEPS

    def rate_rule(self) -> RateRule | None:
        """`adapt_rate` as a rule (None: off)."""
        if self.adapt_rate is True:
            return RateRule()
        return self.adapt_rate or None

    @property
    def dwell(self) -> int:
        """`min_dwell`, resolved."""
        return self.default_min_dwell(self.every) if self.min_dwell is None else self.min_dwell

    def span(self, lora_only: bool) -> int:
        """`min_span`, resolved for a model whose experts are all LoRA experts or not."""
        return self.default_min_span(lora_only) if self.min_span is None else self.min_span

    def shrinks(self, dense: Sequence[bool]) -> list[float]:
        """`shrink`, resolved per expert: `dense[e]` whether expert `e` is a dense expert."""
        return [self.default_shrink(d) if self.shrink is None else self.shrink for d in dense]

    def shrink_steps_for(self, dense: Sequence[bool]) -> list[int]:
        """`shrink_steps`, resolved per expert: `dense[e]` whether expert `e` is a dense expert."""
        lora_only = not any(dense)
        if self.shrink_steps is not None:
            return [self.shrink_steps] * len(dense)
        return [self.default_shrink_steps(d, lora_only) for d in dense]

    def router_settings(self) -> dict:
        return dict(
            policy="heldout", min_dwell=self.dwell, warmup_steps=self.warmup_steps, freeze_after=self.freeze_after
        )

    def ledger_settings(self, dense: Sequence[bool]) -> dict:
        """The Ledger's settings for experts of these kinds (`dense[e]`: expert `e` is dense)."""
        rule = self.rate_rule()
        lora_only = not any(dense)
        return dict(
            ema_decay=self.ema_decay,
            heldout_decay=self.decay,
            heldout_horizon=self.horizon,
            heldout_shrink=self.shrinks(dense),
            heldout_shrink_steps=self.shrink_steps_for(dense),
            shrink_spectral=self.shrink_spectral,
            heldout_min_span=self.span(lora_only),
            **(rule or RateRule()).ledger_settings(adapt=rule is not None),
        )

    def probe(self) -> HeldoutProbe | None:
        return HeldoutProbe(self.loss_fn, self.every, self.offload)


Policy = TopK | Hysteresis | Heldout
POLICY_CLASSES = (TopK, Hysteresis, Heldout)


def check_policy(routing: Any) -> Policy:
    if not isinstance(routing, POLICY_CLASSES):
        raise ConfigError(
            f"routing must be a routing policy object: molf.TopK, molf.Hysteresis or molf.Heldout, got {routing!r}"
        )
    return routing


def policy_by_name(
    policy: str,
    *,
    loss_fn: Callable[[], Any] | None = None,
    topk: int = 1,
    score: str = "epd",
    margin: float | None = None,
    min_dwell: int | None = None,
    warmup_steps: int = 0,
    freeze_after: int | None = None,
    every: int | None = None,
    min_span: int | None = None,
    adapt_rate: bool | None = None,
    offload: bool | None = None,
) -> Policy:
    """The policy object a policy name ("topk", "paper", "hysteresis", "heldout", as the
    CLI's `--policy` spells them) and flat settings stand for; a setting left None takes
    the policy's own default. "paper" is `TopK(k=1, score="epd")` and refuses other scores."""
    common = dict(warmup_steps=warmup_steps, freeze_after=freeze_after)
    given = {k: v for k, v in dict(margin=margin, min_dwell=min_dwell).items() if v is not None}
    if policy == "paper" and score != "epd":
        raise ConfigError(f"policy 'paper' is the published EPD top-1 routing: score must be 'epd', got {score!r}")
    if policy in ("topk", "paper"):
        if given.get("margin", 0) != 0 or given.get("min_dwell", 0) != 0:
            raise ConfigError(
                "margin and min_dwell belong to policy 'hysteresis'; with policy 'topk' they must be 0, "
                f"got margin={margin} min_dwell={min_dwell}"
            )
        return TopK(k=topk, score=score, **common)
    if policy == "hysteresis":
        return Hysteresis(k=topk, score=score, **given, **common)
    if policy == "heldout":
        if loss_fn is None:
            raise ConfigError("policy 'heldout' needs heldout=, a callable returning a loss on held-out data")
        if given.get("margin", 0) != 0:
            raise ConfigError(
                f"margin belongs to policy 'hysteresis'; with policy 'heldout' it must be 0, got {margin!r}"
            )
        extra = dict(every=every, adapt_rate=adapt_rate, offload=offload)
        extra = {k: v for k, v in extra.items() if v is not None}
        return Heldout(loss_fn, min_span=min_span, min_dwell=min_dwell, **extra, **common)
    raise ConfigError(
        f"unknown policy {policy!r}; expected one of 'topk', 'hysteresis', 'heldout', 'paper' (an alias of 'topk')"
    )
