"""Property tests of molf.Router against a plain-Python reference of its semantics.

The reference below is written from the specification (sorting, per-row lists, Python
floats); it shares no code with the package. Python floats are IEEE doubles, and float32
scores widen to them exactly, so the reference and the Rust core must agree bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, note
from hypothesis import strategies as st

import molf._core as core
from molf.testing import router_configs, routing_runs, score_matrices, step_sequences


class RefRouter:
    def __init__(
        self,
        num_modules,
        num_experts,
        topk=1,
        policy="topk",
        margin=0.0,
        min_dwell=0,
        warmup_steps=0,
        freeze_after=None,
    ):
        self.m, self.e, self.k = num_modules, num_experts, topk
        self.policy, self.margin, self.min_dwell = policy, margin, min_dwell
        self.warmup_steps, self.freeze_after = warmup_steps, freeze_after
        self.step = 0
        # Policy heldout starts with every expert active; the others with no incumbent.
        self.incumbents = [[policy == "heldout"] * num_experts for _ in range(num_modules)]
        self.last_change = [0] * num_modules
        self.expert_last_change = [[0] * num_experts for _ in range(num_modules)]  # heldout's dwell

    @property
    def phase(self):
        s = self.step
        if s < self.warmup_steps:
            return "warmup"
        if self.freeze_after is not None and s >= self.freeze_after:
            return "frozen"
        return "routing"

    @staticmethod
    def top_k(row, k, incumbents=None, margin=0.0):
        def key(e):
            s = row[e]
            if incumbents is not None and incumbents[e]:
                return (-(s + margin * abs(s)), 0, e)  # incumbents first among equals
            return (-s, 1, e)

        order = sorted((e for e in range(len(row)) if math.isfinite(row[e])), key=key)
        won = set(order[:k])
        return [e in won for e in range(len(row))]

    def route(self, scores):
        rows = np.asarray(scores).tolist()
        s, phase = self.step, self.phase
        out = []
        for m, row in enumerate(rows):
            finite = [math.isfinite(x) for x in row]
            inc = self.incumbents[m]
            held = [i and f for i, f in zip(inc, finite)]
            if phase == "warmup":
                win = finite
            elif self.policy == "heldout":  # the active set changes in regate only
                win = held
            elif phase == "frozen":
                win = held if any(inc) else self.top_k(row, self.k)
            elif self.policy == "topk":
                win = self.top_k(row, self.k)
            elif any(inc) and any(held) and s - self.last_change[m] < self.min_dwell:
                win = held
            elif any(inc):
                win = self.top_k(row, self.k, inc, self.margin)
            else:
                win = self.top_k(row, self.k)
            if phase == "routing" and self.policy != "heldout" and any(win) and win != inc:
                self.incumbents[m] = list(win)
                self.last_change[m] = s
            out.append(win)
        self.step += 1
        return np.array(out, dtype=bool).reshape(self.m, self.e)

    def regate(self, descent, potential):
        """Policy heldout: an active expert stays unless its smoothed held-out descent is
        <= 0 (NaN: not measured, stays); a dropped one returns when its potential is finite
        and > 0 and it was dropped >= min_dwell steps ago. Not when frozen."""
        if self.phase == "frozen":
            return 0
        changed = 0
        for m in range(self.m):
            inc = self.incumbents[m]
            new = []
            for e in range(self.e):
                d, p = float(descent[m][e]), float(potential[m][e])
                if inc[e]:
                    new.append(math.isnan(d) or d > 0)
                else:
                    may_return = self.step - self.expert_last_change[m][e] >= self.min_dwell
                    new.append(may_return and math.isfinite(p) and p > 0)
                if new[e] != inc[e]:
                    self.expert_last_change[m][e] = self.step
            if new != inc:
                self.incumbents[m] = new
                self.last_change[m] = self.step
                changed += 1
        return changed


def assert_mask(got, want, context=""):
    assert got.dtype == np.bool_ and got.shape == want.shape
    assert np.array_equal(got, want), f"{context}\ngot\n{got}\nwant\n{want}"


@given(routing_runs(layouts=True))
def test_matches_reference(run):
    config, steps = run
    router, ref = core.Router(**config), RefRouter(**config)
    note(f"config={config}")
    for i, scores in enumerate(steps):
        assert router.phase == ref.phase
        note(f"step {i} ({ref.phase}) scores={scores.tolist()}")
        assert_mask(router.route(scores), ref.route(scores), f"step {i}")
        assert router.step == ref.step
        assert np.array_equal(router.incumbents(), np.array(ref.incumbents, dtype=bool))
    assert router.phase == ref.phase


@given(router_configs(policy="topk", warmup_steps=0, freeze_after=None), st.data())
def test_topk_wins_min_k_finite(config, data):
    scores = data.draw(score_matrices((config["num_modules"], config["num_experts"])))
    mask = core.Router(**config).route(scores)
    finite = np.isfinite(scores).sum(axis=1)
    assert (mask.sum(axis=1) == np.minimum(finite, config["topk"])).all()


@given(routing_runs())
def test_deterministic(run):
    config, steps = run
    a, b = core.Router(**config), core.Router(**config)
    for scores in steps:
        assert_mask(a.route(scores), b.route(scores.copy()))


@given(routing_runs(max_steps=20))
def test_non_finite_never_wins(run):
    config, steps = run
    router = core.Router(**config)
    for scores in steps:
        mask = router.route(scores)
        assert not (mask & ~np.isfinite(scores)).any()


@given(router_configs(margin=0.0), st.data())
def test_equivariant_under_expert_permutation(config, data):
    # Absent ties among finite scores only values decide, wherever the expert sits. Margin 0:
    # an incumbent's adjusted score could otherwise tie with a challenger's.
    m, e = config["num_modules"], config["num_experts"]
    steps = data.draw(step_sequences((m, e), ties=False))
    for scores in steps:
        for row in scores:
            finite = row[np.isfinite(row)]
            assume(len(np.unique(finite)) == len(finite))
    perm = np.array(data.draw(st.permutations(range(e))))
    a, b = core.Router(**config), core.Router(**config)
    for scores in steps:
        assert_mask(a.route(scores)[:, perm], b.route(scores[:, perm]))
    assert np.array_equal(a.incumbents()[:, perm], b.incumbents())


@given(routing_runs(value_kwargs={"magnitude": (2.0**-60, 2.0**60)}), st.data())
def test_invariant_to_positive_row_scaling(run, data):
    # Powers of two scale exactly (no rounding; no overflow or underflow within this
    # magnitude range), so even ties and margin comparisons must be preserved.
    config, steps = run
    exps = data.draw(st.lists(st.integers(-8, 8), min_size=config["num_modules"], max_size=config["num_modules"]))
    scale = np.ldexp(1.0, np.array(exps))[:, None]
    note(f"scale={scale.ravel().tolist()}")
    a, b = core.Router(**config), core.Router(**config)
    for scores in steps:
        scaled = (scores * scale.astype(scores.dtype)).astype(scores.dtype)
        assert_mask(a.route(scores), b.route(scaled))


@given(routing_runs(), st.data())
def test_monotone_in_own_score(run, data):
    # In any state and phase: raising a winner's score keeps it a winner, lowering a finite
    # loser's keeps it out. Only for margin <= 1: see the next test.
    config, steps = run
    assume(config["margin"] <= 1.0)
    router = core.Router(**config)
    for scores in steps[:-1]:
        router.route(scores)
    last = steps[-1]
    m = data.draw(st.integers(0, last.shape[0] - 1))
    e = data.draw(st.integers(0, last.shape[1] - 1))
    x = last[m, e]
    assume(np.isfinite(x))
    before = core.Router.from_bytes(router.to_bytes()).route(last)
    changed = last.copy()
    with np.errstate(over="ignore"):
        one = last.dtype.type(1)
        changed[m, e] = x + abs(x) + one if before[m, e] else x - abs(x) - one
    assume(np.isfinite(changed[m, e]))
    note(f"module {m} expert {e}: {x!r} -> {changed[m, e]!r}, winner={before[m, e]}")
    assert router.route(changed)[m, e] == before[m, e]


def test_hysteresis_margin_above_one_is_not_monotone_for_negative_scores():
    # Pins a consequence of the specified adjusted score s + margin*|s|: for s < 0 it is
    # s*(1 - margin), which grows as s falls when margin > 1. (molf's EPD/PFN scores are >= 0.)
    r = core.Router(1, 2, policy="hysteresis", margin=2.0)
    assert_mask(r.route(np.array([[1.0, 0.0]])), np.array([[True, False]]))
    lowered = core.Router.from_bytes(r.to_bytes())
    assert_mask(r.route(np.array([[-0.01, 0.1]])), np.array([[False, True]]))
    assert_mask(lowered.route(np.array([[-1.0, 0.1]])), np.array([[True, False]]))


@given(routing_runs(min_steps=2, max_steps=16), st.data())
def test_serialise_restore_continues_identically(run, data):
    config, steps = run
    cut = data.draw(st.integers(0, len(steps)))
    a = core.Router(**config)
    for scores in steps[:cut]:
        a.route(scores)
    b = core.Router.from_bytes(a.to_bytes())
    assert a == b and b.step == cut and b.phase == a.phase and b.config() == config
    for scores in steps[cut:]:
        assert_mask(a.route(scores), b.route(scores))
    assert a == b


@given(router_configs())
def test_config_round_trips_through_constructor(config):
    r = core.Router(**config)
    assert r.config() == config
    assert core.Router(**r.config()) == r
    for name, value in config.items():
        assert getattr(r, name) == value
    assert r.step == 0 and r.phase == ("warmup" if config["warmup_steps"] else "routing")
    assert "Router(" in repr(r) and f"policy='{config['policy']}'" in repr(r)


def test_float32_and_float64_route_alike():
    scores = np.array([[1.5, 1.5, np.nan], [np.inf, -1.0, 0.25]], dtype=np.float32)
    a, b = core.Router(2, 3, topk=2), core.Router(2, 3, topk=2)
    assert_mask(a.route(scores), b.route(scores.astype(np.float64)))
    assert_mask(a.route(scores), np.array([[True, True, False], [False, True, True]]))


def test_large_inputs_release_the_gil_and_still_route():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((3000, 4))
    mask = core.Router(3000, 4).route(scores)
    assert_mask(mask, scores == scores.max(axis=1, keepdims=True))


# --- bad inputs -----------------------------------------------------------------------------

BAD_SCORES = [
    pytest.param(np.zeros((2, 4)), id="wrong-rows"),
    pytest.param(np.zeros((3, 3)), id="wrong-cols"),
    pytest.param(np.zeros((3, 4), dtype=np.int64), id="int"),
    pytest.param(np.zeros((3, 4), dtype=np.float16), id="float16"),
    pytest.param(np.zeros((3, 4), dtype=bool), id="bool"),
    pytest.param(np.zeros((3, 4), dtype=">f8"), id="big-endian"),
    pytest.param(np.zeros(12), id="1-D"),
    pytest.param(np.zeros((3, 4, 1)), id="3-D"),
    pytest.param(np.float64(1.0), id="0-D"),
    pytest.param([[0.0] * 4] * 3, id="list"),
    pytest.param(None, id="None"),
]


@pytest.mark.parametrize("scores", BAD_SCORES)
def test_bad_scores_raise_score_error(scores):
    r = core.Router(3, 4)
    with pytest.raises(core.ScoreError, match=r"scores must be a numpy array of shape \(3, 4\)"):
        r.route(scores)
    assert r.step == 0
    ledger = core.Ledger(3, 4)
    with pytest.raises(core.ScoreError):
        ledger.record(scores, np.zeros((3, 4), dtype=bool))
    assert ledger.step == 0


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((3, 4)),
        np.zeros((3, 4), dtype=np.uint8),
        np.zeros((4, 3), dtype=bool),
        np.zeros(12, dtype=bool),
        [[False] * 4] * 3,
    ],
    ids=["float", "uint8", "transposed", "1-D", "list"],
)
def test_bad_masks_raise_score_error(mask):
    ledger = core.Ledger(3, 4)
    with pytest.raises(core.ScoreError, match="mask must be"):
        ledger.record(np.zeros((3, 4)), mask)
    assert ledger.step == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_modules": 0}, "num_modules must be >= 1, got 0"),
        ({"num_experts": -1}, "num_experts must be >= 1, got -1"),
        ({"topk": 0}, "topk must be >= 1, got 0"),
        ({"policy": "foo"}, "unknown policy 'foo'; expected one of 'topk', 'hysteresis'"),
        ({"margin": 0.1}, "belong to policy 'hysteresis'"),
        ({"min_dwell": 2}, "belong to policy 'hysteresis'"),
        ({"policy": "hysteresis", "margin": -0.1}, "margin must be finite and >= 0"),
        ({"policy": "hysteresis", "margin": float("nan")}, "margin must be finite"),
        ({"policy": "hysteresis", "margin": float("inf")}, "margin must be finite"),
        ({"policy": "hysteresis", "min_dwell": -1}, "min_dwell must be >= 0, got -1"),
        ({"warmup_steps": -2}, "warmup_steps must be >= 0, got -2"),
        ({"warmup_steps": 3, "freeze_after": 3}, "freeze_after must be None or > warmup_steps"),
        ({"freeze_after": 0}, "freeze_after must be None or > warmup_steps"),
        ({"freeze_after": -5}, "freeze_after must be >= 0, got -5"),
        ({"num_modules": 10**30}, "num_modules must be >= 1 and <= 9223372036854775807"),
        ({"num_modules": 2**20, "num_experts": 2**20}, "num_modules \\* num_experts must be <="),
    ],
)
def test_bad_config_raises_config_error(kwargs, message):
    args = {"num_modules": 3, "num_experts": 4, **kwargs}
    with pytest.raises(core.ConfigError, match=message):
        core.Router(**args)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_modules": 0}, {"num_experts": 0}, {"ema_decay": 1.0}, {"ema_decay": -0.1}, {"ema_decay": float("nan")}],
)
def test_bad_ledger_config_raises_config_error(kwargs):
    with pytest.raises(core.ConfigError):
        core.Ledger(**{"num_modules": 2, "num_experts": 2, **kwargs})


def test_wrong_argument_types_raise_type_error():
    with pytest.raises(TypeError):
        core.Router(3, 4, topk=1.5)
    with pytest.raises(TypeError):
        core.Router(3, 4, policy=1)


def test_exception_hierarchy_and_module():
    for name, base in [
        ("ConfigError", ValueError),
        ("ScoreError", ValueError),
        ("StateError", ValueError),
        ("InternalError", RuntimeError),
    ]:
        cls = getattr(core, name)
        assert issubclass(cls, base) and cls.__module__ == "molf._core" and cls.__name__ == name
    assert core.PHASES == ("warmup", "routing", "frozen")
    assert core.POLICIES == ("topk", "hysteresis", "heldout")
    assert isinstance(core.__version__, str)


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: core.Router(True, 4), "num_modules"),
        (lambda: core.Router(3, True), "num_experts"),
        (lambda: core.Router(3, 4, topk=True), "topk"),
        (lambda: core.Router(3, 4, policy="hysteresis", min_dwell=True), "min_dwell"),
        (lambda: core.Router(3, 4, warmup_steps=True), "warmup_steps"),
        (lambda: core.Router(3, 4, freeze_after=True), "freeze_after"),
        (lambda: core.Ledger(True, 4), "num_modules"),
        (lambda: core.Ledger(3, True), "num_experts"),
        (lambda: core.Ledger(3, 4, heldout_min_span=True), "heldout_min_span"),
        (lambda: core.Ledger(3, 4).record_shrink(True, 1.0, 0.5), "expert"),
    ],
    ids=[
        "Router-num_modules",
        "Router-num_experts",
        "topk",
        "min_dwell",
        "warmup_steps",
        "freeze_after",
        "Ledger-num_modules",
        "Ledger-num_experts",
        "heldout_min_span",
        "record_shrink-expert",
    ],
)
def test_bool_integer_arguments_raise_config_error(build, name):
    # bool is an int subclass: True would silently mean 1.
    with pytest.raises(core.ConfigError, match=f"^{name} must be an integer, got the bool True$"):
        build()


def test_masked_arrays_are_refused_not_routed_by_their_data():
    scores = np.ma.masked_array([[0.0, 5.0], [1.0, 0.0]], mask=[[False, True], [False, False]])
    r = core.Router(2, 2)
    with pytest.raises(core.ScoreError, match=r"MaskedArray.*scores\.filled\(np\.nan\)"):
        r.route(scores)
    assert r.step == 0
    assert_mask(r.route(scores.filled(np.nan)), np.array([[True, False], [True, False]]))
    ledger = core.Ledger(2, 2)
    with pytest.raises(core.ScoreError, match="scores must be .*MaskedArray"):
        ledger.record(scores, np.ones((2, 2), dtype=bool))
    with pytest.raises(core.ScoreError, match=r"mask must be .*MaskedArray.*mask\.filled\(False\)"):
        ledger.record(np.zeros((2, 2)), np.ma.masked_array(np.ones((2, 2), dtype=bool)))
    assert ledger.step == 0
    with pytest.raises(core.ScoreError, match=r"descent must be .*MaskedArray.*descent\.filled\(np\.nan\)"):
        core.Router(2, 2, policy="heldout").regate(np.ma.masked_array(np.zeros((2, 2))), np.zeros((2, 2)))
