"""The methods of the generalization suite (`generalization.py`) and its training run:
quality.py's methods, plus the baselines a practitioner would set beside molf —
FFT and LoRA with early stopping on the validation split the held-out routing
uses (the best validation checkpoint, checked every CHECK_EVERY steps), and
peft's DoRA and PiSSA at the LoRA baseline's rank and scale."""

from __future__ import annotations

import copy
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402

CHECK_EVERY = 10  # steps between validation checks of the early-stopped baselines


def peft_lora(**options) -> Callable[..., quality.Built]:
    """peft's LoRA with `options` (use_dora, init_lora_weights) at the LoRA baseline's rank and
    rsLoRA scale; peft wraps any module's nn.Linear layers named by target_modules."""

    def build(model, lr, steps, targets, log_path, heldout) -> quality.Built:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=quality.LORA_RANK,
            lora_alpha=quality.LORA_RANK,
            use_rslora=True,
            target_modules=list(targets),
            **options,
        )
        model = get_peft_model(model, cfg)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        return model, opt, quality._none

    return build


@dataclass(frozen=True)
class Method:
    build: Callable[..., quality.Built]
    early_stop: bool = False
    # For hparams instances: the name of quality.py's builder with the variant applied
    # (the dense + LoRA routed methods); None: the variant does not touch it.
    varied: str | None = None


def _suite(name: str) -> Method:
    return Method(quality.METHODS[name], varied=name if name in quality.VARIED else None)


METHODS: dict[str, Method] = {
    "FFT": _suite("FFT"),
    "LoRA": _suite("LoRA"),
    "FFT (early stop)": Method(quality.METHODS["FFT"], early_stop=True),
    "LoRA (early stop)": Method(quality.METHODS["LoRA"], early_stop=True),
    "DoRA": Method(peft_lora(use_dora=True)),
    "PiSSA": Method(peft_lora(init_lora_weights="pissa")),
    "AdaLoRA": _suite("AdaLoRA"),
    "MoLF (paper)": _suite("MoLF (paper)"),
    "MoLF-E": _suite("MoLF-E"),
    "molf default": _suite("molf default"),
    "molf-E default": _suite("molf-E default"),
    # molf-E default with its experts in AdaLoRA's form (MoLFConfig(lora_form="svd")).
    "molf-E svd": Method(quality._molf(quality.EFFICIENT_RANKS, False, quality._default, lora_form="svd")),
}
ROUTED = ("MoLF (paper)", "MoLF-E", "molf default", "molf-E default", "molf-E svd")


# A dense + LoRA method with its LoRA experts' rate at a multiple of its dense rate: molf's two
# rates chosen together on validation (`generalization.py --lora-factors`). By name, so that
# the suite's spawned workers build it from the job alone.
_WITH_FACTOR = re.compile(r"(?P<method>.+) \(lora_lr (?P<factor>\S+) lr\)")


def with_lora_factor(method: str, factor: float) -> str:
    """The name of `method` (one of quality.VARIED) run with lora_lr = `factor` x lr."""
    if method not in quality.VARIED:
        raise ValueError(f"{method!r} has no LoRA rate of its own to move; expected one of {list(quality.VARIED)}")
    return f"{method} (lora_lr {factor:g} lr)"


def base_method(method: str) -> str:
    """The suite's method a `with_lora_factor` name moves (any other name: itself)."""
    m = _WITH_FACTOR.fullmatch(method)
    return m["method"] if m and m["method"] in quality.VARIED else method


def builder(method: str, variant: str | None) -> Callable[..., quality.Built]:
    base = base_method(method)
    if base != method:  # lora_lr = factor x lr; an hparams variant moves it further, as it moves the base's
        factor = float(_WITH_FACTOR.fullmatch(method)["factor"])
        lr_factor, alpha_factor = (1.0, 1.0) if variant is None else quality.VARIANTS[variant]
        return quality._molf((quality.LORA_RANK,), True, quality.VARIED[base], factor * lr_factor, alpha_factor)
    m = METHODS[method]
    if variant is None or m.varied is None:
        return m.build
    return quality.VARIANT_METHODS[quality.variant(m.varied, variant)]


class BestCheckpoint:
    """The trainable tensors at the lowest validation loss seen so far (NaN never counts)."""

    def __init__(self, model: nn.Module, val_loss: Callable[[], torch.Tensor]) -> None:
        self.model, self.val_loss = model, val_loss
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.best, self.step, self.saved = math.inf, 0, None

    @torch.no_grad()
    def check(self, step: int) -> None:
        training = self.model.training
        self.model.eval()
        loss = float(self.val_loss())
        self.model.train(training)
        if loss < self.best:
            self.best, self.step = loss, step
            self.saved = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def restore(self) -> None:
        if self.saved is not None:
            for p, s in zip(self.params, self.saved):
                p.copy_(s)


def train_eval(
    inst: quality.Instance,
    method: str,
    lr: float,
    seed: int,
    steps: int,
    split: str,
    variant: str | None = None,
    tick: Callable[[], None] = lambda: None,
) -> dict:
    """quality.train_eval for this suite's methods (the same model init and minibatches per
    seed): the metric on `split`, the wall time, for routed methods the share of modules per
    expert at the end, for early-stopped ones the step of the checkpoint kept."""
    m = METHODS[base_method(method)]
    with torch.random.fork_rng(devices=[]):  # LoRA inits draw from the global RNG
        torch.manual_seed(seed)

        def heldout(model: nn.Module) -> torch.Tensor:  # the instance's validation split
            return inst.loss(model, inst.heldout)

        model, opt, after_step = builder(method, variant)(
            copy.deepcopy(inst.model), lr, steps, inst.targets, None, heldout
        )
        batches = torch.Generator().manual_seed(seed + 1)  # the same minibatches for every method
        keep = BestCheckpoint(model, lambda: heldout(model)) if m.early_stop else None
        model.train()
        start = time.perf_counter()
        for step in range(1, steps + 1):
            inst.loss(model, inst.batch(step, steps, batches)).backward()
            opt.step()
            after_step(step)
            opt.zero_grad()
            if keep is not None and (step % CHECK_EVERY == 0 or step == steps):
                keep.check(step)
            tick()
        if keep is not None:
            keep.restore()
        wall = time.perf_counter() - start
        model.eval()
        out: dict = {"metric": inst.evaluate(model, split), "wall_s": wall}
    if keep is not None:
        out["best_step"] = keep.step
    if base_method(method) in ROUTED:
        out["active_share"] = dict(zip(opt.expert_names, map(float, opt.router.incumbents().mean(axis=0))))
    return out
