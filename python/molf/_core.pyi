"""Rust routing core of molf (``molf_rs``), compiled with pyo3.

Everything here is deterministic and pure: no torch, no randomness, no clock. All arrays are
numpy arrays of shape ``(num_modules, num_experts)`` (row = routed module, column = expert;
expert 0 is the dense/FFT expert when present) unless stated otherwise.

No Rust panic ever reaches Python: a panic is reported as :class:`InternalError`.
Objects are not meant to be shared between threads while a call is running.
"""

from collections.abc import Sequence
from typing import Final, Literal, Self, TypedDict, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "Router",
    "Ledger",
    "score_sums",
    "all_finite",
    "ConfigError",
    "ScoreError",
    "StateError",
    "InternalError",
    "PHASES",
    "POLICIES",
    "__version__",
]

__version__: Final[str]
"""Version of the Rust core (``molf_rs`` crate)."""

PHASES: Final[tuple[Literal["warmup"], Literal["routing"], Literal["frozen"]]]
"""Routing phases, in schedule order."""

POLICIES: Final[tuple[Literal["topk"], Literal["hysteresis"], Literal["heldout"]]]
"""Routing policies accepted by :class:`Router`."""

_Phase = Literal["warmup", "routing", "frozen"]
_Policy = Literal["topk", "hysteresis", "paper"]  # "paper": alias of "topk"
_ScoreArray = npt.NDArray[np.float32] | npt.NDArray[np.float64]

class ConfigError(ValueError):
    """Invalid configuration or argument value (the message names the argument and the
    allowed values, e.g. ``topk must be >= 1, got 0``)."""

class ScoreError(ValueError):
    """A score or mask array of the wrong shape, dtype or number of dimensions (the message
    gives the expected and the received shape and dtype)."""

class StateError(ValueError):
    """Serialised state that is truncated, tampered with (checksum), of the wrong magic or
    kind, of an unsupported format version, or internally inconsistent."""

class InternalError(RuntimeError):
    """A broken invariant inside the core. Never expected: please report it."""

class _RouterConfig(TypedDict):
    num_modules: int
    num_experts: int
    topk: int
    policy: _Policy
    margin: float
    min_dwell: int
    warmup_steps: int
    freeze_after: int | None

