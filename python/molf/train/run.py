"""`train(cfg)`: a `molf train` run on the transformers Trainer.

The Trainer does the loop: batches (shuffled with `seed`), gradient accumulation, mixed
precision, clipping, the warm-up + decay schedule, logging (`report_to`), evaluation on
`heldout_data`, checkpoints (`OUT/checkpoint-N`, `keep_checkpoints` of them) and the
processes of `torchrun` / `accelerate launch`. molf adds the optimizer (MoLFAdamW, with
the routing policy object built from the options, for molf and molf-e), its routing
statistics in the logs (`molf.hf.RoutingCallback`), a plain JSONL log of every Trainer
log record (`OUT/train_log.jsonl`), in each checkpoint of a wrapped model the merged model
or the PEFT adapter (`molf.hf.ExportCallback`), the run's identity (`OUT/run.json`: the options that
shape the trajectory and the data files' digests, checked on resume), and at the end the
merged model (fft, molf) or the PEFT adapter (lora, molf-e) with the tokenizer, and the
routing figures (the same function as `molf plot`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._core import ConfigError
from ..optimizer import MoLFAdamW
from ..routing_log import LogSettings
from ..wrap import merge, wrap
from .config import ADAPTER_MODES, DTYPES, ROUTED_MODES, TrainConfig
from .data import (
    build_heldout_batch,
    collator,
    fingerprint,
    heldout_loss_fn,
    load_rows,
    tokenized_dataset,
)
from .run_dir import (
    BASE_MODEL,
    CACHE,
    GENERATED_DATA,
    ROUTING_LOG,
    RUN_STATE,
    TRAIN_LOG,
    TRAINER_STATE,
    check_same_run,
    checkpoint_problem,
    data_key,
    list_checkpoints,
    log_callback,
    resume_checkpoint,
    run_started,
    write_json,
)
from .tiny import save_tiny_model, write_arithmetic_data

__all__ = ["TrainError", "TrainResult", "build_model", "train"]


class TrainError(RuntimeError):
    """A run that cannot go on for a reason outside its options (a full disk while saving); what
    was saved before stays intact, so the run can be resumed once the cause is fixed."""


@dataclass
class TrainResult:
    out: Path
    steps: int  # optimizer steps taken in total
    losses: list[float]  # the training losses logged by this invocation (every `logging_steps`)
    eval_loss: float | None  # the last evaluation's loss on heldout_data
    saved: Path  # the merged model or the adapter directory
    checkpoint: Path | None  # the final checkpoint
    train_log: Path
    routing_log: Path | None
    figures: list[Path]
    routing_summary: dict | None
    # policy "heldout": {"windows": measured windows, "active": {module: [active experts]},
    # "active_share": {expert: share of modules where it is active}}; else None
    heldout: dict | None = None


def build_model(cfg: TrainConfig, model_dir: str | os.PathLike) -> nn.Module:
    """The model as training sees it: loaded from `model_dir` (float32 weights unless `dtype`
    casts them) and, except for fft, wrapped by molf (LoRA init draws from torch's RNG: seed first)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.run.seed)
    dtype = DTYPES[cfg.model.dtype] if cfg.model.dtype is not None else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    if cfg.model.mode != "fft":
        wrap(model, cfg.model.molf_config())
    return model


def _use_cpu(device: str) -> bool:
    """Whether the Trainer is to stay on the CPU; a CUDA device that is not there is a ConfigError."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda': no CUDA GPU is available here; use --device cpu (or auto)")
    return device == "cpu" or not torch.cuda.is_available()


# ------------------------------------------------------------------ the Trainer


def _training_arguments(cfg: TrainConfig, out: Path, evaluate: bool):
    import dataclasses

    from transformers import TrainingArguments

    optim, run = cfg.optim, cfg.run
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    # transformers 5 takes a ratio as a float warmup_steps; older releases have warmup_ratio.
    warmup = {"warmup_ratio": optim.warmup_ratio} if "warmup_ratio" in names else {"warmup_steps": optim.warmup_ratio}
    lora = cfg.model.mode == "lora"  # its one LoRA adapter trains at the LoRA rate
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=optim.batch_size,
        per_device_eval_batch_size=optim.batch_size,
        gradient_accumulation_steps=optim.gradient_accumulation_steps,
        max_steps=run.steps if run.steps is not None else -1,
        num_train_epochs=run.epochs,
        learning_rate=optim.lora_lr if lora else optim.lr,
        weight_decay=optim.lora_weight_decay if lora else optim.weight_decay,
        lr_scheduler_type="constant_with_warmup" if optim.lr_scheduler == "constant" else optim.lr_scheduler,
        max_grad_norm=optim.max_grad_norm,
        bf16=optim.bf16,
        fp16=optim.fp16,
        use_cpu=_use_cpu(run.device),
        seed=run.seed,
        save_strategy="steps",
        save_steps=run.save_every,
        save_total_limit=run.keep_checkpoints,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=run.eval_every if run.eval_every is not None else run.save_every,
        logging_steps=run.logging_steps,
        report_to=run.report_to,
        disable_tqdm=not run.progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,  # the tokenized sets hold input_ids and labels only
        **warmup,
    )


def _heldout_info(opt: MoLFAdamW) -> dict:
    active = opt.router.incumbents()
    return {
        "windows": int(opt.ledger.heldout_windows),
        "active": {m: [e for e, on in zip(opt.expert_names, row) if on] for m, row in zip(opt.module_names, active)},
        "active_share": {e: float(active[:, j].mean()) for j, e in enumerate(opt.expert_names)},
    }


def train(cfg: TrainConfig, callbacks: Sequence = ()) -> TrainResult:
    """Run (or resume) the training job `cfg` describes; `callbacks`: more TrainerCallbacks."""
    from transformers import AutoTokenizer, PrinterCallback, Trainer

    from ..hf import ExportCallback, add_routing_callback, find_molf_optimizer

    if not cfg.run.progress:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    out = Path(cfg.run.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out {cfg.run.out!r}: exists and is not a directory")
    resume_from = None
    if cfg.run.resume is not None:
        resume_from = resume_checkpoint(cfg, out)
    elif run_started(out):
        raise ConfigError(
            f"out {cfg.run.out!r} already holds a run: pass --resume (resume='latest') to continue it, or choose "
            "another --out"
        )
    fields = cfg.data.fields
    # The user's data is checked before anything is written.
    rows = load_rows(cfg.data.data, fields) if cfg.data.data else None
    heldout_rows = load_rows(cfg.data.heldout_data, fields, what="heldout_data") if cfg.data.heldout_data else None
    args = _training_arguments(cfg, out, evaluate=heldout_rows is not None)

    model_dir = Path(cfg.model.model) if cfg.model.model is not None else out / BASE_MODEL
    with args.main_process_first(desc="molf train: the run directory and the tokenized data"):
        out.mkdir(parents=True, exist_ok=True)
        if cfg.model.model is None and not (model_dir / "config.json").is_file():
            save_tiny_model(model_dir, cfg.run.seed)
        data_paths = cfg.data.data
        if rows is None:
            generated = out / GENERATED_DATA
            if not generated.is_file():
                write_arithmetic_data(generated, seed=cfg.run.seed)
            data_paths = [str(generated)]
            rows = load_rows(data_paths, fields)
        files = {data_key(f, out): fingerprint(f) for f in data_paths + (cfg.data.heldout_data or [])}
        state_path = out / RUN_STATE
        if state_path.exists():
            check_same_run(cfg, json.loads(state_path.read_text(encoding="utf-8")), files, resume_from or out)
        elif args.should_save:
            write_json(state_path, {"identity": cfg.identity(), "data_files": files})

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"model {str(model_dir)!r}: the tokenizer has no eos token to end completions")
        train_set = tokenized_dataset(rows, tokenizer, cfg.data.max_length, out / CACHE, files)
        eval_set = None
        if heldout_rows is not None:
            eval_set = tokenized_dataset(
                heldout_rows, tokenizer, cfg.data.max_length, out / CACHE, files, "heldout_data"
            )
    collate = collator(tokenizer)

    model = build_model(cfg, model_dir)
    log_path = out / ROUTING_LOG if cfg.model.mode in ROUTED_MODES else None
    optimizer = {}
    if cfg.model.mode in ROUTED_MODES:
        heldout = None
        if cfg.routing_policy == "heldout":
            heldout = heldout_loss_fn(model, build_heldout_batch(eval_set, cfg.routing.heldout_batch, collate))
        kwargs = dict(
            lr=cfg.optim.lr,
            lora_lr=cfg.optim.lora_lr,
            lora_weight_decay=cfg.optim.lora_weight_decay,
            routing=cfg.build_routing(heldout),
            lagged=cfg.routing.lagged,
            state_dtype=torch.float32 if cfg.optim.state_dtype == "float32" else cfg.optim.state_dtype,
        )
        optimizer = {"optimizer_cls_and_kwargs": (MoLFAdamW, kwargs)}
    train_log = out / TRAIN_LOG
    extra = [log_callback(train_log)]
    if cfg.model.mode != "fft" and cfg.run.export_checkpoints:  # also the merged model or adapter
        extra.append(ExportCallback(base_model_name_or_path=str(model_dir.resolve())))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collate,
        processing_class=tokenizer,  # saved beside the model in every checkpoint
        callbacks=[*extra, *callbacks],
        **optimizer,
    )
    if not cfg.run.progress:
        trainer.remove_callback(PrinterCallback)  # it prints every log record
    if cfg.model.mode in ROUTED_MODES:
        # The statistics in the logs; the routing log (the main process's) in OUT.
        add_routing_callback(trainer, routing_log=LogSettings(ROUTING_LOG, every=cfg.routing.log_every))
    saved_state = {} if resume_from is None else json.loads((resume_from / TRAINER_STATE).read_text())
    start = saved_state.get("global_step", 0)
    try:
        if start and start >= saved_state.get("max_steps", start + 1):
            # A finished run: the Trainer would take one more step; only the export is left to do.
            trainer._load_from_checkpoint(str(resume_from))
        else:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    except OSError as exc:
        kept = [p for p in list_checkpoints(out) if checkpoint_problem(p) is None]
        intact = f"the checkpoints before it are intact (latest: {kept[-1].name})" if kept else "none was saved before"
        raise TrainError(
            f"the run stopped at step {trainer.state.global_step} ({exc.strerror or exc}); {intact}: free space "
            "(or fix the cause) and continue the run with --resume"
        ) from exc

    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h and h["step"] > start]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    opt = find_molf_optimizer(trainer.optimizer)
    saved = out / ("adapter" if cfg.model.mode in ADAPTER_MODES else "model")
    figures: list[Path] = []
    if args.should_save:
        saved = _save_result(cfg, model, tokenizer, out, model_dir)
        if cfg.run.plots and log_path is not None and log_path.exists():
            from ..plots import plot_routing_log

            figures = plot_routing_log(log_path, out / "routing_share.png")
    checkpoints = list_checkpoints(out)
    return TrainResult(
        out=out,
        steps=max(trainer.state.global_step, start),
        losses=losses,
        eval_loss=evals[-1] if evals else None,
        saved=saved,
        checkpoint=checkpoints[-1] if checkpoints else None,
        train_log=train_log,
        routing_log=log_path,
        figures=figures,
        routing_summary=opt.routing_summary().to_dict() if opt is not None else None,
        heldout=_heldout_info(opt) if opt is not None and cfg.routing_policy == "heldout" else None,
    )


def _save_result(cfg: TrainConfig, model: nn.Module, tokenizer, out: Path, model_dir: Path) -> Path:
    """The merged model or the adapter, with the tokenizer: written beside its place and moved
    there whole, so a failed save (a full disk) leaves no half-written directory behind."""
    path = out / ("adapter" if cfg.model.mode in ADAPTER_MODES else "model")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if cfg.model.mode in ADAPTER_MODES:
            from ..export import export_peft

            export_peft(model, tmp, base_model_name_or_path=str(model_dir.resolve()))
        else:
            (merge(model) if cfg.model.mode == "molf" else model).save_pretrained(tmp)
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
