"""`TrainConfig`: every option of `molf train` in sections of related options, and their checks.
The options stay flat where users see them (flags, config keys, `from_mapping`, `to_dict`,
`identity`); `SECTIONS` files each one under its section."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import torch

from .._core import POLICIES, ConfigError
from ..config import DEFAULT_RANKS, LORA_FORMS, MoLFConfig
from ..routing import SCORES, Policy, policy_by_name

__all__ = ["MODES", "DataOptions", "ModelOptions", "OptimOptions", "RoutingOptions", "RunOptions", "TrainConfig"]

MODES = ("fft", "lora", "molf", "molf-e")
ROUTED_MODES = ("molf", "molf-e")
ADAPTER_MODES = ("lora", "molf-e")
SCHEDULERS = ("constant", "linear", "cosine")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STATE_DTYPES = ("auto", "param", "float32")
DEVICES = ("auto", "cpu", "cuda")
DATA_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Options that may differ between a run and its resumption (a copied run directory has another
# `out`); every other one shapes the trajectory and is part of the run's identity.
RESUME_FREE = frozenset(
    {
        "out",
        "resume",
        "device",
        "save_every",
        "keep_checkpoints",
        "eval_every",
        "logging_steps",
        "report_to",
        "progress",
        "plots",
        "export_checkpoints",
        "heldout_offload",  # where the probe's copies live, not what they hold
    }
)
# The routing options as `policy_by_name` names them; None takes the policy's own default.
ROUTING_OPTIONS = {
    "topk": "topk",
    "score": "score",
    "margin": "margin",
    "min_dwell": "min_dwell",
    "routing_warmup": "warmup_steps",
    "freeze_after": "freeze_after",
    "heldout_every": "every",
    "heldout_min_span": "min_span",
    "heldout_adapt_rate": "adapt_rate",
    "heldout_offload": "offload",
}


@dataclass
class ModelOptions:
    """The model and what trains in it: the mode, the LoRA experts and the weights' dtype."""

    model: str | None = None  # local model directory; None: the embedded tiny Qwen2
    mode: str = "molf"
    ranks: list[int] | None = None  # None: molf.config.DEFAULT_RANKS of the mode
    alphas: list[float] | None = None
    rslora: bool = True
    dropout: float = 0.0
    target_modules: list[str] | None = None
    exclude_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    lora_form: str = "ba"  # MoLFConfig.lora_form: "ba" (LoRA's B·A) or "svd" (AdaLoRA's B·diag(λ)·A)
    dtype: str | None = None  # cast the weights (pure bf16/fp16 training); None: float32

    def __post_init__(self) -> None:
        _listify(self, ("ranks", "alphas", "target_modules", "exclude_modules"))
        _choice("mode", self.mode, MODES)
        _choice("lora_form", self.lora_form, LORA_FORMS)
        if self.dtype is not None:
            _choice("dtype", self.dtype, tuple(DTYPES))
        _booleans(self, ("rslora",))
        if self.model is not None and not Path(self.model, "config.json").is_file():
            raise ConfigError(f"model {self.model!r}: not a local model directory (no config.json)")
        if self.mode == "lora" and self.ranks is not None and len(self.ranks) != 1:
            raise ConfigError(f"mode 'lora' trains one adapter: ranks must have one entry, got {self.ranks}")
        if self.mode == "molf-e" and self.ranks is not None and len(self.ranks) < 2:
            raise ConfigError(f"mode 'molf-e' routes between LoRA experts: ranks needs >= 2 entries, got {self.ranks}")
        if self.mode != "fft":
            self.molf_config()  # validates ranks, alphas, dropout and module names

    def molf_config(self) -> MoLFConfig:
        ranks = tuple(self.ranks) if self.ranks is not None else DEFAULT_RANKS[self.mode]
        return MoLFConfig(
            ranks=ranks,
            alphas=None if self.alphas is None else tuple(self.alphas),
            fft=self.mode == "molf",
            rslora=self.rslora,
            dropout=self.dropout,
            target_modules=None if self.target_modules is None else tuple(self.target_modules),
            exclude_modules=tuple(self.exclude_modules),
            lora_form=self.lora_form,
        )