@final
class Router:
    """Picks the winning experts of every module from a score matrix.

    Phases (of the call with 0-based index ``s``): ``"warmup"`` while ``s < warmup_steps``
    (every expert with a finite score wins; no incumbents are recorded), then ``"frozen"``
    once ``freeze_after`` is set and ``s >= freeze_after`` (winners = incumbents with a
    finite score; a module without incumbents gets plain top-k), else ``"routing"``.

    Routing, policy ``"topk"``: per module, the ``topk`` highest finite scores win; ties go
    to the lower expert index; NaN and ±Inf never win; if fewer than ``topk`` scores are
    finite only those win; if none is, the row is all False.

    Routing, policy ``"hysteresis"``: the incumbents ``I`` of a module (its last non-empty
    winner set) are held while ``s - last_change < min_dwell`` (if any incumbent has a
    finite score); otherwise experts are ranked by ``s_e + margin * |s_e|`` for incumbents
    and ``s_e`` for the rest, top-k among finite scores, ties to incumbents first, then to
    the lower index. A challenger thus displaces an incumbent only by beating it by the
    relative margin. (For a negative incumbent score the adjusted score is
    ``s_e * (1 - margin)``; with ``margin > 1`` it grows as ``s_e`` falls, so routing is
    monotone in the scores only for ``margin <= 1`` or non-negative scores, such as
    molf's EPD and PFN.)

    After each routing step, a module whose winner row is non-empty and differs from its
    incumbents takes that row as incumbents (``last_change = s``); an empty row changes
    nothing.

    Threads: one Router (or Ledger) may be shared; concurrent calls run one after another
    (large inputs release the GIL meanwhile), as if made sequentially in the order served.

    Args:
        num_modules: rows of the score matrix, >= 1.
        num_experts: columns, >= 1.
        topk: winners per module, >= 1 (``topk >= num_experts`` means every finite
            expert wins).
        policy: one of :data:`POLICIES` (or ``"paper"``, an alias of ``"topk"``).
            ``"heldout"``: every expert starts active; a routing step's winners are the
            active experts with finite scores; only :meth:`regate` changes the active set
            (``topk`` is not used).
        margin: relative advantage of incumbents, finite and >= 0 (``"hysteresis"`` only;
            must be 0 otherwise).
        min_dwell: steps incumbents are held after a change (``"hysteresis"``), or steps
            after its drop before a dropped expert may return (``"heldout"``), >= 0; must
            be 0 for ``"topk"``.
        warmup_steps: number of initial warm-up calls, >= 0.
        freeze_after: index of the first frozen call, or None; must be > ``warmup_steps``.

    Raises:
        ConfigError: any argument out of range (also integers that do not fit in 64 bits,
            and ``num_modules * num_experts > 2**32``), or a bool for an integer argument
            (``True`` is not taken as 1).
        TypeError: an argument of the wrong type (e.g. a float for an integer argument).
    """

    def __new__(
        cls,
        num_modules: int,
        num_experts: int,
        topk: int = 1,
        policy: _Policy = "topk",
        margin: float = 0.0,
        min_dwell: int = 0,
        warmup_steps: int = 0,
        freeze_after: int | None = None,
    ) -> Self: ...
    @property
    def num_modules(self) -> int: ...
    @property
    def num_experts(self) -> int: ...
    @property
    def topk(self) -> int: ...
    @property
    def policy(self) -> _Policy: ...
    @property
    def margin(self) -> float: ...
    @property
    def min_dwell(self) -> int: ...
    @property
    def warmup_steps(self) -> int: ...
    @property
    def freeze_after(self) -> int | None: ...
    @property
    def step(self) -> int:
        """Number of :meth:`route` calls so far."""
    @property
    def phase(self) -> _Phase:
        """Phase of the *next* :meth:`route` call."""
    def route(self, scores: _ScoreArray) -> npt.NDArray[np.bool_]:
        """Routes one step and advances :attr:`step`.

        Args:
            scores: float32 or float64 array of shape exactly ``(num_modules, num_experts)``;
                any memory layout (non-C-contiguous input is copied). f32 and f64 inputs
                with the same values route identically.

        Returns:
            A new bool array ``(num_modules, num_experts)``: True where the expert wins.

        Raises:
            ScoreError: wrong type, ndim, shape or dtype, or a ``numpy.ma.MaskedArray``
                (its mask would not be read: fill the masked entries first, e.g.
                ``scores.filled(np.nan)``, as a NaN score never wins); the router is left
                unchanged.
        """
    def regate(self, descent: npt.NDArray[np.float64], potential: npt.NDArray[np.float64]) -> int:
        """Policy ``"heldout"``: updates the active experts; returns how many modules changed.

        Per module, at the current step: an active expert stays while its ``descent`` (the
        smoothed held-out loss decrease per step while it moved, usually
        :meth:`Ledger.heldout_descent`) is NaN or > 0; an inactive one becomes active when its
        ``potential`` (first-order held-out decrease of one step of it) is finite and > 0
        and it was dropped at least ``min_dwell`` steps ago (:meth:`expert_last_change`: the
        dwell counts per expert, so one expert's drop does not hold another back). Every
        flipped expert's last change, and a changed module's, become the current step.
        Nothing changes when frozen.

        Raises:
            ConfigError: the router's policy is not ``"heldout"``.
            ScoreError: an argument is not a float64 array of shape (M, E).
        """
    def forecast(self) -> tuple[Literal["gated", "top1"], npt.NDArray[np.bool_] | None] | None:
        """How the next :meth:`route` call's winners follow from its scores, where a rule
        simpler than ``route`` gives them exactly: ``("gated", mask)`` — the experts set in
        the bool ``(num_modules, num_experts)`` mask whose score is finite (warm-up, policy
        ``"heldout"``, a frozen router whose modules all have incumbents, ``topk >=
        num_experts``) —, ``("top1", None)`` — per module the highest finite score, ties to
        the lower index, none if none is finite (policy ``"topk"`` with ``topk == 1``) —, or
        None (hysteresis, other ``topk``). A device can then decide a step before the host
        has its scores; ``route`` still books it."""
    def incumbents(self) -> npt.NDArray[np.bool_]:
        """Copy of the current incumbents, bool ``(num_modules, num_experts)`` (the active
        set under policy ``"heldout"``)."""
    def expert_last_change(self) -> npt.NDArray[np.uint64]:
        """Copy, uint64 ``(num_modules, num_experts)``: the step at which :meth:`regate` last
        flipped each expert (0: never; other policies leave it 0)."""
    def config(self) -> _RouterConfig:
        """The constructor arguments: ``Router(**r.config())`` builds a fresh equal-config
        router."""
    def to_bytes(self) -> bytes:
        """Serialises configuration and state (format: see :meth:`from_bytes`)."""
    @staticmethod
    def from_bytes(data: bytes) -> Router:
        """Restores a router exactly: it takes the same future decisions as the original.

        Format (little-endian): ``b"MOLF"``, kind byte (1 = router, 2 = ledger), format
        version u16 (1, the only version that loads), payload length u64, payload, then a
        u64 FNV-1a-64 checksum of every preceding byte. Floats are stored bit-exact.

        Raises:
            StateError: truncated data, wrong magic or kind, unsupported version (the
                message names the version seen and the supported ones), bad checksum, or a
                decoded state that violates an invariant.
        """
    def __eq__(self, other: object, /) -> bool:
        """Equal configuration and state (step, incumbents, last changes)."""
    def __reduce__(self) -> tuple[object, tuple[bytes]]:
        """Pickle / ``copy.deepcopy`` support via :meth:`to_bytes`."""

