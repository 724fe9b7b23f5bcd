"""`MoLFConfig`: which layers become routed modules and which experts they carry."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ._core import ConfigError

__all__ = ["ALL_LINEAR", "DEFAULT_RANKS", "LORA_FORMS", "MoLFConfig"]

# The default expert ranks, in one place for MoLFConfig, `molf train` and the README:
# MoLF (the dense weight and one LoRA expert; SPEC §6), MoLF-Efficient (two LoRA experts
# of different rank, base frozen) and plain LoRA.
DEFAULT_RANKS = MappingProxyType({"molf": (128,), "molf-e": (16, 128), "lora": (128,)})

# PEFT's spelling for "every linear layer but the output head" (target_modules="all-linear").
ALL_LINEAR = "all-linear"


def _tuple_of_str(value: str | Iterable[str] | None, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    out = tuple(value)
    if not all(isinstance(v, str) and v for v in out):
        raise ConfigError(f"{name} must be a sequence of non-empty module names, got {value!r}")
    return out


def _target_modules(value: str | Iterable[str] | None) -> tuple[str, ...] | str | None:
    """`target_modules` as stored: None, "all-linear" (PEFT's shorthand, any case, alone
    or as the one entry of a sequence) or a tuple of module-name suffixes."""
    names = _tuple_of_str(value, "target_modules")
    if names is None:
        return None
    shorthand = [n for n in names if n.lower() == ALL_LINEAR]
    if shorthand and len(names) > 1:
        raise ConfigError(
            f"target_modules={value!r}: {ALL_LINEAR!r} already means every linear layer but the output head; "
            "give it alone, or list module names without it"
        )
    return ALL_LINEAR if shorthand else names


def _numbers(value: Any, name: str, kind: type, what: str) -> tuple:
    """`value` (one number or a sequence, numpy scalars and arrays included) as a
    tuple of numbers of `kind` (numbers.Integral or numbers.Real); bools refused,
    as True would silently mean 1 (numpy.bool_ is no number to begin with)."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # a 0-d array (numpy or torch) is one number, not a sequence
    try:
        items = (value,) if isinstance(value, (numbers.Number, str, bytes)) else tuple(value)
    except TypeError:
        raise ConfigError(f"{name} must be {what} or a sequence of them, got {value!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, kind) for v in items):
        raise ConfigError(f"{name} must be {what}, got {value!r}")
    return items


LORA_FORMS = ("ba", "svd")  # MoLFConfig.lora_form: LoRA's B·A, AdaLoRA's B·diag(λ)·A


@dataclass(frozen=True)
class MoLFConfig:
    """Shape of the experts every wrapped linear layer carries.

    ranks / alphas: one entry per LoRA expert; alphas default to 32 for every rank.
        ranks=() with fft=True leaves the dense weight as the only expert.
    fft: keep the dense weight as expert 0 (MoLF); False freezes every base
        parameter and routes between the LoRA experts alone (MoLF-Efficient).
    rslora: scale s = alpha / sqrt(r) (default) instead of alpha / r.
    dropout: dropout on the LoRA path only.
    target_modules: name suffixes to wrap (e.g. ("q_proj", "v_proj")); None
        wraps every linear layer (and HF GPT-2 Conv1D) not excluded; "all-linear"
        (PEFT's spelling) every one but the output head (the layer
        `get_output_embeddings()` returns, else a top-level `score` or
        `classifier`) not excluded.
    exclude_modules: name suffixes never wrapped (default: the output head).
    lora_form: each LoRA expert's parametrization. "ba" (default, LoRA's): ΔW = s·B·A,
        A Kaiming-uniform, B zeros. "svd" (AdaLoRA's): ΔW = s·B·diag(λ)·A, λ (r values,
        a third tensor of the expert, without weight decay) zeros, A and B drawn from
        N(0, 0.02); it takes larger learning rates, and on tasks whose update must be
        undone or kept small it gets further than "ba" (docs/algorithm.md, "LoRA form").

    Default ranks (`DEFAULT_RANKS`): (128,) here; MoLF-Efficient's pair is (16, 128).
    """

    ranks: tuple[int, ...] = DEFAULT_RANKS["molf"]
    alphas: tuple[float, ...] | None = None
    fft: bool = True
    rslora: bool = True
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] = field(default=("lm_head",))
    lora_form: str = "ba"

    def __post_init__(self) -> None:
        ranks = _numbers(self.ranks, "ranks", numbers.Integral, "positive integers")
        if not ranks and not self.fft:
            raise ConfigError("ranks must name at least one LoRA expert when fft=False, got ()")
        if any(r <= 0 for r in ranks):
            raise ConfigError(f"ranks must be positive integers, got {self.ranks!r}")
        ranks = tuple(int(r) for r in ranks)
        if self.alphas is None:
            alphas = (32.0,) * len(ranks)
        else:
            alphas = _numbers(self.alphas, "alphas", numbers.Real, "positive finite numbers")
            if len(alphas) != len(ranks):
                raise ConfigError(f"alphas must have one entry per rank: ranks={ranks} but alphas={alphas}")
            if any(not math.isfinite(a) or a <= 0 for a in alphas):
                raise ConfigError(f"alphas must be positive finite numbers, got {self.alphas!r}")
            alphas = tuple(float(a) for a in alphas)
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.fft, bool) or not isinstance(self.rslora, bool):
            raise ConfigError("fft and rslora must be booleans")
        if self.lora_form not in LORA_FORMS:
            raise ConfigError(f"lora_form must be one of {LORA_FORMS}, got {self.lora_form!r}")
        object.__setattr__(self, "ranks", ranks)
        object.__setattr__(self, "alphas", alphas)
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "target_modules", _target_modules(self.target_modules))
        object.__setattr__(self, "exclude_modules", _tuple_of_str(self.exclude_modules, "exclude_modules") or ())

    @property
    def scales(self) -> tuple[float, ...]:
        """The LoRA scale s_i of each LoRA expert."""
        return tuple(a / (math.sqrt(r) if self.rslora else r) for a, r in zip(self.alphas, self.ranks))

    @property
    def num_experts(self) -> int:
        return len(self.ranks) + int(self.fft)

    @property
    def expert_names(self) -> tuple[str, ...]:
        lora = tuple(f"lora{i}_r{r}" for i, r in enumerate(self.ranks))
        return (("dense",) + lora) if self.fft else lora

    def to_dict(self) -> dict:
        return {
            "ranks": list(self.ranks),
            "alphas": list(self.alphas),
            "fft": self.fft,
            "rslora": self.rslora,
            "dropout": self.dropout,
            "target_modules": (
                list(self.target_modules) if isinstance(self.target_modules, tuple) else self.target_modules
            ),
            "exclude_modules": list(self.exclude_modules),
            "lora_form": self.lora_form,
        }
