"""MoLFAdamW under the Hugging Face Trainer: both ways of plugging it in, the
param groups the Trainer builds, routing statistics in the Trainer's logs, and
exact checkpoint / resume_from_checkpoint. Tiny Qwen2 models, CPU."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import accelerate  # noqa: E402,F401  (test dependencies: a missing one fails, never skips)
import peft
import pytest
import torch
import transformers  # noqa: E402

import molf
from molf.hf import ExportCallback, RoutingCallback, add_routing_callback, find_molf_optimizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 61
SEQ = 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here on one torch thread (conftest's `one_thread`)."""


def tiny_qwen2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return transformers.Qwen2ForCausalLM(cfg)


def wrapped(fft: bool = True, seed: int = 0, dropout: float = 0.0):
    ranks = (2,) if fft else (2, 4)
    return molf.wrap(tiny_qwen2(seed), molf.MoLFConfig(ranks=ranks, alphas=(8,) * len(ranks), fft=fft, dropout=dropout))


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def args(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        dataloader_num_workers=0,
    )
    return transformers.TrainingArguments(**{**base, **overrides})


OPT_KW = dict(lr=5e-3, lora_lr=1e-2, lora_weight_decay=0.01)
SWITCHING = dict(lora_lr=5e-3)  # on these tiny models, equal rates make modules switch experts


def opt_kwargs(**extra) -> tuple:
    return molf.MoLFAdamW, {**OPT_KW, **extra}


# ------------------------------------------------------------------ plugging in


def test_trainer_groups_from_optimizer_cls_and_kwargs(tmp_path):
    """The Trainer builds [{decay params, weight_decay: args.weight_decay},
    {no-decay params, weight_decay: 0}] and calls MoLFAdamW(groups, **kwargs):
    dense and plain tensors follow the group's weight_decay, LoRA experts their
    own lora_weight_decay, biases and norms none; lr and lora_lr come from the kwargs."""
    for trainer_wd in (0.1, 0.0):
        model = wrapped()
        trainer = transformers.Trainer(
            model=model,
            args=args(tmp_path, weight_decay=trainer_wd),
            train_dataset=TokenData(8),
            optimizer_cls_and_kwargs=opt_kwargs(),
        )
        opt = trainer.create_optimizer()
        assert isinstance(opt, molf.MoLFAdamW)
        decay_of = {}
        lr_of = {}
        for g in opt.param_groups:
            for p in g["params"]:
                decay_of[id(p)], lr_of[id(p)] = g["weight_decay"], g["lr"]
        for name, p in model.named_parameters():
            is_lora = ".lora_" in name
            if is_lora:
                want_wd, want_lr = 0.01, 1e-2
            elif p.dim() < 2 or "norm" in name:
                want_wd, want_lr = 0.0, 5e-3
            else:
                want_wd, want_lr = trainer_wd, 5e-3
            assert (decay_of[id(p)], lr_of[id(p)]) == (want_wd, want_lr), name
        assert opt.expert_names == ["dense", "lora0_r2"]
        assert len(opt.module_names) == 14