@dataclass
class DataOptions:
    """The training and held-out data files and how their rows become examples."""

    data: list[str] | None = None  # JSONL/JSON/parquet/CSV files; None: a generated arithmetic set
    heldout_data: list[str] | None = None  # the eval split; with molf/molf-e also the routing's held-out data
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    max_length: int = 512

    def __post_init__(self) -> None:
        for name in ("data", "heldout_data"):
            value = getattr(self, name)
            if isinstance(value, (str, os.PathLike)):
                setattr(self, name, [os.fspath(value)])
            elif isinstance(value, (list, tuple)):
                setattr(self, name, [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value])
            elif value is not None:
                raise ConfigError(f"{name} must be a file path or a list of them, got {value!r}")
        _integer("max_length", self.max_length, low=1)
        for name in ("data", "heldout_data"):
            for path in getattr(self, name) or ():
                if not isinstance(path, str):
                    raise ConfigError(f"{name} must be a list of file paths, got {path!r}")
                if not Path(path).is_file():
                    raise ConfigError(f"{name} {path!r}: no such file")
                data_format(path, name)
        if self.heldout_data is not None and not self.heldout_data:
            raise ConfigError("heldout_data must name at least one file (or be left out)")

    @property
    def fields(self) -> dict[str, str]:
        """The row columns by role, as `load_rows` takes them."""
        return {"prompt": self.prompt_field, "completion": self.completion_field, "messages": self.messages_field}


@dataclass
class OptimOptions:
    """The optimizer, its schedule and precision, and the batch of one step."""

    batch_size: int = 8  # per process and micro-batch
    gradient_accumulation_steps: int = 1
    lr: float = 2e-5  # dense weights and everything outside the LoRA experts
    lora_lr: float = 1e-4
    weight_decay: float = 0.1
    lora_weight_decay: float = 0.01
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.0  # share of the steps with a linear LR warm-up
    max_grad_norm: float = 1.0  # 0: no clipping
    state_dtype: str = "auto"
    bf16: bool = False  # mixed precision (autocast); the weights stay in their dtype
    fp16: bool = False

    def __post_init__(self) -> None:
        _choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        _choice("state_dtype", self.state_dtype, STATE_DTYPES)
        for name in ("batch_size", "gradient_accumulation_steps"):
            _integer(name, getattr(self, name), low=1)
        for name in ("lr", "lora_lr", "weight_decay", "lora_weight_decay", "max_grad_norm"):
            _number(name, getattr(self, name))
        _number("warmup_ratio", self.warmup_ratio, high=1.0)
        if self.warmup_ratio >= 1:
            raise ConfigError(f"warmup_ratio must be below 1, got {self.warmup_ratio!r}")
        _booleans(self, ("bf16", "fp16"))
        if self.bf16 and self.fp16:
            raise ConfigError("bf16 and fp16 are two kinds of mixed precision: choose one")


