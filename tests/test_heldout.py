"""Policy "heldout" of MoLFAdamW, against an independent float64 reference.

The reference below re-implements the semantics from their description alone
(SPEC §2 step semantics; the held-out measurement of `molf.heldout`; the
Ledger's held-out EMA; the Router's `regate`): its own parameter copies, its
own forward pass of the wrapped layers (y = W x + b + sum_i s_i B_i A_i x,
s_i = alpha / sqrt(r)), its own gradients, Adam moments, masks and held-out
books, all in float64 tensors and Python floats. Only the model construction
(`molf.wrap`, for the initial LoRA A values) is shared with molf.

Then: AdamW equality while every expert is active, the behaviour on held-out
losses that oppose / equal the training loss, checkpoints, configuration
errors, when the closure runs, the frozen phase, and experts without gradients.
"""

from __future__ import annotations

import copy
import io
import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import molf
from molf._shrink import _Trial  # (here, not in the CUDA-only test: a bad import fails on any machine)
from molf.heldout import ORIGIN_KEY, spectral_shrink_b

pytestmark = pytest.mark.usefixtures("one_thread")

BETAS = (0.9, 0.999)
EPS = 1e-8
ALPHA = 32.0  # MoLFConfig's default alpha for every rank


# ----------------------------------------------------------------- the model


def mlp(dims, dtype, seed):
    """Linear layers "0", "2", ... with a GELU between consecutive ones."""
    torch.manual_seed(seed)
    layers = []
    for i in range(len(dims) - 1):
        if i:
            layers.append(nn.GELU())
        layers.append(nn.Linear(dims[i], dims[i + 1]))
    return nn.Sequential(*layers).to(dtype)


def build(dims, wrapped, ranks, fft, dtype=torch.float64, seed=0, b_std=0.0):
    """A wrapped MLP; `b_std` > 0 starts the LoRA B matrices off zero (so every
    expert's gradient is non-zero from the first step)."""
    model = molf.wrap(
        mlp(dims, dtype, seed),
        molf.MoLFConfig(ranks=ranks, fft=fft, target_modules=wrapped, exclude_modules=()),
    )
    if b_std:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for _, layer in molf.routed_modules(model):
                for b in layer.lora_B:
                    b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float64) * b_std)
    return model


# ------------------------------------------------------------- the reference


