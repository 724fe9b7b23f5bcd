"""molf: optimizer-level routing between full fine-tuning and LoRA (MoLF).

import molf
model = molf.wrap(model, molf.MoLFConfig(ranks=(128,), fft=True))
opt = molf.MoLFAdamW(model, lr=2e-5, lora_lr=5e-5, routing=molf.TopK(k=1, score="epd"))
...; loss.backward(); opt.step(); opt.zero_grad()
model = molf.merge(model)
"""

import importlib

from ._core import (
    PHASES,
    POLICIES,
    ConfigError,
    InternalError,
    Ledger,
    Router,
    ScoreError,
    StateError,
)
from ._core import __version__ as core_version
from .config import MoLFConfig
from .distributed import RankDivergenceError
from .export import export_peft, import_peft
from .layer import MoLFLinear
from .optimizer import SCORES, MoLFAdamW
from .routing import Heldout, Hysteresis, RateRule, TopK
from .routing_log import LogSettings, RoutingLog, read_routing_log
from .summary import RoutingSummary, print_trainable_parameters
from .wrap import is_wrapped, merge, merged_state_dict, routed_modules, wrap

__version__ = "0.1.0"

# transformers is optional and slow to import: molf.hf (and these names of it) load on first use.
_HF_NAMES = ("RoutingCallback", "add_routing_callback")


def __getattr__(name: str):
    if name == "hf" or name in _HF_NAMES:
        hf = importlib.import_module(".hf", __name__)  # (`from . import hf` would come back here)
        return hf if name == "hf" else getattr(hf, name)
    raise AttributeError(f"module 'molf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"hf", *_HF_NAMES})


__all__ = [
    "PHASES",
    "POLICIES",
    "SCORES",
    "ConfigError",
    "Heldout",
    "Hysteresis",
    "InternalError",
    "Ledger",
    "LogSettings",
    "MoLFAdamW",
    "MoLFConfig",
    "MoLFLinear",
    "RankDivergenceError",
    "RateRule",
    "Router",
    "RoutingCallback",
    "RoutingLog",
    "RoutingSummary",
    "ScoreError",
    "StateError",
    "TopK",
    "add_routing_callback",
    "core_version",
    "export_peft",
    "import_peft",
    "is_wrapped",
    "merge",
    "merged_state_dict",
    "print_trainable_parameters",
    "read_routing_log",
    "routed_modules",
    "wrap",
]