@dataclass
class RoutingOptions:
    """The routing of molf/molf-e: the policy and its settings, and the routing log. A setting
    left None takes the policy's own default (`molf.TopK`, `molf.Hysteresis`, `molf.Heldout`)."""

    policy: str | None = None  # None: "heldout" with heldout_data in molf/molf-e, else "topk"
    score: str | None = None
    topk: int | None = None
    margin: float | None = None
    min_dwell: int | None = None
    routing_warmup: int | None = None
    freeze_after: int | None = None
    heldout_batch: int = 64  # the first N held-out rows form the routing's one fixed held-out batch
    heldout_every: int | None = None  # routing steps between held-out measurements
    heldout_min_span: int | None = None
    heldout_adapt_rate: bool | None = None  # None: the policy's default (on)
    heldout_offload: bool | None = None  # None: the policy's default (off)
    lagged: bool = False
    log_every: int = 1  # routing log period

    def __post_init__(self) -> None:
        if self.score is not None:
            _choice("score", self.score, SCORES)
        if self.policy is not None:
            _choice("policy", self.policy, POLICIES)
        for name in ("log_every", "heldout_batch"):
            _integer(name, getattr(self, name), low=1)
        for name in ("freeze_after", "topk", "heldout_every"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), low=1)
        for name in ("min_dwell", "heldout_min_span", "routing_warmup"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), low=0)
        if self.margin is not None:
            _number("margin", self.margin)
        optional = ("heldout_adapt_rate", "heldout_offload")  # (None: the policy's default)
        _booleans(self, ["lagged", *(n for n in optional if getattr(self, n) is not None)])

    def given(self) -> list[str]:
        """The policy and the settings set here (not left to the policy's defaults)."""
        return [k for k in ("policy", *ROUTING_OPTIONS) if getattr(self, k) is not None]


@dataclass
class RunOptions:
    """The run's length, seed and device, and what it writes where: checkpoints, evaluations,
    logs, progress and figures."""

    out: str = "molf-train"
    steps: int | None = None  # optimizer steps; None: `epochs` passes over the data
    epochs: int = 1
    seed: int = 0
    device: str = "auto"
    save_every: int = 100  # checkpoint period in steps (a final checkpoint is always written)
    keep_checkpoints: int = 2
    eval_every: int | None = None  # steps between evaluations on heldout_data; None: save_every
    logging_steps: int = 10
    report_to: list[str] = field(default_factory=lambda: ["none"])
    resume: str | None = None  # a checkpoint directory, or "latest" (in OUT)
    progress: bool = True
    plots: bool = True  # routing figures at the end (molf, molf-e)
    export_checkpoints: bool = True  # the merged model / adapter in every checkpoint of a wrapped model

    def __post_init__(self) -> None:
        _listify(self, ("report_to",))
        _choice("device", self.device, DEVICES)
        for name in ("epochs", "save_every", "keep_checkpoints", "logging_steps"):
            _integer(name, getattr(self, name), low=1)
        _integer("seed", self.seed, low=0)
        for name in ("steps", "eval_every"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), low=1)
        _booleans(self, ("progress", "plots", "export_checkpoints"))
        if not all(isinstance(r, str) for r in self.report_to):
            raise ConfigError(f"report_to must name integrations ('none', 'tensorboard', ...), got {self.report_to!r}")


