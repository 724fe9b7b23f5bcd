"""Stateful test: a real Router + Ledger and plain-Python models of both, in lockstep.

Hypothesis chooses a configuration, then any interleaving of: route a score matrix and
record it, record an arbitrary mask (empty rows, several winners), serialise and restore
mid-run, query the summary. After every step the invariants compare everything the core
exposes. The models compute in the same order as the specification (Python floats are IEEE
doubles), so even the EMA must match bit for bit.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import molf._core as core
from molf.testing import router_configs, score_matrices
from test_router_properties import RefRouter

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
U64 = (1 << 64) - 1


def fnv1a64(data: bytes) -> int:
    h = FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & U64
    return h


class RefLedger:
    def __init__(
        self,
        m,
        e,
        decay,
        heldout_decay=0.5,
        heldout_horizon=0.25,
        heldout_shrink=None,
        heldout_min_span=0,
        heldout_shrink_steps=None,
    ):
        self.m, self.e, self.decay = m, e, decay
        self.heldout_decay, self.heldout_horizon = heldout_decay, heldout_horizon
        self.heldout_min_span = heldout_min_span
        self.heldout_shrink = [0.1] * e if heldout_shrink is None else heldout_shrink  # per expert
        self.heldout_shrink_steps = [1] * e if heldout_shrink_steps is None else heldout_shrink_steps  # (a setting)
        self.shrink_trials, self.shrinks = [0] * e, [0] * e
        self.heldout_windows = 0
        self.heldout_ema = [[math.nan] * e for _ in range(m)]
        self.heldout_span = [[0] * e for _ in range(m)]
        self.step = 0
        self.checksum = 0
        self.last_scores = [[math.nan] * e for _ in range(m)]
        self.ema = [[math.nan] * e for _ in range(m)]
        self.wins = [[0] * e for _ in range(m)]
        self.switches = [0] * m
        self.last_switch_step = [-1] * m
        self.no_winner = [0] * m
        self.prev = [None] * m

    def record(self, scores, mask):
        s = self.step
        rows, mrows = np.asarray(scores).tolist(), np.asarray(mask).tolist()
        for m in range(self.m):
            for e in range(self.e):
                x = rows[m][e]
                self.last_scores[m][e] = x
                if math.isfinite(x):
                    old = self.ema[m][e]
                    self.ema[m][e] = x if math.isnan(old) else self.decay * old + (1.0 - self.decay) * x
                self.wins[m][e] += int(mrows[m][e])
            if not any(mrows[m]):
                self.no_winner[m] += 1
                continue
            if self.prev[m] is not None and self.prev[m] != mrows[m]:
                self.switches[m] += 1
                self.last_switch_step[m] = s
            self.prev[m] = list(mrows[m])
        payload = struct.pack("<QQ", self.checksum, s) + bytes(int(b) for row in mrows for b in row)
        self.checksum = fnv1a64(payload)
        self.step += 1

    def record_shrink(self, expert, base, trial):
        """A trial is kept when it lowered the held-out loss (NaN never does)."""
        keep = trial < base
        self.shrink_trials[expert] += 1
        self.shrinks[expert] += keep
        return keep

    def record_heldout(self, descent, moved):
        """EMA of the finite held-out descents of experts that moved; the rest keep theirs.
        An expert's decay grows with its span n (the windows it has moved in since its last
        pause) so that the mean age is ~horizon x n."""
        h = self.heldout_horizon
        for m in range(self.m):
            for e in range(self.e):
                n = self.heldout_span[m][e] = self.heldout_span[m][e] + 1 if moved[m][e] else 0
                d = self.heldout_decay if h == 0 else max(self.heldout_decay, 1.0 - (1.0 / h - 1.0) / max(n, 1))
                x = float(descent[m][e])
                if moved[m][e] and math.isfinite(x):
                    old = self.heldout_ema[m][e]
                    self.heldout_ema[m][e] = x if math.isnan(old) else d * old + (1.0 - d) * x
        self.heldout_windows += 1

    def heldout_descent(self):
        """The EMA where the expert's span has reached the minimum, NaN (not judged) elsewhere."""
        return [
            [x if n >= self.heldout_min_span else math.nan for x, n in zip(xs, ns)]
            for xs, ns in zip(self.heldout_ema, self.heldout_span)
        ]

    def last_mask(self):
        return [p if p is not None else [False] * self.e for p in self.prev]

    def summary(self):
        total = sum(map(sum, self.wins))
        per_expert = [sum(row[e] for row in self.wins) for e in range(self.e)]
        switches = sum(self.switches)
        return {
            "step": self.step,
            "checksum": self.checksum,
            "win_share": [w / total if total else 0.0 for w in per_expert],
            "current_share": [sum(row[e] for row in self.last_mask()) / self.m for e in range(self.e)],
            "switches": switches,
            "switch_rate": switches / (self.m * max(self.step - 1, 1)),
            "no_winner_events": sum(self.no_winner),
        }