class Reference:
    """Policy "heldout" over an MLP, in float64, from the semantics' description.

    Parameter keys: (layer, "W"), (layer, "b"), (layer, "A", i), (layer, "B", i).
    """

    def __init__(
        self,
        model,
        dims,
        wrapped,
        ranks,
        fft,
        *,
        lr,
        lora_lr,
        wd,
        lora_wd,
        every,
        decay,
        horizon,
        min_dwell,
        min_span,
        shrink=0.0,
        shrink_steps=1,
        spectral=True,
        rate=None,
    ):
        self.layers = [str(2 * i) for i in range(len(dims) - 1)]
        self.wrapped = list(wrapped)  # in module order
        self.ranks = tuple(ranks)
        self.scales = [ALPHA / math.sqrt(r) for r in ranks]
        self.fft = fft
        self.every, self.decay, self.horizon, self.min_dwell = every, decay, horizon, min_dwell
        self.min_span = min_span  # windows of record an expert needs before it can be dropped
        self.spectral = spectral
        self.rate = rate  # None, or (up, down, cap, floor, trust) of the learning-rate multipliers
        self.P: dict[tuple, torch.Tensor] = {}
        self.hyper: dict[tuple, tuple[float, float]] = {}  # key -> (lr, weight decay)
        self.trainable: list[tuple] = []
        for name in self.layers:
            layer = model[int(name)]
            base = layer.base if name in self.wrapped else layer
            self.P[(name, "W")] = base.weight.detach().to(torch.float64).clone()
            self.P[(name, "b")] = base.bias.detach().to(torch.float64).clone()
            if fft:  # MoLF-Efficient freezes every parameter but the LoRA experts
                self.trainable += [(name, "W"), (name, "b")]
                self.hyper[(name, "W")] = (lr, wd)
                self.hyper[(name, "b")] = (lr, 0.0)
            if name in self.wrapped:
                for i in range(len(ranks)):
                    for part, src in (("A", layer.lora_A[i]), ("B", layer.lora_B[i])):
                        key = (name, part, i)
                        self.P[key] = src.detach().to(torch.float64).clone()
                        self.trainable.append(key)
                        self.hyper[key] = (lora_lr, lora_wd)
        # experts[m][e]: the parameter keys of expert e of routed module m
        self.experts = []
        for name in self.wrapped:
            lora = [[(name, "A", i), (name, "B", i)] for i in range(len(ranks))]
            self.experts.append(([[(name, "W"), (name, "b")]] if fft else []) + lora)
        self.M, self.E = len(self.experts), len(self.experts[0])
        # Per expert index: the fraction of its shrink trials (one number: every expert's).
        self.shrink = list(shrink) if isinstance(shrink, (list, tuple)) else [shrink] * self.E
        # Per expert index: its most trials per measurement, each from the last kept one.
        self.steps = list(shrink_steps) if isinstance(shrink_steps, (list, tuple)) else [shrink_steps] * self.E
        # Where every parameter started: a shrink trial scales an expert's update since then.
        self.origin = {k: v.clone() for k, v in self.P.items()}
        self.shrink_trials = [0] * self.E
        self.shrinks = [0] * self.E
        self.inactive_shrunk = 0  # tensors of dropped experts that a kept trial scaled
        self.closure_calls = 0
        self.routed = {k for row in self.experts for ex in row for k in ex}
        self.plain = [k for k in self.trainable if k not in self.routed]
        self.m = {k: torch.zeros_like(self.P[k]) for k in self.trainable}
        self.v = {k: torch.zeros_like(self.P[k]) for k in self.trainable}
        self.t = {k: 0 for k in self.trainable}
        self.active = [[True] * self.E for _ in range(self.M)]
        self.expert_changed = [[0] * self.E for _ in range(self.M)]  # step of each expert's last flip
        self.ema = [[math.nan] * self.E for _ in range(self.M)]
        self.c = [[1.0] * self.E for _ in range(self.M)]  # each expert's learning-rate multiplier
        self.span = [[0] * self.E for _ in range(self.M)]  # consecutive windows each expert moved in
        self.restarted = 0  # moved entries whose restarted span gave another decay than the run's length
        self.floored = 0  # multipliers the floor held above c * down
        self.untrusted = 0  # descents that left a multiplier where it was: short of trust x potential
        self.windows = 0
        self.step_count = 0  # routed steps
        self.last_measure = 0
        self.prev: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (theta, g) at the last measurement
        self.mask = None
        self.drops = 0
        self.readmissions = 0
        self.held_back = 0  # dropped experts with a positive potential kept out by min_dwell
        self.unjudged = 0  # active experts with a harmful record kept in by min_span
        self.measurements = 0

    def forward(self, P, x):
        h = x
        for j, name in enumerate(self.layers):
            y = F.linear(h, P[(name, "W")], P[(name, "b")])
            if name in self.wrapped:
                for i, s in enumerate(self.scales):
                    y = y + s * F.linear(F.linear(h, P[(name, "A", i)]), P[(name, "B", i)])
            h = y if j == len(self.layers) - 1 else F.gelu(y)
        return h

    def grads(self, loss_fn, keys):
        P = {k: (v.clone().requires_grad_(k in keys)) for k, v in self.P.items()}
        loss = loss_fn(lambda x: self.forward(P, x))
        gs = torch.autograd.grad(loss, [P[k] for k in keys], allow_unused=True)
        return {k: torch.zeros_like(self.P[k]) if g is None else g for k, g in zip(keys, gs)}

    def adamw(self, k, c=1.0):
        """AdamW at the key's lr times the expert's multiplier c: decay and Adam step both."""
        lr, wd = self.hyper[k]
        lr = lr * c
        b1, b2 = BETAS
        t = self.t[k]
        p = self.P[k] * (1 - lr * wd)
        m_hat = self.m[k] / (1 - b1**t)
        v_hat = self.v[k] / (1 - b2**t)
        self.P[k] = p - lr * m_hat / (v_hat.sqrt() + EPS)

    def step(self, loss_fn, heldout_fn):
        g = self.grads(loss_fn, self.trainable)
        b1, b2 = BETAS
        for k in self.trainable:
            self.t[k] += 1
            self.m[k] = b1 * self.m[k] + (1 - b1) * g[k]
            self.v[k] = b2 * self.v[k] + (1 - b2) * g[k] ** 2
        for k in self.plain:
            self.adamw(k)
        self.mask = [[False] * self.E for _ in range(self.M)]
        for mi, row in enumerate(self.experts):
            for e, keys in enumerate(row):
                lr = self.hyper[keys[0]][0]
                n = sum(self.P[k].numel() for k in keys)
                score = lr / n * sum(float((self.m[k] ** 2 / (self.v[k].sqrt() + EPS)).sum()) for k in keys)
                self.mask[mi][e] = self.active[mi][e] and math.isfinite(score)
                if self.mask[mi][e]:
                    for k in keys:
                        self.adamw(k, self.c[mi][e])
        self.step_count += 1
        if self.step_count - self.last_measure >= self.every:
            self.measure(heldout_fn)

    def heldout_value(self, heldout_fn):
        self.closure_calls += 1
        with torch.no_grad():
            return float(heldout_fn(lambda x: self.forward(self.P, x)))

    def shrunk_b(self, k, delta):
        """LoRA's B of key k, spectral: the product ΔW = B A with its singular values
        soft-thresholded, σ ← max(σ − δ·σ_max, 0), and B moved by (ΔW' − ΔW) A⁺
        (A stays, so B' A = ΔW'); else scaled by 1 - δ about zero."""
        if not self.spectral:
            return (1 - delta) * self.P[k]
        a = self.P[(k[0], "A", k[2])]
        dw = self.P[k] @ a
        u, sv, vh = torch.linalg.svd(dw, full_matrices=False)
        target = u @ torch.diag((sv - delta * sv.max()).clamp_min(0)) @ vh
        return self.P[k] + (target - dw) @ torch.linalg.pinv(a)

    def shrink_trials_now(self, heldout_fn):
        """For each expert index e with a shrink δ > 0: shrink every module's e-th update since
        the start (W, b scaled by 1 - δ about their start; a LoRA pair as `shrunk_b` says),
        keep it if the held-out loss is lower, and while kept shrink again, up to its steps."""
        base = self.heldout_value(heldout_fn)
        for e, delta in enumerate(self.shrink):
            if not delta:
                continue
            keys = [k for row in self.experts for k in row[e] if k[1] in ("W", "b", "B")]
            for _ in range(self.steps[e]):
                saved = {k: self.P[k] for k in keys}
                for k in keys:
                    if k[1] == "B":
                        self.P[k] = self.shrunk_b(k, delta)
                    else:
                        self.P[k] = self.origin[k] + (1 - delta) * (saved[k] - self.origin[k])
                trial = self.heldout_value(heldout_fn)
                self.shrink_trials[e] += 1
                if not trial < base:
                    self.P.update(saved)
                    break
                base = trial
                self.shrinks[e] += 1
                # A dropped expert's movement is training movement only: its record moves with
                # the kept trial, so the window sees it unmoved.
                for mi, row in enumerate(self.experts):
                    if not self.active[mi][e]:
                        for k in row[e]:
                            if k in self.prev and k in saved:
                                self.prev[k] = (self.P[k].clone(), self.prev[k][1])
                                self.inactive_shrunk += 1

    def measure(self, heldout_fn):
        self.measurements += 1
        if any(self.shrink):
            self.shrink_trials_now(heldout_fn)
        self.closure_calls += 1
        keys = [k for row in self.experts for ex in row for k in ex]
        g = self.grads(heldout_fn, keys)
        b1, b2 = BETAS
        first = not self.prev
        realized = [[0.0] * self.E for _ in range(self.M)]
        movement = [[0.0] * self.E for _ in range(self.M)]
        potential = [[0.0] * self.E for _ in range(self.M)]
        for mi, row in enumerate(self.experts):
            for e, ex in enumerate(row):
                for k in ex:
                    theta = self.P[k]
                    if not first:
                        theta_prev, g_prev = self.prev[k]
                        realized[mi][e] += float(((g_prev + g[k]) / 2 * (theta - theta_prev)).sum())
                        movement[mi][e] += float((theta - theta_prev).abs().sum())
                    t = self.t[k]
                    if t:
                        m_hat = self.m[k] / (1 - b1**t)
                        v_hat = self.v[k] / (1 - b2**t)
                        lr = self.hyper[k][0] * self.c[mi][e]
                        potential[mi][e] += lr * float((g[k] * (m_hat / (v_hat.sqrt() + EPS))).sum())
                    self.prev[k] = (theta.clone(), g[k].clone())
        window = self.step_count - self.last_measure
        self.last_measure = self.step_count
        self.last_potential = potential
        if first:
            return

        # Each expert's decay: the EMA's mean age grows to `horizon` of the windows it has
        # moved in without a pause (its span restarts when it moves again after one).
        def decay(n):
            return self.decay if self.horizon == 0 else max(self.decay, 1 - (1 / self.horizon - 1) / n)

        for mi in range(self.M):
            for e in range(self.E):
                moved = movement[mi][e] > 0
                self.span[mi][e] = self.span[mi][e] + 1 if moved else 0
                x = -realized[mi][e] / window
                if moved and math.isfinite(x):
                    d = decay(self.span[mi][e])
                    self.restarted += d != decay(self.windows + 1)
                    old = self.ema[mi][e]
                    self.ema[mi][e] = x if math.isnan(old) else d * old + (1 - d) * x
                if self.rate is not None:  # the window's descent, before the EMA
                    up, down, cap, floor, trust = self.rate
                    # Up only where the descent reached `trust` x the potential: the predicted
                    # descent of one step at the expert's rate (lr x c above), where it is
                    # finite and positive; any descent with trust 0.
                    p = potential[mi][e]
                    trusted = trust == 0 or (math.isfinite(p) and p > 0 and x >= trust * p)
                    self.untrusted += x > 0 and not trusted
                    if x > 0 and trusted:
                        self.c[mi][e] = min(self.c[mi][e] * up, cap)
                    elif x < 0:
                        self.floored += self.c[mi][e] * down < floor
                        self.c[mi][e] = max(self.c[mi][e] * down, floor)
        self.windows += 1
        s = self.step_count
        for mi in range(self.M):
            new = []
            for e in range(self.E):
                if self.active[mi][e]:
                    ema = self.ema[mi][e]
                    judged = self.span[mi][e] >= self.min_span
                    new.append(not judged or math.isnan(ema) or ema > 0)
                    self.unjudged += not judged and ema <= 0
                else:
                    p = potential[mi][e]
                    may_return = s - self.expert_changed[mi][e] >= self.min_dwell  # since its drop
                    new.append(may_return and math.isfinite(p) and p > 0)
                    self.held_back += not may_return and math.isfinite(p) and p > 0
                if new[e] != self.active[mi][e]:
                    self.expert_changed[mi][e] = s
            self.drops += sum(a and not b for a, b in zip(self.active[mi], new))
            self.readmissions += sum(b and not a for a, b in zip(self.active[mi], new))
            self.active[mi] = new

    def molf_param(self, model, key):
        layer = model[int(key[0])]
        if key[1] in ("W", "b"):
            base = layer.base if key[0] in self.wrapped else layer
            return base.weight if key[1] == "W" else base.bias
        return (layer.lora_A if key[1] == "A" else layer.lora_B)[key[2]]


# ------------------------------------------------- 1. lockstep with the reference


def teacher_data(dims, seed, n=16, batches=4, shift=1.0):
    """Training batches of a noisy teacher, and a held-out batch whose first
    output is shifted: fitting the training data partly hurts the held-out loss."""
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    teacher = torch.randn(dims[0], dims[-1], **f64)
    train = []
    for _ in range(batches):
        x = torch.randn(n, dims[0], **f64)
        train.append((x, torch.tanh(x @ teacher) + 0.3 * torch.randn(n, dims[-1], **f64)))
    xh = torch.randn(n, dims[0], **f64)
    yh = torch.tanh(xh @ teacher)
    yh[:, 0] += shift
    return train, (xh, yh)


def mse(f, x, y):
    return ((f(x) - y) ** 2).mean()


LOCKSTEP = {
    # name: (ranks, fft, lr, lora_lr, weight_decay, lora_weight_decay)
    "molf": ((2,), True, 3e-2, 3e-2, 0.0, 0.0),
    "molf-decay": ((2,), True, 2e-2, 4e-2, 0.1, 0.1),
    "efficient": ((2, 4), False, 3e-2, 3e-2, 0.0, 0.0),
    "efficient-decay": ((2, 4), False, 1e-2, 2e-2, 0.0, 0.1),
}


