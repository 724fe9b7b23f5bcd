"""Hugging Face Trainer integration.

MoLFAdamW itself plugs into the Trainer as it is, through `optimizers=(opt, scheduler)`
or `optimizer_cls_and_kwargs=(molf.MoLFAdamW, dict(lr=args.learning_rate, ...))` (the
Trainer passes no learning rate of its own: MoLFAdamW refuses groups without one), and
checkpoints and resumes through it exactly. This module adds:

* `RoutingCallback` (`add_routing_callback`): the router's statistics next to the loss,
  and the routing log in `output_dir/routing.jsonl` unless the optimizer has one;
* `ExportCallback`: at every checkpoint, the model as a plain one (merged, or the PEFT
  adapter of MoLF-Efficient) inside the checkpoint folder;
* `molf_optimizer(trainer)`: the MoLFAdamW inside accelerate's wrapper.

`molf.hf` loads on first use after `import molf` (transformers is slow to import).
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ._core import ConfigError
from .distributed import is_sharded
from .export import _wrapped_root, export_peft
from .optimizer import MoLFAdamW
from .routing_log import LogSettings
from .wrap import merged_state_dict

__all__ = ["ExportCallback", "RoutingCallback", "add_routing_callback", "find_molf_optimizer", "molf_optimizer"]


def find_molf_optimizer(optimizer: torch.optim.Optimizer | Trainer | None) -> MoLFAdamW | None:
    """The MoLFAdamW inside `optimizer` (accelerate wraps it in an
    AcceleratedOptimizer) or inside a Trainer's optimizer, or None."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, MoLFAdamW) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, MoLFAdamW) else None


def molf_optimizer(trainer: Trainer) -> MoLFAdamW:
    """The MoLFAdamW that `trainer` trains with, e.g. `molf_optimizer(trainer).routing_summary()`
    (`trainer.optimizer` is accelerate's wrapper around it once training has started).
    ConfigError when the trainer has no optimizer yet or another one."""
    opt = find_molf_optimizer(trainer)
    if opt is not None:
        return opt
    held = getattr(trainer, "optimizer", None)
    if held is None:
        raise ConfigError(
            "molf_optimizer: the trainer has no optimizer yet; trainer.train() (or trainer.create_optimizer()) "
            "builds it from optimizer_cls_and_kwargs"
        )
    raise ConfigError(f"molf_optimizer: the trainer's optimizer is {type(held).__name__}, not molf.MoLFAdamW")


class RoutingCallback(TrainerCallback):
    """Adds the router's statistics to every training log of a Trainer, and gives the
    optimizer a routing log `args.output_dir/routing_log` (default `routing.jsonl`; None:
    none; a `molf.LogSettings` with a relative path: that log under `output_dir`) when it
    has none (`log_path`), so `molf plot` has something to read; the main process alone
    writes it, and a resumed run continues it. The statistics:

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

    def __init__(self, prefix: str = "molf/", routing_log: LogSettings | str | None = "routing.jsonl") -> None:
        self.prefix = prefix
        self.routing_log = None if routing_log is None else LogSettings.of(routing_log)
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
        # Resumed runs already hold the checkpoint's optimizer state here (so the log resumes too).
        opt = find_molf_optimizer(kwargs.get("optimizer"))
        if opt is None:
            return
        log = self.routing_log
        if log is not None and opt.log_path is None and state.is_world_process_zero:
            opt.set_log(dataclasses.replace(log, path=os.path.join(args.output_dir, log.path)))
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


def add_routing_callback(
    trainer: Trainer, prefix: str = "molf/", routing_log: LogSettings | str | None = "routing.jsonl"
) -> RoutingCallback:
    """Install a `RoutingCallback(prefix, routing_log)` first among `trainer`'s callbacks
    (see its docstring for why first) and return it."""
    handler = trainer.callback_handler
    if any(isinstance(cb, RoutingCallback) for cb in handler.callbacks):
        raise ConfigError("add_routing_callback: the trainer already has a RoutingCallback")
    callback = RoutingCallback(prefix, routing_log)
    handler.callbacks.insert(0, callback)
    return callback


class ExportCallback(TrainerCallback):
    """At every checkpoint the Trainer saves (`output_dir/checkpoint-N`, which holds the
    wrapped model that `resume_from_checkpoint` needs), also write there what the live
    model is as a plain one:

    * `checkpoint-N/model`: with a dense expert (MoLF), the merged model
      (`molf.merged_state_dict`), for `AutoModelForCausalLM.from_pretrained`;
    * `checkpoint-N/adapter`: MoLF-Efficient's PEFT adapter (`molf.export_peft`), for
      `PeftModel.from_pretrained(base, ...)` on the unwrapped base model;

    with the Trainer's tokenizer (processing class) beside it. The live model stays
    wrapped and the checkpoint's own files are untouched, so training and resuming go on
    exactly as without the callback. `base_model_name_or_path`: written into the
    adapter's config (default: the model's `config._name_or_path`).
    """

    def __init__(self, base_model_name_or_path: str | None = None) -> None:
        self.base_model_name_or_path = base_model_name_or_path

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kw):
        root, layers = _wrapped_root(model, "ExportCallback")
        if any(layer.fft for _, layer in layers) and not hasattr(root, "save_pretrained"):
            raise ConfigError(
                f"ExportCallback writes the merged model with save_pretrained, which {type(root).__name__} lacks "
                "(use a transformers model, or molf.merged_state_dict(model) in a callback of your own)"
            )

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        root, layers = _wrapped_root(model, "ExportCallback")
        sharded = any(is_sharded(p) for p in root.parameters())
        if not (args.should_save or sharded):  # sharded tensors are gathered on every rank
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and not os.path.isdir(folder):
            raise RuntimeError(
                f"ExportCallback: the Trainer saved no checkpoint folder {folder} (hyperparameter search "
                "trials save elsewhere and are not supported)"
            )
        if any(layer.fft for _, layer in layers):
            out = os.path.join(folder, "model")
            state_dict = merged_state_dict(root)
            if args.should_save:
                root.save_pretrained(out, state_dict=state_dict)
        else:
            out = os.path.join(folder, "adapter")
            export_peft(root, out, base_model_name_or_path=self.base_model_name_or_path)
        tokenizer = kwargs.get("processing_class", kwargs.get("tokenizer"))  # "tokenizer" before transformers 4.46
        if args.should_save and tokenizer is not None:
            tokenizer.save_pretrained(out)
