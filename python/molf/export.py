"""PEFT LoRA adapters out of, and into, molf-wrapped models (SPEC §5).

MoLF-Efficient (fft=False) leaves the base weights untouched, so what it learnt
is exactly the sum of its LoRA experts, sum_i s_i B_i A_i. That sum is one LoRA
of rank sum_i r_i:

    B = [s_1 B_1 | s_2 B_2 | ...],  A = [A_1; A_2; ...],  scaling 1

which `export_peft` writes in PEFT's adapter layout (adapter_config.json and
adapter_model.safetensors), for `peft.PeftModel.from_pretrained` on the
unwrapped base model. `import_peft` goes the other way: it starts one LoRA
expert from an existing PEFT LoRA adapter. Neither needs peft installed.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ._core import ConfigError
from .distributed import full
from .layer import MoLFLinear
from .wrap import _CONFIG_ATTR, routed_modules

__all__ = ["export_peft", "import_peft", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LEGACY_WEIGHTS = "adapter_model.bin"
# PEFT prefixes every saved key with the path of the base model inside its PeftModel.
_KEY_PREFIX = "base_model.model."
# PEFT task type per transformers auto-class mapping (names as in modeling_auto).
_TASK_TYPES = {
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "CAUSAL_LM",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES": "SEQ_2_SEQ_LM",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": "SEQ_CLS",
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": "TOKEN_CLS",
    "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES": "QUESTION_ANS",
}


def _wrapped_root(model: nn.Module, what: str) -> tuple[nn.Module, list[tuple[str, MoLFLinear]]]:
    """The model `wrap` returned (it may sit inside a DDP or accelerate wrapper,
    whose `module.` prefix is no part of the base model's names) and its layers."""
    root = next((m for m in model.modules() if hasattr(m, _CONFIG_ATTR)), model)
    layers = routed_modules(root)
    if not layers:
        raise ConfigError(
            f"{what}: the model has no molf-wrapped layers (merged already, or never wrapped); "
            "pass the model molf.wrap returned"
        )
    return root, layers


def _task_type(model: nn.Module) -> str | None:
    """The PEFT task type of a transformers model class (GPT2LMHeadModel is a
    causal LM too, so ask transformers' own auto mappings); None if unknown."""
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:
        return None
    name = type(model).__name__
    for mapping, task in _TASK_TYPES.items():
        classes = getattr(modeling_auto, mapping, {}).values()
        if any(name == c or (isinstance(c, tuple) and name in c) for c in classes):
            return task
    return None


def _default_base_path(model: nn.Module) -> str | None:
    path = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(path) if path else None


@torch.no_grad()
def export_peft(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "auto",
) -> None:
    """Write the LoRA experts of a MoLF-Efficient model as one PEFT LoRA adapter.

    Each wrapped module's experts (ranks r_1, r_2, ...) become one LoRA of rank
    r_1 + r_2 + ... with B = [s_1 B_1 | s_2 B_2 | ...], A = [A_1; A_2; ...] and
    lora_alpha = rank, so PEFT's scaling is 1; `target_modules` lists exactly
    the wrapped modules. Load it with `PeftModel.from_pretrained(base, path)`
    on the unwrapped base model. `base_model_name_or_path` defaults to the
    model's `config._name_or_path`; `task_type` "auto" infers it from the
    model class (e.g. CAUSAL_LM for *ForCausalLM), None leaves it unset.

    Under torch.distributed call it on every rank: FSDP2-sharded experts are
    gathered (a collective), and rank 0 writes.

    Refused: a model with a dense expert (fft=True changes the base weights:
    use `molf.merge` and `save_pretrained`), and a merged or unwrapped model.
    """
    model, layers = _wrapped_root(model, "export_peft")
    dense = [name for name, layer in layers if layer.fft]
    if dense:
        raise ConfigError(
            f"export_peft needs MoLF-Efficient (MoLFConfig(fft=False)): {len(dense)} wrapped modules "
            f"(e.g. {dense[0]}) carry the dense expert, whose updates change the base weights and are not "
            "a LoRA adapter; use molf.merge(model) then model.save_pretrained(dir) instead"
        )
    ranks = {layer.ranks for _, layer in layers}
    if len(ranks) != 1:
        raise ConfigError(f"export_peft: wrapped modules carry different expert ranks {sorted(ranks)}")
    if task_type == "auto":
        task_type = _task_type(model)
    lora_ids = {id(p) for _, layer in layers for expert in layer.experts() for p in expert}
    unexported = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in lora_ids]
    if unexported:
        warnings.warn(
            f"export_peft: {len(unexported)} trainable parameters outside the LoRA experts "
            f"(e.g. {unexported[0]}) are not part of the adapter; if they were trained, the adapter "
            "alone does not reproduce the model",
            UserWarning,
            stacklevel=2,
        )

    tensors: dict[str, torch.Tensor] = {}
    conv1d = False
    for name, layer in layers:
        dtype = layer.lora_B[0].dtype
        # Under FSDP2 the experts are DTensor shards: gather them (on every rank). ("svd"-form
        # experts: λ folded into B, in float64.)
        pairs = layer.lora_pairs(lambda t: full(t.detach()).to(torch.float64))
        a = torch.cat([a.to(dtype) for a, _, _ in pairs], dim=0)
        b = torch.cat([(s * b).to(dtype) for _, b, s in pairs], dim=1)
        tensors[f"{_KEY_PREFIX}{name}.lora_A.weight"] = a.cpu().contiguous()
        tensors[f"{_KEY_PREFIX}{name}.lora_B.weight"] = b.cpu().contiguous()
        conv1d |= layer.transposed
    rank = sum(next(iter(ranks)))
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path or _default_base_path(model),
        "r": rank,
        "lora_alpha": rank,  # scaling alpha / r = 1: the expert scales live in B
        "use_rslora": False,
        "target_modules": [name for name, _ in layers],
        "lora_dropout": layers[0][1].lora_dropout.p if isinstance(layers[0][1].lora_dropout, nn.Dropout) else 0.0,
        # HF Conv1D stores its weight transposed; PEFT wants to be told (A and B keep nn.Linear's layout).
        "fan_in_fan_out": conv1d,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return  # one writer; the other ranks took part in the gathers above
    from safetensors.torch import save_file  # optional (comes with transformers): imported on use

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def _pattern_value(patterns: dict, name: str, default):
    # PEFT's own rule (peft.utils.other.get_pattern_key): a key matches a module
    # name that ends with it at a dot boundary; the first match wins.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_adapter(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise ConfigError(f"import_peft: no {ADAPTER_CONFIG} in {str(path)!r}")
    config = json.loads(config_file.read_text())
    if (path / ADAPTER_WEIGHTS).is_file():
        from safetensors.torch import load_file

        weights = load_file(str(path / ADAPTER_WEIGHTS))
    elif (path / _LEGACY_WEIGHTS).is_file():
        weights = torch.load(path / _LEGACY_WEIGHTS, map_location="cpu", weights_only=True)
    else:
        raise ConfigError(f"import_peft: no {ADAPTER_WEIGHTS} or {_LEGACY_WEIGHTS} in {str(path)!r}")
    return config, weights


