"""`Heldout(offload=True)`: θ and the held-out gradient at the last measurement, the dense
experts' origin and a kept shrink trial's undo copy in pinned host memory on CUDA. Results
are bitwise those without it, however the sums stage the host copies; the copies stay on the
host through a checkpoint; an exception after a kept trial restores the weights from the
host copy; a training step's peak GPU memory is two copies of the routed tensors lower and
the measurement's about four dense weight copies. On the CPU the setting changes nothing
(the memory is the host's already)."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import molf
from molf import _window_sums
from molf.heldout import GRAD_KEY, ORIGIN_KEY, THETA_KEY

cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="offload moves copies between a GPU and pinned host memory: on a machine without CUDA it does nothing",
)

K = 3  # heldout_every


class Net(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1 = nn.Linear(8, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class Run:
    """A wrapped Net whose held-out loss every update raises (the distance from the untouched
    model's outputs), so shrink trials are kept, the dense one too."""

    def __init__(self, device, offload, width=16, rows=16, raise_in_backward_at=None, shrink_steps=None):
        torch.manual_seed(0)
        self.model = molf.wrap(Net(width), molf.MoLFConfig(ranks=(2,), exclude_modules=("head",))).to(device)
        with torch.no_grad():
            for _, layer in molf.routed_modules(self.model):
                for b in layer.lora_B:
                    b.normal_(0, 0.1)
        gen = torch.Generator().manual_seed(99)
        self.xh = torch.randn(rows, 8, generator=gen).to(device)
        with torch.no_grad():
            self.y0 = self.model(self.xh)
        self.device = device
        self.boom = raise_in_backward_at  # the measurement (1-based) whose gradient's backward raises
        self.measurements = 0
        self.opt = molf.MoLFAdamW(
            self.model,
            lr=1e-2,
            routing=molf.Heldout(self.heldout, every=K, min_span=0, offload=offload, shrink_steps=shrink_steps),
        )

    def heldout(self):
        out = self.model(self.xh)
        if torch.is_grad_enabled():  # the gradient's call
            self.measurements += 1
            if self.measurements == self.boom:
                out = _Boom.apply(out)
        return ((out - self.y0) ** 2).mean()

    def step(self, s):
        gen = torch.Generator().manual_seed(s)
        x, y = torch.randn(8, 8, generator=gen).to(self.device), torch.randn(8, 3, generator=gen).to(self.device)
        ((self.model(x) - y) ** 2).mean().backward()
        self.opt.step()
        self.opt.zero_grad()


class _Boom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise KeyboardInterrupt


def lockstep(a, b, steps):
    for s in steps:
        a.step(s)
        b.step(s)


def origins(opt):
    return [s[ORIGIN_KEY] for s in opt.state.values() if ORIGIN_KEY in s]


def copies(opt):
    """Every held-out copy in the optimizer's state."""
    return [s[k] for s in opt.state.values() for k in (THETA_KEY, GRAD_KEY, ORIGIN_KEY) if k in s]


def on_host(tensors):
    return bool(tensors) and all(t.device.type == "cpu" and t.is_pinned() for t in tensors)


def assert_same_run(a, b):
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n
    sa, sb = a.opt.state_dict(), b.opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]  # with the router's and ledger's bytes
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for k, t in sa["state"][i].items():
            assert torch.equal(t.cpu(), sb["state"][i][k].cpu()), (i, k)


def test_offload_must_be_a_bool():
    with pytest.raises(molf.ConfigError, match="offload"):
        molf.Heldout(lambda: None, offload="yes")


def test_on_the_cpu_offload_changes_nothing():
    a, b = Run("cpu", offload=False), Run("cpu", offload=True)
    lockstep(a, b, range(1, 4 * K + 1))
    assert a.opt.ledger.shrinks().sum() > 0
    assert_same_run(a, b)
    assert copies(b.opt) and all(not t.is_pinned() for t in copies(b.opt))


@cuda
@pytest.mark.parametrize(
    "stage_bytes,shrink_steps", [(_window_sums.STAGE_BYTES, None), (1, None), (_window_sums.STAGE_BYTES, 3)]
)
def test_offloaded_run_is_bitwise_the_same_and_keeps_its_copies_on_the_host(monkeypatch, stage_bytes, shrink_steps):
    # stage_bytes 1: the sums copy the host operands to the device one tensor at a time;
    # shrink_steps 3: every expert's trial repeated while kept, the dense one's from its
    # origin fetched once from the host.
    monkeypatch.setattr(_window_sums, "STAGE_BYTES", stage_bytes)
    a, b = (Run("cuda", offload=offload, shrink_steps=shrink_steps) for offload in (False, True))
    lockstep(a, b, range(1, 5 * K + 1))
    shrinks = b.opt.ledger.shrinks()
    assert shrinks[0] > 0 and shrinks[1] > 0  # dense and LoRA trials kept: their undo copies went to the host
    if shrink_steps:
        assert b.opt.ledger.shrink_trials()[0] > b.opt.ledger.heldout_windows + 1  # the dense trial repeated
    assert_same_run(a, b)
    assert copies(a.opt) and all(t.is_cuda for t in copies(a.opt))
    assert on_host(copies(b.opt)) and origins(b.opt)


