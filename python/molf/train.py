"""`molf train`: fine-tune a local causal LM on local prompt/completion data.

Modes: "fft" (AdamW over every weight), "lora" (frozen base, one LoRA adapter,
AdamW), "molf" (dense + LoRA experts, MoLFAdamW routing) and "molf-e"
(MoLF-Efficient: frozen base, two LoRA experts of different rank, routed).
The loss covers the completion tokens only. With held-out data the routed
modes use MoLFAdamW's policy "heldout": every `heldout_every` steps the
optimizer measures the loss on one fixed held-out batch and drops (or brings
back) experts by what their updates did to it. Checkpoints hold everything a run
needs to continue bit for bit (model, optimizer, scheduler, RNG, data position);
`resume` picks one up. At the end the merged model (fft, molf) or the PEFT
adapter (lora, molf-e) is saved with the tokenizer, and for the routed modes
the routing log and its figures.

Without a model, a tiny Qwen2 built from a config (random weights, a byte-level
tokenizer, no download) and a generated arithmetic dataset stand in, so the
whole pipeline runs in seconds on a CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._core import POLICIES, ConfigError, StateError
from .config import MoLFConfig
from .optimizer import MoLFAdamW
from .routing import SCORES, Heldout, Hysteresis, Policy, policy_by_name
from .wrap import merge, wrap

__all__ = [
    "MODES",
    "TrainConfig",
    "TrainResult",
    "TrainError",
    "train",
    "load_config_file",
    "build_model",
    "tokenize_pair",
    "build_heldout_batch",
    "heldout_loss_fn",
]

MODES = ("fft", "lora", "molf", "molf-e")
ROUTED_MODES = ("molf", "molf-e")
ADAPTER_MODES = ("lora", "molf-e")
SCHEDULERS = ("constant", "linear", "cosine")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STATE_DTYPES = ("auto", "param", "float32")
DEFAULT_RANKS = {"lora": (16,), "molf": (16,), "molf-e": (8, 32)}
# Options that may differ between a run and its resumption; every other one shapes the trajectory.
RESUME_FREE = ("resume", "save_every", "keep_checkpoints", "progress", "plots", "device")
ROUTING_LOG = "routing.jsonl"
CHECKPOINTS = "checkpoints"
BASE_MODEL = "base_model"
# Written when a run starts (its options and data fingerprints): marks OUT as holding a run even
# before the first checkpoint, so a stopped run is resumed (from step 0), never silently overwritten.
RUN_STATE = "run.json"
CHECKPOINT_KEYS = frozenset({"step", "data", "config", "model", "optimizer", "scheduler", "rng"})


class TrainError(RuntimeError):
    """A run that cannot go on for a reason outside its options (a full disk while saving); what
    was saved before stays intact, so the run can be resumed once the cause is fixed."""


@dataclass
class TrainConfig:
    """Every option of `molf train` (the CLI flags and config-file keys have these names)."""

    model: str | None = None  # local model directory; None: the embedded tiny Qwen2
    data: list[str] | None = None  # JSONL / parquet files; None: a generated arithmetic set
    heldout_data: list[str] | None = None  # files like `data`; given: policy "heldout" (molf, molf-e)
    heldout_batch: int = 64  # the first N held-out rows form the one fixed held-out batch
    heldout_every: int = 10  # routing steps between held-out measurements
    heldout_min_span: int | None = None  # None: 10 windows for molf-e (LoRA experts only), 0 for molf
    out: str = "molf-train"
    mode: str = "molf"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    max_length: int = 512
    batch_size: int = 8
    steps: int | None = None  # optimizer steps; None: `epochs` passes over the data
    epochs: int = 1
    lr: float = 2e-5  # dense weights and everything outside the LoRA experts
    lora_lr: float = 1e-4
    weight_decay: float = 0.1
    lora_weight_decay: float = 0.01
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.0  # share of the steps with a linear LR warm-up
    max_grad_norm: float = 1.0  # 0: no clipping
    ranks: list[int] | None = None  # None: 16 (lora, molf) or 8, 32 (molf-e)
    alphas: list[float] | None = None
    rslora: bool = True
    dropout: float = 0.0
    target_modules: list[str] | None = None
    exclude_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    score: str = "epd"
    topk: int = 1
    policy: str | None = None  # None: "heldout" with heldout_data, else "topk"
    margin: float = 0.0
    min_dwell: int | None = None  # None: the policy's default (molf.Heldout: 3 * heldout_every)
    routing_warmup: int = 0  # steps in which every expert is updated
    freeze_after: int | None = None
    lagged: bool = False
    state_dtype: str = "auto"
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0
    save_every: int = 100  # checkpoint period in steps (a final checkpoint is always written)
    keep_checkpoints: int = 2
    log_every: int = 1
    resume: str | None = None  # a checkpoint file, or "latest" (in OUT/checkpoints)
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
        for name in ("ranks", "alphas", "target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (str, int, float)):
                setattr(self, name, [value])
            elif value is not None:
                setattr(self, name, list(value))
        _choice("mode", self.mode, MODES)
        _choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        _choice("score", self.score, SCORES)
        if self.policy is not None:
            _choice("policy", self.policy, POLICIES)
        _choice("dtype", self.dtype, tuple(DTYPES))
        _choice("state_dtype", self.state_dtype, STATE_DTYPES)
        for name in (
            "max_length",
            "batch_size",
            "epochs",
            "topk",
            "save_every",
            "keep_checkpoints",
            "log_every",
            "heldout_batch",
            "heldout_every",
        ):
            _integer(name, getattr(self, name), low=1)
        for name in ("routing_warmup", "seed"):
            _integer(name, getattr(self, name), low=0)
        for name in ("steps", "freeze_after"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), low=1)
        for name in ("min_dwell", "heldout_min_span"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), low=0)
        for name in ("lr", "lora_lr", "weight_decay", "lora_weight_decay", "max_grad_norm", "margin"):
            _number(name, getattr(self, name))
        _number("warmup_ratio", self.warmup_ratio, high=1.0)
        for name in ("lagged", "rslora", "progress", "plots"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.model is not None and not Path(self.model, "config.json").is_file():
            raise ConfigError(f"model {self.model!r}: not a local model directory (no config.json)")
        for name in ("data", "heldout_data"):
            for path in getattr(self, name) or ():
                if not isinstance(path, str):
                    raise ConfigError(f"{name} must be a list of file paths, got {path!r}")
                if not Path(path).is_file():
                    raise ConfigError(f"{name} {path!r}: no such file")
                _data_format(path, name)
        self._check_heldout()
        if self.mode == "lora" and self.ranks is not None and len(self.ranks) != 1:
            raise ConfigError(f"mode 'lora' trains one adapter: ranks must have one entry, got {self.ranks}")
        if self.mode == "molf-e" and self.ranks is not None and len(self.ranks) < 2:
            raise ConfigError(f"mode 'molf-e' routes between LoRA experts: ranks needs >= 2 entries, got {self.ranks}")
        if self.mode != "fft":
            self.molf_config()  # validates ranks, alphas, dropout and module names
        if self.mode in ROUTED_MODES:
            self.routing()  # the routing settings, checked by the policy classes

    def _check_heldout(self) -> None:
        if self.heldout_data is not None and not self.heldout_data:
            raise ConfigError("heldout_data must name at least one file (or be left out)")
        if self.heldout_data:
            if self.mode not in ROUTED_MODES:
                raise ConfigError(
                    f"heldout_data routes experts by held-out loss; mode {self.mode!r} has no routing "
                    "(use mode 'molf' or 'molf-e', or drop heldout_data)"
                )
            if self.policy not in (None, "heldout"):
                raise ConfigError(
                    f"heldout_data is used by policy 'heldout' only, got policy {self.policy!r} "
                    "(leave policy unset or set it to 'heldout', or drop heldout_data)"
                )
        elif self.policy == "heldout":
            raise ConfigError(
                "policy 'heldout' needs held-out data: give heldout_data (--heldout-data FILE ...), "
                "prompt/completion files like data"
            )

    def routing(self, heldout: Callable[[], torch.Tensor] | None = None) -> Policy:
        """The routing policy object of the routed modes (`molf.routing`), built from the
        flat options in this one place; `heldout`: the held-out loss closure (a placeholder
        while only validating)."""
        return policy_by_name(
            self.routing_policy,
            loss_fn=heldout if heldout is not None else _no_heldout,
            topk=self.topk,
            score=self.score,
            margin=self.margin,
            min_dwell=self.min_dwell,
            warmup_steps=self.routing_warmup,
            freeze_after=self.freeze_after,
            every=self.heldout_every,
            min_span=self.heldout_min_span,
        )

    @property
    def routing_policy(self) -> str:
        """The routing policy the routed modes use: `policy`, or its default."""
        return _effective_policy(self.policy, self.heldout_data)

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


def _effective_policy(policy: str | None, heldout_data: list[str] | None) -> str:
    if policy is not None:
        return policy
    return "heldout" if heldout_data else "topk"


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _integer(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _number(name: str, value: Any, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
        raise ConfigError(f"{name} must be a number in [0, {high}], got {value!r}")


def _data_format(path: str, what: str = "data") -> str:
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "json"
    if suffix == ".parquet":
        return "parquet"
    raise ConfigError(f"{what} {path!r}: unknown format {suffix!r}; expected .jsonl, .json or .parquet")


def load_config_file(path: str | os.PathLike) -> dict:
    """The options in a TOML (.toml) or YAML (.yaml/.yml) file, as a dict."""
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
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {str(path)!r}: invalid YAML: {exc}") from None
        values = {} if values is None else values
    else:
        raise ConfigError(f"config {str(path)!r}: unknown format {suffix!r}; expected .toml, .yaml or .yml")
    if not isinstance(values, dict):
        raise ConfigError(f"config {str(path)!r}: expected a table of options, got {type(values).__name__}")
    return values


# ------------------------------------------------------------------ the embedded default


def byte_tokenizer():
    """A byte-level tokenizer built locally (256 byte tokens, pad and eos): no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|endoftext|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=specials[0], eos_token=specials[1])


