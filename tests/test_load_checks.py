"""Nothing half-changed: bad group values, optimizers over two models, checkpoints of
another size or with tampered fields, and routing settings that differ are refused
before any state changes; what is accepted continues exactly."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

import molf
from test_checkpoint import STOP, TOTAL, Net, make, run, save


def same(a, b) -> bool:
    """Structural equality of state dicts, tensors compared bitwise (dtype included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def wrapped_net(seed: int = 0):
    torch.manual_seed(seed)
    return molf.wrap(Net(), molf.MoLFConfig(ranks=(3,)))


# ------------------------------------------------------------------ group values


@pytest.mark.parametrize(
    "group, match",
    [
        (dict(lr=float("nan")), "lr must be a finite number"),
        (dict(lr=-5), "lr must be a finite number >= 0"),
        (dict(lr="fast"), "lr must be"),
        (dict(weight_decay="0.1"), "weight_decay must be"),
        (dict(lora_lr=float("inf")), "lora_lr must be"),
        (dict(lora_weight_decay=-0.1), "lora_weight_decay must be"),
        (dict(eps=-1e-8), "eps must be"),
        (dict(betas=(0.9,)), "betas must be a pair"),
        (dict(betas=(0.9, 1.0)), r"betas\[1\] must be in \[0, 1\)"),
    ],
)
def test_bad_group_values_are_refused_at_construction(group, match):
    model = wrapped_net()
    with pytest.raises(molf.ConfigError, match=match):
        molf.MoLFAdamW([{"params": list(model.parameters()), **group}])


@pytest.mark.parametrize(
    "group, match",
    [(dict(lr=-1), "lr must be"), (dict(lr=float("nan")), "lr must be"), (dict(weight_decay="0.1"), "weight_decay")],
)
def test_add_param_group_checks_values_before_changing_anything(group, match):
    model = wrapped_net()
    extra = nn.Parameter(torch.randn(4, 4))
    opt = molf.MoLFAdamW(model, lr=1e-2)
    groups_before = len(opt.param_groups)
    with pytest.raises(molf.ConfigError, match=match):
        opt.add_param_group({"params": [extra], **group})
    assert len(opt.param_groups) == groups_before and extra not in opt.state
    opt.add_param_group({"params": [extra], "lr": 1e-3})  # a good group still goes in
    model(torch.randn(2, 6)).sum().backward()
    (extra**2).sum().backward()
    opt.step()
    assert opt.state[extra]["step"] == 1


def test_add_param_group_refuses_expert_tensors():
    model, other = wrapped_net(0), wrapped_net(1)
    opt = molf.MoLFAdamW([p for n, p in model.named_parameters() if "fc1" not in n])
    with pytest.raises(molf.ConfigError, match="can only be routed by the optimizer built over them"):
        opt.add_param_group({"params": list(other.fc1.parameters())})


# ------------------------------------------------------------------ two models


def test_one_optimizer_over_two_wrapped_models_is_refused():
    a, b = wrapped_net(0), wrapped_net(1)
    with pytest.raises(molf.ConfigError, match="more than one wrapped model"):
        molf.MoLFAdamW(list(a.parameters()) + list(b.parameters()))
    with pytest.raises(molf.ConfigError, match="more than one wrapped model"):
        molf.MoLFAdamW([{"params": list(a.parameters())}, {"params": list(b.parameters()), "lr": 1e-4}])


# ------------------------------------------------------------------ checkpoints


def test_checkpoint_of_a_model_of_another_size_is_refused():
    """Same module names, hidden 8 into hidden 12: refused naming the tensor, nothing changed."""

    def model_of(hidden: int):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3))
        return molf.wrap(net, molf.MoLFConfig(ranks=(2,), exclude_modules=()))

    small, large = model_of(8), model_of(12)
    opt_small, opt_large = molf.MoLFAdamW(small), molf.MoLFAdamW(large)
    for model, opt in ((small, opt_small), (large, opt_large)):
        model(torch.randn(4, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    before = copy.deepcopy(opt_large.state_dict())
    with pytest.raises(molf.StateError, match=r"shape \(8, 6\), the parameter \(12, 6\)"):
        opt_large.load_state_dict(opt_small.state_dict())
    assert same(opt_large.state_dict(), before)


def _meta(sd: dict) -> dict:
    return next(g["molf_meta"] for g in sd["param_groups"] if g.get("molf_meta"))


def _state0(sd: dict) -> dict:
    return sd["state"][0]


def _routed(sd: dict) -> dict:
    return next(g for g in sd["param_groups"] if g["molf_role"] != "plain")


def _del(d: dict, key):
    del d[key]


def _meta_twice(sd):
    other = [g for g in sd["param_groups"] if "molf_meta" not in g]
    if other:
        other[0]["molf_meta"] = dict(_meta(sd))
    else:  # one group only: a second group carrying the routing state too
        sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0]))


