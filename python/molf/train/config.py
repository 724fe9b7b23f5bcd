"""`TrainConfig`: every option of `molf train`, its checks, and TOML/YAML config files."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._core import POLICIES, ConfigError
from ..config import DEFAULT_RANKS, MoLFConfig
from ..routing import SCORES, Policy, policy_by_name

__all__ = ["MODES", "TrainConfig", "load_config_file"]

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
}


@dataclass
class TrainConfig:
    """Every option of `molf train` (the CLI flags and config-file keys have these names).
    A routing option left None takes the policy's own default (`molf.TopK`, `molf.Hysteresis`,
    `molf.Heldout`)."""

    model: str | None = None  # local model directory; None: the embedded tiny Qwen2
    data: list[str] | None = None  # JSONL/JSON/parquet/CSV files; None: a generated arithmetic set
    heldout_data: list[str] | None = None  # the eval split; with molf/molf-e also the routing's held-out data
    heldout_batch: int = 64  # the first N held-out rows form the routing's one fixed held-out batch
    heldout_every: int | None = None  # routing steps between held-out measurements
    heldout_min_span: int | None = None
    eval_every: int | None = None  # steps between evaluations on heldout_data; None: save_every
    out: str = "molf-train"
    mode: str = "molf"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    max_length: int = 512
    batch_size: int = 8  # per process and micro-batch
    gradient_accumulation_steps: int = 1
    steps: int | None = None  # optimizer steps; None: `epochs` passes over the data
    epochs: int = 1
    lr: float = 2e-5  # dense weights and everything outside the LoRA experts
    lora_lr: float = 1e-4
    weight_decay: float = 0.1
    lora_weight_decay: float = 0.01
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.0  # share of the steps with a linear LR warm-up
    max_grad_norm: float = 1.0  # 0: no clipping
    ranks: list[int] | None = None  # None: molf.config.DEFAULT_RANKS of the mode
    alphas: list[float] | None = None
    rslora: bool = True
    dropout: float = 0.0
    target_modules: list[str] | None = None
    exclude_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    score: str | None = None
    topk: int | None = None
    policy: str | None = None  # None: "heldout" with heldout_data in molf/molf-e, else "topk"
    margin: float | None = None
    min_dwell: int | None = None
    routing_warmup: int | None = None
    freeze_after: int | None = None
    lagged: bool = False
    state_dtype: str = "auto"
    bf16: bool = False  # mixed precision (autocast); the weights stay in their dtype
    fp16: bool = False
    dtype: str | None = None  # cast the weights (pure bf16/fp16 training); None: float32
    device: str = "auto"
    seed: int = 0
    save_every: int = 100  # checkpoint period in steps (a final checkpoint is always written)
    keep_checkpoints: int = 2
    logging_steps: int = 10
    log_every: int = 1  # routing log period
    report_to: list[str] = field(default_factory=lambda: ["none"])
    resume: str | None = None  # a checkpoint directory, or "latest" (in OUT)
    progress: bool = True
    plots: bool = True  # routing figures at the end (molf, molf-e)

    def __post_init__(self) -> None:
        for name in ("data", "heldout_data"):
            value = getattr(self, name)
            if isinstance(value, (str, os.PathLike)):
                setattr(self, name, [os.fspath(value)])
            elif isinstance(value, (list, tuple)):
                setattr(self, name, [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value])
            elif value is not None:
                raise ConfigError(f"{name} must be a file path or a list of them, got {value!r}")
        for name in ("ranks", "alphas", "target_modules", "exclude_modules", "report_to"):
            value = getattr(self, name)
            if isinstance(value, (str, int, float)):
                setattr(self, name, [value])
            elif value is not None:
                setattr(self, name, list(value))
        _choice("mode", self.mode, MODES)
        _choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        if self.score is not None:
            _choice("score", self.score, SCORES)
        if self.policy is not None:
            _choice("policy", self.policy, POLICIES)
        if self.dtype is not None:
            _choice("dtype", self.dtype, tuple(DTYPES))
        _choice("state_dtype", self.state_dtype, STATE_DTYPES)
        _choice("device", self.device, DEVICES)
        for name in (
            "max_length",
            "batch_size",
            "gradient_accumulation_steps",
            "epochs",
            "save_every",
            "keep_checkpoints",
            "logging_steps",
            "log_every",
            "heldout_batch",
        ):
            _integer(name, getattr(self, name), low=1)
        _integer("seed", self.seed, low=0)
        for name in ("steps", "freeze_after", "topk", "heldout_every", "eval_every"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), low=1)
        for name in ("min_dwell", "heldout_min_span", "routing_warmup"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), low=0)
        for name in ("lr", "lora_lr", "weight_decay", "lora_weight_decay", "max_grad_norm"):
            _number(name, getattr(self, name))
        if self.margin is not None:
            _number("margin", self.margin)
        _number("warmup_ratio", self.warmup_ratio, high=1.0)
        if self.warmup_ratio >= 1:
            raise ConfigError(f"warmup_ratio must be below 1, got {self.warmup_ratio!r}")
        for name in ("lagged", "rslora", "bf16", "fp16", "progress", "plots"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.bf16 and self.fp16:
            raise ConfigError("bf16 and fp16 are two kinds of mixed precision: choose one")
        if not all(isinstance(r, str) for r in self.report_to):
            raise ConfigError(f"report_to must name integrations ('none', 'tensorboard', ...), got {self.report_to!r}")
        if self.model is not None and not Path(self.model, "config.json").is_file():
            raise ConfigError(f"model {self.model!r}: not a local model directory (no config.json)")
        for name in ("data", "heldout_data"):
            for path in getattr(self, name) or ():
                if not isinstance(path, str):
                    raise ConfigError(f"{name} must be a list of file paths, got {path!r}")
                if not Path(path).is_file():
                    raise ConfigError(f"{name} {path!r}: no such file")
                data_format(path, name)
        if self.heldout_data is not None and not self.heldout_data:
            raise ConfigError("heldout_data must name at least one file (or be left out)")
        if self.routing_policy == "heldout" and not self.heldout_data:
            raise ConfigError(
                "policy 'heldout' needs held-out data: give heldout_data (--heldout-data FILE ...), "
                "files of rows like data"
            )
        if self.mode not in ROUTED_MODES:
            routing = [k for k in ("policy", *ROUTING_OPTIONS) if getattr(self, k) is not None]
            if routing:
                raise ConfigError(f"mode {self.mode!r} has no routing: drop {', '.join(routing)} (or use molf, molf-e)")
        if self.mode == "lora" and self.ranks is not None and len(self.ranks) != 1:
            raise ConfigError(f"mode 'lora' trains one adapter: ranks must have one entry, got {self.ranks}")
        if self.mode == "molf-e" and self.ranks is not None and len(self.ranks) < 2:
            raise ConfigError(f"mode 'molf-e' routes between LoRA experts: ranks needs >= 2 entries, got {self.ranks}")
        if self.mode != "fft":
            self.molf_config()  # validates ranks, alphas, dropout and module names
        if self.mode in ROUTED_MODES:
            self.routing()  # the routing settings, checked by the policy classes

    @property
    def routing_policy(self) -> str | None:
        """The routing policy of the routed modes (`policy`, or its default); None for fft and lora."""
        if self.mode not in ROUTED_MODES:
            return None
        if self.policy is not None:
            return self.policy
        return "heldout" if self.heldout_data else "topk"

    def routing(self, heldout: Callable[[], torch.Tensor] | None = None) -> Policy:
        """The routing policy object (`molf.routing`), built from the flat options in this one
        place; `heldout`: the held-out loss closure (a placeholder while only validating)."""
        given = {name: getattr(self, opt) for opt, name in ROUTING_OPTIONS.items() if getattr(self, opt) is not None}
        policy = self.routing_policy
        if policy != "heldout":
            for opt in ("heldout_every", "heldout_min_span"):
                if getattr(self, opt) is not None:
                    raise ConfigError(f"{opt} belongs to policy 'heldout', got policy {policy!r}")
            given.pop("every", None)
            given.pop("min_span", None)
        return policy_by_name(policy, loss_fn=heldout if heldout is not None else _no_heldout, **given)

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
        )

    def identity(self) -> dict:
        """The options that shape the run's trajectory, routing options resolved to the values
        the policy object acts with (an unset policy with held-out data is "heldout", an unset
        min_dwell the policy's default): what a resumption must match."""
        out = {k: v for k, v in self.to_dict().items() if k not in RESUME_FREE}
        if self.mode in ROUTED_MODES:
            policy = self.routing()
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
                heldout_min_span=policy.span(lora_only=self.mode == "molf-e") if heldout else None,
            )
        return out

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _no_heldout() -> torch.Tensor:
    raise ConfigError("no held-out data")


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


# YAML 1.2 spells floats without a dot too (1e-3); PyYAML's YAML 1.1 resolver reads those as strings.
_YAML12_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789"))
    return Loader


def load_config_file(path: str | os.PathLike) -> dict:
    """The options in a TOML (.toml) or YAML (.yaml/.yml) file, as a dict. YAML numbers in
    exponent form without a dot (`lr: 1e-3`) are numbers, as in YAML 1.2 and TOML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config {str(path)!r}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib

        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {str(path)!r}: invalid TOML: {exc}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(
                f"config {str(path)!r}: YAML needs PyYAML (pip install pyyaml), or use a .toml config"
            ) from None
        try:
            values = yaml.load(path.read_text(encoding="utf-8"), Loader=_yaml_loader())  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {str(path)!r}: invalid YAML: {' '.join(str(exc).split())}") from None
        values = {} if values is None else values
    else:
        raise ConfigError(f"config {str(path)!r}: unknown format {suffix!r}; expected .toml, .yaml or .yml")
    if not isinstance(values, dict):
        raise ConfigError(f"config {str(path)!r}: expected a table of options, got {type(values).__name__}")
    return values