@dataclass
class TrainConfig:
    """Every option of `molf train`, in sections; the CLI flags and config-file keys are the
    sections' field names (`from_mapping` takes them flat). The sections check their own
    options; this class checks the ones that span sections (routing against mode and data)."""

    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    routing: RoutingOptions = field(default_factory=RoutingOptions)
    run: RunOptions = field(default_factory=RunOptions)

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"TrainConfig.{name} must be {cls.__name__}(...), got {getattr(self, name)!r}")
        if self.routing_policy == "heldout" and not self.data.heldout_data:
            raise ConfigError(
                "policy 'heldout' needs held-out data: give heldout_data (--heldout-data FILE ...), "
                "files of rows like data"
            )
        mode = self.model.mode
        if mode not in ROUTED_MODES and self.routing.given():
            raise ConfigError(
                f"mode {mode!r} has no routing: drop {', '.join(self.routing.given())} (or use molf, molf-e)"
            )
        if mode in ROUTED_MODES:
            self.build_routing()  # the routing settings, checked by the policy classes

    @property
    def routing_policy(self) -> str | None:
        """The routing policy of the routed modes (`policy`, or its default); None for fft and lora."""
        if self.model.mode not in ROUTED_MODES:
            return None
        if self.routing.policy is not None:
            return self.routing.policy
        return "heldout" if self.data.heldout_data else "topk"

    def build_routing(self, heldout: Callable[[], torch.Tensor] | None = None) -> Policy:
        """The routing policy object (`molf.routing`), built from the routing options in this one
        place; `heldout`: the held-out loss closure (a placeholder while only validating)."""
        options = self.routing
        given = {
            name: getattr(options, opt) for opt, name in ROUTING_OPTIONS.items() if getattr(options, opt) is not None
        }
        policy = self.routing_policy
        if policy != "heldout":
            for opt in ("heldout_every", "heldout_min_span", "heldout_adapt_rate", "heldout_offload"):
                if getattr(options, opt) is not None:
                    raise ConfigError(f"{opt} belongs to policy 'heldout', got policy {policy!r}")
            for name in ("every", "min_span", "adapt_rate", "offload"):
                given.pop(name, None)
        return policy_by_name(policy, loss_fn=heldout if heldout is not None else _no_heldout, **given)

    def identity(self) -> dict:
        """The options that shape the run's trajectory, flat, routing options resolved to the
        values the policy object acts with (an unset policy with held-out data is "heldout", an
        unset min_dwell the policy's default): what a resumption must match."""
        out = {k: v for k, v in self.to_dict().items() if k not in RESUME_FREE}
        if self.model.mode in ROUTED_MODES:
            policy = self.build_routing()
            heldout = policy.name == "heldout"
            out.update(
                policy=policy.name,
                topk=policy.topk,
                score=policy.score,
                margin=getattr(policy, "margin", 0.0),
                min_dwell=policy.dwell if heldout else getattr(policy, "min_dwell", 0),
                routing_warmup=policy.warmup_steps,
                freeze_after=policy.freeze_after,
                heldout_every=policy.every if heldout else None,
                heldout_min_span=policy.span(lora_only=self.model.mode == "molf-e") if heldout else None,
                heldout_adapt_rate=policy.rate_rule() is not None if heldout else None,
            )
        return out

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """A config from flat options (config-file keys or flags, with _ or -), each filed
        under its section by `SECTIONS`; an option left out takes its default."""
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - OPTION_SECTION.keys())
        if unknown:
            allowed = ", ".join(sorted(OPTION_SECTION))
            raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}; allowed: {allowed}")
        sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in values.items():
            sections[OPTION_SECTION[key]][key] = value
        return cls(**{name: SECTIONS[name](**given) for name, given in sections.items()})

    def to_dict(self) -> dict:
        """Every option, flat (as `from_mapping` takes them)."""
        return {k: v for name in SECTIONS for k, v in dataclasses.asdict(getattr(self, name)).items()}


# TrainConfig's sections by field name, and the one table of flat options: each option's
# section (it is a field of exactly one, named as its flag and config key).
SECTIONS: dict[str, type] = get_type_hints(TrainConfig)
OPTION_SECTION = {f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def _no_heldout() -> torch.Tensor:
    raise ConfigError("no held-out data")


def _listify(options: Any, names: Iterable[str]) -> None:
    """A single value given for a list option becomes a one-item list; any sequence a list."""
    for name in names:
        value = getattr(options, name)
        if isinstance(value, (str, int, float)):
            setattr(options, name, [value])
        elif value is not None:
            setattr(options, name, list(value))


def _booleans(options: Any, names: Iterable[str]) -> None:
    for name in (n for n in names if not isinstance(getattr(options, n), bool)):
        raise ConfigError(f"{name} must be true or false, got {getattr(options, name)!r}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _integer(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _number(name: str, value: Any, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
        raise ConfigError(f"{name} must be a number in [0, {high}], got {value!r}")


def data_format(path: str, what: str = "data") -> str:
    """The `datasets` builder of a data file, by its suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in DATA_FORMATS:
        raise ConfigError(f"{what} {path!r}: unknown format {suffix!r}; expected .jsonl, .json, .parquet or .csv")
    return DATA_FORMATS[suffix]