def _ragged(sd):
    _meta(sd)["pending"] = [[1.0], [1.0, 2.0]]


MUTATIONS = {
    # the routing state's meta fields
    "skipped_steps str": lambda sd: _meta(sd).__setitem__("skipped_steps", "abc"),
    "skipped_steps negative": lambda sd: _meta(sd).__setitem__("skipped_steps", -5),
    "skipped_steps float": lambda sd: _meta(sd).__setitem__("skipped_steps", 1.5),
    "skipped_steps bool": lambda sd: _meta(sd).__setitem__("skipped_steps", True),
    "pending ragged": _ragged,
    "pending wrong shape": lambda sd: _meta(sd).__setitem__("pending", [[0.0, 0.0]]),
    "pending str": lambda sd: _meta(sd).__setitem__("pending", "x"),
    "pending right shape": lambda sd: _meta(sd).__setitem__("pending", _meta(sd)["pending"]),  # accepted as is
    "heldout_step negative": lambda sd: _meta(sd).__setitem__("heldout_step", -1),
    "heldout_step str": lambda sd: _meta(sd).__setitem__("heldout_step", "x"),
    "heldout_step past the router": lambda sd: _meta(sd).__setitem__("heldout_step", 10**6),
    "version": lambda sd: _meta(sd).__setitem__("version", 99),
    "modules": lambda sd: _meta(sd).__setitem__("modules", ["x"] * len(_meta(sd)["modules"])),
    "experts": lambda sd: _meta(sd).__setitem__("experts", ["a", "b"]),
    "score": lambda sd: _meta(sd).__setitem__("score", "pfn"),
    "router garbage": lambda sd: _meta(sd).__setitem__("router", "AAAA"),
    "ledger not base64": lambda sd: _meta(sd).__setitem__("ledger", "%%%"),
    "meta missing": lambda sd: [g.pop("molf_meta", None) for g in sd["param_groups"]],
    "meta twice": lambda sd: _meta_twice(sd),
    # group values and structure
    "lr str": lambda sd: sd["param_groups"][0].__setitem__("lr", "fast"),
    "lr nan": lambda sd: sd["param_groups"][0].__setitem__("lr", float("nan")),
    "lr negative": lambda sd: sd["param_groups"][-1].__setitem__("lr", -1.0),
    "weight_decay str": lambda sd: sd["param_groups"][0].__setitem__("weight_decay", "0.1"),
    "betas short": lambda sd: sd["param_groups"][0].__setitem__("betas", (0.9,)),
    "betas one": lambda sd: sd["param_groups"][0].__setitem__("betas", (0.9, 1.0)),
    "eps negative": lambda sd: sd["param_groups"][0].__setitem__("eps", -1.0),
    "params short": lambda sd: sd["param_groups"][0]["params"].pop(),
    "params not a list": lambda sd: sd["param_groups"][0].__setitem__("params", 3),
    "role": lambda sd: _routed(sd).__setitem__("molf_role", "plain"),
    "slots": lambda sd: _routed(sd).__setitem__("molf_slots", _routed(sd)["molf_slots"][::-1]),
    "group missing": lambda sd: sd["param_groups"].pop(),
    "state not a dict": lambda sd: sd.__setitem__("state", []),
    # one tensor's state
    "exp_avg reshaped": lambda sd: _state0(sd).__setitem__("exp_avg", _state0(sd)["exp_avg"].reshape(1, -1)),
    "exp_avg missing": lambda sd: _del(_state0(sd), "exp_avg"),
    "exp_avg_sq missing": lambda sd: _del(_state0(sd), "exp_avg_sq"),
    "step missing": lambda sd: _del(_state0(sd), "step"),
    "step str": lambda sd: _state0(sd).__setitem__("step", "x"),
    "step int": lambda sd: _state0(sd).__setitem__("step", 4),
    "step negative": lambda sd: _state0(sd).__setitem__("step", torch.tensor(-1.0)),
    "step fractional": lambda sd: _state0(sd).__setitem__("step", torch.tensor(1.5)),
    "exp_avg int": lambda sd: _state0(sd).__setitem__("exp_avg", _state0(sd)["exp_avg"].long()),
    "exp_avg str": lambda sd: _state0(sd).__setitem__("exp_avg", "x"),
    "exp_avg float64": lambda sd: _state0(sd).__setitem__("exp_avg", _state0(sd)["exp_avg"].double()),  # accepted
    "unknown key": lambda sd: _state0(sd).__setitem__("foo", torch.zeros(1)),
    "heldout copy": lambda sd: _state0(sd).__setitem__("heldout_theta", torch.zeros_like(_state0(sd)["exp_avg"])),
    "entry not a dict": lambda sd: sd["state"].__setitem__(0, "abc"),
}