# held-out shrinkage off, the defaults (0.1 once for a dense expert; 0.05 for a LoRA one, up to
# twice beside a dense expert), 0.1 once for every expert (LoRA spectral), and LoRA scaled with
# up to 3 trials of every expert
@pytest.mark.parametrize(
    "shrink,spectral,shrink_steps", [(0.0, True, None), (None, True, None), (0.1, True, 1), (0.1, False, 3)]
)
@pytest.mark.parametrize("horizon", [0.0, 0.4])  # 0: the fixed decay; 0.4: it grows from window 6 on
@pytest.mark.parametrize("case", list(LOCKSTEP))
def test_lockstep_with_float64_reference(case, horizon, shrink, spectral, shrink_steps):
    ranks, fft, lr, lora_lr, wd, lora_wd = LOCKSTEP[case]
    dims, wrapped, K, D, dwell, steps = (4, 8, 8, 2), ("0", "2"), 3, 0.7, 4, 60  # layer "4" stays unrouted
    model = build(dims, wrapped, ranks, fft)
    # Beside a dense expert the default minimum span (0); LoRA experts only: 3 windows (the
    # default, 10, would leave this short run without the re-admissions tested here).
    min_span = 0 if fft else 3
    per_expert = [0.1] * fft + [0.05] * len(ranks) if shrink is None else [shrink] * (fft + len(ranks))
    steps_per_expert = (
        [1] * fft + [2 if fft else 1] * len(ranks) if shrink_steps is None else [shrink_steps] * (fft + len(ranks))
    )
    ref = Reference(
        model,
        dims,
        wrapped,
        ranks,
        fft,
        lr=lr,
        lora_lr=lora_lr,
        wd=wd,
        lora_wd=lora_wd,
        every=K,
        decay=D,
        horizon=horizon,
        min_dwell=dwell,
        min_span=min_span,
        shrink=per_expert,
        shrink_steps=steps_per_expert,
        spectral=spectral,
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert bool(frozen) == (not fft)
    train, (xh, yh) = teacher_data(dims, seed=0)
    calls = []

    def heldout():
        calls.append(1)
        return mse(model, xh, yh)

    opt = molf.MoLFAdamW(
        model,
        lr=lr,
        lora_lr=lora_lr,
        weight_decay=wd,
        lora_weight_decay=lora_wd,
        routing=molf.Heldout(
            heldout,
            min_dwell=dwell,
            every=K,
            decay=D,
            horizon=horizon,
            shrink=shrink,
            shrink_steps=shrink_steps,
            shrink_spectral=spectral,
            # The routing's scenarios without the rate adaptation (on by default; its
            # lockstep against this reference: tests/test_heldout_rate.py).
            adapt_rate=False,
            **{} if fft else dict(min_span=min_span),
        ),
    )
    assert not opt.ledger.heldout_adapt_rate
    assert opt.router.policy == "heldout" and opt.router.min_dwell == dwell
    assert opt.ledger.shrink_spectral == spectral
    assert opt.ledger.heldout_horizon == horizon and opt.ledger.heldout_shrink == per_expert
    assert opt.ledger.heldout_shrink_steps == steps_per_expert
    assert opt.ledger.heldout_min_span == min_span
    assert opt.router.incumbents().all()
    wins = opt.ledger.wins().copy()
    for s in range(1, steps + 1):
        x, y = train[s % len(train)]
        mse(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        ref.step(lambda f, x=x, y=y: mse(f, x, y), lambda f: mse(f, xh, yh))

        assert opt.router.step == ref.step_count == s
        assert ref.measurements == s // K
        # Per measurement: the gradient's call, and with shrinkage the trials' baseline and
        # each trial (one per expert, more where one was kept and steps allow).
        trials = sum(ref.shrink_trials)
        assert len(calls) == ref.closure_calls == ref.measurements * (1 + any(per_expert)) + trials
        if any(per_expert):
            assert opt.ledger.shrink_trials().tolist() == ref.shrink_trials, f"step {s}: shrink trials"
            assert opt.ledger.shrinks().tolist() == ref.shrinks, f"step {s}: shrinks kept"
            for made, most in zip(ref.shrink_trials, steps_per_expert):
                assert s // K <= made <= most * (s // K)
        new_wins = opt.ledger.wins()
        mask = new_wins - wins
        assert set(np.unique(mask)) <= {0, 1}
        wins = new_wins.copy()
        assert mask.astype(bool).tolist() == ref.mask, f"step {s}: update mask"
        assert opt.router.incumbents().tolist() == ref.active, f"step {s}: active set"
        for k in ref.trainable:
            p = ref.molf_param(model, k)
            # The float64 rounding of a different op order (lerp vs. b1*m + (1-b1)*g, ...) is
            # ~1e-16 per step and grows through the dynamics to <= ~1e-13 of the tensor's scale
            # here (a larger LoRA lr makes the run chaotic: pick cases that are not).
            scale = float(ref.P[k].abs().max())
            torch.testing.assert_close(
                p.detach(), ref.P[k], rtol=1e-9, atol=1e-10 * scale, msg=lambda m, s=s, k=k: f"step {s} {k}: {m}"
            )
        assert opt.ledger.heldout_windows == ref.windows == max(s // K - 1, 0)
        assert opt.ledger.heldout_span().tolist() == ref.span, f"step {s}: spans"
        ema, ref_ema = opt.ledger.heldout_ema(), np.array(ref.ema)
        assert (np.isnan(ema) == np.isnan(ref_ema)).all(), f"step {s}: {ema} vs {ref_ema}"
        # molf measures in float32 per tensor: close, not bitwise.
        np.testing.assert_allclose(ema, ref_ema, rtol=1e-4, atol=1e-8, err_msg=f"step {s}")
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    # Not vacuous: the run dropped experts, brought dropped ones back, and kept one with a
    # positive potential out until its module's dwell ran out.
    assert ref.drops >= 1 and ref.readmissions >= 1 and ref.held_back >= 1, (ref.drops, ref.readmissions, ref.held_back)
    # With a minimum span, a harmful record was also left unjudged while too short.
    assert (ref.unjudged >= 1) == (min_span > 0), ref.unjudged
    if horizon:  # and a returned expert's restarted span changed its EMA's decay
        assert ref.restarted >= 1
    if any(per_expert):  # and both kept and refused shrink trials, some of which scaled a dropped expert
        assert 0 < sum(ref.shrinks) < sum(ref.shrink_trials), (ref.shrinks, ref.shrink_trials)
        assert ref.inactive_shrunk >= 1
        # Where an expert may have more than one trial, a kept one was followed by another.
        repeated = [t > ref.measurements for t, n in zip(ref.shrink_trials, steps_per_expert) if n > 1]
        assert all(repeated), (ref.shrink_trials, steps_per_expert, ref.measurements)


# --------------------------------------- 2. before the second measurement: AdamW


class Net(nn.Module):
    """Two wrapped layers, an unrouted LayerNorm and head (plain AdamW)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 7)
        self.norm = nn.LayerNorm(7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))))


def make_net(ranks, fft, seed=0, b_std=0.1):
    torch.manual_seed(seed)
    model = molf.wrap(Net(), molf.MoLFConfig(ranks=ranks, fft=fft, exclude_modules=("head",)))
    with torch.no_grad():
        for _, layer in molf.routed_modules(model):
            for b in layer.lora_B:
                b.normal_(0, b_std)
    return model


def batch(seed, n=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen), torch.randn(n, 3, generator=gen)


def adamw_groups(model, lr, lora_lr, wd, lora_wd):
    """torch.optim.AdamW groups with MoLFAdamW's rules: LoRA experts use the LoRA lr and
    decay; other tensors the dense lr, with decay only for 2-D ones."""
    lora, decay, no_decay = [], [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_" in n:
            lora.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": wd},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        {"params": lora, "lr": lora_lr, "weight_decay": lora_wd},
    ]
    return [g for g in groups if g["params"]]


def assert_bitwise_equal(model_a, model_b, what=""):
    a, b = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), f"{what} {n}: max diff {(a[n] - b[n]).abs().max().item()}"


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("fft,ranks", [(True, (3,)), (True, (2, 4)), (False, (2, 4))])
def test_all_active_before_second_measurement_is_adamw(fft, ranks, foreach):
    K = 4
    model = make_net(ranks, fft)
    twin = copy.deepcopy(model)
    xh, yh = batch(99)
    calls = []

    def heldout():
        calls.append(1)
        return ((model(xh) - yh + 1.0) ** 2).mean()

    kw = dict(lr=1e-2, lora_lr=3e-2, weight_decay=0.1, lora_weight_decay=0.01)
    # Shrinkage off: its trials would move the weights at the first measurement (tested in 7.).
    opt = molf.MoLFAdamW(model, **kw, fused=False, routing=molf.Heldout(heldout, every=K, shrink=0.0))
    ref = torch.optim.AdamW(
        adamw_groups(twin, kw["lr"], kw["lora_lr"], kw["weight_decay"], kw["lora_weight_decay"]),
        betas=BETAS,
        eps=EPS,
        foreach=foreach,
    )
    for s in range(1, 2 * K + 1):  # the second measurement runs after the update of step 2K
        x, y = batch(s)
        for m, o in ((model, opt), (twin, ref)):
            ((m(x) - y) ** 2).mean().backward()
            o.step()
            o.zero_grad()
        assert_bitwise_equal(model, twin, f"step {s}")
        assert opt.ledger.wins().min() == opt.ledger.wins().max() == s  # every expert updated every step
        if s < 2 * K:
            assert opt.router.incumbents().all()
    assert len(calls) == 2 and opt.ledger.heldout_windows == 1


# ------------------------------------------------------------------ 3. behaviour


def fixed_batch_run(fft, ranks, sign, steps, K, dtype=torch.float32, lr=1e-3, shrink=0.0, min_span=0):
    """Every linear layer wrapped; training on one fixed batch; the held-out loss is
    `sign` x the training loss on the same batch. Shrinkage and the rate adaptation off
    unless `shrink`, and records judged from the first window unless `min_span` (None: the
    default): these runs test the drops and re-admissions alone."""
    dims = (4, 8, 8, 2)
    model = build(dims, ("0", "2", "4"), ranks, fft, dtype=dtype, b_std=0.1)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 4, generator=gen).to(dtype), torch.randn(16, 2, generator=gen).to(dtype)

    def loss():
        return mse(model, x, y)

    span = {} if min_span is None else dict(min_span=min_span)
    opt = molf.MoLFAdamW(
        model,
        lr=lr,
        weight_decay=0.0,
        routing=molf.Heldout(lambda: sign * loss(), every=K, shrink=shrink, adapt_rate=False, **span),
    )
    history = []  # per step: (incumbents, heldout_ema, routed params)
    for _ in range(steps):
        loss().backward()
        opt.step()
        opt.zero_grad()
        routed = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        history.append((opt.router.incumbents(), opt.ledger.heldout_ema(), routed))
    return model, opt, x, y, history


@pytest.mark.parametrize("fft,ranks", [(True, (2,)), (False, (2, 4))])
def test_negated_training_loss_drops_every_expert_for_good(fft, ranks):
    K, steps = 3, 30
    model, opt, _, _, history = fixed_batch_run(fft, ranks, -1.0, steps, K)
    assert opt.router.min_dwell == 3 * K  # the default; it runs out long before the end
    for s, (active, ema, params) in enumerate(history, start=1):
        if s > 1:  # until the drop, every expert moves every step
            prev = history[s - 2][2]
            moved = {n: not torch.equal(params[n], prev[n]) for n in params}
            assert all(moved.values()) == (s <= 2 * K), (s, moved)
        if s < 2 * K:
            assert active.all(), s
            assert np.isnan(ema).all()
        else:
            # Every expert moved in the first window and raised -loss: all dropped at the
            # second measurement, none back (a step of any would raise it: potential < 0).
            assert not active.any(), (s, active)
            assert np.isfinite(ema).all() and (ema < 0).all(), (s, ema)
            for n, p in params.items():
                assert torch.equal(p, history[2 * K - 1][2][n]), (s, n)
    assert opt.ledger.heldout_windows == steps // K - 1
    assert (opt.ledger.wins() == 2 * K).all()


@pytest.mark.parametrize("fft,ranks,want", [(True, (2,), 0), (False, (2, 4), 10), (False, (3,), 10)])
def test_default_minimum_span_holds_a_lora_only_drop_for_ten_windows(fft, ranks, want):
    """The default minimum span: 0 beside a dense expert (every expert dropped at the first
    window of record, as above), 10 windows where every expert is a LoRA expert: the same
    harmful record drops nothing until its tenth window, then every expert at once."""
    K = 3
    steps = K * (want + 3)
    model, opt, _, _, history = fixed_batch_run(fft, ranks, -1.0, steps, K, min_span=None)
    assert opt.ledger.heldout_min_span == want
    first_drop = next(s for s, (active, _, _) in enumerate(history, start=1) if not active.all())
    # Window n is recorded at step K (n + 1); the first one judged is window max(want, 1).
    assert first_drop == K * (max(want, 1) + 1), first_drop
    for s, (active, ema, _) in enumerate(history, start=1):
        if K * 2 <= s < first_drop:
            assert (ema < 0).all(), (s, ema)  # harmful all along, and kept
        assert not active.any() if s >= first_drop else active.all(), (s, active)
    spans = opt.ledger.heldout_span()
    assert (spans == 0).all()  # none moved in the last windows
    assert (opt.ledger.wins() == first_drop).all()


@pytest.mark.parametrize("fft,ranks", [(True, (2,)), (False, (2, 4))])
def test_training_loss_as_heldout_keeps_every_expert(fft, ranks):
    """Deterministic full-batch descent: every expert's movement lowers the held-out
    (= training) loss, so every expert stays active and the run is AdamW's."""
    K, steps, lr = 3, 30, 1e-3
    model, opt, x, y, history = fixed_batch_run(fft, ranks, 1.0, steps, K, lr=lr)
    for s, (active, ema, _) in enumerate(history, start=1):
        assert active.all(), s
        assert np.isnan(ema).all() == (s < 2 * K)
        if s >= 2 * K:
            assert (ema > 0).all(), (s, ema)
    assert opt.ledger.heldout_windows == steps // K - 1
    assert (opt.ledger.wins() == steps).all()
    # The same run under torch.optim.AdamW.
    twin = build((4, 8, 8, 2), ("0", "2", "4"), ranks, fft, dtype=torch.float32, b_std=0.1)
    ref = torch.optim.AdamW(
        [p for p in twin.parameters() if p.requires_grad], lr=lr, weight_decay=0.0, betas=BETAS, eps=EPS, foreach=False
    )
    for _ in range(steps):
        mse(twin, x, y).backward()
        ref.step()
        ref.zero_grad()
    assert_bitwise_equal(model, twin)


# ----------------------------------------------------------------- 4. checkpoints


def shifted_heldout(model):
    xh, yh = batch(99)
    return lambda: ((model(xh) - yh - 1.0) ** 2).mean()


def make_ckpt_run(fft, ranks, heldout=True, min_span=1, adapt_rate=False, shrink=None, shrink_steps=None):
    model = make_net(ranks, fft)
    policy = molf.Heldout(
        shifted_heldout(model),
        every=4,
        min_dwell=4,
        min_span=min_span,
        adapt_rate=adapt_rate,
        shrink=shrink,
        shrink_steps=shrink_steps,
    )
    kw = dict(routing=policy) if heldout else {}
    opt = molf.MoLFAdamW(model, lr=3e-2, lora_lr=5e-2, weight_decay=0.1, lora_weight_decay=0.01, **kw)
    return model, opt


def train(model, opt, steps, history=None):
    for s in steps:
        x, y = batch(s)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        if history is not None:
            history.append(opt.router.incumbents())


@pytest.mark.parametrize("fft,ranks", [(True, (3,)), (False, (2, 4))])
def test_checkpoint_resume_is_bitwise(fft, ranks):
    total, stop = 40, 11
    model, opt = make_ckpt_run(fft, ranks)
    history = []
    train(model, opt, range(1, total + 1), history)
    # Not vacuous: experts were dropped (and, with K=4, min_dwell=4, brought back).
    actives = np.stack(history)
    dropped = actives[:-1] & ~actives[1:]
    readmitted = ~actives[:-1] & actives[1:]
    assert dropped.any() and readmitted.any()

    model_a, opt_a = make_ckpt_run(fft, ranks)
    train(model_a, opt_a, range(1, stop + 1))
    sd = opt_a.state_dict()
    states = [st for st in sd["state"].values()]
    assert states and any("heldout_theta" in st and "heldout_grad" in st for st in states)
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": sd}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_b, opt_b = make_ckpt_run(fft, ranks, min_span=7)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    assert opt_b.ledger.heldout_min_span == 1  # the checkpoint's, as every ledger setting
    train(model_b, opt_b, range(stop + 1, total + 1))

    assert_bitwise_equal(model, model_b)
    assert opt.router.to_bytes() == opt_b.router.to_bytes()
    assert opt.ledger.to_bytes() == opt_b.ledger.to_bytes()


@pytest.mark.parametrize("saved_heldout", [True, False])
def test_checkpoint_policy_mismatch_is_refused(saved_heldout):
    model, opt = make_ckpt_run(True, (3,), heldout=saved_heldout)
    train(model, opt, range(1, 10))
    sd = opt.state_dict()
    other_model, other = make_ckpt_run(True, (3,), heldout=not saved_heldout)
    train(other_model, other, range(1, 3))
    before = (other.router.to_bytes(), other.ledger.to_bytes(), copy.deepcopy(other.state_dict()["state"]))
    with pytest.raises(molf.StateError, match="heldout"):
        other.load_state_dict(sd)
    # Refused without changing anything.
    assert (other.router.to_bytes(), other.ledger.to_bytes()) == before[:2]
    after = other.state_dict()["state"]
    assert after.keys() == before[2].keys()
    for i in after:
        assert after[i].keys() == before[2][i].keys()
        for k in after[i]:
            assert torch.equal(after[i][k], before[2][i][k]), (i, k)


# --------------------------------------------------------------- 5. config errors


def tiny():
    return make_net((2,), True)


def ok_heldout():
    return torch.zeros((), requires_grad=True) * 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(loss_fn=None),
        dict(every=0),
        dict(every=-3),
        dict(every=True),
        dict(every=1.5),
        dict(every=2.0),
        dict(decay=1.0),
        dict(decay=1.5),
        dict(decay=-0.1),
        dict(decay=float("nan")),
        dict(horizon=1.0),
        dict(horizon=-0.25),
        dict(horizon=float("nan")),
        dict(horizon=float("inf")),
        dict(shrink=1.0),
        dict(shrink=-0.1),
        dict(shrink=float("nan")),
        dict(shrink_steps=0),
        dict(shrink_steps=True),
        dict(shrink_steps=2.0),
        dict(shrink_steps=17),
        dict(shrink_spectral=1),
        dict(shrink_spectral="yes"),
        dict(min_span=-1),
        dict(min_span=True),
        dict(min_span=2.0),
        dict(min_span=2**63),
        dict(loss_fn="not a callable"),
        dict(min_dwell=-1),
    ],
    ids=repr,
)
def test_config_errors(kwargs):
    assert issubclass(molf.ConfigError, ValueError)
    with pytest.raises(molf.ConfigError):
        molf.MoLFAdamW(tiny(), lr=1e-2, routing=molf.Heldout(**{"loss_fn": ok_heldout, **kwargs}))


def test_heldout_defaults():
    opt = molf.MoLFAdamW(tiny(), lr=1e-2, routing=molf.Heldout(ok_heldout))
    assert opt.router.policy == "heldout" and opt.router.min_dwell == 3 * 10
    assert opt.ledger.heldout_decay == 0.5 and opt.ledger.heldout_horizon == 0.25
    # The shrink per expert: 0.1 for the dense expert, 0.05 for the LoRA expert.
    assert opt.ledger.heldout_shrink == [0.1, 0.05] and opt.ledger.shrink_spectral
    opt = molf.MoLFAdamW(tiny(), lr=1e-2, routing=molf.Heldout(ok_heldout, every=2, decay=0.0))
    assert opt.router.min_dwell == 6 and opt.ledger.heldout_decay == 0.0
    opt = molf.MoLFAdamW(tiny(), lr=1e-2, routing=molf.Heldout(ok_heldout, min_dwell=0, every=2))
    assert opt.router.min_dwell == 0
    # The minimum span: 0 beside a dense expert, 10 windows for LoRA experts only, or as given.
    assert opt.ledger.heldout_min_span == 0
    lora_only = make_net((2, 4), False)
    assert molf.MoLFAdamW(lora_only, lr=1e-2, routing=molf.Heldout(ok_heldout)).ledger.heldout_min_span == 10
    # The shrink: 0.05 for every LoRA expert without a dense one too, or as given for every expert.
    assert molf.MoLFAdamW(lora_only, lr=1e-2, routing=molf.Heldout(ok_heldout)).ledger.heldout_shrink == [0.05] * 2
    with_dense = make_net((2, 4), True)
    assert molf.MoLFAdamW(with_dense, lr=1e-2, routing=molf.Heldout(ok_heldout)).ledger.heldout_shrink == [
        0.1,
        0.05,
        0.05,
    ]
    for given in (0.0, 0.1, 0.3):
        for model in (tiny(), make_net((2, 4), False)):
            opt = molf.MoLFAdamW(model, lr=1e-2, routing=molf.Heldout(ok_heldout, shrink=given))
            assert opt.ledger.heldout_shrink == [given] * len(opt.ledger.shrinks())

    # The trials per measurement: up to 2 for a LoRA expert beside a dense expert, 1 otherwise
    # (LoRA experts only too), or as given for every expert.
    def steps(model, **kw):
        return molf.MoLFAdamW(model, lr=1e-2, routing=molf.Heldout(ok_heldout, **kw)).ledger.heldout_shrink_steps

    assert steps(tiny()) == [1, 2] and steps(with_dense) == [1, 2, 2] and steps(lora_only) == [1, 1]
    assert steps(with_dense, shrink_steps=3) == [3] * 3 and steps(lora_only, shrink_steps=1) == [1] * 2
    assert repr(molf.Heldout(ok_heldout)).count("shrink") == 0  # None, the default, is not shown
    assert molf.MoLFAdamW(lora_only, lr=1e-2, routing=molf.Heldout(ok_heldout, min_span=0)).ledger.heldout_min_span == 0
    assert molf.MoLFAdamW(tiny(), lr=1e-2, routing=molf.Heldout(ok_heldout, min_span=4)).ledger.heldout_min_span == 4
    assert molf.MoLFAdamW(tiny(), lr=1e-2).router.policy == "topk"


BAD_CLOSURES = {
    "non-scalar tensor": lambda model, x: model(x),
    "vector": lambda model, x: model(x).mean(dim=1),
    "python float": lambda model, x: float(model(x).mean().detach()),
    "detached scalar": lambda model, x: model(x).mean().detach(),
    "None": lambda model, x: None,
}


@pytest.mark.parametrize("bad", list(BAD_CLOSURES))
def test_bad_closure_raises_at_first_measurement(bad):
    K = 3
    model = tiny()
    xh, _ = batch(99)
    calls = []

    def heldout():
        calls.append(1)
        return BAD_CLOSURES[bad](model, xh)

    opt = molf.MoLFAdamW(model, lr=1e-2, routing=molf.Heldout(heldout, every=K))
    for s in range(1, K + 1):
        x, y = batch(s)
        ((model(x) - y) ** 2).mean().backward()
        if s < K:
            opt.step()
            assert not calls
        else:
            with pytest.raises(molf.ConfigError, match="scalar loss"):
                opt.step()
            # A detached scalar passes the shrink trials (no gradient needed: one call before and
            # one per expert, a second of the LoRA expert's if its first was kept), then fails the
            # gradient's call.
            trials = range(len(opt.expert_names), sum(opt.ledger.heldout_shrink_steps) + 1)
            if bad == "detached scalar":
                assert len(calls) - 2 in trials
            else:
                assert len(calls) == 1
        opt.zero_grad()


# ------------------------------------------------ 6. when the closure is called


def test_closure_every_k_routed_steps_not_on_skipped_steps():
    K = 3
    model = tiny()
    xh, yh = batch(99)
    calls = []  # the router step at each call, and whether grad mode was on

    def heldout():
        calls.append((opt.router.step, torch.is_grad_enabled()))
        return ((model(xh) - yh) ** 2).mean()

    opt = molf.MoLFAdamW(model, lr=1e-2, routing=molf.Heldout(heldout, every=K))
    # Calls per measurement: the shrink trials' baseline and each trial (no grad: one per
    # expert, a second of the LoRA expert's where its first was kept), then the gradient.
    steps = opt.ledger.heldout_shrink_steps
    assert steps == [1, 2]
    # Non-finite gradients on some steps, among them ones where a measurement would be due.
    bad = {3, 5, 6, 10, 14, 15, 16}
    routed = 0
    for s in range(1, 25):
        x, y = batch(s)
        ((model(x) - y) ** 2).mean().backward()
        if s in bad:
            model.fc2.lora_B[0].grad.view(-1)[0] = float("nan")
        n_calls, n_trials = len(calls), int(opt.ledger.shrink_trials().sum())
        opt.step()
        made = int(opt.ledger.shrink_trials().sum()) - n_trials
        routed += s not in bad
        assert opt.router.step == routed
        assert opt.routing_summary().skipped_steps == len([b for b in bad if b <= s])
        measured = s not in bad and routed % K == 0
        assert len(calls) == n_calls + (2 + made) * measured, s
        assert len(calls) == 2 * (routed // K) + int(opt.ledger.shrink_trials().sum())
        if measured:
            assert len(steps) <= made <= sum(steps)
            assert calls[-(2 + made) :] == [(routed, False)] * (1 + made) + [(routed, True)]
            # The measurement leaves every gradient None.
            assert all(p.grad is None for p in model.parameters())
        else:
            assert made == 0
        opt.zero_grad()
        # A step with no gradient at all routes nothing and measures nothing.
        opt.step()
        assert opt.router.step == routed and len(calls) == 2 * (routed // K) + int(opt.ledger.shrink_trials().sum())
    assert opt.ledger.heldout_windows == routed // K - 1
    # Not vacuous: the LoRA expert's trial was repeated after a kept one.
    assert opt.ledger.shrink_trials()[1] > routed // K


@pytest.mark.parametrize("freeze_after", [6, 7])
def test_frozen_phase_keeps_the_active_set(freeze_after):
    """Held-out loss = -training loss drops every expert at the second measurement
    (router step 2K = 6) unless the router is frozen by then."""
    K, steps = 3, 12
    dims = (4, 8, 8, 2)
    model = build(dims, ("0", "2", "4"), (2,), True, dtype=torch.float32, b_std=0.1)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)
    opt = molf.MoLFAdamW(
        model,
        lr=1e-3,
        weight_decay=0.0,
        routing=molf.Heldout(lambda: -mse(model, x, y), freeze_after=freeze_after, every=K),
    )
    for _ in range(steps):
        mse(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    assert opt.ledger.heldout_windows == steps // K - 1  # measured all the same
    assert (opt.ledger.heldout_ema() < 0).all()
    if freeze_after <= 2 * K:
        assert opt.router.incumbents().all() and (opt.ledger.wins() == steps).all()
    else:
        assert not opt.router.incumbents().any() and (opt.ledger.wins() == 2 * K).all()


# --------------------------------- an expert that has no gradient for a while


class Branchy(nn.Module):
    """`extra` (a wrapped layer) takes part only when asked to."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.extra = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x, use_extra=False):
        h = torch.tanh(self.fc1(x))
        if use_extra:
            h = h + self.extra(h)
        return self.head(h)


def branchy_run(steps, K=2, shrink=0.1):
    torch.manual_seed(0)
    model = molf.wrap(Branchy(), molf.MoLFConfig(ranks=(2,), exclude_modules=("head",)))
    xh, yh = batch(99)
    opt = molf.MoLFAdamW(
        model,
        lr=1e-2,
        weight_decay=0.1,
        routing=molf.Heldout(lambda: ((model(xh) - yh) ** 2).mean(), every=K, shrink=shrink),
    )
    extra0 = {n: p.detach().clone() for n, p in model.extra.named_parameters()}
    for s in range(1, steps + 1):
        x, y = batch(s)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt, extra0


def test_expert_without_gradient_is_active_but_not_updated():
    """No gradient: a NaN training score (masked out although active), no movement
    (its held-out EMA stays NaN, so it stays active), no change to its tensors."""
    K, steps = 2, 9
    model, opt, extra0 = branchy_run(steps, K)
    i = opt.module_names.index("extra")
    assert opt.ledger.heldout_windows == steps // K - 1
    assert np.isnan(opt.ledger.heldout_ema()[i]).all()
    assert opt.router.incumbents()[i].all()
    assert (opt.ledger.wins()[i] == 0).all()
    assert np.isnan(opt.ledger.last_scores()[i]).all()
    for n, p in model.extra.named_parameters():
        assert torch.equal(p, extra0[n]), n
    j = opt.module_names.index("fc1")
    assert opt.ledger.wins()[j].sum() > 0


def test_expert_first_gradient_after_a_measurement_gets_a_fresh_adamw_step():
    K = 2
    # Measured twice while `extra` had no gradient; shrinkage off, whose trial after the next
    # step would scale the step's LoRA update.
    model, opt, extra0 = branchy_run(2 * K + 1, K, shrink=0.0)
    x, y = batch(1000)
    ((model(x, use_extra=True) - y) ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.extra.named_parameters()}
    opt.step()
    # Still active (never measured moving): a first AdamW step, m_hat = g, v_hat = g^2.
    for n, p in model.extra.named_parameters():
        wd = 0.1 if p.dim() >= 2 else 0.0
        g = grads[n]
        expected = extra0[n] * (1 - 1e-2 * wd) - 1e-2 * g / (g.abs() + EPS)
        torch.testing.assert_close(p.detach(), expected, msg=n)
        assert float(opt.state[p]["step"]) == 1


def test_checkpoint_with_an_expert_that_never_had_a_gradient():
    K = 2
    model, opt, _ = branchy_run(2 * K + 1, K)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    model_b, opt_b, _ = branchy_run(0, K)
    model_b.load_state_dict(model.state_dict())
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    assert opt_b.router.to_bytes() == opt.router.to_bytes()
    assert opt_b.ledger.to_bytes() == opt.ledger.to_bytes()


def test_heldout_gradients_stay_out_of_other_optimizers_parameters():
    """The held-out backward accumulates into this optimizer's parameters only: a parameter
    that another optimizer steps keeps its training gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    molf.wrap(model, molf.MoLFConfig(ranks=(2,), target_modules=("0",), exclude_modules=()))
    own = [p for n, p in model.named_parameters() if not n.startswith("2.")]
    x, y, xv, yv = torch.randn(8, 4), torch.randn(8, 2), torch.randn(8, 4), torch.randn(8, 2)
    opt = molf.MoLFAdamW(own, lr=1e-2, routing=molf.Heldout(lambda: ((model(xv) - yv) ** 2).mean(), every=1))
    for _ in range(3):
        ((model(x) - y) ** 2).mean().backward()
        head_grads = [p.grad.clone() for p in model[2].parameters()]
        opt.step()
        for p, g in zip(model[2].parameters(), head_grads):
            assert torch.equal(p.grad, g)
        assert all(p.grad is None for p in own)
        model.zero_grad()


def test_heldout_backward_computes_the_expert_tensors_gradients_only():
    """The held-out backward differentiates the routed expert tensors only, the sums' operands:
    no gradient reaches this optimizer's other parameters (an embedding, a norm, an unwrapped
    head), whose held-out gradient nothing reads and whose memory would sit at the probe's peak."""
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 2))
    molf.wrap(model, molf.MoLFConfig(ranks=(2,), target_modules=("0",), exclude_modules=()))
    ids, y, ids_v, y_v = torch.randint(0, 10, (8,)), torch.randn(8, 2), torch.randint(0, 10, (8,)), torch.randn(8, 2)
    opt = molf.MoLFAdamW(
        [*emb.parameters(), *model.parameters()],
        lr=1e-2,
        routing=molf.Heldout(lambda: ((model(emb(ids_v)) - y_v) ** 2).mean(), every=1),
    )
    routed = {id(p) for _, p, _ in opt.expert_view().expert_tensors()}
    others = [p for p in [*emb.parameters(), *model.parameters()] if id(p) not in routed]
    assert len(others) == 5  # the embedding, the norm's weight and bias, the head's weight and bias
    reached: list[int] = []
    hooks = [p.register_hook(lambda g, i=i: reached.append(i)) for i, p in enumerate(others)]
    for step in range(3):
        ((model(emb(ids)) - y) ** 2).mean().backward()
        assert sorted(reached) == list(range(5)), "the training backward reaches them all"
        reached.clear()
        opt.step()  # measures (every=1)
        assert reached == [], f"the held-out backward of step {step + 1} reached non-expert tensors"
        opt.zero_grad()
    for h in hooks:
        h.remove()
    assert opt._probe.last_step == 3


def test_shrink_trials_forwards_skip_the_routed_layers_function(monkeypatch):
    """A measurement's forwards without gradient (the base value and one trial per expert
    index) run the routed layer's kernels without its autograd Function; only the held-out
    forward + backward goes through it, once per wrapped layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    molf.wrap(model, molf.MoLFConfig(ranks=(2,), exclude_modules=()))
    x, x_v = torch.randn(8, 4), torch.randn(8, 4)
    opt = molf.MoLFAdamW(model, lr=1e-2, routing=molf.Heldout(lambda: model(x_v).square().mean(), every=1))
    function = molf.routed_linear.RoutedLinearFunction
    apply = function.apply
    closure_calls, applied = [], []
    loss_fn = opt._probe.loss_fn
    monkeypatch.setattr(opt._probe, "loss_fn", lambda: closure_calls.append(torch.is_grad_enabled()) or loss_fn())
    monkeypatch.setattr(function, "apply", lambda *a: applied.append(torch.is_grad_enabled()) or apply(*a))
    for _ in range(3):
        model(x).square().mean().backward()
        applied.clear()
        closure_calls.clear()
        trials = int(opt.ledger.shrink_trials().sum())
        opt.step()  # measures (every=1); from the second on, with shrink trials
        opt.zero_grad()
    # The base value, the trials (one per expert index, a second of the LoRA one's if its first
    # was kept), the gradient.
    trials = int(opt.ledger.shrink_trials().sum()) - trials
    assert 2 <= trials <= 3
    assert closure_calls == [False] * (1 + trials) + [True]
    assert applied == [True, True]  # the held-out forward's two wrapped layers


def test_heldout_backward_leaves_other_modules_alone_when_every_expert_is_frozen():
    """Experts frozen after the optimizer was built: nothing of the optimizer's needs a held-out
    gradient, and none reaches a module outside it (another optimizer's, here `other`)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    molf.wrap(model, molf.MoLFConfig(ranks=(2,), target_modules=("0",), exclude_modules=()))
    other = nn.Linear(4, 4)
    x, x_v = torch.randn(8, 4), torch.randn(8, 4)
    opt = molf.MoLFAdamW(model, lr=1e-2, routing=molf.Heldout(lambda: model(other(x_v)).square().mean(), every=1))
    for p in model[0].parameters():
        p.requires_grad_(False)
    for step in range(3):
        model(other(x)).square().mean().backward()
        other.zero_grad(set_to_none=True)
        opt.step()  # measures (every=1)
        assert all(p.grad is None for p in other.parameters()), f"step {step + 1}"
        opt.zero_grad()
    assert opt._probe.last_step == 3


def test_routing_summary_reports_the_active_sets():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    molf.wrap(model, molf.MoLFConfig(ranks=(2,), exclude_modules=()))
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    # The held-out loss is the negated training loss: every moving expert is dropped.
    opt = molf.MoLFAdamW(model, lr=1e-2, routing=molf.Heldout(lambda: -((model(x) - y) ** 2).mean(), every=2))
    for _ in range(4):
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    s = opt.routing_summary()
    inc = opt.router.incumbents()
    assert not inc.all(), "the negated training loss drops experts"
    assert s.active_share == {e: float(inc[:, j].mean()) for j, e in enumerate(opt.expert_names)}
    assert s.current_share == {e: 1.0 for e in opt.expert_names}  # the last non-empty winners: all
    for i, m in enumerate(s.modules.values()):
        assert m["active"] == [e for e, on in zip(opt.expert_names, inc[i]) if on]
    assert "active" in str(s)


def test_routing_summary_reports_the_rate_multipliers():
    """With the rate rule on, the summary carries each expert's multiplier per module and its
    mean over modules (what tells a user that LoRA sits at its cap); with it off, none."""

    def run(adapt_rate):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
        molf.wrap(model, molf.MoLFConfig(ranks=(2,), exclude_modules=()))
        x, y = torch.randn(16, 4), torch.randn(16, 2)
        # The held-out loss is the training loss: steps pay as predicted, so rates rise.
        routing = molf.Heldout(lambda: ((model(x) - y) ** 2).mean(), every=2, adapt_rate=adapt_rate)
        opt = molf.MoLFAdamW(model, lr=1e-2, routing=routing)
        for _ in range(12):
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
        return opt

    opt = run(True)
    s, rates = opt.routing_summary(), opt.ledger.heldout_rate()
    assert (rates > 1).any(), "the rule raised some rate"
    assert s.rate == {e: float(rates[:, j].mean()) for j, e in enumerate(opt.expert_names)}
    for i, m in enumerate(s.modules.values()):
        assert m["rate"] == dict(zip(opt.expert_names, rates[i].tolist()))
    assert "rate x" in str(s) and s.to_dict()["rate"] == s.rate
    off = run(False).routing_summary()
    assert off.rate == {} and "rate x" not in str(off)
    assert all("rate" not in m for m in off.modules.values())


# ------------------------------------------------------------- 7. held-out shrinkage


def test_shrink_refused_leaves_the_run_bitwise_and_kept_pulls_towards_the_start():
    """The held-out loss is the distance of the model's outputs from the untouched model's:
    every update raises it, so every trial is kept and each expert's update since the start
    shrinks by 0.9 per window (the LoRA expert's twice: its trials are repeated while kept). With
    the negation of that loss every trial is refused, and the
    run is bitwise the run without shrinkage (a refused trial restores the weights exactly)."""
    K, steps = 3, 12
    xh, _ = batch(99)

    def run(sign, shrink):
        model = make_net((2,), True, b_std=0.0)  # B from zero, as wrap makes it: s B A is the update
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            y0 = model(xh)
        opt = molf.MoLFAdamW(
            model,
            lr=1e-2,
            routing=molf.Heldout(
                lambda: sign * ((model(xh) - y0) ** 2).mean(), min_dwell=10**6, every=K, shrink=shrink
            ),
        )
        for s in range(1, steps + 1):
            x, y = batch(s)
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
        return model, opt, start

    windows = steps // K
    kept, opt, start = run(1.0, 0.1)
    assert opt.ledger.shrink_trials().tolist() == [windows, 2 * windows]
    assert opt.ledger.shrinks().tolist() == [windows, 2 * windows]
    assert opt.routing_summary().shrinks == dict(zip(opt.expert_names, [windows, 2 * windows]))
    assert "shrinks kept" in str(opt.routing_summary())
    plain, _, _ = run(1.0, 0.0)
    for (n, p), q in zip(kept.named_parameters(), plain.parameters()):
        if n.endswith(("base.weight", "lora_B.0")):  # scaled: nearer the start than without
            assert (p - start[n]).norm() < (q - start[n]).norm(), n
    refused, opt, _ = run(-1.0, 0.1)
    assert opt.ledger.shrinks().tolist() == [0, 0] and opt.ledger.shrink_trials().tolist() == [windows] * 2
    off, _, _ = run(-1.0, 0.0)
    assert_bitwise_equal(refused, off)


def test_checkpoint_without_shrinkage_resumes_without_it():
    """A checkpoint's ledger decides (one saved with heldout_shrink=0 continues without
    trials)."""
    model = make_net((2,), True)
    saved = molf.MoLFAdamW(model, lr=3e-2, routing=molf.Heldout(shifted_heldout(model), every=4, shrink=0.0))
    train(model, saved, range(1, 9))
    fresh = molf.MoLFAdamW(model, lr=3e-2, routing=molf.Heldout(shifted_heldout(model), every=4))
    assert fresh.ledger.heldout_shrink == [0.1, 0.05]
    fresh.load_state_dict(saved.state_dict())
    assert fresh.ledger.heldout_shrink == [0.0, 0.0]
    train(model, fresh, range(9, 17))
    assert fresh.ledger.shrink_trials().tolist() == [0, 0]


@pytest.mark.parametrize(
    "fft,ranks,named",
    [
        # LoRA experts only: shrink 0.1 before the default became 0.05 (one trial, as now).
        (False, (2, 4), [r"heldout_shrink \[0.1, 0.1\] / \[0.05, 0.05\]"]),
        # A dense and a LoRA expert: 0.1 and one trial each before the LoRA expert's became
        # 0.05, up to twice.
        (True, (3,), [r"heldout_shrink \[0.1, 0.1\] / \[0.1, 0.05\]", r"heldout_shrink_steps \[1, 1\] / \[1, 2\]"]),
    ],
)
def test_checkpoint_from_before_the_shrink_defaults_resumes_with_its_own(fft, ranks, named):
    """A run saved under the shrink settings every run had before today's defaults (0.1 for
    every expert, one trial each per measurement) resumes with them, says which, and
    continues bitwise as it ran."""
    old = dict(shrink=0.1, shrink_steps=1)

    def policy(model, **kw):
        return molf.Heldout(shifted_heldout(model), every=4, min_span=1, **kw)

    model = make_net(ranks, fft)
    whole = molf.MoLFAdamW(model, lr=3e-2, routing=policy(model, **old))
    train(model, whole, range(1, 17))
    assert whole.ledger.shrinks().sum() > 0  # not vacuous: trials at 0.1 were kept
    model_a = make_net(ranks, fft)
    opt_a = molf.MoLFAdamW(model_a, lr=3e-2, routing=policy(model_a, **old))
    train(model_a, opt_a, range(1, 9))
    model_b = make_net(ranks, fft)
    model_b.load_state_dict(model_a.state_dict())
    fresh = molf.MoLFAdamW(model_b, lr=3e-2, routing=policy(model_b))
    assert (fresh.ledger.heldout_shrink, fresh.ledger.heldout_shrink_steps) == (
        [0.1] * fft + [0.05] * len(ranks),
        [1] * fft + [2 if fft else 1] * len(ranks),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.load_state_dict(opt_a.state_dict())
    (message,) = [str(w.message) for w in caught]
    assert "checkpoint's are used" in message
    for setting in named:
        assert re.search(setting, message), message
    assert ("heldout_shrink_steps" in message) == fft  # a setting that did not change is not named
    assert (fresh.ledger.heldout_shrink, fresh.ledger.heldout_shrink_steps) == ([0.1] * 2, [1] * 2)
    train(model_b, fresh, range(9, 17))
    assert_bitwise_equal(model, model_b)
    assert fresh.ledger.to_bytes() == whole.ledger.to_bytes()


def test_shrink_without_the_starting_point_is_a_state_error():
    model, opt = make_ckpt_run(True, (2,))
    train(model, opt, range(1, 5))
    sd = opt.state_dict()
    for st in sd["state"].values():
        st.pop(ORIGIN_KEY, None)
    other = molf.MoLFAdamW(
        model,
        lr=3e-2,
        lora_lr=5e-2,
        weight_decay=0.1,
        lora_weight_decay=0.01,
        routing=molf.Heldout(shifted_heldout(model), min_dwell=4, every=4),
    )
    with pytest.raises(molf.StateError, match="starting point"):  # at load, before anything changes
        other.load_state_dict(sd)
    assert other.router.step == 0 and not other.state
    train(model, other, range(5, 9))  # still usable


@pytest.mark.parametrize("out,r,inp", [(8, 4, 16), (16, 32, 8), (3, 5, 7), (6, 2, 6)])
def test_spectral_shrink_soft_thresholds_the_product(out, r, inp):
    """B' A is B A with its singular values soft-thresholded by δ x the largest, written
    plainly (the SVD of the whole product), and B moves by (ΔW' − ΔW) A⁺ only, also where
    r exceeds a side of the product; batched; a zero B (nothing learned) stays zero."""
    gen = torch.Generator().manual_seed(out * 100 + r)
    b = torch.randn(3, out, r, generator=gen, dtype=torch.float64)
    a = torch.randn(3, r, inp, generator=gen, dtype=torch.float64)
    got = spectral_shrink_b(b, a, 0.3)
    for k in range(3):
        dw = b[k] @ a[k]
        u, sv, vh = torch.linalg.svd(dw, full_matrices=False)
        want = u @ torch.diag((sv - 0.3 * sv[0]).clamp_min(0)) @ vh
        torch.testing.assert_close(got[k] @ a[k], want, rtol=0, atol=1e-12)
        torch.testing.assert_close(got[k], b[k] + (want - dw) @ torch.linalg.pinv(a[k]), rtol=0, atol=1e-12)
        # the largest singular value shrinks by the factor 1 - δ, the weakest ones vanish
        new = torch.linalg.svdvals(got[k] @ a[k])
        assert math.isclose(float(new[0]), 0.7 * float(sv[0]), rel_tol=1e-12)
        assert (new <= sv + 1e-12).all()
    assert torch.equal(spectral_shrink_b(torch.zeros(4, 2), torch.ones(2, 5), 0.1), torch.zeros(4, 2))


def test_checkpoint_decides_how_lora_is_shrunk():
    """The ledger carries the kind of LoRA shrink trial: a checkpoint saved with
    heldout_shrink_spectral=False resumes
    scaling, bitwise as the uninterrupted run; spectral trials give another run."""

    def opt_for(model, **kw):
        return molf.MoLFAdamW(model, lr=3e-2, routing=molf.Heldout(shifted_heldout(model), every=4, **kw))

    def whole_run(spectral):
        model = make_net((2, 4), False)
        opt = opt_for(model, shrink_spectral=spectral)
        train(model, opt, range(1, 17))
        return model, opt

    model = make_net((2, 4), False)
    saved = opt_for(model, shrink_spectral=False)
    train(model, saved, range(1, 9))
    resumed = opt_for(model)
    assert resumed.ledger.shrink_spectral
    resumed.load_state_dict(saved.state_dict())
    assert not resumed.ledger.shrink_spectral
    train(model, resumed, range(9, 17))
    scaled, scaled_opt = whole_run(False)
    assert_bitwise_equal(model, scaled)
    spectral, spectral_opt = whole_run(True)
    assert spectral_opt.ledger.shrinks().sum() > 0 and scaled_opt.ledger.shrinks().sum() > 0
    assert any(not torch.equal(p, q) for p, q in zip(spectral.parameters(), scaled.parameters()))


@pytest.mark.parametrize("out,r,inp", [(48, 16, 96), (96, 16, 48), (200, 32, 64), (24, 32, 16)])
def test_spectral_shrink_of_float32_tensors_is_the_float64_result_rounded(out, r, inp):
    """float32 B and A (the math of bf16 ones runs in float32 too) with a decaying spectrum: B'
    is B + (ΔW' − ΔW) A⁺ of the exact soft-thresholded product to float32 rounding (a few
    1e-8 here, where decompositions in float32 lost an order of magnitude more), also for a
    rank-one B and where r > in (A⁺ A projects); a zero B stays exactly."""
    gen = torch.Generator().manual_seed(out + r + inp)
    a = (torch.rand(6, r, inp, generator=gen) * 2 - 1) / inp**0.5
    b = torch.randn(6, out, r, generator=gen) * torch.logspace(0, -4, r) * 1e-2
    b[0] = 0
    b[1, :, 1:] = 0
    got = spectral_shrink_b(b, a, 0.1)
    assert got.dtype == torch.float32 and torch.equal(got[0], b[0])
    b64, a64 = b.double(), a.double()
    dw = b64 @ a64
    u, sv, vh = torch.linalg.svd(dw, full_matrices=False)
    want = u @ torch.diag_embed((sv - 0.1 * sv[..., :1]).clamp_min(0)) @ vh
    want_b = b64 + (want - dw) @ torch.linalg.pinv(a64)
    for k in range(1, 6):
        assert (got[k].double() - want_b[k]).norm() <= 1e-7 * want_b[k].norm(), k
        assert (got[k].double() @ a64[k] - want[k]).norm() <= 1e-7 * want[k].norm(), k


class OpCount(TorchDispatchMode):
    """Counts the operators torch dispatches (views and detach aside: no kernel runs)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func is not torch.ops.aten.detach.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fft,ranks", [(True, (2,)), (False, (2, 3))])
def test_probe_work_does_not_grow_with_the_number_of_tensors(monkeypatch, fft, ranks):
    """Besides the closure's own forwards and backward, a measurement runs a number of torch
    operators that does not grow with the model's tensors, but for the copy a shrink trial
    keeps of each tensor it scales (B per LoRA expert; W and b of the dense one): batched
    sums, Gram products and transforms per shape, multi-tensor writes. (One operator per
    tensor and operation, ~80 per module, made large models' measurements launch-bound.) The
    sums batch as on an accelerator (on the CPU they go one tensor at a time), and however
    they are batched, they are the same."""

    def run(layers, limit):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(layers)])
        molf.wrap(model, molf.MoLFConfig(ranks=ranks, fft=fft, exclude_modules=()))
        x = torch.randn(4, 6)
        opt = molf.MoLFAdamW(
            model, lr=1e-2, routing=molf.Heldout(lambda: model(x).square().mean(), every=10**9, min_span=0)
        )
        with monkeypatch.context() as patch:
            patch.setattr(molf._window_sums, "_batch_elements", lambda device: limit)
            for s in range(3):
                model(x).sum().backward()
                opt.step()
                opt.zero_grad()
                if s == 1:
                    opt._probe.measure(opt)  # the first measurement: the next one sums a window
            with OpCount() as probe:
                opt._probe.measure(opt)
        with OpCount() as forward, torch.no_grad():
            model(x).square().mean()
        with OpCount() as forward_backward:
            model(x).square().mean().backward()
        trials = len(opt.expert_names) + 1  # the base value and one trial per expert index
        return probe.count - trials * forward.count - forward_backward.count, opt

    (small, _), (large, opt) = run(2, 1 << 24), run(8, 1 << 24)
    copies = 3 if fft else len(ranks)  # tensors a trial scales, per module
    assert large - small <= 6 * copies
    assert np.isfinite(opt.ledger.heldout_ema()).all()
    for limit in (0, 100):  # one tensor at a time; a few per batch
        _, other = run(8, limit)
        np.testing.assert_allclose(other.ledger.heldout_ema(), opt.ledger.heldout_ema(), rtol=1e-6)
        assert (other.router.incumbents() == opt.router.incumbents()).all()


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: the spectral trial runs as products on a side stream there"
)
def test_spectral_trial_on_cuda_matches_the_cpu():
    """On CUDA the r x r transforms of every shape run at once as matrix products on a side
    stream; the trial's B's are the CPU's to rounding, and the pieces come back in order."""
    gen = torch.Generator().manual_seed(0)
    entries, bs, as_ = [], [], []
    for out, inp in [(24, 40)] * 9 + [(40, 24)] * 5:
        b = torch.randn(out, 8, generator=gen) * torch.logspace(0, -2, 8) * 0.1
        a = torch.randn(8, inp, generator=gen) / inp**0.5
        bs.append(b)
        as_.append(a)
        entries.append((b.cuda(), None, a.cuda(), False))
    local = [e[0].clone() for e in entries]
    _Trial(entries, 0.1).apply(entries, local)
    for b, a, got in zip(bs, as_, local):
        torch.testing.assert_close(got.cpu(), spectral_shrink_b(b, a, 0.1), rtol=1e-6, atol=1e-9)