def save_tiny_model(path: Path, seed: int) -> None:
    """A tiny random Qwen2 and its byte-level tokenizer, saved to `path`."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    tokenizer = byte_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def write_arithmetic_data(path: Path, rows: int = 256, seed: int = 0) -> None:
    """Prompt/completion pairs "12+34=" -> "46": a task a tiny model learns in minutes."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            a, b = rng.randrange(100), rng.randrange(100)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")


# ------------------------------------------------------------------ data


def load_pairs(paths: list[str], prompt_field: str, completion_field: str, what: str = "data") -> list[tuple[str, str]]:
    """(prompt, completion) pairs from local JSON Lines files (.jsonl, .json; a .json
    file may also hold one array of rows) or parquet files (through `datasets`).
    Anything unusable raises ConfigError naming the file and the line or row: text
    that is not UTF-8, a line that is not JSON, a row without both fields as strings
    (NaN and null included), an empty completion, a file without rows (`what`: the
    option the files came from, for the message)."""
    pairs: list[tuple[str, str]] = []
    for path in paths:
        if _data_format(path, what) == "json":
            rows = _json_rows(path, what)
        else:
            rows = _parquet_rows(path, what, (prompt_field, completion_field))
        before = len(pairs)
        for where, row in rows:
            if not isinstance(row, dict):
                raise ConfigError(
                    f"{what} {path!r}: {where}: expected an object with fields {prompt_field!r} and "
                    f"{completion_field!r}, got {_shown(row)}"
                )
            for name in (prompt_field, completion_field):
                if name not in row:
                    raise ConfigError(f"{what} {path!r}: {where}: missing field {name!r} (fields: {list(row)})")
                if not isinstance(row[name], str):
                    raise ConfigError(
                        f"{what} {path!r}: {where}: field {name!r} must be a string, got {_shown(row[name])}"
                    )
            if not row[completion_field]:
                raise ConfigError(f"{what} {path!r}: {where}: field {completion_field!r} is empty")
            pairs.append((row[prompt_field], row[completion_field]))
        if len(pairs) == before:
            raise ConfigError(f"{what} file {path!r} holds no rows")
    return pairs