def test_optimizer_cls_and_kwargs_trains_like_a_plain_loop(tmp_path):
    """Four Trainer steps on one full batch equal four steps of a hand-written
    loop with the same optimizer (no clipping, constant lr)."""
    data = TokenData(4)
    model = wrapped()
    reference = copy.deepcopy(model)
    trainer = transformers.Trainer(
        model=model,
        args=args(tmp_path, max_grad_norm=0.0, weight_decay=0.1),
        train_dataset=data,
        optimizer_cls_and_kwargs=opt_kwargs(**SWITCHING),
    )
    # The loop replays the batches the Trainer fed, rows in its sampler's order:
    # k_proj's bias has an analytically zero gradient (softmax ignores a shift
    # shared by all keys), so Adam turns the rounding of another row order into
    # 1e-6 moves there.
    fed = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: fed.append((kwargs["input_ids"].clone(), kwargs["labels"].clone())), with_kwargs=True
    )
    trainer.train()
    hook.remove()
    assert len(fed) == 4 and all(sorted(ids.tolist()) == sorted(data.ids.tolist()) for ids, _ in fed)

    opt = molf.MoLFAdamW(reference, weight_decay=0.1, **{**OPT_KW, **SWITCHING})
    reference.train()
    for ids, labels in fed:
        reference(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = find_molf_optimizer(trainer.optimizer)
    assert trained.routing_summary().step == 4
    assert trained.routing_summary().modules == opt.routing_summary().modules
    assert 0 < opt.routing_summary().win_share["dense"] < 1, "both kinds of expert must have been updated"
    got, want = dict(model.named_parameters()), dict(reference.named_parameters())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_optimizers_tuple_is_the_optimizer_the_trainer_steps(tmp_path):
    model = wrapped(fft=False)
    opt = molf.MoLFAdamW(model, **OPT_KW)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    trainer = transformers.Trainer(
        model=model, args=args(tmp_path, max_steps=3), train_dataset=TokenData(12), optimizers=(opt, sched)
    )
    trainer.train()
    assert find_molf_optimizer(trainer.optimizer) is opt
    assert opt.routing_summary().step == 3
    assert [g["lr"] for g in opt.param_groups] == [1e-2 / 4] * len(opt.param_groups)  # the scheduler acted


# ------------------------------------------------------------------ routing logs


class Recorder(transformers.TrainerCallback):
    """Stands in for a reporting integration (TensorBoard, W&B): records what on_log receives."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


class MaskTracker(transformers.TrainerCallback):
    """Records the winner mask and skip count after every optimizer step (the reference for the logs)."""

    def __init__(self) -> None:
        self.masks: list[torch.Tensor] = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.masks.append(torch.as_tensor(find_molf_optimizer(optimizer).ledger.last_mask()).clone())


def integration_slot(monkeypatch, recorder: Recorder) -> None:
    # The Trainer puts reporting integrations right after its DefaultFlowCallback,
    # before user callbacks: install the recorder exactly there.
    monkeypatch.setattr(transformers.trainer, "get_reporting_integration_callbacks", lambda report_to: [recorder])


ROUTING_KEY = re.compile(r"molf/(share/.+|switches_per_step|skipped_steps|no_winner_events)")


def test_routing_callback_keys_reach_history_loggers_and_console(tmp_path, monkeypatch, capsys):
    recorder, tracker = Recorder(), MaskTracker()
    integration_slot(monkeypatch, recorder)
    model = wrapped()
    trainer = transformers.Trainer(
        model=model,
        args=args(tmp_path, max_steps=6, logging_steps=2),
        train_dataset=TokenData(24),
        optimizer_cls_and_kwargs=opt_kwargs(**SWITCHING),
        callbacks=[tracker],
    )
    callback = add_routing_callback(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()

    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in train_logs] == [2, 4, 6]
    # Independent reference from the recorded masks: shares now, winner changes per module and step.
    masks = torch.stack(tracker.masks)  # [steps, modules, experts]
    assert masks.shape == (6, 14, 2)
    changes = [0] + [int((masks[t] != masks[t - 1]).any(dim=1).sum()) for t in range(1, 6)]
    for h in train_logs:
        t = h["step"]
        share = masks[t - 1].double().mean(dim=0)
        assert h["molf/share/dense"] == pytest.approx(float(share[0]))
        assert h["molf/share/lora0_r2"] == pytest.approx(float(share[1]))
        assert h["molf/switches_per_step"] == pytest.approx(sum(changes[t - 2 : t]) / 2)
        assert h["molf/skipped_steps"] == 0 and h["molf/no_winner_events"] == 0
    assert sum(changes) > 0, "the run must switch at least once for the switch rate to be tested"
    # The integration-slot logger and the console (PrinterCallback) saw the same keys.
    recorded = [r for r in recorder.logs if "loss" in r]
    assert [{k: v for k, v in r.items() if ROUTING_KEY.fullmatch(k)} for r in recorded] == [
        {k: v for k, v in h.items() if ROUTING_KEY.fullmatch(k)} for h in train_logs
    ]
    printed = capsys.readouterr().out
    assert printed.count("'molf/share/dense'") == 3
    assert "molf/" not in str([h for h in trainer.state.log_history if "train_runtime" in h])


def test_routing_callback_passed_through_callbacks_reaches_history(tmp_path, monkeypatch):
    """Passed the ordinary way it runs after the integrations: the history gets
    the keys, an integration does not (which is why add_routing_callback exists)."""
    recorder = Recorder()
    integration_slot(monkeypatch, recorder)
    trainer = transformers.Trainer(
        model=wrapped(fft=False),
        args=args(tmp_path, max_steps=2),
        train_dataset=TokenData(8),
        optimizer_cls_and_kwargs=opt_kwargs(),
        callbacks=[RoutingCallback()],
    )
    trainer.train()
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 2
    assert all(h["molf/share/lora0_r2"] + h["molf/share/lora1_r4"] == pytest.approx(1.0) for h in train_logs)
    assert not any("molf/share/lora0_r2" in r for r in recorder.logs)
    with pytest.raises(molf.ConfigError, match="already has a RoutingCallback"):
        add_routing_callback(trainer)


def test_routing_callback_counts_skipped_steps(tmp_path):
    class NanOnce(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:  # the second optimizer step
                next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))

    trainer = transformers.Trainer(
        model=wrapped(),
        args=args(tmp_path, max_steps=3, max_grad_norm=0.0),
        train_dataset=TokenData(12),
        optimizer_cls_and_kwargs=opt_kwargs(),
        callbacks=[NanOnce()],
    )
    add_routing_callback(trainer)
    trainer.train()
    skipped = [h["molf/skipped_steps"] for h in trainer.state.log_history if "loss" in h]
    assert skipped == [0.0, 1.0, 1.0]


def test_routing_callback_warns_without_molf_optimizer(tmp_path):
    trainer = transformers.Trainer(model=tiny_qwen2(), args=args(tmp_path, max_steps=2), train_dataset=TokenData(8))
    add_routing_callback(trainer)
    with pytest.warns(UserWarning, match="not molf.MoLFAdamW"):
        trainer.train()
    assert not any(k.startswith("molf/") for h in trainer.state.log_history for k in h)


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("fft,lagged,plug", [(True, False, "cls"), (False, True, "cls"), (True, False, "tuple")])
def test_resume_from_checkpoint_is_exact(fft, lagged, plug, tmp_path):
    """Train 7 steps straight vs 3 steps, then a fresh Trainer on a freshly
    built model resumes from checkpoint-3: bitwise equal parameters, equal
    routing summary and equal logged routing statistics. Shuffled data over
    two epochs and LoRA dropout exercise the data skip and the RNG restore;
    `plug` is how MoLFAdamW reaches the Trainer (a decaying schedule with "tuple")."""
    kw = dict(max_steps=7, save_strategy="steps", save_steps=3, weight_decay=0.1)

    def trainer_for(out, seed, callbacks=None):
        model = wrapped(fft=fft, seed=seed, dropout=0.1)
        if plug == "cls":
            plugged = dict(optimizer_cls_and_kwargs=opt_kwargs(lagged=lagged, **SWITCHING))
        else:
            opt = molf.MoLFAdamW(model, weight_decay=0.1, lagged=lagged, **{**OPT_KW, **SWITCHING})
            plugged = dict(optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t))))
        trainer = transformers.Trainer(
            model=model, args=args(out, **kw), train_dataset=TokenData(20), callbacks=callbacks, **plugged
        )
        add_routing_callback(trainer)
        return model, trainer

    def run(out, seed, resume=None):
        model, trainer = trainer_for(out, seed)
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    straight_model, straight = run(tmp_path / "straight", seed=0)

    # A first run that stops at its checkpoint (the same arguments: the schedule must match).
    _, first = trainer_for(tmp_path / "cut", seed=0, callbacks=[StopAt(3)])
    first.train()
    assert (tmp_path / "cut" / "checkpoint-3").is_dir()
    assert find_molf_optimizer(first.optimizer).routing_summary().step == 3

    resumed_model, resumed = run(tmp_path / "cut", seed=123, resume=str(tmp_path / "cut" / "checkpoint-3"))
    want, got = dict(straight_model.named_parameters()), dict(resumed_model.named_parameters())
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    s_straight = find_molf_optimizer(straight.optimizer).routing_summary().to_dict()
    s_resumed = find_molf_optimizer(resumed.optimizer).routing_summary().to_dict()
    assert s_resumed == s_straight and s_straight["step"] == 7

    def routing_history(trainer):
        return [
            {k: v for k, v in h.items() if ROUTING_KEY.fullmatch(k) or k in ("step", "loss")}
            for h in trainer.state.log_history
            if "loss" in h
        ]

    assert routing_history(resumed) == routing_history(straight)


class StopAt(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_resumed_trainer_run_keeps_the_whole_routing_log(tmp_path):
    """accelerate reloads the optimizer's own state when it wraps it: that reload must not
    touch the routing log. A Trainer run resumed from checkpoint-3 leaves a log equal to
    the uninterrupted run's (steps 1-7), not one of steps 4-7."""
    kw = dict(max_steps=7, save_strategy="steps", save_steps=3)

    def trainer_for(out, callbacks=None):
        kwargs = dict(log=str(out / "routing.jsonl"), **SWITCHING)
        return transformers.Trainer(
            model=wrapped(),
            args=args(out, **kw),
            train_dataset=TokenData(20),
            callbacks=callbacks,
            optimizer_cls_and_kwargs=opt_kwargs(**kwargs),
        )

    trainer_for(tmp_path / "straight").train()
    trainer_for(tmp_path / "cut", callbacks=[StopAt(3)]).train()
    trainer_for(tmp_path / "cut").train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    straight = list(molf.read_routing_log(tmp_path / "straight" / "routing.jsonl"))
    resumed = list(molf.read_routing_log(tmp_path / "cut" / "routing.jsonl"))
    assert [r["step"] for r in resumed] == list(range(1, 8))
    assert resumed == straight


def test_fresh_trainer_run_moves_an_old_log_aside(tmp_path):
    log = tmp_path / "routing.jsonl"
    log.write_text('{"step": 1, "phase": "routing", "experts": [], "modules": {}}\n')
    trainer = transformers.Trainer(
        model=wrapped(),
        args=args(tmp_path, max_steps=2),
        train_dataset=TokenData(8),
        optimizer_cls_and_kwargs=opt_kwargs(log=str(log)),
    )
    with pytest.warns(RuntimeWarning, match="moved to"):
        trainer.train()
    assert (tmp_path / "routing.jsonl.prev").read_text().startswith('{"step": 1')
    assert [r["step"] for r in molf.read_routing_log(log)] == [1, 2]


# ------------------------------------------------------------------ the learning rate


def test_trainer_learning_rate_is_never_silently_ignored(tmp_path):
    """The Trainer calls MoLFAdamW(groups, **kwargs) without its learning_rate: kwargs
    without lr are refused (not trained at the default 1e-3); lr=args.learning_rate is
    what the dense experts and unwrapped weights then train at."""
    training_args = args(tmp_path, learning_rate=3e-4, max_steps=1)
    refused = transformers.Trainer(
        model=wrapped(),
        args=training_args,
        train_dataset=TokenData(4),
        optimizer_cls_and_kwargs=(molf.MoLFAdamW, dict(lora_lr=1e-2)),
    )
    with pytest.raises(molf.ConfigError, match=r"lr=args\.learning_rate"):
        refused.train()
    trainer = transformers.Trainer(
        model=wrapped(),
        args=training_args,
        train_dataset=TokenData(4),
        optimizer_cls_and_kwargs=(molf.MoLFAdamW, dict(lr=training_args.learning_rate, lora_lr=1e-2)),
    )
    opt = trainer.create_optimizer()
    assert {g["molf_role"]: g["lr"] for g in opt.param_groups} == {"plain": 3e-4, "dense": 3e-4, "lora": 1e-2}


def test_the_lr_default_stays_where_nothing_else_is_stated():
    """A model or bare tensors take the default lr (as torch.optim.AdamW); groups that
    each carry their own lr need none; a group without one needs it."""
    model = wrapped()
    assert {g["lr"] for g in molf.MoLFAdamW(model).param_groups} == {1e-3}
    assert {g["lr"] for g in molf.MoLFAdamW(list(model.parameters())).param_groups} == {1e-3}
    own = molf.MoLFAdamW([{"params": list(model.parameters()), "lr": 2e-4}])
    assert {g["lr"] for g in own.param_groups} == {2e-4}
    with pytest.raises(molf.ConfigError, match="param groups without an 'lr'"):
        molf.MoLFAdamW([{"params": list(model.parameters())[:3], "lr": 2e-4}, {"params": list(model.parameters())[3:]}])


# ------------------------------------------------------------------ reaching the optimizer


def test_molf_optimizer_reaches_through_accelerates_wrapper(tmp_path):
    trainer = transformers.Trainer(
        model=wrapped(),
        args=args(tmp_path, max_steps=2),
        train_dataset=TokenData(8),
        optimizer_cls_and_kwargs=opt_kwargs(),
    )
    with pytest.raises(molf.ConfigError, match="no optimizer yet"):
        molf.hf.molf_optimizer(trainer)
    trainer.train()
    assert not isinstance(trainer.optimizer, molf.MoLFAdamW)  # accelerate's AcceleratedOptimizer
    opt = molf.hf.molf_optimizer(trainer)
    assert isinstance(opt, molf.MoLFAdamW) and opt is trainer.optimizer.optimizer
    assert opt.routing_summary().step == 2
    plain = transformers.Trainer(model=tiny_qwen2(), args=args(tmp_path, max_steps=1), train_dataset=TokenData(4))
    plain.train()
    with pytest.raises(molf.ConfigError, match="AcceleratedOptimizer, not molf.MoLFAdamW"):
        molf.hf.molf_optimizer(plain)


def test_molf_hf_needs_no_import_and_transformers_loads_only_when_used(monkeypatch):
    """`import molf` leaves transformers alone (a fresh interpreter); `molf.hf` then loads it
    on first use, without an import statement of its own."""
    code = "import sys, molf\nassert 'transformers' not in sys.modules and 'hf' in dir(molf)\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    monkeypatch.delattr(molf, "hf")  # as before its first use: the attribute comes from molf.__getattr__
    assert molf.hf is sys.modules["molf.hf"] and molf.hf.ExportCallback is ExportCallback


# ------------------------------------------------------------------ the default routing log


def test_routing_log_defaults_to_output_dir_and_resumes(tmp_path):
    """With the callback and no log of the optimizer's own, output_dir/routing.jsonl gets every step; a run
    resumed from checkpoint-3 leaves the log of the uninterrupted run; routing_log=None
    writes none and a log of the optimizer's own is kept."""
    kw = dict(max_steps=7, save_strategy="steps", save_steps=3)

    def trainer_for(out, callbacks=None, routing_log="routing.jsonl", **opt):
        trainer = transformers.Trainer(
            model=wrapped(),
            args=args(out, **kw),
            train_dataset=TokenData(20),
            callbacks=callbacks,
            optimizer_cls_and_kwargs=opt_kwargs(**SWITCHING, **opt),
        )
        add_routing_callback(trainer, routing_log=routing_log)
        return trainer

    trainer_for(tmp_path / "straight").train()
    trainer_for(tmp_path / "cut", callbacks=[StopAt(3)]).train()
    assert [r["step"] for r in molf.read_routing_log(tmp_path / "cut" / "routing.jsonl")] == [1, 2, 3]
    resumed = trainer_for(tmp_path / "cut")
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    assert molf.hf.molf_optimizer(resumed).log_path == str(tmp_path / "cut" / "routing.jsonl")
    straight = list(molf.read_routing_log(tmp_path / "straight" / "routing.jsonl"))
    assert [r["step"] for r in straight] == list(range(1, 8))
    assert list(molf.read_routing_log(tmp_path / "cut" / "routing.jsonl")) == straight

    trainer_for(tmp_path / "none", routing_log=None).train()
    assert not (tmp_path / "none" / "routing.jsonl").exists()
    own = tmp_path / "elsewhere.jsonl"
    trainer_for(tmp_path / "own", log=str(own)).train()
    assert not (tmp_path / "own" / "routing.jsonl").exists()
    assert [r["step"] for r in molf.read_routing_log(own)] == list(range(1, 8))


def test_only_the_main_process_gets_the_default_routing_log(tmp_path):
    callback = RoutingCallback()
    for main in (False, True):
        opt = molf.MoLFAdamW(wrapped(), lr=1e-3)
        state = transformers.TrainerState(is_world_process_zero=main)
        callback.on_train_begin(args(tmp_path), state, transformers.TrainerControl(), optimizer=opt)
        assert opt.log_path == (str(tmp_path / "routing.jsonl") if main else None)
    # A LogSettings with a relative path: that log, under output_dir.
    opt = molf.MoLFAdamW(wrapped(), lr=1e-3)
    callback = RoutingCallback(routing_log=molf.LogSettings("logs/r.jsonl", every=2, format="full"))
    callback.on_train_begin(args(tmp_path), transformers.TrainerState(), transformers.TrainerControl(), optimizer=opt)
    assert opt.log_path == str(tmp_path / "logs" / "r.jsonl") and (opt._log.every, opt._log.format) == (2, "full")


# ------------------------------------------------------------------ checkpoints as models


class MergedAtSave(transformers.TrainerCallback):
    """The reference for the export: at each save, a deep copy of the live model merged by molf.merge."""

    def __init__(self) -> None:
        self.merged: dict[int, dict] = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        self.merged[state.global_step] = molf.merge(copy.deepcopy(model)).state_dict()


class TokenizerStub:
    """Stands in for a tokenizer: the Trainer and the callback save it next to the model."""

    def save_pretrained(self, path, **kwargs):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "tokenizer_stub.txt"), "w") as f:
            f.write("stub")


