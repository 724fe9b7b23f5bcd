"""The versioned byte format of Router and Ledger: exact round trips; truncated, tampered,
wrong-kind, wrong-magic and wrong-version blobs raise StateError.

Layout (little-endian): b"MOLF" | kind u8 (1 router, 2 ledger) | version u16 | payload
length u64 | payload | FNV-1a-64 of everything before, u64.
"""

from __future__ import annotations

import copy
import pickle
import struct

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

import molf._core as core
from molf.testing import routing_runs

HEADER = 15


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def reseal(blob: bytes) -> bytes:
    """Recomputes the trailing checksum, so the change behind it is what gets tested."""
    body = blob[:-8]
    return body + struct.pack("<Q", fnv1a64(body))


@st.composite
def states(draw):
    """A router and a ledger that have seen a random run, plus the rest of the run."""
    config, steps = draw(routing_runs(max_steps=10))
    decay = draw(st.floats(0.0, 0.99))
    cut = draw(st.integers(0, len(steps)))
    router = core.Router(**config)
    ledger = core.Ledger(config["num_modules"], config["num_experts"], ema_decay=decay)
    for scores in steps[:cut]:
        ledger.record(scores, router.route(scores))
    note(f"config={config} decay={decay} after {cut} steps")
    return router, ledger, steps[cut:]


def test_envelope_layout():
    blob = core.Router(2, 3).to_bytes()
    magic, kind, version, length = struct.unpack_from("<4sBHQ", blob)
    assert (magic, kind, version) == (b"MOLF", 1, 1)
    assert length == len(blob) - HEADER - 8
    assert struct.unpack("<Q", blob[-8:])[0] == fnv1a64(blob[:-8])
    assert core.Ledger(2, 3).to_bytes()[4] == 2  # kind: ledger


@given(states())
def test_round_trips_are_exact(state):
    router, ledger, rest = state
    rb, lb = router.to_bytes(), ledger.to_bytes()
    assert isinstance(rb, bytes) and isinstance(lb, bytes)
    r2, l2 = core.Router.from_bytes(rb), core.Ledger.from_bytes(lb)
    assert r2 == router and l2 == ledger
    assert r2.to_bytes() == rb and l2.to_bytes() == lb
    assert r2.config() == router.config() and r2.step == router.step
    assert np.array_equal(r2.incumbents(), router.incumbents())
    for name in ("last_scores", "ema"):
        assert np.array_equal(getattr(l2, name)().view(np.uint64), getattr(ledger, name)().view(np.uint64))
    assert l2.summary() == ledger.summary()
    # Identical future decisions and bookkeeping.
    for scores in rest:
        m1, m2 = router.route(scores), r2.route(scores)
        assert np.array_equal(m1, m2)
        ledger.record(scores, m1)
        l2.record(scores, m2)
    assert r2 == router and l2 == ledger and l2.checksum == ledger.checksum


@given(states())
def test_pickle_and_deepcopy_round_trip(state):
    router, ledger, _ = state
    for obj in (router, ledger):
        assert pickle.loads(pickle.dumps(obj)) == obj
        assert copy.deepcopy(obj) == obj


@given(states(), st.data())
def test_truncated_blobs_raise_state_error(state, data):
    router, ledger, _ = state
    for cls, blob in ((core.Router, router.to_bytes()), (core.Ledger, ledger.to_bytes())):
        cut = data.draw(st.integers(0, len(blob) - 1), label="cut")
        with pytest.raises(core.StateError):
            cls.from_bytes(blob[:cut])
        with pytest.raises(core.StateError):
            cls.from_bytes(blob + b"\x00")


def test_every_truncation_and_every_bit_flip_is_rejected():
    router = core.Router(3, 2, topk=1, policy="hysteresis", margin=0.1, min_dwell=1, warmup_steps=1, freeze_after=4)
    ledger = core.Ledger(3, 2)
    rng = np.random.default_rng(1)
    for _ in range(3):
        scores = rng.standard_normal((3, 2))
        ledger.record(scores, router.route(scores))
    for cls, blob in ((core.Router, router.to_bytes()), (core.Ledger, ledger.to_bytes())):
        for cut in range(len(blob)):
            with pytest.raises(core.StateError):
                cls.from_bytes(blob[:cut])
        for i in range(len(blob)):
            for bit in range(8):
                bad = bytearray(blob)
                bad[i] ^= 1 << bit
                with pytest.raises(core.StateError):
                    cls.from_bytes(bytes(bad))


@given(states(), st.data())
def test_bit_flips_raise_state_error(state, data):
    router, ledger, _ = state
    for cls, blob in ((core.Router, router.to_bytes()), (core.Ledger, ledger.to_bytes())):
        i = data.draw(st.integers(0, len(blob) - 1), label="byte")
        bit = data.draw(st.integers(0, 7), label="bit")
        bad = bytearray(blob)
        bad[i] ^= 1 << bit
        with pytest.raises(core.StateError):
            cls.from_bytes(bytes(bad))


@given(states())
def test_wrong_kind_raises_state_error(state):
    router, ledger, _ = state
    with pytest.raises(core.StateError, match="is a router"):
        core.Ledger.from_bytes(router.to_bytes())
    with pytest.raises(core.StateError, match="is a ledger"):
        core.Router.from_bytes(ledger.to_bytes())
    # Even with a consistent checksum, a changed kind byte is caught.
    blob = bytearray(router.to_bytes())
    blob[4] = 7
    with pytest.raises(core.StateError, match="unknown kind"):
        core.Router.from_bytes(reseal(bytes(blob)))