def _shown(value: Any) -> str:
    """A field value as the file spells it (null, NaN, 5, [1]), cut short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_rows(path: str, what: str):
    """("row N", record) of a JSON Lines file, or of a file holding one JSON array of records."""
    row = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _utf8(raw, path, what, lineno)
            if not line.strip():
                continue
            if row == 0 and line.lstrip().startswith("["):  # one JSON array, not JSON Lines
                text = line + _utf8(f.read(), path, what, lineno + 1)
                try:
                    records = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ConfigError(
                        f"{what} {path!r}: line {lineno + exc.lineno - 1} cannot be read as JSON ({exc.msg})"
                    ) from None
                yield from ((f"row {i}", r) for i, r in enumerate(records, start=1))
                return
            row += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{what} {path!r}: line {lineno} cannot be read as JSON ({exc.msg}, column {exc.colno})"
                ) from None
            yield (f"row {row}" if row == lineno else f"row {row} (line {lineno})"), record


def _utf8(raw: bytes, path: str, what: str, first_line: int) -> str:
    """`raw` (the file's bytes from line `first_line` on) as text; ConfigError names the line of a bad byte."""
    try:
        return raw.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + raw.count(b"\n", 0, exc.start)
        column = exc.start - raw.rfind(b"\n", 0, exc.start)
        raise ConfigError(
            f"{what} {path!r}: line {line} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {column}); "
            "save the file as UTF-8"
        ) from None


def _parquet_rows(path: str, what: str, fields: tuple[str, str]):
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset("parquet", data_files=[path], split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        raise ConfigError(f"{what} {path!r}: cannot be read ({type(exc).__name__}: {exc})") from None
    for name in fields:
        if name not in ds.column_names:
            raise ConfigError(f"{what} {path!r}: row 1: missing field {name!r} (fields: {ds.column_names})")
    for row, values in enumerate(zip(*(ds[name] for name in fields)), start=1):
        yield f"row {row}", dict(zip(fields, values))


def tokenize_pair(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of prompt + completion + eos, truncated to `max_length`;
    labels are -100 on the prompt, so the loss covers the completion only."""
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    p = prefix + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p + c)[:max_length]
    labels = ([-100] * len(p) + c)[:max_length]
    return ids, labels


def _collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def build_heldout_batch(
    tokenizer, pairs: list[tuple[str, str]], rows: int, max_length: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """The one fixed held-out batch: the first `rows` pairs, tokenized and
    collated like training rows (labels on the completion only); rows that
    keep no completion token under `max_length` are left out, with a warning."""
    examples = [tokenize_pair(tokenizer, p, c, max_length) for p, c in pairs[:rows]]
    kept = [e for e in examples if any(y != -100 for y in e[1])]
    if not kept:
        raise ConfigError(f"max_length={max_length} leaves no completion token in any held-out row")
    if len(kept) < len(examples):
        warnings.warn(
            f"{len(examples) - len(kept)} held-out rows lost every completion token to max_length={max_length}",
            stacklevel=1,
        )
    return _collate(kept, pad_id)


def heldout_loss_fn(model: nn.Module, batch: Mapping[str, torch.Tensor], device) -> Callable[[], torch.Tensor]:
    """The `heldout=` closure of MoLFAdamW: the model's loss (the training loss,
    completion tokens only) on `batch`, moved to `device` once. It runs in eval
    mode (no dropout: a deterministic measurement that draws no random numbers)
    and puts the model back in the mode it found it in."""
    on_device = {k: v.to(device) for k, v in batch.items()}

    def loss() -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return model(**on_device).loss
        finally:
            model.train(was_training)

    return loss


def _batch_indices(n: int, batch_size: int, seed: int, epoch: int, index: int) -> list[int]:
    """Batch `index` of `epoch`: a fixed function of (seed, epoch), so a resumed run sees the same data."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[index * batch_size : (index + 1) * batch_size].tolist()


# ------------------------------------------------------------------ model and optimizer


def build_model(cfg: TrainConfig, model_dir: str | os.PathLike) -> nn.Module:
    """The model as training sees it: loaded from `model_dir` and, except for
    fft, wrapped by molf (LoRA init draws from torch's RNG: seed first)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[cfg.dtype], local_files_only=True)
    if cfg.mode != "fft":
        wrap(model, cfg.molf_config())
    return model


def _build_optimizer(
    cfg: TrainConfig, model: nn.Module, log_path: Path | None, heldout: Callable[[], torch.Tensor] | None = None
) -> torch.optim.Optimizer:
    if cfg.mode in ROUTED_MODES:
        return MoLFAdamW(
            model,
            lr=cfg.lr,
            lora_lr=cfg.lora_lr,
            weight_decay=cfg.weight_decay,
            lora_weight_decay=cfg.lora_weight_decay,
            routing=cfg.routing(heldout),
            lagged=cfg.lagged,
            log_path=log_path,
            log_every=cfg.log_every,
            state_dtype=torch.float32 if cfg.state_dtype == "float32" else cfg.state_dtype,
        )
    # fft and lora: plain AdamW over the trainable tensors; none for biases and norm weights.
    lr, wd = (cfg.lora_lr, cfg.lora_weight_decay) if cfg.mode == "lora" else (cfg.lr, cfg.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": wd},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def _lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    warm = round(cfg.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        if cfg.lr_scheduler == "linear":
            return 1.0 - progress
        if cfg.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def _device(name: str) -> torch.device:
    """The device `name` names, checked to be usable here before anything is written."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be 'auto' or a torch device such as 'cpu' or 'cuda:0', got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: no CUDA GPU is available here; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:  # torch reports a device it lacks support for by either
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"device {name!r} is not usable here ({reason}); use --device cpu (or auto)") from None
    return device


# ------------------------------------------------------------------ checkpoints


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoint_path(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:08d}.pt"


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / CHECKPOINTS).glob("step-*.pt"))