def test_export_callback_writes_the_merged_model_into_every_checkpoint(tmp_path):
    reference = MergedAtSave()
    model = wrapped()
    trainer = transformers.Trainer(
        model=model,
        args=args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=TokenData(16),
        optimizer_cls_and_kwargs=opt_kwargs(**SWITCHING),
        processing_class=TokenizerStub(),
        callbacks=[ExportCallback(), reference],
    )
    trainer.train()
    assert molf.is_wrapped(model)
    opt = molf.hf.molf_optimizer(trainer)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert sorted(reference.merged) == [2, 4]
    for step, want in reference.merged.items():
        folder = tmp_path / f"checkpoint-{step}" / "model"
        assert (folder / "tokenizer_stub.txt").is_file()
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
        assert not molf.is_wrapped(loaded)
        got = loaded.state_dict()
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (step, key)
    # The last checkpoint is the live model: equal logits.
    ids = TokenData(4, seed=1).ids
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_export_callback_writes_molf_efficient_as_a_peft_adapter(tmp_path):
    model = wrapped(fft=False)
    trainer = transformers.Trainer(
        model=model,
        args=args(tmp_path, max_steps=3, save_strategy="steps", save_steps=3),
        train_dataset=TokenData(12),
        optimizer_cls_and_kwargs=opt_kwargs(),
        callbacks=[ExportCallback()],
    )
    trainer.train()
    adapter = tmp_path / "checkpoint-3" / "adapter"
    loaded = peft.PeftModel.from_pretrained(tiny_qwen2(), adapter)  # the base the run started from
    ids = TokenData(4, seed=1).ids
    model.eval()
    loaded.eval()
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=1e-5)
        assert not torch.allclose(tiny_qwen2()(ids).logits, want, atol=1e-3), "the adapter must have learnt"


