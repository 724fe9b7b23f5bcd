"""MoLFAdamW's construction, param groups, validation, routing log and summary."""

from __future__ import annotations

import copy
import json
import math
import pickle

import pytest
import torch
from torch import nn

import molf


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.q_proj = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.lm_head = nn.Linear(6, 11, bias=False)

    def forward(self, ids):
        return self.lm_head(self.norm(self.q_proj(self.emb(ids))))


def wrapped(ranks=(2,), fft=True):
    torch.manual_seed(0)
    return molf.wrap(Net(), molf.MoLFConfig(ranks=ranks, fft=fft))


def loss_step(model, opt, seed=0):
    ids = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(seed))
    nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    opt.step()
    opt.zero_grad()


def roles(opt):
    return [(g["molf_role"], g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups]


def test_groups_from_model():
    opt = molf.MoLFAdamW(wrapped(), lr=1e-3, lora_lr=5e-3, weight_decay=0.1, lora_weight_decay=0.01)
    assert roles(opt) == [
        ("plain", 1e-3, 0.1, 2),  # emb, lm_head
        ("plain", 1e-3, 0.0, 2),  # norm weight + bias
        ("dense", 1e-3, 0.1, 1),  # q_proj.weight
        ("dense", 1e-3, 0.0, 1),  # q_proj.bias
        ("lora", 5e-3, 0.01, 2),
    ]
    assert opt.module_names == ["q_proj"] and opt.expert_names == ["dense", "lora0_r2"]


def test_groups_from_trainer_style_param_groups():
    """HF Trainer passes [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]."""
    model = wrapped()
    names = dict(model.named_parameters())
    decay = [p for n, p in names.items() if "norm" not in n and not n.endswith("bias")]
    no_decay = [p for n, p in names.items() if "norm" in n or n.endswith("bias")]
    opt = molf.MoLFAdamW(
        [{"params": decay, "weight_decay": 0.2}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
        lora_lr=4e-3,
        lora_weight_decay=0.05,
    )
    assert roles(opt) == [
        ("plain", 1e-3, 0.2, 2),
        ("dense", 1e-3, 0.2, 1),
        ("lora", 4e-3, 0.05, 2),
        ("plain", 1e-3, 0.0, 2),
        ("dense", 1e-3, 0.0, 1),
    ]
    loss_step(model, opt)
    assert opt.routing_summary().step == 1


def test_group_keys_override_lora_settings():
    model = wrapped()
    opt = molf.MoLFAdamW([{"params": list(model.parameters()), "lora_lr": 9e-3, "lora_weight_decay": 0.3}], lr=1e-3)
    lora = [g for g in opt.param_groups if g["molf_role"] == "lora"]
    assert [(g["lr"], g["weight_decay"]) for g in lora] == [(9e-3, 0.3)]
    assert all("lora_lr" not in g for g in opt.param_groups)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(lr=math.inf), "lr"),
        (dict(lora_lr=-1e-3), "lora_lr"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(lora_weight_decay=-0.1), "lora_weight_decay"),
        (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(betas=(0.9,)), "betas"),
        (dict(routing=lambda: molf.TopK(score="loss")), "score"),
        (dict(routing=lambda: molf.TopK(k=0)), "topk"),
        (dict(routing="greedy"), "policy"),
        (dict(state_dtype=torch.int8), "state_dtype"),
        (dict(log=lambda: molf.LogSettings("log.jsonl", every=0)), "LogSettings: every"),
        (dict(log=5), "LogSettings: path"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, match):
    with pytest.raises(molf.ConfigError, match=match):
        molf.MoLFAdamW(wrapped(), **{k: v() if callable(v) else v for k, v in kwargs.items()})


def test_parameter_twice_is_refused():
    model = wrapped()
    ps = list(model.parameters())
    with pytest.raises(molf.ConfigError, match="more than one"):
        molf.MoLFAdamW([{"params": ps}, {"params": ps[:1]}])


def test_two_experts_topk_two_warns():
    with pytest.warns(UserWarning, match="routing is off"):
        molf.MoLFAdamW(wrapped(), routing=molf.TopK(k=2))


@pytest.mark.parametrize("fmt", ["compact", "full"])
def test_routing_log_lines(fmt, tmp_path):
    path = tmp_path / "logs" / "routing.jsonl"
    model = wrapped(ranks=(2, 4))
    opt = molf.MoLFAdamW(model, lr=1e-3, log=molf.LogSettings(path, scores_every=1, format=fmt))
    for s in range(3):
        loss_step(model, opt, s)
    records = list(molf.read_routing_log(path))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["experts"] == ["dense", "lora0_r2", "lora1_r4"]
    entry = records[-1]["modules"]["q_proj"]
    assert len(entry["scores"]) == 3 and len(entry["winners"]) == 1
    # Full precision: the logged scores are exactly the ledger's last scores.
    assert entry["scores"] == [float(s) for s in opt.ledger.last_scores()[0]]
    assert 0 < entry["scores"][0] < 1e-3, "EPD scores are tiny; they must not be rounded to 0"
    if fmt == "full":  # the lines as written are the records as read
        assert [json.loads(line) for line in path.read_text().splitlines()] == records


def test_summary_and_str():
    model = wrapped()
    opt = molf.MoLFAdamW(model, lr=1e-3)
    for s in range(3):
        loss_step(model, opt, s)
    summary = opt.routing_summary()
    assert summary.step == 3 and summary.experts == ["dense", "lora0_r2"]
    assert set(summary.modules) == {"q_proj"}
    assert sum(summary.modules["q_proj"]["wins"].values()) == 3
    text = str(summary)
    assert "dense" in text and "lora0_r2" in text and "3 steps" in text
    json.dumps(summary.to_dict())


def test_deepcopy_and_pickle_keep_router_state():
    model = wrapped()
    opt = molf.MoLFAdamW(model, lr=1e-3)
    loss_step(model, opt)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.ledger == opt.ledger and clone.router == opt.router
        assert clone.module_names == opt.module_names
