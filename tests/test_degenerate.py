"""SPEC §2's degenerate cases: MoLFAdamW must equal torch.optim.AdamW exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import molf

STEPS = 12


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.fc2 = nn.Linear(7, 7)
        self.head = nn.Linear(7, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(self.norm(torch.relu(self.fc1(x))))))


def decay_groups(params, wd):
    params = list(params)
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def train_pair(model_a, opt_a, model_b, opt_b, dtype, steps=STEPS):
    gen = torch.Generator().manual_seed(7)
    sched_a = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=steps)
    sched_b = torch.optim.lr_scheduler.CosineAnnealingLR(opt_b, T_max=steps)
    for _ in range(steps):
        x = torch.randn(9, 5, generator=gen).to(dtype)
        y = torch.randn(9, 2, generator=gen).to(dtype)
        for model, opt, sched in ((model_a, opt_a, sched_a), (model_b, opt_b, sched_b)):
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
            sched.step()


def assert_bitwise_equal(model_a, model_b):
    a = dict(model_a.named_parameters())
    b = dict(model_b.named_parameters())
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), f"{n}: max diff {(a[n].float() - b[n].float()).abs().max().item()}"


DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("fft,ranks", [(True, (3,)), (True, (2, 4)), (False, (2, 4))])
def test_k_at_least_experts_is_adamw(dtype, foreach, fft, ranks):
    torch.manual_seed(0)
    model = molf.wrap(Net().to(dtype), molf.MoLFConfig(ranks=ranks, fft=fft))
    with torch.no_grad():
        for _, layer in molf.routed_modules(model):
            for b in layer.lora_B:
                b.normal_()
    twin = copy.deepcopy(model)
    k = len(ranks) + int(fft)
    with pytest.warns(UserWarning, match="routing is off"):
        opt = molf.MoLFAdamW(
            model,
            lr=1e-2,
            lora_lr=1e-2,
            weight_decay=0.1,
            lora_weight_decay=0.1,
            state_dtype="param",
            routing=molf.TopK(k=k),
        )
    ref = torch.optim.AdamW(
        decay_groups([p for p in twin.parameters() if p.requires_grad], 0.1), lr=1e-2, foreach=foreach
    )
    train_pair(model, opt, twin, ref, dtype)
    assert_bitwise_equal(model, twin)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("foreach", [False, True])
def test_dense_only_module_is_adamw(dtype, foreach):
    torch.manual_seed(1)
    plain = Net().to(dtype)
    model = molf.wrap(copy.deepcopy(plain), molf.MoLFConfig(ranks=(), fft=True))
    with pytest.warns(UserWarning, match="routing is off"):
        opt = molf.MoLFAdamW(model, lr=3e-3, weight_decay=0.05, state_dtype="param")
    ref = torch.optim.AdamW(decay_groups(plain.parameters(), 0.05), lr=3e-3, foreach=foreach)
    train_pair(model, opt, plain, ref, dtype)
    merged = molf.merge(model)
    assert_bitwise_equal(merged, plain)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("foreach", [False, True])
def test_efficient_single_lora_is_lora_adamw(dtype, foreach):
    torch.manual_seed(2)
    model = molf.wrap(Net().to(dtype), molf.MoLFConfig(ranks=(4,), fft=False))
    twin = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="routing is off"):
        opt = molf.MoLFAdamW(model, lr=1.0, lora_lr=2e-2, weight_decay=0.5, lora_weight_decay=0.01, state_dtype="param")
    lora = [p for p in twin.parameters() if p.requires_grad]
    assert lora and all(p.dim() == 2 for p in lora)
    ref = torch.optim.AdamW(lora, lr=2e-2, weight_decay=0.01, foreach=foreach)
    train_pair(model, opt, twin, ref, dtype)
    assert_bitwise_equal(model, twin)


def test_fp32_state_for_bf16_params_differs_from_bf16_state():
    """The 'auto' state dtype keeps float32 moments for bf16 weights (SPEC §2 pitfall)."""
    torch.manual_seed(3)
    model = molf.wrap(Net().to(torch.bfloat16), molf.MoLFConfig(ranks=(2,)))
    opt = molf.MoLFAdamW(model, lr=1e-3)
    x = torch.randn(4, 5, dtype=torch.bfloat16)
    model(x).float().pow(2).mean().backward()
    opt.step()
    states = [s for s in opt.state.values()]
    assert states and all(
        s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32 for s in states
    )
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
