"""Policy heldout's rate adaptation (`molf.RateRule`): per (module, expert) a multiplier c of
the expert's learning rate, ×up (to cap) after a window whose movement lowered the held-out
loss, ×down after one that raised it. Checked in lockstep against the float64 reference of
tests/test_heldout.py (its AdamW at lr × c, written out there), on the foreach path and on the
fused path (Triton's interpreter on the CPU); resumed bitwise mid-run; its defaults and
settings; a ledger saved before it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import molf
from test_heldout import LOCKSTEP, Reference, assert_bitwise_equal, build, make_ckpt_run, mse, teacher_data, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _fused_module(monkeypatch):
    """`molf._fused` under Triton's interpreter (tests/conftest.py turns it on), with the
    smaller chunks the CPU tests use (see tests/test_fused.py)."""
    pytest.importorskip("triton")
    from molf import _fused

    monkeypatch.setattr(_fused, "CHUNK", 2048)
    return _fused


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
def test_lockstep_with_float64_reference_at_scaled_rates(case, path, lagged, monkeypatch):
    ranks, fft, lr, lora_lr, wd, lora_wd = LOCKSTEP[case]
    dims, wrapped, K, D, dwell, steps = (4, 8, 8, 2), ("0", "2"), 3, 0.7, 4, 60
    rule = molf.RateRule(up=1.5, down=0.5, cap=2.5)
    model = build(dims, wrapped, ranks, fft)
    hyper = dict(lr=lr, lora_lr=lora_lr, wd=wd, lora_wd=lora_wd)
    ref = Reference(model, dims, wrapped, ranks, fft, **hyper, every=K, decay=D, horizon=0.4, min_dwell=dwell,
                    min_span=0, shrink=0.1, rate=(rule.up, rule.down, rule.cap))  # fmt: skip
    train_data, (xh, yh) = teacher_data(dims, seed=0)
    opt = molf.MoLFAdamW(
        model,
        lr=lr,
        lora_lr=lora_lr,
        weight_decay=wd,
        lora_weight_decay=lora_wd,
        lagged=lagged,
        routing=molf.Heldout(lambda: mse(model, xh, yh), every=K, min_dwell=dwell, decay=D, horizon=0.4,
                             adapt_rate=rule),
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
    # Not vacuous: multipliers went up, hit the cap and went down, and experts were dropped
    # and brought back at those rates.
    assert max(seen) == rule.cap and min(seen) < 1 and any(1 < c < rule.cap for c in seen), sorted(seen)
    assert ref.drops >= 1 and ref.readmissions >= 1, (ref.drops, ref.readmissions)


def test_checkpoint_resume_is_bitwise_with_scaled_rates():
    fft, ranks, total, stop = True, (3,), 20, 11
    model, opt = make_ckpt_run(fft, ranks, adapt_rate=True)
    train(model, opt, range(1, total + 1))
    model_a, opt_a = make_ckpt_run(fft, ranks, adapt_rate=True)
    train(model_a, opt_a, range(1, stop + 1))
    rate = opt_a.ledger.heldout_rate()
    assert opt_a.ledger.heldout_adapt_rate and (rate != 1).any() and (rate > 1).any(), rate
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_b, opt_b = make_ckpt_run(fft, ranks, adapt_rate=True)
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


def test_a_changed_rate_setting_is_named_on_load():
    model, opt = make_ckpt_run(True, (3,), adapt_rate=True)
    train(model, opt, range(1, 6))
    _, other = make_ckpt_run(True, (3,), adapt_rate=molf.RateRule(cap=3.0))
    with pytest.warns(UserWarning, match=r"heldout_rate_cap 2\.0 / 3\.0"):
        other.load_state_dict(opt.state_dict())
    assert other.ledger.heldout_rate_cap == 2.0  # the checkpoint's, as every ledger setting


def _opt(fft, ranks, **kw):
    model, _ = make_ckpt_run(fft, ranks, heldout=False)
    return molf.MoLFAdamW(model, lr=1e-2, routing=molf.Heldout(lambda: torch.zeros((), requires_grad=True), **kw))


@pytest.mark.parametrize(
    "fft,ranks,adapt_rate,want",
    [
        (True, (3,), False, None),  # the default (off): dense + LoRA
        (False, (2, 4), False, None),  # and LoRA experts only
        (True, (3,), True, molf.RateRule()),
        (False, (2, 4), True, molf.RateRule()),
        (False, (2, 4), molf.RateRule(up=1.5, down=0.25, cap=4.0), molf.RateRule(up=1.5, down=0.25, cap=4.0)),
    ],
)
def test_defaults_and_settings(fft, ranks, adapt_rate, want):
    ledger = _opt(fft, ranks, adapt_rate=adapt_rate).ledger
    assert molf.Heldout(lambda: None).adapt_rate is False
    assert ledger.heldout_adapt_rate == (want is not None)
    got = molf.RateRule(ledger.heldout_rate_up, ledger.heldout_rate_down, ledger.heldout_rate_cap)
    assert got == (want or molf.RateRule())
    assert (ledger.heldout_rate() == 1).all()
    assert molf.RateRule() == molf.RateRule(up=1.1, down=0.5, cap=2.0)
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
    ],
)
def test_rate_rule_is_validated(kwargs, match):
    with pytest.raises(molf.ConfigError, match=match):
        molf.RateRule(**kwargs)


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
    assert (ledger.heldout_rate_up, ledger.heldout_rate_down, ledger.heldout_rate_cap) == (1.1, 0.5, 2.0)
    # Adapting changes nothing; written again it is version 2 and reads back the same.
    ledger.adapt_heldout_rate(np.array([[1.0, -1.0]]))
    assert ledger.heldout_rate().tolist() == [[1.0, 1.0]]
    again = ledger.to_bytes()
    assert again[5:7] == b"\x02\x00" and molf.Ledger.from_bytes(again) == ledger