class _LedgerSummary(TypedDict):
    step: int
    checksum: int
    win_share: list[float]
    current_share: list[float]
    switches: int
    switch_rate: float
    no_winner_events: int

@final
class Ledger:
    """Score and decision bookkeeping per module and expert.

    With ``s = step`` before a :meth:`record` call:

    * ``last_scores = scores`` (as float64; non-finite values kept as they are);
    * for each finite score: ``ema = score`` if unset (NaN) else
      ``ema_decay * ema + (1 - ema_decay) * score`` (evaluated in exactly this order, f64);
    * ``wins[m, e] += mask[m, e]``;
    * per module: an empty mask row counts a no-winner event and keeps the previous row;
      otherwise, if a previous row exists and differs, ``switches[m] += 1`` and
      ``last_switch_step[m] = s``; the row becomes the previous row;
    * ``checksum = fnv1a64(prev_checksum.to_bytes(8, "little") + s.to_bytes(8, "little")
      + bytes(mask.ravel(order="C")))`` (one 0/1 byte per mask entry, row-major), with
      ``prev_checksum = 0`` before the first record and FNV-1a 64 (offset basis
      ``0xcbf29ce484222325``, prime ``0x100000001b3``). Two ledgers have equal checksums iff
      they saw the same decision history, with overwhelming probability: compare it across
      distributed ranks;
    * ``step += 1``.

    Args:
        num_modules: >= 1.
        num_experts: >= 1.
        ema_decay: in ``[0, 1)``.
        heldout_decay: in ``[0, 1)``, the decay of :meth:`heldout_ema` per
            :meth:`record_heldout` window (with ``heldout_horizon``: its floor).
        heldout_horizon: in ``[0, 1)``; > 0: an expert's decay at the ``n``-th window of
            its span (:meth:`heldout_span`: the windows it has moved in since its last
            pause, counted from 1) is ``max(heldout_decay, 1 - a / n)`` with
            ``a = 1 / heldout_horizon - 1``, so window ``k`` weighs about
            ``(a / n) * (k / n) ** (a - 1)`` and the EMA's mean age is about
            ``heldout_horizon`` of the span (0.25: its last quarter): late in a long run
            one window is noise around a small drift, and a span growing with the run
            resolves it; an expert back from a drop starts a new span, so its record from
            before the drop fades within a few windows instead of dropping it again at
            once. 0: the fixed ``heldout_decay``.
        heldout_shrink: in ``[0, 1)``, the fraction by which a held-out shrink trial
            scales an expert's update back (see :meth:`record_shrink`); 0: no trials.
            One value for every expert, or a sequence of one per expert.
        heldout_shrink_steps: in ``[1, 16]``, an expert's most shrink trials per
            measurement, each from where the last kept one left the update (the
            optimizer stops at the first refused). One value for every expert, or a
            sequence of one per expert.
        shrink_spectral: how a shrink trial shrinks a LoRA expert's product (the
            optimizer applies it): True soft-thresholds its singular values by its
            ``heldout_shrink`` x the largest, False scales it by ``1 - heldout_shrink``.
        heldout_min_span: >= 0, the windows an expert's span must reach before its
            record can drop it (see :meth:`heldout_descent`); 0: from the first window.
        heldout_adapt_rate: whether :meth:`adapt_heldout_rate` moves the learning-rate
            multipliers (:meth:`heldout_rate`); False: every one stays 1.
        heldout_rate_up: finite, >= 1: a multiplier's factor after a window whose
            movement lowered the held-out loss.
        heldout_rate_down: in ``(0, 1]``: its factor after a window that raised it.
        heldout_rate_cap: finite, >= 1: the ceiling of a multiplier.
        heldout_rate_floor: in ``[0, 1]``: the floor of a multiplier after a window that
            raised the held-out loss (1: never below the set rate; 0: no floor).
        heldout_rate_trust: finite, >= 0: a multiplier goes up only where the window's
            realized descent is at least this many times the expert's potential (the
            descent a first-order model of one step at its rate predicts); 0: no condition.

    Raises:
        ConfigError: an argument out of range, or a bool for an integer argument.
    """

    def __new__(
        cls,
        num_modules: int,
        num_experts: int,
        ema_decay: float = 0.9,
        heldout_decay: float = 0.5,
        heldout_horizon: float = 0.25,
        heldout_shrink: float | Sequence[float] = 0.1,
        heldout_shrink_steps: int | Sequence[int] = 1,
        shrink_spectral: bool = True,
        heldout_min_span: int = 0,
        heldout_adapt_rate: bool = False,
        heldout_rate_up: float = 1.1,
        heldout_rate_down: float = 0.5,
        heldout_rate_cap: float = 2.0,
        heldout_rate_floor: float = 1.0,
        heldout_rate_trust: float = 0.8,
    ) -> Self: ...
    @property
    def heldout_decay(self) -> float: ...
    @property
    def heldout_shrink(self) -> list[float]:
        """Per expert: its shrink fraction."""
    @property
    def heldout_shrink_steps(self) -> list[int]:
        """Per expert: its most shrink trials per measurement."""
    @property
    def shrink_spectral(self) -> bool: ...
    def record_shrink(self, expert: int, base: float, trial: float) -> bool:
        """Decides one held-out shrink trial of ``expert``: ``base`` is the held-out loss
        as the parameters are, ``trial`` the loss with the expert's update since the start
        shrunk (see ``shrink_spectral``). True (keep the shrunk update) iff
        ``trial < base``; a NaN on either side keeps the update as it is. Counted in
        :meth:`shrink_trials` and :meth:`shrinks`.

        Raises:
            ConfigError: ``expert`` is out of range, or its ``heldout_shrink`` is 0;
                nothing is counted.
        """
    def shrink_trials(self) -> npt.NDArray[np.uint64]:
        """Copy, ``(E,)``: shrink trials recorded per expert."""
    def shrinks(self) -> npt.NDArray[np.uint64]:
        """Copy, ``(E,)``: shrink trials kept per expert."""
    @property
    def heldout_horizon(self) -> float: ...
    @property
    def heldout_windows(self) -> int:
        """Number of :meth:`record_heldout` calls so far."""
    def record_heldout(self, descent: npt.NDArray[np.float64], moved: npt.NDArray[np.bool_]) -> None:
        """Records one held-out window: for each expert that ``moved`` with a finite
        ``descent``, ``heldout_ema = descent`` if unset (NaN) else
        ``d * heldout_ema + (1 - d) * descent`` with the expert's decay ``d`` (see
        ``heldout_horizon``); the others keep theirs. An expert's span grows by one
        where it moved and restarts at 0 where it did not.

        Raises:
            ScoreError: an argument of the wrong type, dtype or shape; nothing is recorded.
        """
    def heldout_ema(self) -> npt.NDArray[np.float64]:
        """Copy, ``(M, E)``: the held-out descent EMA (NaN where never measured)."""
    def heldout_span(self) -> npt.NDArray[np.uint64]:
        """Copy, ``(M, E)``: per expert, the consecutive :meth:`record_heldout` windows,
        up to the last, in which it moved (0: it did not move in the last one)."""
    @property
    def heldout_min_span(self) -> int: ...
    def adapt_heldout_rate(self, descent: npt.NDArray[np.float64], potential: npt.NDArray[np.float64]) -> None:
        """After :meth:`record_heldout` of a window, with ``heldout_adapt_rate``: each
        expert's multiplier ``c`` becomes ``min(c * heldout_rate_up, heldout_rate_cap)``
        where ``descent`` (the window's realized descent per step, as recorded) is > 0 and
        trusted: ``heldout_rate_trust`` is 0, or ``potential`` (the expert's first-order
        descent of one step at its current rate) is finite, > 0 and
        ``descent >= heldout_rate_trust * potential``;
        ``max(c * heldout_rate_down, heldout_rate_floor)`` where ``descent`` is < 0; it
        stays otherwise (``descent`` 0 or NaN, or not trusted). Without
        ``heldout_adapt_rate`` nothing changes.

        Raises:
            ScoreError: ``descent`` or ``potential`` of the wrong type, dtype or shape;
                nothing changes.
            StateError: no window recorded yet.
        """
    def heldout_rate(self) -> npt.NDArray[np.float64]:
        """Copy, ``(M, E)``: each expert's learning-rate multiplier (1 at the start; the
        optimizer scales the expert's whole AdamW update by it)."""
    @property
    def heldout_adapt_rate(self) -> bool: ...
    @property
    def heldout_rate_up(self) -> float: ...
    @property
    def heldout_rate_down(self) -> float: ...
    @property
    def heldout_rate_cap(self) -> float: ...
    @property
    def heldout_rate_floor(self) -> float: ...
    @property
    def heldout_rate_trust(self) -> float: ...
    def heldout_descent(self) -> npt.NDArray[np.float64]:
        """Copy, ``(M, E)``: the record as :meth:`Router.regate` judges it:
        :meth:`heldout_ema` where :meth:`heldout_span` >= ``heldout_min_span``, NaN (not
        judged yet: an active expert stays) elsewhere. So a drop needs a record of that many
        windows since the start or the expert's last return."""
    @property
    def num_modules(self) -> int: ...
    @property
    def num_experts(self) -> int: ...
    @property
    def ema_decay(self) -> float: ...
    @property
    def step(self) -> int:
        """Number of :meth:`record` calls so far."""
    @property
    def checksum(self) -> int:
        """Decision checksum (u64), see the class docstring."""
    @property
    def no_winner_total(self) -> int:
        """Total no-winner events over all modules."""
    def record(self, scores: _ScoreArray, mask: npt.NDArray[np.bool_]) -> None:
        """Records one step.

        Args:
            scores: as for :meth:`Router.route`.
            mask: bool array ``(num_modules, num_experts)``, usually ``Router.route``'s
                result.

        Raises:
            ScoreError: wrong type, ndim, shape or dtype of either array, or a
                ``numpy.ma.MaskedArray`` (as for :meth:`Router.route`); nothing is recorded.
        """
    def last_scores(self) -> npt.NDArray[np.float64]:
        """Copy, ``(M, E)``: scores of the last record (NaN before the first)."""
    def ema(self) -> npt.NDArray[np.float64]:
        """Copy, ``(M, E)``: EMA of finite scores (NaN where no finite score was seen)."""
    def wins(self) -> npt.NDArray[np.uint64]:
        """Copy, ``(M, E)``: cumulative win counts."""
    def switches(self) -> npt.NDArray[np.uint64]:
        """Copy, ``(M,)``: changes of the non-empty winner row."""
    def last_switch_step(self) -> npt.NDArray[np.int64]:
        """Copy, ``(M,)``: step of the last switch, -1 if never."""
    def no_winner(self) -> npt.NDArray[np.uint64]:
        """Copy, ``(M,)``: steps in which the module's mask row was empty."""
    def last_mask(self) -> npt.NDArray[np.bool_]:
        """Copy, ``(M, E)``: last non-empty mask row per module (all False before one)."""
    def summary(self) -> _LedgerSummary:
        """Aggregates for logs.

        * ``win_share[e]``: cumulative wins of expert ``e`` over all wins (zeros if none);
        * ``current_share[e]``: fraction of modules whose last non-empty row includes ``e``;
        * ``switches``: total over modules;
        * ``switch_rate``: ``switches / (num_modules * max(step - 1, 1))``;
        * ``no_winner_events``: total no-winner events.
        """
    def to_bytes(self) -> bytes:
        """Serialises configuration and state (format: see :meth:`Router.from_bytes`)."""
    @staticmethod
    def from_bytes(data: bytes) -> Ledger:
        """Restores a ledger bit-exactly.

        Raises:
            StateError: as for :meth:`Router.from_bytes` (router bytes are rejected as the
                wrong kind).
        """
    def __eq__(self, other: object, /) -> bool:
        """Identical configuration and state; floats compared bit for bit (NaN == NaN)."""
    def __reduce__(self) -> tuple[object, tuple[bytes]]:
        """Pickle / ``copy.deepcopy`` support via :meth:`to_bytes`."""

