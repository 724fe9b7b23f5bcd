"""Policy heldout's rate adaptation (`molf.RateRule`): per (module, expert) a multiplier c of
the expert's learning rate, ×up (to cap) after a window whose movement lowered the held-out
loss by at least `trust` × its potential (what a first-order model of a step at its rate
predicted), ×down (to floor) after one that raised it. Checked in lockstep against the
float64 reference of tests/test_heldout.py (its AdamW at lr × c, written out there), on the
foreach path and on the fused path (Triton's interpreter on the CPU), with the default floor
(1) and trust (0.8), without the trust condition, and without either; resumed bitwise
mid-run; its defaults and settings; ledgers saved before it (version 1) and before its floor
and trust condition (version 2)."""

from __future__ import annotations

import base64
import io
import struct
import warnings

import numpy as np
import pytest
import torch

import molf
from test_core_serialisation import fnv1a64
from test_heldout import LOCKSTEP, Reference, assert_bitwise_equal, build, make_ckpt_run, mse, teacher_data, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _fused_module(monkeypatch):
    """`molf._fused` under Triton's interpreter (tests/conftest.py turns it on), with the
    smaller chunks the CPU tests use (see tests/test_fused.py)."""
    pytest.importorskip("triton")
    from molf import _fused

    monkeypatch.setattr(_fused, "CHUNK", 2048)
    return _fused


# The default rule (c never below the set rate, up only where trusted); without the trust
# condition; the rule as first run (neither: a version-2 ledger's).
@pytest.mark.parametrize("floor,trust", [(1.0, 0.8), (1.0, 0.0), (0.0, 0.0)])
@pytest.mark.parametrize(
    "case,path,lagged",
    [
        ("molf", "foreach", False),
        ("molf-decay", "foreach", False),  # weight decay: the decay factor 1 - lr·c·λ too
        ("molf-decay", "foreach", True),
        ("molf-decay", "fused", False),  # the device decides these steps (molf._device_routing)
        pytest.param("molf-decay", "fused", True, marks=pytest.mark.slow),  # winners applied in the moments pass
    ],
)
def test_lockstep_with_float64_reference_at_scaled_rates(case, path, lagged, floor, trust, monkeypatch):
    ranks, fft, lr, lora_lr, wd, lora_wd = LOCKSTEP[case]
    dims, wrapped, K, D, dwell, steps = (4, 8, 8, 2), ("0", "2"), 3, 0.7, 4, 60
    rule = molf.RateRule(up=1.5, down=0.5, cap=2.5, floor=floor, trust=trust)
    model = build(dims, wrapped, ranks, fft)
    hyper = dict(lr=lr, lora_lr=lora_lr, wd=wd, lora_wd=lora_wd)
    ref = Reference(model, dims, wrapped, ranks, fft, **hyper, every=K, decay=D, horizon=0.4, min_dwell=dwell,
                    min_span=0, shrink=0.1, shrink_steps=1,
                    rate=(rule.up, rule.down, rule.cap, rule.floor, rule.trust))  # fmt: skip
    train_data, (xh, yh) = teacher_data(dims, seed=0)
    opt = molf.MoLFAdamW(
        model,
        lr=lr,
        lora_lr=lora_lr,
        weight_decay=wd,
        lora_weight_decay=lora_wd,
        lagged=lagged,
        routing=molf.Heldout(lambda: mse(model, xh, yh), every=K, min_dwell=dwell, decay=D, horizon=0.4,
                             shrink=0.1, shrink_steps=1, adapt_rate=rule),
    )  # fmt: skip
    if path == "fused":
        opt._fused = _fused_module(monkeypatch)
    seen = set()
    for s in range(1, steps + 1):
        x, y = train_data[s % len(train_data)]
        mse(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        ref.step(lambda f, x=x, y=y: mse(f, x, y), lambda f: mse(f, xh, yh))
        # The multipliers follow the window's signs exactly: the same floats as the reference's.
        assert opt.ledger.heldout_rate().tolist() == ref.c, f"step {s}"
        assert opt.router.incumbents().tolist() == ref.active, f"step {s}: active set"
        for k in ref.trainable:
            scale = float(ref.P[k].abs().max())
            torch.testing.assert_close(
                ref.molf_param(model, k).detach(), ref.P[k], rtol=1e-9, atol=1e-10 * scale,
                msg=lambda m, s=s, k=k: f"step {s} {k}: {m}",
            )  # fmt: skip
        seen.update(np.unique(opt.ledger.heldout_rate()).tolist())
    # Not vacuous: multipliers went up, hit the cap and went down (with the floor at 1, to it
    # and no further: it held some above c·down; without one, below 1), and experts were
    # dropped and brought back at those rates.
    assert max(seen) == rule.cap and any(1 < c < rule.cap for c in seen), sorted(seen)
    if floor == 1:
        assert min(seen) == 1 and ref.floored >= 1, (sorted(seen), ref.floored)
    else:
        assert min(seen) < 1, sorted(seen)
    # With the trust condition some windows of descent fell short of it and left c as it was
    # (a product that ignored the condition would have raised c there and left the reference).
    assert (ref.untrusted >= 1) == (trust > 0), ref.untrusted
    assert ref.drops >= 1 and ref.readmissions >= 1, (ref.drops, ref.readmissions)


def _saved(model, opt) -> dict:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("adapt_rate", [True, molf.RateRule(floor=0.0, trust=0.0)])
def test_checkpoint_resume_is_bitwise_with_scaled_rates(adapt_rate):
    fft, ranks, total, stop = True, (3,), 20, 11
    model, opt = make_ckpt_run(fft, ranks, adapt_rate=adapt_rate)
    train(model, opt, range(1, total + 1))
    model_a, opt_a = make_ckpt_run(fft, ranks, adapt_rate=adapt_rate)
    train(model_a, opt_a, range(1, stop + 1))
    rate = opt_a.ledger.heldout_rate()
    assert opt_a.ledger.heldout_adapt_rate and (rate != 1).any() and (rate > 1).any(), rate
    ckpt = _saved(model_a, opt_a)
    model_b, opt_b = make_ckpt_run(fft, ranks, adapt_rate=adapt_rate)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    assert np.array_equal(opt_b.ledger.heldout_rate(), rate)
    train(model_b, opt_b, range(stop + 1, total + 1))
    assert_bitwise_equal(model, model_b)
    assert opt.ledger.to_bytes() == opt_b.ledger.to_bytes()
    assert opt.router.to_bytes() == opt_b.router.to_bytes()
    # The run without the adaptation is another run.
    model_c, opt_c = make_ckpt_run(fft, ranks, adapt_rate=False)
    train(model_c, opt_c, range(1, total + 1))
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), model_c.parameters()))


