"""state_dict round trips: a resumed run continues exactly as the uninterrupted one."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn

import molf

TOTAL, STOP = 10, 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 10)
        self.norm = nn.LayerNorm(10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))))


VARIANTS = {
    "molf": (dict(ranks=(3,), fft=True), dict()),
    "molf-efficient": (dict(ranks=(2, 6), fft=False), dict()),
    "hysteresis": (dict(ranks=(3,), fft=True), dict(routing=molf.Hysteresis(margin=0.2, min_dwell=2))),
    "paper": (dict(ranks=(3,), fft=True), dict(routing=molf.TopK(k=1, score="epd"))),
    "warmup-freeze": (dict(ranks=(2, 3), fft=True), dict(routing=molf.TopK(k=2, warmup_steps=2, freeze_after=6))),
    "pfn-bf16": (dict(ranks=(3,), fft=True), dict(routing=molf.TopK(score="pfn"))),
    "lagged": (dict(ranks=(2, 4), fft=False), dict(lagged=True)),
}


def make(variant, log_path=None):
    cfg_kw, opt_kw = VARIANTS[variant]
    torch.manual_seed(0)
    net = Net()
    if variant.endswith("bf16"):
        net = net.to(torch.bfloat16)
    model = molf.wrap(net, molf.MoLFConfig(alphas=None, **cfg_kw))
    with torch.no_grad():
        for _, layer in molf.routed_modules(model):
            for b in layer.lora_B:
                b.normal_(0, 0.1)
    opt = molf.MoLFAdamW(model, lr=5e-3, lora_lr=2e-2, weight_decay=0.1, log=log_path, **opt_kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return model, opt, sched


def run(model, opt, sched, steps):
    for t in steps:
        gen = torch.Generator().manual_seed(1000 + t)
        dtype = next(model.parameters()).dtype
        x = torch.randn(8, 6, generator=gen).to(dtype)
        y = torch.randn(8, 3, generator=gen).to(dtype)
        ((model(x) - y) ** 2).float().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def save(model, opt, sched) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_resume_is_exact(variant, tmp_path):
    full_log, resumed_log = tmp_path / "full.jsonl", tmp_path / "resumed.jsonl"
    model, opt, sched = make(variant, full_log)
    run(model, opt, sched, range(TOTAL))

    model_a, opt_a, sched_a = make(variant, resumed_log)
    run(model_a, opt_a, sched_a, range(STOP))
    blob = save(model_a, opt_a, sched_a)
    del model_a, opt_a, sched_a

    ckpt = torch.load(io.BytesIO(blob), weights_only=True)
    model_b, opt_b, sched_b = make(variant, resumed_log)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    sched_b.load_state_dict(ckpt["sched"])
    run(model_b, opt_b, sched_b, range(STOP, TOTAL))

    for (n, p), (_, q) in zip(model.named_parameters(), model_b.named_parameters()):
        assert torch.equal(p, q), f"{n} differs after resume"
    for p, q in zip(opt.state.values(), opt_b.state.values()):
        for k in p:
            assert p[k].dtype == q[k].dtype and torch.equal(p[k], q[k]), k
    assert opt.ledger == opt_b.ledger and opt.router == opt_b.router
    assert opt.ledger.checksum == opt_b.ledger.checksum
    full = [json.loads(line) for line in full_log.read_text().splitlines()]
    resumed = [json.loads(line) for line in resumed_log.read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, TOTAL + 1)), "log must continue without gaps or repeats"
    assert full == resumed


def test_loading_a_live_optimizers_state_dict_shares_no_state():
    """torch's load_state_dict keeps a loaded tensor itself where it is already on the
    parameter's device and in its dtype, and every `step` counter: loaded straight from a
    live optimizer, both would write into each other's state (steps counted twice, the
    held-out state overwritten). No state tensor is shared, and the two continue bitwise
    alike."""
    torch.manual_seed(0)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = molf.wrap(Net(), molf.MoLFConfig(ranks=(3,)))
        gen = torch.Generator().manual_seed(7)
        xh, yh = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)

        def heldout(model=model, xh=xh, yh=yh):
            return ((model(xh) - yh) ** 2).mean()

        opt = molf.MoLFAdamW(model, lr=5e-3, routing=molf.Heldout(heldout, every=2))
        runs.append((model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)))
    a, b = runs
    run(*a, range(STOP))
    run(*b, range(STOP))
    b[1].load_state_dict(a[1].state_dict())
    mine = {t.data_ptr() for s in b[1].state.values() for t in s.values() if torch.is_tensor(t)}
    theirs = {t.data_ptr() for s in a[1].state.values() for t in s.values() if torch.is_tensor(t)}
    assert any("heldout_theta" in s for s in b[1].state.values()) and not mine & theirs
    run(*a, range(STOP, TOTAL))
    run(*b, range(STOP, TOTAL))
    for (n, p), q in zip(a[0].named_parameters(), b[0].parameters()):
        assert torch.equal(p, q), n


def test_state_dict_is_plain_data():
    model, opt, sched = make("molf")
    run(model, opt, sched, range(2))
    sd = opt.state_dict()
    for state in sd["state"].values():
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    # weights_only loading accepts it
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


def test_checkpoint_from_other_model_is_refused_and_changes_nothing():
    model, opt, sched = make("molf")
    run(model, opt, sched, range(2))
    other_model, other_opt, other_sched = make("molf-efficient")
    run(other_model, other_opt, other_sched, range(3))
    before = {k: v.clone() for k, v in other_opt.state_dict()["state"][0].items()}
    before_ledger = other_opt.ledger.to_bytes()
    with pytest.raises(molf.StateError):
        other_opt.load_state_dict(opt.state_dict())
    after = other_opt.state_dict()["state"][0]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert other_opt.ledger.to_bytes() == before_ledger


def test_tampered_router_state_is_refused():
    model, opt, sched = make("molf")
    run(model, opt, sched, range(2))
    sd = opt.state_dict()
    meta = next(g["molf_meta"] for g in sd["param_groups"] if "molf_meta" in g)
    raw = bytearray(__import__("base64").b64decode(meta["ledger"]))
    raw[len(raw) // 2] ^= 0x40
    meta["ledger"] = __import__("base64").b64encode(bytes(raw)).decode()
    with pytest.raises(molf.StateError):
        opt.load_state_dict(sd)
