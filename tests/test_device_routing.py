"""Steps the device decides (molf._device_routing): its scores are bitwise the host's, its
rules give the router's winners, and whole runs equal runs the host decided — weights,
moments, router, ledger, routing log, skipped steps — on the CPU through Triton's
interpreter (or on a GPU where one is present)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # (tests/conftest.py sets it for the whole run)
pytest.importorskip("triton")

import molf  # noqa: E402
from molf import _fused, _fused_path  # noqa: E402
from molf._device_routing import DeviceDecision  # noqa: E402
from molf._score_sources import _ScoreSources  # noqa: E402
from molf.testing import step_sequences  # noqa: E402

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SPECIAL = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-300, 5e-324, 1e300, 3.0, 3.0, -2.5]


@st.composite
def score_sums(draw):
    """Per-tensor sums, their slots (0, 1 or 2 tensors per slot), learning rates, numels."""
    M, E = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    per_slot = draw(st.lists(st.integers(0, 2), min_size=M * E, max_size=M * E))
    slots = np.repeat(np.arange(M * E), per_slot)
    order = draw(st.permutations(range(len(slots))))
    slots = slots[list(order)] if len(slots) else slots
    value = st.one_of(st.sampled_from(SPECIAL), st.floats(allow_nan=True, allow_infinity=True, width=64))
    sums = np.array(draw(st.lists(value, min_size=len(slots), max_size=len(slots))), dtype=np.float64)
    lrs = np.array(
        draw(st.lists(st.sampled_from([1e-3, 2e-5, 0.0, 1.0, 3e-7]), min_size=len(slots), max_size=len(slots)))
    )
    numels = np.array(draw(st.lists(st.integers(1, 10**7), min_size=len(slots), max_size=len(slots))), dtype=np.int64)
    return M, E, slots, sums, lrs, numels


def host_scores(M, E, slots, sums, lrs, numels, score):
    sources = _ScoreSources(None)
    sources.add(torch.from_numpy(sums), slots.tolist(), lrs.tolist(), numels.tolist())
    return sources.resolve((M, E), score).reshape(-1)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal to the bit, NaN payloads aside."""
    nan = np.isnan(a)
    return bool((nan == np.isnan(b)).all() and (a[~nan].view(np.int64) == b[~nan].view(np.int64)).all())


@given(score_sums(), st.sampled_from(["epd", "pfn"]))
def test_device_scores_are_bitwise_the_hosts(case, score):
    M, E, slots, sums, lrs, numels = case
    if score == "pfn":
        sums = np.abs(sums)  # PFN's numerators are sums of squares
    decision = DeviceDecision(slots, numels, M * E, torch.device(DEVICE))
    got = decision.scores(torch.from_numpy(sums).to(DEVICE), torch.from_numpy(lrs).to(DEVICE), score)
    got, want = got.cpu().numpy(), host_scores(M, E, slots, sums, lrs, numels, score)
    if score == "pfn" and DEVICE == "cpu":
        # torch's vectorized CPU sqrt (SLEEF, 0.5001 ulp) is not correctly rounded, CUDA's
        # is: on the CPU, the interpreter's test vehicle, √num may be an ulp off numpy's (√numel
        # is numpy's), a relative error of at most 2^-52, so the quotient up to two ulps
        # (Hypothesis found two: sums 2.36e15 over 38,987 elements).
        assert np.array_equal(np.isnan(got), np.isnan(want))
        finite = np.isfinite(want)
        assert np.array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)])
        assert (np.abs(got[finite] - want[finite]) <= 2 * np.spacing(np.abs(want[finite]))).all()
        return
    assert same_bits(got, want)


def test_more_than_two_tensors_per_slot_is_left_to_the_host():
    assert DeviceDecision.applies(np.array([0, 1, 1, 0]), 2)
    assert not DeviceDecision.applies(np.array([0, 1, 1, 1]), 2)


@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 2), st.sampled_from(["topk", "heldout"]), st.data())
def test_forecast_rules_give_the_routers_winners(M, E, warmup, policy, data):
    steps = data.draw(step_sequences((M, E), dtype=np.float64, max_steps=6))
    router = molf.Router(M, E, policy=policy, warmup_steps=warmup)
    slots = np.arange(M * E)
    decision = DeviceDecision(slots, np.ones(M * E, dtype=np.int64), M * E, torch.device(DEVICE))
    for scores in steps:
        rule = router.forecast()
        assert rule is not None
        won = decision.winners(torch.from_numpy(scores.reshape(-1)).to(DEVICE), rule, E).cpu().numpy()
        routed = router.route(scores)
        assert np.array_equal(routed.reshape(-1), won), (rule, scores)
        if policy == "heldout" and data.draw(st.booleans()):
            router.regate(scores, -scores)