@pytest.mark.parametrize(
    "live,match,name,saved",
    [
        (molf.RateRule(cap=3.0), r"heldout_rate_cap 2\.0 / 3\.0", "heldout_rate_cap", 2.0),
        (molf.RateRule(floor=0.0), r"heldout_rate_floor 1\.0 / 0\.0", "heldout_rate_floor", 1.0),
        (molf.RateRule(trust=0.5), r"heldout_rate_trust 0\.8 / 0\.5", "heldout_rate_trust", 0.8),
    ],
)
def test_a_changed_rate_setting_is_named_on_load(live, match, name, saved):
    model, opt = make_ckpt_run(True, (3,), adapt_rate=True)
    train(model, opt, range(1, 6))
    _, other = make_ckpt_run(True, (3,), adapt_rate=live)
    with pytest.warns(UserWarning, match=match):
        other.load_state_dict(opt.state_dict())
    assert getattr(other.ledger, name) == saved  # the checkpoint's, as every ledger setting


def as_version_2(blob: bytes, entries: int, experts: int) -> bytes:
    """A ledger with one shrink fraction and one trial per measurement for all `experts` as
    the version before the floor and the trust condition wrote it: the same bytes without
    rate_floor and rate_trust (16 bytes before the `entries` multipliers), with the shrink
    once and without the shrink steps (before the shrink books, the spectral flag, the
    minimum span and the rate rule), under a version-2 header."""
    payload = blob[15:-8]
    at = len(payload) - 8 * entries - 16
    payload = payload[:at] + payload[at + 16 :]
    at = len(payload) - 8 * entries - 25 - 8 - 1 - 16 * experts - 16 * experts
    assert len(set(payload[at + 8 * e : at + 8 * e + 8] for e in range(experts))) == 1, "one shrink for all"
    steps = payload[at + 8 * experts : at + 16 * experts]
    assert steps == struct.pack(f"<{experts}Q", *[1] * experts), "one trial each"
    payload = payload[: at + 8] + payload[at + 16 * experts :]
    body = blob[:4] + struct.pack("<BHQ", 2, 2, len(payload)) + payload
    return body + struct.pack("<Q", fnv1a64(body))


