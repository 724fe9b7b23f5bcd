"""MoLFAdamW under the Hugging Face Trainer: both ways of plugging it in, the
param groups the Trainer builds, routing statistics in the Trainer's logs, and
exact checkpoint / resume_from_checkpoint. Tiny Qwen2 models, CPU."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import molf

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from molf.hf import RoutingCallback, add_routing_callback, find_molf_optimizer  # noqa: E402

VOCAB = 61
SEQ = 8


def tiny_qwen2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
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
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
                lr_scheduler_type="constant", dataloader_num_workers=0)
    return transformers.TrainingArguments(**{**base, **overrides})


OPT_KW = dict(lr=5e-3, lora_lr=1e-2, lora_weight_decay=0.01)


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
        trainer = transformers.Trainer(model=model, args=args(tmp_path, weight_decay=trainer_wd),
                                       train_dataset=TokenData(8), optimizer_cls_and_kwargs=opt_kwargs())
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
    trainer = transformers.Trainer(model=model, args=args(tmp_path, max_grad_norm=0.0, weight_decay=0.1),
                                   train_dataset=data, optimizer_cls_and_kwargs=opt_kwargs())
    trainer.train()

    opt = molf.MoLFAdamW(reference, weight_decay=0.1, **OPT_KW)
    batch = {"input_ids": data.ids, "labels": data.ids.clone()}
    reference.train()
    for _ in range(4):
        reference(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = find_molf_optimizer(trainer.optimizer)
    assert trained.routing_summary().step == 4
    assert trained.routing_summary().modules == opt.routing_summary().modules
    got, want = dict(model.named_parameters()), dict(reference.named_parameters())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