def _check_plain_lora(config: dict) -> None:
    """Refuse adapters whose forward pass is more than y += s B A dropout(x)."""
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"import_peft reads LoRA adapters, this one has peft_type={config.get('peft_type')!r}")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "lora_bias": bool(config.get("lora_bias")),
        "bias": config.get("bias", "none") != "none",
        "modules_to_save": bool(config.get("modules_to_save")),
        "trainable_token_indices": bool(config.get("trainable_token_indices")),
        "layer_replication": bool(config.get("layer_replication")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ConfigError(
            f"import_peft: the adapter uses {', '.join(f'{k}={config.get(k)!r}' for k in bad)}, which a molf "
            "LoRA expert cannot hold; only plain LoRA (no DoRA, no trained biases, no extra trained modules) imports"
        )


@torch.no_grad()
def import_peft(model: nn.Module, path: str | os.PathLike, *, expert: int) -> nn.Module:
    """Start LoRA expert `expert` of every wrapped module from a PEFT LoRA adapter.

    `expert` is the expert's index in the routing (with fft=True, 0 is the dense
    weight and the LoRA experts are 1, 2, ...; with fft=False they are 0, 1, ...).
    The adapter's rank in each module must equal that expert's rank. A is
    copied; B is rescaled by s_peft / s_molf, so s_molf B A is what PEFT
    computed (an expert in the "svd" form gets λ = 1). Modules the adapter does
    not cover keep their expert as it is (after wrap: no change to the output,
    B or λ being zero); an adapter module that is
    not wrapped is refused. Everything is checked before anything is written.
    Returns the model.
    """
    _, layers = _wrapped_root(model, "import_peft")
    layers = dict(layers)
    first = next(iter(layers.values()))
    lora_experts = range(int(first.fft), first.num_experts)
    if isinstance(expert, bool) or not isinstance(expert, int) or expert not in lora_experts:
        raise ConfigError(
            f"import_peft: expert must be the index of a LoRA expert, one of {list(lora_experts)} "
            f"(expert 0 is the dense weight when fft=True), got {expert!r}"
        )
    slot = expert - int(first.fft)
    adapter_dir = Path(path)
    config, weights = _read_adapter(adapter_dir)
    _check_plain_lora(config)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if match is None:
            raise ConfigError(
                f"import_peft: unexpected tensor {key!r} in the adapter; only lora_A/lora_B weights import"
            )
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    if not pairs:
        raise ConfigError(f"import_peft: the adapter in {str(adapter_dir)!r} holds no LoRA weights")

    plan = []
    for name, pair in pairs.items():
        if name not in layers:
            raise ConfigError(
                f"import_peft: the adapter adapts {name!r}, which is not a molf-wrapped module "
                f"(wrapped: {', '.join(list(layers)[:4])}, ...); wrap it too (MoLFConfig.target_modules)"
            )
        if set(pair) != {"lora_A", "lora_B"}:
            raise ConfigError(
                f"import_peft: module {name!r} has {sorted(pair)} in the adapter, needs lora_A and lora_B"
            )
        layer = layers[name]
        a, b = pair["lora_A"], pair["lora_B"]
        want_a, want_b = tuple(layer.lora_A[slot].shape), tuple(layer.lora_B[slot].shape)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ConfigError(
                f"import_peft: module {name!r}: adapter A {tuple(a.shape)}, B {tuple(b.shape)} do not fit expert "
                f"{expert} (A {want_a}, B {want_b}); wrap with that expert's rank = the adapter's rank {a.shape[0]}"
            )
        r = a.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
        peft_scale = alpha / (r**0.5 if config.get("use_rslora") else r)
        plan.append((layer, a, b, peft_scale / layer.scales[slot]))
    for layer, a, b, factor in plan:
        layer.lora_A[slot].copy_(a)
        layer.lora_B[slot].copy_((b.to(torch.float64) * factor).to(layer.lora_B[slot].dtype))
        if layer.form == "svd":  # an "svd"-form expert: B·diag(1)·A is the adapter's pair
            layer.lora_E[slot].fill_(1.0)
    return model