@pytest.mark.parametrize("live", [molf.RateRule(floor=0.0, trust=0.0), molf.RateRule()])
def test_a_checkpoint_from_before_the_floor_resumes_as_it_ran(live):
    # Saved by a version before the floor and the trust condition (a version-2 ledger: the
    # rule without either, c below 1 here): it resumes without them, bitwise as the run would
    # have gone on, under the rule given now too (that one's floor and trust are named, the
    # checkpoint's are used).
    # (One shrink fraction and one trial per measurement for every expert: what a version-2
    # ledger has.)
    fft, ranks, total, stop, rule = True, (3,), 20, 11, molf.RateRule(floor=0.0, trust=0.0)
    before = dict(shrink=0.1, shrink_steps=1)
    model, opt = make_ckpt_run(fft, ranks, adapt_rate=rule, **before)
    train(model, opt, range(1, total + 1))
    model_a, opt_a = make_ckpt_run(fft, ranks, adapt_rate=rule, **before)
    train(model_a, opt_a, range(1, stop + 1))
    rate = opt_a.ledger.heldout_rate()
    assert (rate < 1).any(), rate  # the state a floor of 1 could not reach
    ckpt = _saved(model_a, opt_a)
    meta = next(g["molf_meta"] for g in ckpt["opt"]["param_groups"] if "molf_meta" in g)
    old = as_version_2(base64.b64decode(meta["ledger"]), rate.size, rate.shape[1])
    meta["ledger"] = base64.b64encode(old).decode("ascii")
    model_b, opt_b = make_ckpt_run(fft, ranks, adapt_rate=live, **before)
    model_b.load_state_dict(ckpt["model"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt_b.load_state_dict(ckpt["opt"])
    for name, saved in (("floor", 0.0), ("trust", 0.0)):
        named = [str(w.message) for w in caught if f"heldout_rate_{name} 0.0 / {getattr(live, name)}" in str(w.message)]
        assert len(named) == (getattr(live, name) != saved), [str(w.message) for w in caught]
    assert (opt_b.ledger.heldout_rate_floor, opt_b.ledger.heldout_rate_trust) == (0.0, 0.0)
    assert np.array_equal(opt_b.ledger.heldout_rate(), rate)
    train(model_b, opt_b, range(stop + 1, total + 1))
    assert_bitwise_equal(model, model_b)
    assert opt.ledger.to_bytes() == opt_b.ledger.to_bytes()


def rate_settings(ledger) -> tuple:
    """A ledger's rate rule settings: (up, down, cap, floor, trust)."""
    return (
        ledger.heldout_rate_up,
        ledger.heldout_rate_down,
        ledger.heldout_rate_cap,
        ledger.heldout_rate_floor,
        ledger.heldout_rate_trust,
    )


def _opt(fft, ranks, **kw):
    model, _ = make_ckpt_run(fft, ranks, heldout=False)
    return molf.MoLFAdamW(model, lr=1e-2, routing=molf.Heldout(lambda: torch.zeros((), requires_grad=True), **kw))


@pytest.mark.parametrize(
    "fft,ranks,adapt_rate,want",
    [
        (True, (3,), None, molf.RateRule()),  # the default (on): dense + LoRA
        (False, (2, 4), None, molf.RateRule()),  # and LoRA experts only
        (True, (3,), False, None),  # off: dense + LoRA
        (False, (2, 4), False, None),  # and LoRA experts only
        (True, (3,), True, molf.RateRule()),
        (False, (2, 4), True, molf.RateRule()),
        (False, (2, 4), molf.RateRule(up=1.5, down=0.25, cap=4.0), molf.RateRule(up=1.5, down=0.25, cap=4.0)),
        (True, (3,), molf.RateRule(floor=0.25), molf.RateRule(floor=0.25)),
        (False, (2, 4), molf.RateRule(trust=0.0), molf.RateRule(trust=0.0)),
        (True, (3,), molf.RateRule(trust=1.5), molf.RateRule(trust=1.5)),
    ],
)
def test_defaults_and_settings(fft, ranks, adapt_rate, want):
    ledger = _opt(fft, ranks, **({} if adapt_rate is None else dict(adapt_rate=adapt_rate))).ledger
    assert molf.Heldout(lambda: None).adapt_rate is True
    assert ledger.heldout_adapt_rate == (want is not None)
    got = molf.RateRule(*rate_settings(ledger))
    assert got == (want or molf.RateRule())
    assert (ledger.heldout_rate() == 1).all()
    # The default rule: ×1.1 up to 2× where the descent reached 0.8 × the potential, ×0.5
    # down to the set rate (c never below 1).
    assert molf.RateRule() == molf.RateRule(up=1.1, down=0.5, cap=2.0, floor=1.0, trust=0.8)
    assert molf.Heldout(lambda: None, adapt_rate=True).rate_rule() == molf.RateRule()
    # Other policies keep it off.
    assert not molf.MoLFAdamW(make_ckpt_run(fft, ranks, heldout=False)[0]).ledger.heldout_adapt_rate


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(up=0.9), "heldout_rate_up"),
        (dict(up=float("inf")), "heldout_rate_up"),
        (dict(down=0.0), "heldout_rate_down"),
        (dict(down=1.5), "heldout_rate_down"),
        (dict(down=float("nan")), "heldout_rate_down"),
        (dict(cap=0.5), "heldout_rate_cap"),
        (dict(floor=-0.1), "heldout_rate_floor"),
        (dict(floor=1.5), "heldout_rate_floor"),
        (dict(floor=float("nan")), "heldout_rate_floor"),
        (dict(floor=float("inf")), "heldout_rate_floor"),
        (dict(trust=-0.1), "heldout_rate_trust"),
        (dict(trust=float("nan")), "heldout_rate_trust"),
        (dict(trust=float("inf")), "heldout_rate_trust"),
    ],
)
def test_rate_rule_is_validated(kwargs, match):
    with pytest.raises(molf.ConfigError, match=match):
        molf.RateRule(**kwargs)
    settings = molf.RateRule().ledger_settings(adapt=True) | {f"heldout_rate_{k}": v for k, v in kwargs.items()}
    with pytest.raises(molf.ConfigError, match=match):
        molf.Ledger(1, 2, **settings)


