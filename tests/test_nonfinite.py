"""Non-finite gradients: the whole step is skipped, nothing changes, it is counted."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import molf


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.fc1(x))))


def make(tmp_path, **kw):
    torch.manual_seed(0)
    model = molf.wrap(Net(), molf.MoLFConfig(ranks=(2,), exclude_modules=("head",)))
    opt = molf.MoLFAdamW(model, lr=1e-2, log=tmp_path / "log.jsonl", **kw)
    return model, opt


def good_step(model, opt, seed):
    gen = torch.Generator().manual_seed(seed)
    model(torch.randn(4, 5, generator=gen)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def snapshot(model, opt):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    return params, state, opt.ledger.to_bytes(), opt.router.to_bytes()


def assert_unchanged(before, model, opt):
    params, state, ledger, router = before
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]), k
    assert opt.ledger.to_bytes() == ledger and opt.router.to_bytes() == router


PLANTS = {
    "one expert (LoRA B)": lambda m: m.fc1.lora_B[0],
    "the dense expert": lambda m: m.fc1.base.weight,
    "an unrouted parameter": lambda m: m.norm.weight,
}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [*PLANTS, "everywhere"])
@pytest.mark.parametrize("lagged", [False, True])
def test_nonfinite_step_changes_nothing(tmp_path, bad, where, lagged):
    model, opt = make(tmp_path, lagged=lagged)
    for s in range(3):
        good_step(model, opt, s)
    before = snapshot(model, opt)
    model(torch.randn(4, 5)).pow(2).mean().backward()
    targets = list(model.parameters()) if where == "everywhere" else [PLANTS[where](model)]
    for p in targets:
        p.grad.view(-1)[0] = bad
    opt.step()
    opt.zero_grad()
    assert_unchanged(before, model, opt)
    summary = opt.routing_summary()
    assert summary.skipped_steps == 1 and summary.step == 3
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines[-1] == {"skipped_after_step": 3, "reason": "non-finite gradient"}
    good_step(model, opt, 9)  # training goes on
    assert opt.routing_summary().step == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_count_survives_checkpoint(tmp_path):
    model, opt = make(tmp_path)
    good_step(model, opt, 0)
    model(torch.randn(4, 5)).pow(2).mean().backward()
    model.fc1.base.weight.grad.fill_(float("nan"))
    opt.step()
    opt.zero_grad()
    sd = opt.state_dict()
    _, fresh = make(tmp_path / "b")
    fresh.load_state_dict(sd)
    assert fresh.routing_summary().skipped_steps == 1


def test_grad_scaler_overflow_step_changes_nothing(tmp_path):
    """GradScaler path: scaler.scale(loss).backward(); scaler.step(opt); scaler.update().
    GradScaler unscales and checks the gradients itself and skips opt.step() on overflow."""
    model, opt = make(tmp_path)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for s in range(2):
        gen = torch.Generator().manual_seed(s)
        scaler.scale(model(torch.randn(4, 5, generator=gen)).pow(2).mean()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert opt.routing_summary().step == 2
    before = snapshot(model, opt)
    scale = scaler.get_scale()
    scaler.scale(model(torch.randn(4, 5)).pow(2).mean() * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    assert_unchanged(before, model, opt)
    assert scaler.get_scale() < scale
    assert opt.routing_summary().step == 2


def test_skip_nonfinite_false_lets_nan_through(tmp_path):
    model, opt = make(tmp_path, skip_nonfinite=False)
    model(torch.randn(4, 5)).pow(2).mean().backward()
    model.norm.weight.grad.fill_(float("nan"))
    opt.step()
    assert torch.isnan(model.norm.weight).all()
    assert opt.routing_summary().skipped_steps == 0


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_any_nonfinite_is_exact(device):
    """Finite values whose sum overflows are finite; one NaN or infinity anywhere is not."""
    from molf import _kernels

    huge = [torch.full((10,), 1e308, dtype=torch.float64, device=device), torch.ones(3, device=device)]
    assert not _kernels.any_nonfinite(huge)
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(7, device=device).to(torch.bfloat16)
        t[3] = bad
        assert _kernels.any_nonfinite([torch.randn(4, device=device), t])
    pair = torch.tensor([float("inf"), -float("inf")], device=device)  # sums to NaN
    assert _kernels.any_nonfinite([pair])
    assert not _kernels.any_nonfinite([torch.randn(5, 5, device=device).to(torch.bfloat16)])