def _save_checkpoint(
    out: Path, cfg: TrainConfig, data_files: dict, step: int, epoch: int, index: int, model, opt, sched
) -> Path:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    blob = {
        "step": step,
        "data": {"epoch": epoch, "batch": index},
        "config": json.dumps(cfg.to_dict()),
        "data_files": json.dumps(data_files),
        "model": {n: t for n, t in model.state_dict().items() if n in trainable},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": _rng_state(),
    }
    path = _checkpoint_path(out, step)
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Through a Python file, so a full disk raises OSError (torch's own writer reports a RuntimeError);
        # fsync before the rename, so a power loss cannot leave an empty file under the real name.
        with open(tmp, "wb") as f:
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a crash mid-save never leaves a torn checkpoint under the real name
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if not isinstance(exc, OSError):
            raise
        kept = _checkpoints(out)
        intact = f"the checkpoints before it are intact (latest: {kept[-1].name})" if kept else "none was saved before"
        raise TrainError(
            f"cannot save checkpoint {str(path)!r} ({exc.strerror or exc}); {intact}: free space (or fix the "
            "cause) and continue the run with --resume"
        ) from exc
    # Checkpoints past this step (an unreadable one that resume fell back from) are left to be overwritten.
    older = [p for p in _checkpoints(out) if p.name <= path.name]
    for old in older[: -cfg.keep_checkpoints]:
        old.unlink()
    return path


def _read_checkpoint(path: Path) -> dict:
    """The contents of a checkpoint file; StateError when it is damaged (truncated, empty) or no checkpoint."""
    try:
        blob = torch.load(path, weights_only=True)
    except Exception as exc:  # torch.load raises RuntimeError, EOFError, UnpicklingError, ... on a damaged file
        # The first sentence: torch adds a paragraph of advice to a damaged zip archive.
        reason = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else "the file ends early"
        raise StateError(f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}: {reason})") from None
    if not isinstance(blob, dict) or not CHECKPOINT_KEYS <= blob.keys():
        raise StateError(f"checkpoint {str(path)!r} cannot be read (not a checkpoint of molf train)")
    return blob


