"""An exception inside a held-out measurement (a KeyboardInterrupt, a CUDA out-of-memory
error) undoes it whole: weights (a shrink trial's included), held-out state, every `.grad`,
the Ledger, the Router, the probe's last step and the RNG are bitwise as before the
measurement began; the exception propagates; the next step measures again, and the run
continues bitwise as one whose measurement was simply made one step later.

Exceptions are injected at the k-th closure call of a measurement (the base value, each
expert's shrink trial, the gradient's forward), in the gradient's backward, in the sums and
in the Router's regate (after the Ledger has recorded the window)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import molf
from molf.heldout import HeldoutProbe

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3  # heldout_every


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def batch(seed, n=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen), torch.randn(n, 3, generator=gen)


class Boom(torch.autograd.Function):
    """The identity, whose backward raises `exc`."""

    @staticmethod
    def forward(ctx, x, exc):
        ctx.exc = exc
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise ctx.exc


class Run:
    """A wrapped Net in training mode with LoRA dropout (so the closure draws random numbers)
    and a held-out loss that every update raises (the distance from the untouched model's
    outputs): shrink trials are kept and experts dropped, so a measurement has kept trials to
    undo, also of inactive experts. `arm(where, exc)` makes the next measurement raise."""

    def __init__(self, fft, ranks):
        torch.manual_seed(0)
        self.model = molf.wrap(Net(), molf.MoLFConfig(ranks=ranks, fft=fft, dropout=0.2, exclude_modules=("head",)))
        with torch.no_grad():
            for _, layer in molf.routed_modules(self.model):
                for b in layer.lora_B:
                    b.normal_(0, 0.1)
        self.xh, _ = batch(99)
        with torch.no_grad():
            self.y0 = self.model(self.xh)
        self.calls = 0
        self.armed = None  # (where, exception): raise at the closure's call `where` (int) or in its backward
        self.opt = molf.MoLFAdamW(
            self.model, lr=1e-2, routing=molf.Heldout(self.heldout, min_dwell=2 * K, every=K, min_span=0)
        )
        self.probe = self.opt._probe
        self.snapshots = []
        measure = self.probe.measure

        def spy(opt):  # what the model and optimizer were just before each measurement
            self.snapshots.append(snapshot(self.model, opt))
            self.calls = 0
            measure(opt)

        self.probe.measure = spy

    def heldout(self):
        self.calls += 1
        out = self.model(self.xh)
        where, exc = self.armed or (None, None)
        if where == self.calls:
            self.armed = None
            raise exc
        if where == "backward" and torch.is_grad_enabled():  # the gradient's call
            self.armed = None
            out = Boom.apply(out, exc)
        return ((out - self.y0) ** 2).mean()

    def step(self, s):
        x, y = batch(s)
        ((self.model(x) - y) ** 2).mean().backward()
        self.opt.step()
        self.opt.zero_grad()


def snapshot(model, opt):
    return dict(
        params={n: p.detach().clone() for n, p in model.named_parameters()},
        grads={n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        state=copy.deepcopy(opt.state_dict()),
        last_step=opt._probe.last_step,
        rng=torch.get_rng_state(),
    )


def assert_same_state_dict(a, b):
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys(), i
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k]), (i, k)
    assert a["param_groups"] == b["param_groups"]  # the group scalars and molf_meta (router, ledger bytes)


def assert_as_before(run, before):
    now = snapshot(run.model, run.opt)
    for n, p in before["params"].items():
        assert torch.equal(now["params"][n], p), n
    # The measurement began with the training gradients and freed them (the step had used
    # them): none comes back, nor any part of the held-out gradient.
    assert any(g is not None for g in before["grads"].values())
    assert all(g is None for g in now["grads"].values())
    assert_same_state_dict(now["state"], before["state"])
    assert now["last_step"] == before["last_step"]
    assert torch.equal(now["rng"], before["rng"])


CASES = {"molf": (True, (2,)), "efficient": (False, (2, 4))}
# The k-th closure call of a measurement: 1 the base value, 2..E+1 the experts' shrink
# trials, E+2 the gradient's forward.
WHERE = [1, 2, 3, 4, "backward"]
EXCEPTIONS = {
    "interrupt": KeyboardInterrupt,
    "oom": lambda: torch.cuda.OutOfMemoryError("CUDA out of memory (injected)"),
}


@pytest.mark.parametrize("exc", list(EXCEPTIONS))
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("measurement", [1, 3])  # the first (it only remembers) and one with inactive experts
@pytest.mark.parametrize("case", list(CASES))
def test_exception_in_a_measurement_undoes_it_and_the_run_continues_as_if_measured_later(case, measurement, where, exc):
    fft, ranks = CASES[case]
    steps, fail = 5 * K, measurement * K
    # The runs one after the other: each draws its dropout masks from the seed it starts with.
    a = Run(fft, ranks)
    for s in range(1, steps + 1):
        if s == fail:
            # Not vacuous: from the third measurement on, it runs with experts dropped.
            assert a.opt.router.incumbents().all() == (measurement == 1)
            a.armed = (where, EXCEPTIONS[exc]())
            x, y = batch(s)
            ((a.model(x) - y) ** 2).mean().backward()
            with pytest.raises(type(a.armed[1])):
                a.opt.step()
            assert a.armed is None  # it did raise where asked
            assert_as_before(a, a.snapshots[-1])
            a.opt.zero_grad()
        else:
            a.step(s)
        if s == fail + 1:  # measured again at the next step
            assert a.probe.last_step == s
    rng = torch.get_rng_state()
    b = Run(fft, ranks)
    due = b.probe.due
    b.probe.due = lambda step: step != fail and due(step)  # the same run, not measured at step `fail`
    for s in range(1, steps + 1):
        b.step(s)
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n
    assert_same_state_dict(a.opt.state_dict(), b.opt.state_dict())
    assert torch.equal(rng, torch.get_rng_state())
    assert b.opt.ledger.shrinks().sum() > 0  # kept trials, to undo where a later call raised


def test_rng_is_restored_too():
    """The closure draws from the RNG (LoRA dropout) before it raises: the draws are undone,
    so the continued run's dropout masks are the uninterrupted run's."""
    run = Run(True, (2,))
    for s in range(1, K):
        run.step(s)
    run.armed = (3, KeyboardInterrupt())
    x, y = batch(K)
    ((run.model(x) - y) ** 2).mean().backward()
    before = torch.get_rng_state()
    with pytest.raises(KeyboardInterrupt):
        run.opt.step()
    assert run.calls == 3  # two closure calls drew dropout masks
    assert torch.equal(torch.get_rng_state(), before)


def injected_in_sums(monkeypatch, after):
    """`HeldoutProbe._grad` (read per tensor in the sums) raises at its `after`-th call."""
    grad = HeldoutProbe._grad
    count = [0]

    def flaky(p, theta):
        count[0] += 1
        if count[0] == after:
            raise KeyboardInterrupt
        return grad(p, theta)

    monkeypatch.setattr(HeldoutProbe, "_grad", staticmethod(flaky))


class RaisingRouter:
    """The optimizer's Router, whose `regate` raises (after the Ledger has recorded the window)."""

    def __init__(self, router):
        self.router = router

    def __getattr__(self, name):
        if name == "regate":
            raise KeyboardInterrupt
        return getattr(self.router, name)