def test_a_disagreement_is_an_internal_error():
    DeviceDecision.check(np.array([[True, False]]), np.array([True, False]))
    with pytest.raises(molf.InternalError, match="slots \\[1\\]"):
        DeviceDecision.check(np.array([[True, False]]), np.array([True, True]))


# ------------------------------------------------------------------- whole runs


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 8)
        self.fc2 = torch.nn.Linear(8, 8, bias=False)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def routing_for(kind, heldout):
    return {
        "topk": molf.TopK(),
        "topk-warmup-freeze": molf.TopK(warmup_steps=2, freeze_after=6),
        "topk-all": molf.TopK(k=2),
        "hysteresis": molf.Hysteresis(min_dwell=2),
        "heldout": molf.Heldout(heldout, every=3),
        "topk-keep-nonfinite": molf.TopK(),
    }[kind]


def run(kind, device_decides, tmp_path, steps=9, nan_at=5):
    torch.manual_seed(0)
    model = molf.wrap(Net(), molf.MoLFConfig(ranks=(2,), exclude_modules=("head",))).to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    val = torch.randn(8, 6, generator=gen).to(DEVICE)

    def heldout():
        return model(val).pow(2).mean()

    log = tmp_path / f"{kind}-{device_decides}.jsonl"
    opt = molf.MoLFAdamW(
        model,
        lr=3e-2,
        routing=routing_for(kind, heldout),
        log=molf.LogSettings(log, format="full"),
        skip_nonfinite=kind != "topk-keep-nonfinite",
    )
    opt._fused = _fused
    decided = []
    if not device_decides:
        opt._device_rule = lambda plan: None
    else:
        real = _fused_path.fused_device_step

        def counting(*args, **kw):
            decided.append(True)
            return real(*args, **kw)

        opt_step_globals = molf.optimizer.__dict__
        opt_step_globals["fused_device_step"] = counting
    try:
        for s in range(steps):
            x = torch.randn(16, 6, generator=gen).to(DEVICE)
            model(x).pow(2).mean().backward()
            if s == nan_at:
                model.fc1.lora_B[0].grad.view(-1)[0] = float("nan")
            opt.step()
            opt.zero_grad()
        sd = opt.state_dict()
    finally:
        if device_decides:
            opt_step_globals["fused_device_step"] = real
    params = [p.detach().cpu().clone() for p in model.parameters()]
    moments = [(s["exp_avg"].cpu(), s["exp_avg_sq"].cpu(), float(s["step"])) for s in opt.state.values()]
    summary = opt.routing_summary()
    return dict(
        params=params,
        moments=moments,
        router=opt.router.to_bytes(),
        ledger=opt.ledger.to_bytes(),
        skipped=summary.skipped_steps,
        log=log.read_text(),
        meta=sd["param_groups"][0]["molf_meta"] if "molf_meta" in sd["param_groups"][0] else None,
        decided=len(decided),
    )


@pytest.mark.usefixtures("interpreter_chunks")
@pytest.mark.parametrize(
    "kind", ["topk", "topk-warmup-freeze", "topk-all", "hysteresis", "heldout", "topk-keep-nonfinite"]
)
def test_device_decided_runs_equal_host_decided_runs(kind, tmp_path):
    host = run(kind, False, tmp_path)
    dev = run(kind, True, tmp_path)
    # Every step but the first (its booking tells torch.distributed.checkpoint's state-init
    # step apart) where a rule exists; hysteresis has none.
    assert dev["decided"] == (0 if kind == "hysteresis" else 8)
    same = dict(rtol=0, atol=0, equal_nan=True)  # (kept non-finite gradients leave NaN moments)
    for a, b in zip(host["params"], dev["params"]):
        torch.testing.assert_close(a, b, **same)
    for (m1, v1, t1), (m2, v2, t2) in zip(host["moments"], dev["moments"]):
        torch.testing.assert_close(m1, m2, **same)
        torch.testing.assert_close(v1, v2, **same)
        assert t1 == t2
    for key in ("router", "ledger", "skipped", "log", "meta"):
        assert host[key] == dev[key], key
    assert dev["skipped"] == (0 if kind == "topk-keep-nonfinite" else 1)


@pytest.fixture
def interpreter_chunks(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setattr(_fused, "CHUNK", 2048)