def same_floats(got: np.ndarray, want) -> bool:
    """Bit-exact comparison (NaN equals NaN, -0.0 differs from 0.0)."""
    want = np.array(want, dtype=np.float64)
    return got.dtype == np.float64 and np.array_equal(got.view(np.uint64), want.view(np.uint64))


class RoutingMachine(RuleBasedStateMachine):
    @initialize(
        config=router_configs(num_modules=st.integers(1, 4), num_experts=st.integers(1, 4)),
        decay=st.one_of(st.sampled_from([0.0, 0.5, 0.9]), st.floats(0.0, 0.999)),
        heldout_decay=st.one_of(st.sampled_from([0.0, 0.5]), st.floats(0.0, 0.999)),
        heldout_horizon=st.one_of(st.sampled_from([0.0, 0.25]), st.floats(0.0, 0.999)),
        # One shrink fraction for every expert, or (cycled) one per expert.
        heldout_shrink=st.lists(st.one_of(st.sampled_from([0.0, 0.1]), st.floats(0.0, 0.999)), min_size=1, max_size=4),
        heldout_min_span=st.integers(0, 4),
        # Likewise the shrink trials per measurement (the tensor side runs them).
        heldout_shrink_steps=st.lists(st.integers(1, 16), min_size=1, max_size=4),
    )
    def setup(
        self, config, decay, heldout_decay, heldout_horizon, heldout_shrink, heldout_min_span, heldout_shrink_steps
    ):
        note(
            f"Router(**{config}); Ledger(decay={decay!r}, heldout_decay={heldout_decay!r}, "
            f"heldout_horizon={heldout_horizon!r}, heldout_shrink={heldout_shrink!r}, "
            f"heldout_min_span={heldout_min_span}, heldout_shrink_steps={heldout_shrink_steps!r})"
        )
        self.config = config
        self.shape = (config["num_modules"], config["num_experts"])
        per_expert = [heldout_shrink[e % len(heldout_shrink)] for e in range(self.shape[1])]
        heldout_shrink = heldout_shrink[0] if len(heldout_shrink) == 1 else per_expert
        steps = [heldout_shrink_steps[e % len(heldout_shrink_steps)] for e in range(self.shape[1])]
        heldout_shrink_steps = heldout_shrink_steps[0] if len(heldout_shrink_steps) == 1 else steps
        self.router, self.ref_router = core.Router(**config), RefRouter(**config)
        self.ledger = core.Ledger(
            *self.shape,
            ema_decay=decay,
            heldout_decay=heldout_decay,
            heldout_horizon=heldout_horizon,
            heldout_shrink=heldout_shrink,
            heldout_min_span=heldout_min_span,
            heldout_shrink_steps=heldout_shrink_steps,
        )
        self.ref_ledger = RefLedger(
            *self.shape, decay, heldout_decay, heldout_horizon, per_expert, heldout_min_span, steps
        )

    @rule(data=st.data())
    def route_and_record(self, data):
        scores = data.draw(score_matrices(self.shape, layouts=True), label="scores")
        phase = self.router.phase
        mask = self.router.route(scores)
        want = self.ref_router.route(scores)
        note(f"step {self.ref_router.step - 1} ({phase}): scores={scores.tolist()} -> {mask.tolist()}")
        assert np.array_equal(mask, want), f"router gave {mask.tolist()}, model {want.tolist()}"
        self.ledger.record(scores, mask)
        self.ref_ledger.record(scores, want)

    @rule(data=st.data())
    def record_arbitrary_mask(self, data):
        scores = data.draw(score_matrices(self.shape), label="scores")
        mask = data.draw(
            st.lists(st.booleans(), min_size=self.shape[0] * self.shape[1], max_size=self.shape[0] * self.shape[1]),
            label="mask",
        )
        mask = np.array(mask, dtype=bool).reshape(self.shape)
        note(f"ledger-only record: mask={mask.tolist()}")
        self.ledger.record(scores, mask)
        self.ref_ledger.record(scores, mask)

    @rule(data=st.data())
    def heldout_window(self, data):
        """A held-out measurement: the ledger's EMA, then (policy heldout) the regate."""
        n = self.shape[0] * self.shape[1]
        values = st.one_of(
            st.floats(allow_nan=True, allow_infinity=True, width=64),
            st.sampled_from([0.0, -0.0, 1e-300, -1e-300, math.nan]),
        )
        descent = np.array(data.draw(st.lists(values, min_size=n, max_size=n), label="descent")).reshape(self.shape)
        potential = np.array(data.draw(st.lists(values, min_size=n, max_size=n), label="potential")).reshape(self.shape)
        moved = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="moved"), dtype=bool).reshape(
            self.shape
        )
        self.ledger.record_heldout(descent, moved)
        self.ref_ledger.record_heldout(descent.tolist(), moved.tolist())
        if self.config["policy"] != "heldout":
            try:
                self.router.regate(self.ledger.heldout_descent(), potential)
            except core.ConfigError:
                return
            raise AssertionError("regate accepted a router whose policy is not 'heldout'")
        got = self.router.regate(self.ledger.heldout_descent(), potential)
        want = self.ref_router.regate(self.ref_ledger.heldout_descent(), potential.tolist())
        note(
            f"held-out window: descent={descent.tolist()} moved={moved.tolist()} "
            f"potential={potential.tolist()} -> {got} modules changed"
        )
        assert got == want

    @rule(data=st.data())
    def shrink_trial(self, data):
        """One held-out shrink trial: kept iff the trial's loss is lower; refused (ConfigError,
        nothing counted) with the expert's shrinkage off or an expert out of range."""
        losses = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64), st.just(1.0))
        expert = data.draw(st.integers(0, self.shape[1]), label="expert")
        base, trial = data.draw(losses, label="base"), data.draw(losses, label="trial")
        if expert == self.shape[1] or self.ref_ledger.heldout_shrink[expert] == 0.0:
            with pytest.raises(core.ConfigError):
                self.ledger.record_shrink(expert, base, trial)
            return
        got = self.ledger.record_shrink(expert, base, trial)
        note(f"shrink trial: expert {expert}, base {base!r}, trial {trial!r} -> kept {got}")
        assert got == self.ref_ledger.record_shrink(expert, base, trial)

    @rule()
    def serialise_and_restore(self):
        router = core.Router.from_bytes(self.router.to_bytes())
        ledger = core.Ledger.from_bytes(self.ledger.to_bytes())
        assert router == self.router and ledger == self.ledger
        note("serialised and restored")
        self.router, self.ledger = router, ledger

    @precondition(lambda self: hasattr(self, "ledger"))
    @invariant()
    def summary_matches(self):
        assert self.ledger.summary() == self.ref_ledger.summary()

    @precondition(lambda self: hasattr(self, "router"))
    @invariant()
    def router_matches(self):
        r, ref = self.router, self.ref_router
        assert r.step == ref.step
        assert r.phase == ref.phase
        assert np.array_equal(r.incumbents(), np.array(ref.incumbents, dtype=bool))
        assert r.expert_last_change().tolist() == ref.expert_last_change

    @precondition(lambda self: hasattr(self, "ledger"))
    @invariant()
    def ledger_matches(self):
        lg, ref = self.ledger, self.ref_ledger
        assert lg.step == ref.step
        assert lg.checksum == ref.checksum
        assert lg.wins().dtype == np.uint64 and lg.wins().tolist() == ref.wins
        assert lg.switches().tolist() == ref.switches
        assert lg.last_switch_step().dtype == np.int64
        assert lg.last_switch_step().tolist() == ref.last_switch_step
        assert lg.no_winner().tolist() == ref.no_winner
        assert lg.no_winner_total == sum(ref.no_winner)
        assert lg.last_mask().tolist() == ref.last_mask()
        assert same_floats(lg.last_scores(), ref.last_scores)
        assert same_floats(lg.ema(), ref.ema)
        assert lg.heldout_windows == ref.heldout_windows
        assert lg.heldout_horizon == ref.heldout_horizon
        assert same_floats(lg.heldout_ema(), ref.heldout_ema)
        assert lg.heldout_span().dtype == np.uint64 and lg.heldout_span().tolist() == ref.heldout_span
        assert lg.heldout_min_span == ref.heldout_min_span
        assert same_floats(lg.heldout_descent(), ref.heldout_descent())
        assert lg.heldout_shrink == ref.heldout_shrink
        assert lg.heldout_shrink_steps == ref.heldout_shrink_steps
        assert lg.shrink_trials().tolist() == ref.shrink_trials and lg.shrinks().tolist() == ref.shrinks


RoutingMachine.TestCase.settings = settings(
    settings.default, stateful_step_count=40, max_examples=settings.default.max_examples
)
test_routing_machine = RoutingMachine.TestCase