@pytest.mark.parametrize("where", ["sums", "regate"])
@pytest.mark.parametrize("case", list(CASES))
def test_exception_in_the_sums_or_the_ledger_update_undoes_the_measurement(monkeypatch, case, where):
    fft, ranks = CASES[case]
    run = Run(fft, ranks)
    for s in range(1, 2 * K):
        run.step(s)
    x, y = batch(2 * K)
    ((run.model(x) - y) ** 2).mean().backward()
    if where == "sums":
        injected_in_sums(monkeypatch, after=3)
    else:
        run.opt._router = RaisingRouter(run.opt._router)
    with pytest.raises(KeyboardInterrupt):
        run.opt.step()
    monkeypatch.undo()
    assert isinstance(run.opt.router, molf.Router)
    assert_as_before(run, run.snapshots[-1])
    run.opt.zero_grad()
    run.step(2 * K + 1)  # measures again
    assert run.probe.last_step == 2 * K + 1 and run.opt.ledger.heldout_windows == 1


def test_tensor_measured_before_its_first_gradient_leaves_no_state_behind():
    """The held-out state a measurement creates for a tensor without any (an expert that had
    no gradient yet) goes with the measurement."""
    torch.manual_seed(0)
    model = molf.wrap(Net(), molf.MoLFConfig(ranks=(2,), exclude_modules=("head",)))
    xh, yh = batch(99)
    calls = [0]

    def heldout():
        calls[0] += 1
        if calls[0] == 4:  # the gradient's call of the first measurement
            raise KeyboardInterrupt
        return ((model(xh) - yh) ** 2).mean()

    opt = molf.MoLFAdamW(model, lr=1e-2, routing=molf.Heldout(heldout, every=1))
    x, y = batch(1)

    def partial_loss():  # fc2 gets no gradient
        return ((model.head(torch.tanh(model.fc1(x))) - y) ** 2).mean()

    partial_loss().backward()
    fc2 = [p for n, p in model.named_parameters() if n.startswith("fc2.")]
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    assert all(p not in opt.state for p in fc2)
    opt.zero_grad()
    partial_loss().backward()
    opt.step()  # measures; fc2 gets its held-out state now, and no moments
    assert all(set(opt.state[p]) >= {"heldout_theta", "heldout_grad"} and "exp_avg" not in opt.state[p] for p in fc2)


def test_interrupt_inside_the_commit_completes_the_measurement(monkeypatch):
    """Past the commit point an interrupt finishes the measurement (the commit is idempotent):
    the run is bitwise the uninterrupted one."""
    commit = HeldoutProbe._commit
    hit = []

    def interrupted_once(self, *args):
        commit(self, *args)
        if not hit:
            hit.append(1)
            raise KeyboardInterrupt

    runs = []
    for interrupt in (True, False):
        run = Run(True, (2,))
        for s in range(1, 3 * K + 1):
            if interrupt and s == 2 * K:
                monkeypatch.setattr(HeldoutProbe, "_commit", interrupted_once)
                x, y = batch(s)
                ((run.model(x) - y) ** 2).mean().backward()
                with pytest.raises(KeyboardInterrupt):
                    run.opt.step()
                monkeypatch.undo()
                assert run.probe.last_step == s and all(p.grad is None for p in run.model.parameters())
                run.opt.zero_grad()
            else:
                run.step(s)
        runs.append(run)
    assert hit
    for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.equal(p, q)
    assert_same_state_dict(runs[0].opt.state_dict(), runs[1].opt.state_dict())
