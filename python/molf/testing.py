"""Hypothesis strategies for testing code built on molf's router.

These are the generators molf's own property tests use, published so you can fuzz *your*
routing configuration (or code that consumes routing masks) in a few lines. They need the
``hypothesis`` package (a test dependency; ``import molf`` never imports this module).

Strategies
----------
* :func:`score_values` — single scores that hit the hard cases: ties, NaN, ±Inf, signed
  zeros, subnormals, huge and tiny magnitudes;
* :func:`score_matrices` — ``(num_modules, num_experts)`` float32/float64 arrays of those,
  optionally in Fortran order or as strided views;
* :func:`router_configs` — keyword dicts for :class:`molf.Router` covering every policy,
  phase and option (any argument can be pinned or given its own strategy);
* :func:`step_sequences` — lists of score matrices of one shape;
* :func:`routing_runs` — a config together with a step sequence that fits it.

Example: check that a hysteresis router with a 5% margin always updates *some* expert of a
module that has a finite score (true in warm-up and routing; not in the frozen phase, where
only incumbents may win, hence ``freeze_after=None``)::

    import numpy as np
    from hypothesis import given
    import molf
    from molf.testing import routing_runs

    @given(routing_runs(num_experts=3, policy="hysteresis", margin=0.05, freeze_after=None))
    def test_a_finite_module_always_updates(run):
        config, steps = run
        router = molf.Router(**config)
        for scores in steps:
            mask = router.route(scores)
            assert (mask.any(axis=1) == np.isfinite(scores).any(axis=1)).all()

Run it with ``pytest``; Hypothesis shrinks any failure to a minimal config and score
sequence.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.extra import numpy as hnp

from ._core import POLICIES

__all__ = [
    "routing_runs",
    "router_configs",
    "score_matrices",
    "score_values",
    "step_sequences",
]


_DTYPES = (np.float32, np.float64)

# Small exactly-representable values: drawn often, so rows contain ties.
_TIE_POOL = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)


class _Unset:
    def __repr__(self) -> str:
        return "<default>"


_UNSET: Any = _Unset()


def _as_strategy(value: Any, default: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    if value is _UNSET:
        return default
    if isinstance(value, st.SearchStrategy):
        return value
    return st.just(value)


def _dtype(dtype: Any) -> st.SearchStrategy[type]:
    if dtype is None:
        return st.sampled_from(_DTYPES)
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise InvalidArgument(f"dtype must be float32, float64 or None, got {dt}")
    return st.just(dt.type)


def score_values(
    dtype: Any = np.float64,
    *,
    allow_nan: bool = True,
    allow_infinity: bool = True,
    allow_subnormal: bool = True,
    ties: bool = True,
    magnitude: tuple[float, float] | None = None,
) -> st.SearchStrategy[float]:
    """Single scores, exactly representable in ``dtype`` (float32 or float64).

    Args:
        dtype: ``np.float32`` or ``np.float64``.
        allow_nan: include NaN.
        allow_infinity: include +Inf and -Inf.
        allow_subnormal: include subnormal numbers.
        ties: draw often from a small pool of values (-2 … 2, signed zeros) so that rows
            contain exact ties.
        magnitude: ``(lo, hi)`` with ``0 < lo <= hi``: restrict finite non-zero values to
            ``lo <= |x| <= hi`` (zeros stay allowed). Useful when a property must not
            overflow or underflow, e.g. scaling invariance. None: the whole finite range,
            including the largest finite value and the smallest normal of ``dtype``.
    """
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise InvalidArgument(f"dtype must be float32 or float64, got {dt}")
    width = 32 if dt == np.float32 else 64
    info = np.finfo(dt)
    parts: list[st.SearchStrategy[float]] = []
    if magnitude is None:
        parts.append(st.floats(width=width, allow_nan=False, allow_infinity=False, allow_subnormal=allow_subnormal))
        extremes = [float(info.max), -float(info.max), float(info.tiny), -float(info.tiny)]
        parts.append(st.sampled_from(extremes))
        if allow_subnormal:
            sub = float(info.smallest_subnormal)
            parts.append(st.sampled_from([sub, -sub, float(info.tiny) / 4]))
        if ties:
            parts += [st.sampled_from(_TIE_POOL + (-0.0,))] * 3
    else:
        lo, hi = float(magnitude[0]), float(magnitude[1])
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise InvalidArgument(f"magnitude must be (lo, hi) with 0 < lo <= hi < inf, got {magnitude}")
        if lo < float(info.tiny) or hi > float(info.max):
            raise InvalidArgument(f"magnitude {magnitude} exceeds the normal range of {dt}")
        positive = st.floats(min_value=lo, max_value=hi, width=width)
        parts.append(st.one_of(positive, positive.map(lambda x: -x)))
        parts.append(st.sampled_from([0.0, -0.0]))
        if ties:
            pool = tuple(v for v in _TIE_POOL if v == 0.0 or lo <= abs(v) <= hi)
            parts += [st.sampled_from(pool + (-0.0,))] * 3
    if allow_nan:
        parts.append(st.just(math.nan))
    if allow_infinity:
        parts.append(st.sampled_from([math.inf, -math.inf]))
    return st.one_of(parts)


@st.composite
def _layout(draw: st.DrawFn, arr: np.ndarray) -> np.ndarray:
    kind = draw(st.sampled_from(["C", "F", "strided"]))
    if kind == "F":
        return np.asfortranarray(arr)
    if kind == "strided":
        # Same values, viewed through a buffer with gaps between elements.
        big = np.empty((arr.shape[0], arr.shape[1] * 2), dtype=arr.dtype)
        big[:, ::2] = arr
        big[:, 1::2] = np.nan
        return big[:, ::2]
    return arr


def score_matrices(
    shape: tuple[int, int] | st.SearchStrategy[tuple[int, int]] | None = None,
    *,
    dtype: Any = None,
    min_modules: int = 1,
    max_modules: int = 6,
    min_experts: int = 1,
    max_experts: int = 5,
    layouts: bool = False,
    **value_kwargs: Any,
) -> st.SearchStrategy[np.ndarray]:
    """Score matrices ``(num_modules, num_experts)`` as numpy arrays.

    Args:
        shape: a fixed ``(num_modules, num_experts)``, a strategy for one, or None to draw
            it within ``[min_modules, max_modules] × [min_experts, max_experts]``.
        dtype: ``np.float32``, ``np.float64`` or None (either).
        layouts: also draw Fortran-ordered arrays and strided views (the router must accept
            any layout); default: C-contiguous only.
        **value_kwargs: passed to :func:`score_values` (``allow_nan``, ``allow_infinity``,
            ``allow_subnormal``, ``ties``, ``magnitude``).
    """
    if shape is None:
        shapes = st.tuples(st.integers(min_modules, max_modules), st.integers(min_experts, max_experts))
    else:
        shapes = _as_strategy(shape, st.nothing())

    @st.composite
    def build(draw: st.DrawFn) -> np.ndarray:
        dt = draw(_dtype(dtype))
        m, e = draw(shapes)
        arr = draw(hnp.arrays(dt, (m, e), elements=score_values(dt, **value_kwargs)))
        return draw(_layout(arr)) if layouts else arr

    return build()


def router_configs(
    *,
    num_modules: Any = _UNSET,
    num_experts: Any = _UNSET,
    topk: Any = _UNSET,
    policy: Any = _UNSET,
    margin: Any = _UNSET,
    min_dwell: Any = _UNSET,
    warmup_steps: Any = _UNSET,
    freeze_after: Any = _UNSET,
) -> st.SearchStrategy[dict[str, Any]]:
    """Valid keyword dicts for :class:`molf.Router`: ``molf.Router(**draw(router_configs()))``.

    Each argument may be left out (drawn from a default range that covers every policy,
    phase and option), pinned to a value, or given as a strategy. Defaults: ``num_modules``
    1–6, ``num_experts`` 1–5, ``topk`` 1–``num_experts + 1``, ``policy`` any of
    ``POLICIES``, ``margin`` (hysteresis) 0, small values or up to 3, ``min_dwell``
    (hysteresis, heldout) 0–3,
    ``warmup_steps`` 0–3, ``freeze_after`` None or ``warmup_steps + 1`` … ``+ 6``.
    With policy ``"topk"``, unpinned ``margin`` and ``min_dwell`` are 0, with
    ``"heldout"`` unpinned ``margin`` is 0 (the router requires it).
    """

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        m = draw(_as_strategy(num_modules, st.integers(1, 6)))
        e = draw(_as_strategy(num_experts, st.integers(1, 5)))
        k = draw(_as_strategy(topk, st.integers(1, e + 1)))
        pol = draw(_as_strategy(policy, st.sampled_from(POLICIES)))
        hyst = pol == "hysteresis"
        default_margin = (
            st.one_of(st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]), st.floats(0.0, 3.0)) if hyst else st.just(0.0)
        )
        mar = draw(_as_strategy(margin, default_margin))
        dwell = draw(_as_strategy(min_dwell, st.integers(0, 3) if pol != "topk" else st.just(0)))
        warm = draw(_as_strategy(warmup_steps, st.integers(0, 3)))
        freeze = draw(_as_strategy(freeze_after, st.one_of(st.none(), st.integers(1, 6).map(lambda d: warm + d))))
        return {
            "num_modules": m,
            "num_experts": e,
            "topk": k,
            "policy": pol,
            "margin": mar,
            "min_dwell": dwell,
            "warmup_steps": warm,
            "freeze_after": freeze,
        }

    return build()


def step_sequences(
    shape: tuple[int, int],
    *,
    min_steps: int = 1,
    max_steps: int = 12,
    dtype: Any = None,
    layouts: bool = False,
    **value_kwargs: Any,
) -> st.SearchStrategy[list[np.ndarray]]:
    """Lists of ``min_steps``–``max_steps`` score matrices of one ``shape``.

    One dtype is drawn per sequence (unless ``dtype`` is given). Other arguments as for
    :func:`score_matrices`.
    """

    @st.composite
    def build(draw: st.DrawFn) -> list[np.ndarray]:
        dt = draw(_dtype(dtype))
        return draw(
            st.lists(
                score_matrices(tuple(shape), dtype=dt, layouts=layouts, **value_kwargs),
                min_size=min_steps,
                max_size=max_steps,
            )
        )

    return build()


def routing_runs(
    *,
    min_steps: int = 1,
    max_steps: int = 12,
    dtype: Any = None,
    layouts: bool = False,
    value_kwargs: dict[str, Any] | None = None,
    **config_kwargs: Any,
) -> st.SearchStrategy[tuple[dict[str, Any], list[np.ndarray]]]:
    """``(config, steps)``: a :func:`router_configs` dict and a :func:`step_sequences` list of
    its shape.

    Args:
        min_steps, max_steps, dtype, layouts: as for :func:`step_sequences`.
        value_kwargs: passed to :func:`score_values`.
        **config_kwargs: passed to :func:`router_configs` (pin or constrain any argument).
    """

    @st.composite
    def build(draw: st.DrawFn) -> tuple[dict[str, Any], list[np.ndarray]]:
        config = draw(router_configs(**config_kwargs))
        steps = draw(
            step_sequences(
                (config["num_modules"], config["num_experts"]),
                min_steps=min_steps,
                max_steps=max_steps,
                dtype=dtype,
                layouts=layouts,
                **(value_kwargs or {}),
            )
        )
        return config, steps

    return build()