@pytest.mark.parametrize("fft", [True, False])
def test_export_callback_leaves_training_and_resume_exact(fft, tmp_path):
    """7 steps without the callback, 7 with it, and 3 with it then a resume from
    checkpoint-3 on a fresh model: bitwise equal parameters and routing."""
    kw = dict(max_steps=7, save_strategy="steps", save_steps=3, weight_decay=0.1)

    def run(out, seed=0, callbacks=(), resume=None):
        model = wrapped(fft=fft, seed=seed, dropout=0.1)
        trainer = transformers.Trainer(
            model=model,
            args=args(out, **kw),
            train_dataset=TokenData(20),
            callbacks=list(callbacks),
            optimizer_cls_and_kwargs=opt_kwargs(**SWITCHING),
        )
        trainer.train(resume_from_checkpoint=resume)
        return model, molf.hf.molf_optimizer(trainer).routing_summary().to_dict()

    plain = run(tmp_path / "plain")
    exported = run(tmp_path / "export", callbacks=[ExportCallback()])
    run(tmp_path / "cut", callbacks=[ExportCallback(), StopAt(3)])
    assert (tmp_path / "cut" / "checkpoint-3" / ("model" if fft else "adapter")).is_dir()
    resumed = run(
        tmp_path / "cut", seed=123, callbacks=[ExportCallback()], resume=str(tmp_path / "cut" / "checkpoint-3")
    )
    want = dict(plain[0].named_parameters())
    for other, summary in (exported, resumed):
        got = dict(other.named_parameters())
        assert got.keys() == want.keys() and summary == plain[1]
        for name in want:
            assert torch.equal(got[name], want[name]), name