def _run_started(out: Path) -> bool:
    """Whether OUT holds a run (of this molf: its run state; of an older one: a checkpoint or a routing log)."""
    return bool(_checkpoints(out)) or (out / RUN_STATE).exists() or (out / ROUTING_LOG).exists()


def _load_resume(cfg: TrainConfig, out: Path) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from and its contents. "latest" falls back past
    unreadable checkpoints (with a warning naming each); (None, None): the run
    in OUT stopped before its first checkpoint and starts again from step 0."""
    if cfg.resume != "latest":
        path = Path(cfg.resume)
        if not path.is_file():
            raise StateError(f"resume {cfg.resume!r}: no such checkpoint file")
        return path, _read_checkpoint(path)
    found = _checkpoints(out)
    if not found:
        if _run_started(out):
            warnings.warn(
                f"resume: the run in {str(out)!r} stopped before its first checkpoint; starting it again from step 0",
                stacklevel=1,
            )
            return None, None
        raise StateError(
            f"resume 'latest': no checkpoint in {out / CHECKPOINTS} and no run started there; "
            "leave out --resume to start one"
        )
    reasons = []
    for path in reversed(found):
        try:
            return path, _read_checkpoint(path)
        except StateError as exc:
            reasons.append(str(exc))
            if path != found[0]:
                warnings.warn(f"{exc}; falling back to the checkpoint before it", stacklevel=1)
    raise StateError(
        f"resume 'latest': none of the {len(found)} checkpoint(s) in {str(out / CHECKPOINTS)!r} can be read "
        f"(latest: {reasons[0]}); delete them and pass --resume to start the run again from step 0, or choose "
        "another out"
    )


def _fingerprint(path: str) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def _check_data_unchanged(blob: dict, now: dict, path: Path) -> None:
    """The data files must be those the run started with: other rows give another run, silently."""
    if "data_files" not in blob:  # a checkpoint from before data fingerprints
        return
    for file, then in json.loads(blob["data_files"]).items():
        if now.get(file) != then:
            raise StateError(
                f"resume {str(path)!r}: data file {file!r} changed since the run started ({then['bytes']} bytes, "
                f"sha256 {then['sha256'][:12]}...); put back the file the run started with, or start a new run "
                "with another out"
            )


def _write_run_state(out: Path, cfg: TrainConfig, data_files: dict) -> None:
    tmp = out / (RUN_STATE + ".tmp")
    try:
        tmp.write_text(json.dumps({"config": cfg.to_dict(), "data_files": data_files}, indent=1), encoding="utf-8")
        os.replace(tmp, out / RUN_STATE)
    finally:
        tmp.unlink(missing_ok=True)


def _acting_options(values: Mapping[str, Any]) -> dict:
    """A config dict as it acts on the run: options a checkpoint from an older
    molf lacks take their defaults, and policy / min_dwell / heldout_min_span their
    resolved values (an unset policy with held-out data is policy "heldout")."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in values:
            out[f.name] = values[f.name]
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        else:
            out[f.name] = f.default_factory()
    out["policy"] = _effective_policy(out["policy"], out["heldout_data"])
    if out["min_dwell"] is None:  # the policy's default
        dwell = {"heldout": Heldout.default_min_dwell(out["heldout_every"]), "hysteresis": Hysteresis.min_dwell}
        out["min_dwell"] = dwell.get(out["policy"], 0)
    if out["heldout_min_span"] is None:  # as MoLFAdamW resolves it: molf-e has LoRA experts only
        out["heldout_min_span"] = Heldout.default_min_span(lora_only=out["mode"] == "molf-e")
    return out


