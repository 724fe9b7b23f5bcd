"""Hugging Face Trainer integration: routing statistics in the Trainer's logs.

MoLFAdamW itself plugs into the Trainer as it is, through
`optimizers=(opt, scheduler)` or `optimizer_cls_and_kwargs=(molf.MoLFAdamW, dict(lr=..., routing=molf.Heldout(...)))`,
and checkpoints and resumes through it exactly. This module adds the
`RoutingCallback`, which writes the router's statistics next to the loss.
"""

from __future__ import annotations

import warnings

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ._core import ConfigError
from .optimizer import MoLFAdamW

__all__ = ["RoutingCallback", "add_routing_callback", "find_molf_optimizer"]


def find_molf_optimizer(optimizer: torch.optim.Optimizer | None) -> MoLFAdamW | None:
    """The MoLFAdamW inside `optimizer` (accelerate wraps it in an
    AcceleratedOptimizer), or None."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, MoLFAdamW) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, MoLFAdamW) else None


class RoutingCallback(TrainerCallback):
    """Adds the router's statistics to every training log of a Trainer:

    * `{prefix}share/<expert>`: share of the routed modules whose latest
      winners include that expert (e.g. `molf/share/dense`);
    * `{prefix}switches_per_step`: winner changes per step since the last log,
      summed over modules;
    * `{prefix}skipped_steps`: optimizer steps skipped so far for non-finite
      gradients; `{prefix}no_winner_events`: module-steps without a finite score.

    The Trainer appends a log to `state.log_history` and then calls every
    callback's `on_log` in turn, the reporting integrations (TensorBoard, W&B,
    ...) first. So install it with `add_routing_callback(trainer)`, which puts it
    first in line: its keys then reach `state.log_history` and every logger.
    Passed as `Trainer(callbacks=[RoutingCallback()])` it runs after the
    reporting integrations, which then miss its keys (the history and the
    console still get them).
    """

    def __init__(self, prefix: str = "molf/") -> None:
        self.prefix = prefix
        self._since: tuple[int, int] | None = None  # (optimizer step, total switches) at the last log
        self._warned = False

    def _optimizer(self, optimizer) -> MoLFAdamW | None:
        opt = find_molf_optimizer(optimizer)
        if opt is None and not self._warned:
            self._warned = True
            warnings.warn(
                f"RoutingCallback: the Trainer's optimizer is {type(optimizer).__name__}, not molf.MoLFAdamW; "
                "no routing statistics are logged",
                UserWarning,
                stacklevel=3,
            )
        return opt

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Resumed runs already hold the checkpoint's optimizer state here.
        opt = find_molf_optimizer(kwargs.get("optimizer"))
        if opt is not None:
            self._since = (opt.ledger.step, int(opt.ledger.summary()["switches"]))

    def routing_logs(self, opt: MoLFAdamW) -> dict[str, float]:
        """The statistics to log now (and the interval of the next switch rate starts here)."""
        summary = opt.routing_summary()
        step0, switches0 = self._since or (0, 0)
        steps = summary.step - step0
        logs = {f"{self.prefix}share/{e}": float(s) for e, s in summary.current_share.items()}
        logs.update({f"{self.prefix}active/{e}": float(s) for e, s in summary.active_share.items()})
        logs[f"{self.prefix}switches_per_step"] = (summary.switches - switches0) / steps if steps > 0 else 0.0
        logs[f"{self.prefix}skipped_steps"] = float(summary.skipped_steps)
        logs[f"{self.prefix}no_winner_events"] = float(summary.no_winner_events)
        self._since = (summary.step, summary.switches)
        return logs

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if logs is None or "loss" not in logs:  # evaluation logs and the final metrics
            return
        opt = self._optimizer(kwargs.get("optimizer"))
        if opt is None:
            return
        extra = self.routing_logs(opt)
        # The Trainer appended {**logs, "step": global_step} to the history just before on_log.
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and last.keys() >= logs.keys():
            last.update(extra)
        logs.update(extra)  # the dict every later callback (logger) receives


def add_routing_callback(trainer: Trainer, prefix: str = "molf/") -> RoutingCallback:
    """Install a `RoutingCallback` first among `trainer`'s callbacks (see its
    docstring for why first) and return it."""
    handler = trainer.callback_handler
    if any(isinstance(cb, RoutingCallback) for cb in handler.callbacks):
        raise ConfigError("add_routing_callback: the trainer already has a RoutingCallback")
    callback = RoutingCallback(prefix)
    handler.callbacks.insert(0, callback)
    return callback