def test_a_descent_short_of_the_trust_condition_keeps_the_rate():
    # Up 1.5, cap 3, trust 0.8 (the Ledger's own rule, through the binding): per expert the
    # window's realized descent x and its potential p (the first-order descent of one step at
    # its current rate). c goes up only where x >= 0.8·p with p finite and > 0.
    x = np.array([[0.8, 0.79, 0.5, 0.5, 0.5, -0.5]])
    p = np.array([[1.0, 1.0, 0.0, np.nan, np.inf, 1.0]])
    moved = np.ones(x.shape, dtype=bool)
    rule = dict(heldout_adapt_rate=True, heldout_rate_up=1.5, heldout_rate_cap=3.0, heldout_rate_floor=0.0)
    ledger = molf.Ledger(1, 6, **rule)
    assert ledger.heldout_rate_trust == 0.8  # the default
    ledger.record_heldout(x, moved)
    ledger.adapt_heldout_rate(x, p)
    assert ledger.heldout_rate().tolist() == [[1.5, 1.0, 1.0, 1.0, 1.0, 0.5]]
    # Without the condition (trust 0) every descent raises c, whatever the potential.
    free = molf.Ledger(1, 6, heldout_rate_trust=0.0, **rule)
    free.record_heldout(x, moved)
    free.adapt_heldout_rate(x, p)
    assert free.heldout_rate().tolist() == [[1.5, 1.5, 1.5, 1.5, 1.5, 0.5]]
    # The potential is checked as the descent is; a bad one changes nothing.
    for bad in (p[:, :5], p.astype(np.float32), p.tolist()):
        with pytest.raises(molf.ScoreError, match="potential"):
            ledger.adapt_heldout_rate(x, bad)
    assert ledger.heldout_rate().tolist() == [[1.5, 1.0, 1.0, 1.0, 1.0, 0.5]]