@cuda
def test_a_state_dict_holds_the_complete_host_copies_at_once(monkeypatch):
    """A measurement's commit copies θ and the gradient to the host without a host wait; the
    state dict taken right after it holds the complete copies, although a slow kernel was
    queued before them (read at once, before anything else waits for the device)."""
    a, b = Run("cuda", offload=False), Run("cuda", offload=True)
    lockstep(a, b, range(1, 2 * K))
    copy = molf.heldout.copy_to_host

    def late(dst, src):
        torch.cuda._sleep(500_000_000)  # (some 0.3 s of device time before the copies start)
        return copy(dst, src)

    monkeypatch.setattr(molf.heldout, "copy_to_host", late)
    a.step(2 * K)
    b.step(2 * K)  # a measurement, committed last
    got = {i: {k: t.clone() for k, t in s.items()} for i, s in b.opt.state_dict()["state"].items()}
    want = a.opt.state_dict()["state"]
    assert got.keys() == want.keys()
    assert any(t.device.type == "cpu" and k == THETA_KEY for s in got.values() for k, t in s.items())
    for i, s in want.items():
        assert s.keys() == got[i].keys()
        for k, t in s.items():
            assert torch.equal(got[i][k].cpu(), t.cpu()), (i, k)


@cuda
def test_copies_return_to_the_host_after_a_load_and_the_run_continues_bitwise():
    a, b = Run("cuda", offload=True), Run("cuda", offload=True)
    lockstep(a, b, range(1, 2 * K + 1))
    sd = a.opt.state_dict()
    b.opt.load_state_dict(sd)  # torch moves state to each parameter's device first
    assert on_host(copies(b.opt)) and origins(b.opt)
    lockstep(a, b, range(2 * K + 1, 4 * K + 1))
    assert_same_run(a, b)


@cuda
def test_exception_after_a_kept_trial_restores_from_the_host_copy():
    plain, run = Run("cuda", offload=True), Run("cuda", offload=True, raise_in_backward_at=3)
    for s in range(1, 3 * K):
        plain.step(s)
        run.step(s)
    gen = torch.Generator().manual_seed(3 * K)
    x, y = torch.randn(8, 8, generator=gen).cuda(), torch.randn(8, 3, generator=gen).cuda()
    ((run.model(x) - y) ** 2).mean().backward()
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    shrinks = run.opt.ledger.shrinks().copy()
    run.opt._probe.measure = lambda source: None  # the update alone first
    run.opt.step()
    del run.opt._probe.measure
    updated = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    assert any(not torch.equal(updated[n], before[n]) for n in before)
    with pytest.raises(KeyboardInterrupt):
        run.opt._probe.measure(run.opt)
    for n, p in run.model.named_parameters():
        assert torch.equal(p, updated[n]), n  # a kept trial's shrink undone from its host copy
    assert (run.opt.ledger.shrinks() == shrinks).all()


@cuda
def test_peak_memory_of_a_measurement_is_two_dense_copies_lower():
    # fc2 is 16 MiB in float32, and the held-out batch's activations make the held-out
    # backward the measurement's peak (as a language model's do).
    width, rows, device = 2048, 8192, "cuda"

    def peak(offload):
        """The peak GPU memory of the first measurement after the first (which only
        remembers) that keeps the dense trial, and that measurement's step."""
        gc.collect()  # (a Run is a reference cycle: the previous one's tensors go now)
        base = torch.cuda.memory_allocated()
        run = Run(device, offload=offload, width=width, rows=rows)
        for s in range(1, 10 * K + 1):
            kept = run.opt.ledger.shrinks()[0]
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            run.step(s)
            if s > K and s % K == 0 and run.opt.ledger.shrinks()[0] > kept:
                return torch.cuda.max_memory_allocated() - base, s
        raise AssertionError("no measurement kept the dense trial")

    dense = sum(p.numel() * p.element_size() for n, p in Net(width).named_parameters() if not n.startswith("head"))
    (plain, at), (offloaded, at_offloaded) = peak(False), peak(True)
    assert at == at_offloaded  # the same measurement: the runs are bitwise alike
    # Neither θ nor the gradient at the last measurement, the origin or the kept trial's undo
    # copy is on the GPU at the held-out backward.
    assert plain - offloaded >= 3.5 * dense, (plain, offloaded, dense)


@cuda
def test_peak_memory_of_a_training_step_is_three_dense_copies_lower():
    """Between measurements the GPU holds none of the probe's copies: θ and the gradient at the
    last measurement and the origin (the training step's peak, with the backward's
    activations)."""
    width, device = 2048, "cuda"

    def peak(offload):
        gc.collect()
        base = torch.cuda.memory_allocated()
        run = Run(device, offload=offload, width=width)
        for s in range(1, 2 * K + 1):
            run.step(s)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run.step(2 * K + 1)  # no measurement
        return torch.cuda.max_memory_allocated() - base

    dense = sum(p.numel() * p.element_size() for n, p in Net(width).named_parameters() if not n.startswith("head"))
    plain, offloaded = peak(False), peak(True)
    assert plain - offloaded >= 2.9 * dense, (plain, offloaded, dense)


def test_the_sums_stage_host_operands_in_runs_within_the_budget():
    """`stage_runs`: items in order, runs of host operands (θ_prev, g_prev) within the budget,
    an item larger than the budget alone. (θ on the meta device stands for a GPU's.)"""

    def item(slot, n, hosted=(True, True)):
        prev, gprev = (torch.zeros(n) if h else torch.zeros(n, device="meta") for h in hosted)
        return (slot, torch.zeros(n, device="meta"), prev, torch.zeros(n, device="meta"), gprev, None)

    sizes = [4, 4, 10, 1, 1, 1, 2]  # float32: 8 bytes per element, both operands on the host
    items = [item(k, n) for k, n in enumerate(sizes)] + [item(7, 4, (True, False)), item(8, 4, (False, True))]
    runs = _window_sums.stage_runs(items, budget=32)
    assert [[it[0] for it in run] for run in runs] == [[0], [1], [2], [3, 4, 5], [6, 7], [8]]
    assert _window_sums.stage_runs([], budget=32) == []