def test_export_callback_refuses_what_it_cannot_export(tmp_path):
    """An unwrapped model; a merged model without save_pretrained (an adapter needs none)."""
    trainer = transformers.Trainer(
        model=tiny_qwen2(),
        args=args(tmp_path, max_steps=1),
        train_dataset=TokenData(4),
        callbacks=[ExportCallback()],
    )
    with pytest.raises(molf.ConfigError, match="ExportCallback: the model has no molf-wrapped layers"):
        trainer.train()

    class Plain(torch.nn.Module):  # no save_pretrained: the merged model has no loader's layout
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

    state, control = transformers.TrainerState(), transformers.TrainerControl()
    with pytest.raises(molf.ConfigError, match="save_pretrained, which Plain lacks"):
        ExportCallback().on_train_begin(args(tmp_path), state, control, model=molf.wrap(Plain()))
    ExportCallback().on_train_begin(
        args(tmp_path), state, control, model=molf.wrap(Plain(), molf.MoLFConfig(fft=False))
    )


# ------------------------------------------------------------------ the README's snippet


def readme_trainer_snippet() -> tuple[str, str]:
    """The README's Trainer section: the extra its install line names, and its Python block."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Hugging Face Trainer") :]
    section = section[: section.index("\n## ", 1)]
    extra = re.search(r'pip install "\.\[(\w+)\]"', section)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    return extra, code


def test_readme_trainer_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    """Run as written, with the names the README leaves to the reader (`model`, `train_ds`,
    `val_batch`) standing in tiny. It imports only what the extra it names installs, and
    reports to no integration that extra lacks (report_to="tensorboard" needs tensorboard)."""
    extra, code = readme_trainer_snippet()
    with open(ROOT / "pyproject.toml", "rb") as f:
        requirements = tomllib.load(f)["project"]["optional-dependencies"][extra]
    installed = {re.match(r"[\w-]+", r)[0].replace("-", "_") for r in requirements}
    imported = {
        name.strip().split(".")[0] for line in re.findall(r"^import (.+)$", code, re.M) for name in line.split(",")
    }
    assert imported <= installed | {"molf", "torch"}, imported
    monkeypatch.chdir(tmp_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    val = TokenData(2, seed=1)[0]
    namespace = {
        "model": tiny_qwen2(),
        "train_ds": TokenData(8),
        "val_batch": {k: v[None].to(device) for k, v in val.items()},
    }
    exec(compile(code, "README.md", "exec"), namespace)
    assert set(namespace["args"].report_to) <= installed
    printed = capsys.readouterr().out
    assert "trainable params:" in printed and "molf routing after 3 steps" in printed
    assert [r["step"] for r in molf.read_routing_log(tmp_path / "runs/hf/routing.jsonl")] == [1, 2, 3]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "runs/hf/checkpoint-3/model")
    assert not molf.is_wrapped(loaded)