@pytest.mark.parametrize("variant", ["molf", "lagged"])
def test_every_field_of_a_checkpoint_mutated_is_refused_unchanged_or_continues_exactly(variant):
    """Each field of a real checkpoint is mutated in turn and loaded into an optimizer that
    already holds the good checkpoint: refused with StateError leaving the optimizer's
    state bitwise as it was, or accepted; either way the run then continues bit for bit
    like the uninterrupted one."""
    model, opt, sched = make(variant)
    run(model, opt, sched, range(TOTAL))
    want = [p.detach().clone() for p in model.parameters()]

    model_a, opt_a, sched_a = make(variant)
    run(model_a, opt_a, sched_a, range(STOP))
    blob = save(model_a, opt_a, sched_a)
    refused = []
    for name, mutate in MUTATIONS.items():
        ckpt = torch.load(io.BytesIO(blob), weights_only=True)
        model_b, opt_b, sched_b = make(variant)
        model_b.load_state_dict(ckpt["model"])
        opt_b.load_state_dict(ckpt["opt"])
        sched_b.load_state_dict(ckpt["sched"])
        before = copy.deepcopy(opt_b.state_dict())
        bad = torch.load(io.BytesIO(blob), weights_only=True)["opt"]
        if name.startswith("pending") and _meta(bad)["pending"] is None:
            _meta(bad)["pending"] = [[0.0] * len(opt_b.expert_names)] * len(opt_b.module_names)
            if name == "pending right shape":
                continue  # exact only where the pending scores are the run's own (lagged)
        mutate(bad)
        try:
            opt_b.load_state_dict(bad)
        except molf.StateError:
            refused.append(name)
            assert same(opt_b.state_dict(), before), f"{name}: a refused load changed the optimizer"
        run(model_b, opt_b, sched_b, range(STOP, TOTAL))
        for p, q in zip(model_b.parameters(), want):
            assert torch.equal(p, q), f"{name}: the run did not continue exactly"
    accepted = set(MUTATIONS) - set(refused)
    assert accepted <= {"pending right shape", "exp_avg float64"}, sorted(accepted)


def test_routing_settings_that_differ_from_the_checkpoint_are_named():
    """A hysteresis optimizer loading a top-k checkpoint resumes the run as it was saved
    (the checkpoint's router and ledger, settings included) and says so, naming each
    setting that differs."""
    model, opt, sched = make("molf")  # top-k
    run(model, opt, sched, range(3))
    torch.manual_seed(0)
    hyst = molf.MoLFAdamW(
        molf.wrap(Net(), molf.MoLFConfig(ranks=(3,))),
        lr=5e-3,
        lora_lr=2e-2,
        weight_decay=0.1,
        routing=molf.Hysteresis(margin=0.3, min_dwell=5, warmup_steps=2, ema_decay=0.5),
    )
    with pytest.warns(
        UserWarning,
        match=(
            r"checkpoint's are used.*policy 'topk' / 'hysteresis'; margin 0.0 / 0.3; min_dwell 0 / 5; "
            r"warmup_steps 0 / 2; ema_decay 0.9 / 0.5$"
        ),
    ):
        hyst.load_state_dict(opt.state_dict())
    assert hyst.router == opt.router and hyst.ledger == opt.ledger
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(opt.state_dict())  # the same settings: no word