@pytest.mark.parametrize("bad", [1.2, "on", (1.2, 0.5, 3.0), None])
def test_adapt_rate_takes_a_rule_or_a_bool(bad):
    with pytest.raises(molf.ConfigError, match="adapt_rate"):
        molf.Heldout(lambda: None, adapt_rate=bad)


# A version-1 ledger, as molf wrote it before the rate adaptation (the bytes of the Rust test
# serial::tests::LEDGER_V1: 1 module x 2 experts, two steps, two held-out windows).
LEDGER_V1 = bytes.fromhex(
    "4d4f4c46020100db0000000000000001000000000000000200000000000000000000000000e03f0200"
    "00000000000032bbf1cd19142f340000000000000840000000000000f03f0000000000000040000000"
    "000000f83f020000000000000001000000000000000100000000000000010000000000000000000000"
    "000000000100000000000000e03f0200000000000000000000000000e83f000000000000d0bf000000"
    "000000d03f020000000000000000000000000000009a9999999999b93f000000000000000000000000"
    "0000000000000000000000000000000000000000010000000000000000c834de2aeba7d316"
)


def test_a_version_1_ledger_loads_with_the_adaptation_off():
    ledger = molf.Ledger.from_bytes(LEDGER_V1)
    assert (ledger.step, ledger.heldout_windows) == (2, 2)
    assert ledger.heldout_ema().tolist() == [[0.75, -0.25]]
    assert not ledger.heldout_adapt_rate and ledger.heldout_rate().tolist() == [[1.0, 1.0]]
    settings = rate_settings(ledger)
    assert settings == (1.1, 0.5, 2.0, 1.0, 0.8)  # the defaults (floor and trust have no effect while off)
    # Adapting changes nothing; written again it is version 4 and reads back the same.
    ledger.adapt_heldout_rate(np.array([[1.0, -1.0]]), np.array([[1.0, 1.0]]))
    assert ledger.heldout_rate().tolist() == [[1.0, 1.0]]
    again = ledger.to_bytes()
    assert again[5:7] == b"\x04\x00" and molf.Ledger.from_bytes(again) == ledger


# A version-2 ledger, as molf wrote it before the floor (the bytes of the Rust test
# serial::tests::LEDGER_V2: 1 module x 3 experts, the adaptation on at up 1.25, down 0.5,
# cap 2; held-out windows [1, -1, 0] and [1, -1, 0.5]).
LEDGER_V2 = bytes.fromhex(
    "4d4f4c46020200450100000000000001000000000000000300000000000000000000000000e03f0100"
    "000000000000c443575b1629a376000000000000f03f00000000000000400000000000000840000000"
    "000000f03f000000000000004000000000000008400000000000000000000000000000000001000000"
    "000000000000000000000000ffffffffffffffff0000000000000000000001000000000000e03f0200"
    "000000000000000000000000f03f000000000000f0bf000000000000e03f000000000000d03f020000"
    "0000000000020000000000000001000000000000009a9999999999b93f000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000100000000"
    "0000000001000000000000f43f000000000000e03f0000000000000040000000000000f93f00000000"
    "0000d03f000000000000f43f2fd1c843dc207906"
)


def test_a_version_2_ledger_loads_without_a_floor_or_trust():
    ledger = molf.Ledger.from_bytes(LEDGER_V2)
    assert ledger.heldout_adapt_rate and ledger.heldout_rate().tolist() == [[1.5625, 0.25, 1.25]]
    settings = rate_settings(ledger)
    assert settings == (1.25, 0.5, 2.0, 0.0, 0.0)  # the rule it ran under
    # It goes on as it ran: halved below 1, no floor; up on any descent, whatever the potential.
    descent = np.array([[-1.0, -1.0, 1e-9]])
    ledger.record_heldout(descent, np.ones((1, 3), dtype=bool))
    ledger.adapt_heldout_rate(descent, np.array([[1.0, 1.0, np.nan]]))
    assert ledger.heldout_rate().tolist() == [[0.78125, 0.125, 1.5625]]
    again = ledger.to_bytes()
    assert again[5:7] == b"\x04\x00" and molf.Ledger.from_bytes(again) == ledger