@given(states(), st.integers(0, 0xFFFF).filter(lambda v: v not in (1, 2, 3, 4)))  # the supported versions
def test_wrong_version_raises_state_error(state, version):
    router, ledger, _ = state
    # A router is read in version 1, a ledger in 1 to 4 (written as 4).
    assert ledger.to_bytes()[5:7] == struct.pack("<H", 4)
    for cls, obj, supported in ((core.Router, router, r"\[1\]"), (core.Ledger, ledger, r"\[1, 2, 3, 4\]")):
        for v in (version, 2) if cls is core.Router else (version,):
            blob = bytearray(obj.to_bytes())
            blob[5:7] = struct.pack("<H", v)
            with pytest.raises(core.StateError, match=rf"version {v}\b.*supported versions: {supported}"):
                cls.from_bytes(reseal(bytes(blob)))


def test_rate_rule_round_trips_and_a_bad_trust_is_rejected():
    # The rate adaptation ends the ledger payload: flag, up, down, cap, floor, trust, then the
    # multipliers (M·E f64), before the checksum.
    ledger = core.Ledger(1, 2, heldout_adapt_rate=True, heldout_rate_up=1.25, heldout_rate_floor=0.5)
    descent = np.array([[1.0, 1.0]])
    ledger.record_heldout(descent, np.ones((1, 2), dtype=bool))
    ledger.adapt_heldout_rate(descent, np.array([[1.25, 1.5]]))  # 1 >= 0.8·1.25, not 0.8·1.5
    assert ledger.heldout_rate().tolist() == [[1.25, 1.0]]
    blob = ledger.to_bytes()
    assert struct.unpack_from("<B5d2d", blob, len(blob) - 8 - 57) == (1, 1.25, 0.5, 2.0, 0.5, 0.8, 1.25, 1.0)
    back = core.Ledger.from_bytes(blob)
    assert back == ledger and back.heldout_rate_trust == 0.8 and back.to_bytes() == blob
    at = len(blob) - 8 - 24  # the trust, before 2 multipliers
    for trust in (-0.5, float("nan"), float("inf")):
        bad = blob[:at] + struct.pack("<d", trust) + blob[at + 8 :]
        with pytest.raises(core.StateError, match="heldout_rate_trust"):
            core.Ledger.from_bytes(reseal(bad))
    bad = blob[:at] + struct.pack("<d", 0.0) + blob[at + 8 :]
    assert core.Ledger.from_bytes(reseal(bad)).heldout_rate_trust == 0.0


def test_wrong_magic_raises_state_error():
    blob = bytearray(core.Router(1, 1).to_bytes())
    blob[:4] = b"MOLG"
    with pytest.raises(core.StateError, match="magic"):
        core.Router.from_bytes(reseal(bytes(blob)))


@pytest.mark.parametrize("data", [b"", b"MOLF", b"\x00" * 64, b"MOLF\x01\x01\x00" + b"\xff" * 40])
def test_garbage_raises_state_error(data):
    for cls in (core.Router, core.Ledger):
        with pytest.raises(core.StateError):
            cls.from_bytes(data)


@given(st.binary(max_size=200), st.sampled_from([1, 2]))
def test_random_payload_in_valid_envelope_is_rejected_or_canonical(payload, kind):
    # A correct envelope gets random bytes to the payload decoder and the invariant checks:
    # only StateError may come out, and anything accepted must re-encode to the same bytes.
    body = b"MOLF" + struct.pack("<BHQ", kind, 1, len(payload)) + payload
    blob = body + struct.pack("<Q", fnv1a64(body))
    cls = core.Router if kind == 1 else core.Ledger
    try:
        obj = cls.from_bytes(blob)
    except core.StateError:
        return
    assert obj.to_bytes() == blob


@given(states(), st.data())
def test_resealed_payload_tampering_never_escapes_as_another_error(state, data):
    router, ledger, _ = state
    for cls, blob in ((core.Router, router.to_bytes()), (core.Ledger, ledger.to_bytes())):
        bad = bytearray(blob)
        for _ in range(data.draw(st.integers(1, 3), label="edits")):
            i = data.draw(st.integers(HEADER, len(blob) - 9), label="offset")
            bad[i] = data.draw(st.integers(0, 255), label="value")
        bad = reseal(bytes(bad))
        try:
            obj = cls.from_bytes(bad)
        except core.StateError:
            continue
        assert obj.to_bytes() == bad


def test_inconsistent_state_is_rejected_even_with_valid_checksum():
    # Incumbents during warm-up (step 0) cannot exist.
    router = core.Router(1, 2, warmup_steps=2)
    blob = bytearray(router.to_bytes())
    # incumbents are the 2 bytes before last_change (u64 x 1), expert_last_change (u64 x 2)
    # and the checksum.
    blob[-8 - 16 - 8 - 2] = 1
    with pytest.raises(core.StateError, match="module 0"):
        core.Router.from_bytes(reseal(bytes(blob)))
    # A non-0/1 bool byte.
    blob = bytearray(router.to_bytes())
    blob[-8 - 16 - 8 - 1] = 2
    with pytest.raises(core.StateError, match="0 or 1"):
        core.Router.from_bytes(reseal(bytes(blob)))


def test_from_bytes_needs_bytes():
    with pytest.raises(TypeError):
        core.Router.from_bytes("MOLF")