def score_sums(
    exp_avgs: list[npt.NDArray[np.float32]] | list[npt.NDArray[np.float64]],
    exp_avg_sqs: list[npt.NDArray[np.float32]] | list[npt.NDArray[np.float64]],
    eps: float,
    score: Literal["epd", "pfn"],
) -> npt.NDArray[np.float64]:
    """Per pair ``(exp_avgs[i], exp_avg_sqs[i])``, the float64 sum behind its score, in one
    pass over the moments (for CPU torch tensors, pass ``t.numpy()``: a view, no copy):

    * ``"epd"``: ``sum(m * m / (sqrt(v) + eps))``;
    * ``"pfn"``: ``sum((m / (sqrt(v) + eps)) ** 2)``.

    Each term is computed in the arrays' dtype (``eps`` rounded to it first) with correctly
    rounded IEEE square root and division, as numpy computes them elementwise, then added in
    float64 in a fixed order; so a NaN term makes the sum NaN and an infinite one (without a
    NaN) +inf. The GIL is released while it computes.

    Raises:
        ScoreError: lists of different lengths; an item that is not a numpy array, is a
            masked array, is not C-contiguous, or is not float32/float64; arrays of more
            than one dtype; ``exp_avgs[i]`` and ``exp_avg_sqs[i]`` of different shapes.
        ConfigError: an unknown ``score``.
    """

def all_finite(arrays: list[npt.NDArray[np.float32] | npt.NDArray[np.float64]]) -> bool:
    """True when no element of any array is NaN or ±infinity (one pass; the GIL is released).

    Raises:
        ScoreError: an item that is not a C-contiguous float32 or float64 numpy array.
    """