def _check_resumable(cfg: TrainConfig, saved: dict, path: Path) -> None:
    now, saved = _acting_options(cfg.to_dict()), _acting_options(saved)
    differ = [k for k in now if k not in RESUME_FREE and now[k] != saved.get(k)]
    if differ:
        shown = "; ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in differ)
        raise StateError(f"resume {str(path)!r}: options differ from the checkpointed run ({shown})")


# ------------------------------------------------------------------ the run


@dataclass
class TrainResult:
    out: Path
    steps: int  # optimizer steps taken in total
    losses: list[float]  # training loss of each step this invocation ran
    saved: Path  # the merged model or the adapter directory
    checkpoint: Path  # the final checkpoint
    routing_log: Path | None
    figures: list[Path]
    routing_summary: dict | None
    # policy "heldout": {"windows": measured windows, "active": {module: [active experts]},
    # "active_share": {expert: share of modules where it is active}}; else None
    heldout: dict | None = None


def _routing_postfix(opt: torch.optim.Optimizer) -> dict[str, str]:
    if not isinstance(opt, MoLFAdamW) or opt.ledger.summary()["step"] == 0:
        return {}
    share = opt.routing_summary().current_share
    return {e: f"{s:.0%}" for e, s in share.items()}


def train(cfg: TrainConfig, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Run (or resume) the training job `cfg` describes; `on_step(step, loss)`
    is called after every optimizer step."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out {cfg.out!r}: exists and is not a directory")
    log_path = out / ROUTING_LOG if cfg.mode in ROUTED_MODES else None
    device = _device(cfg.device)
    resume_path = blob = None
    if cfg.resume is not None:
        resume_path, blob = _load_resume(cfg, out)
        if blob is not None:
            _check_resumable(cfg, json.loads(blob["config"]), resume_path)
    elif _run_started(out):
        raise ConfigError(
            f"out {cfg.out!r} already holds a run: pass --resume (resume='latest') to continue it, or choose "
            "another --out"
        )
    # The user's data is checked before anything is written.
    pairs = load_pairs(cfg.data, cfg.prompt_field, cfg.completion_field) if cfg.data else None
    heldout_pairs = None
    if cfg.heldout_data:
        heldout_pairs = load_pairs(cfg.heldout_data, cfg.prompt_field, cfg.completion_field, what="heldout_data")

    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(cfg.model) if cfg.model is not None else out / BASE_MODEL
    if cfg.model is None and not (model_dir / "config.json").is_file():
        save_tiny_model(model_dir, cfg.seed)
    if pairs is None:
        generated = out / "data.jsonl"
        if not generated.is_file():
            write_arithmetic_data(generated, seed=cfg.seed)
        pairs = load_pairs([str(generated)], "prompt", "completion")
    data_files = {f: _fingerprint(f) for f in (cfg.data or [str(generated)]) + (cfg.heldout_data or [])}
    if blob is not None:
        _check_data_unchanged(blob, data_files, resume_path)
    else:
        _write_run_state(out, cfg, data_files)
    for stale in (out / CHECKPOINTS).glob("*.tmp"):  # left by a save that was killed
        stale.unlink()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"model {str(model_dir)!r}: the tokenizer has no eos token to end completions")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = [tokenize_pair(tokenizer, p, c, cfg.max_length) for p, c in pairs]
    examples = [e for e in examples if any(y != -100 for y in e[1])]
    if len(examples) < len(pairs):
        warnings.warn(
            f"{len(pairs) - len(examples)} rows lost every completion token to max_length={cfg.max_length}",
            stacklevel=1,
        )
    if not examples:
        raise ConfigError(f"max_length={cfg.max_length} leaves no completion token in any row")
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = cfg.steps if cfg.steps is not None else cfg.epochs * per_epoch

    model = build_model(cfg, model_dir).to(device)
    heldout = None
    if heldout_pairs is not None:
        batch = build_heldout_batch(tokenizer, heldout_pairs, cfg.heldout_batch, cfg.max_length, pad_id)
        heldout = heldout_loss_fn(model, batch, device)
    opt = _build_optimizer(cfg, model, log_path, heldout)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total))
    step = 0
    if blob is not None:
        missing = model.load_state_dict(blob["model"], strict=False).missing_keys
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        lacking = sorted(trainable & set(missing))
        if lacking:
            raise StateError(f"resume {str(resume_path)!r}: the checkpoint lacks trainable tensors {lacking[:3]}")
        opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        _set_rng_state(blob["rng"])
        step = int(blob["step"])
        if blob["data"] != {"epoch": step // per_epoch, "batch": step % per_epoch}:
            raise StateError(f"resume {str(resume_path)!r}: data position {blob['data']} does not match step {step}")

    from tqdm.auto import tqdm

    losses: list[float] = []
    model.train()
    checkpoint = resume_path
    with tqdm(total=total, initial=step, desc=f"molf train ({cfg.mode})", disable=not cfg.progress) as bar:
        while step < total:
            rows = _batch_indices(len(examples), cfg.batch_size, cfg.seed, *divmod(step, per_epoch))
            batch = _collate([examples[i] for i in rows], pad_id)
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix({"loss": f"{losses[-1]:.4f}", **_routing_postfix(opt)})
            if step % cfg.save_every == 0 or step == total:
                checkpoint = _save_checkpoint(out, cfg, data_files, step, *divmod(step, per_epoch), model, opt, sched)
            if on_step is not None:
                on_step(step, losses[-1])

    summary = opt.routing_summary().to_dict() if isinstance(opt, MoLFAdamW) else None
    heldout_info = _heldout_info(opt) if heldout is not None else None
    saved = _save_result(cfg, model, tokenizer, out, model_dir)
    figures = []
    if cfg.plots and log_path is not None and log_path.exists():
        from .plots import plot_routing_log

        figures = plot_routing_log(log_path, out / "routing_share.png")
    return TrainResult(out, step, losses, saved, checkpoint, log_path, figures, summary, heldout_info)


def _heldout_info(opt: MoLFAdamW) -> dict:
    active = opt.router.incumbents()
    return {
        "windows": int(opt.ledger.heldout_windows),
        "active": {m: [e for e, on in zip(opt.expert_names, row) if on] for m, row in zip(opt.module_names, active)},
        "active_share": {e: float(active[:, j].mean()) for j, e in enumerate(opt.expert_names)},
    }


def _save_result(cfg: TrainConfig, model: nn.Module, tokenizer, out: Path, model_dir: Path) -> Path:
    """The merged model or the adapter, with the tokenizer: written beside its place and moved
    there whole, so a failed save (a full disk) leaves no half-written directory behind."""
    path = out / ("adapter" if cfg.mode in ADAPTER_MODES else "model")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if cfg.mode in ADAPTER_MODES:
            from .export import export_peft

            export_peft(model, tmp, base_model_name_or_path=str(model_dir.resolve()))
        else:
            (merge(model) if cfg.mode == "molf" else model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, OSError):
            raise
        raise TrainError(
            f"cannot save {str(path)!r} ({exc.strerror or exc}); the run's checkpoints are intact: free space (or "
            "fix the cause) and run the same command with --resume to save it"
        ) from exc
    return path
