"""`molf train`: fine-tune a local causal LM on local data, on the transformers Trainer.

Modes: "fft" (AdamW over every weight), "lora" (frozen base, one LoRA adapter, AdamW),
"molf" (dense + LoRA experts, MoLFAdamW routing) and "molf-e" (MoLF-Efficient: frozen
base, two LoRA experts of different rank, routed). The modules:

* `config`: `TrainConfig` (every option, checked), in sections of related options;
* `config_file`: TOML/YAML config files;
* `data`: rows read and checked, tokenized through `datasets.map` (cached in the run
  directory), prompt masking, the collator, the routing's held-out batch;
* `run`: `train(cfg)` on the Trainer, resume, the export at the end;
* `tiny`: the embedded tiny Qwen2 and arithmetic data (no download).
"""

from .config import MODES, DataOptions, ModelOptions, OptimOptions, RoutingOptions, RunOptions, TrainConfig
from .config_file import load_config_file
from .data import build_heldout_batch, heldout_loss_fn, load_rows, tokenize_messages, tokenize_pair
from .run import TrainError, TrainResult, build_model, train
from .tiny import byte_tokenizer, save_tiny_model, write_arithmetic_data

__all__ = [
    "MODES",
    "DataOptions",
    "ModelOptions",
    "OptimOptions",
    "RoutingOptions",
    "RunOptions",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "build_heldout_batch",
    "build_model",
    "byte_tokenizer",
    "heldout_loss_fn",
    "load_config_file",
    "load_rows",
    "save_tiny_model",
    "tokenize_messages",
    "tokenize_pair",
    "train",
    "write_arithmetic_data",
]
