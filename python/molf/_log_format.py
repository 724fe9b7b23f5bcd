"""The two line formats of the routing log (`molf.routing_log` writes and reads the file):
encoding a step or a skip as a JSON record, and decoding the records of one log in order.

"compact" (the default): the names once, on the first line, then per step the winners of
all modules as one bitmask, and the scores only on every `scores_every`-th step:

    {"step": 1, "phase": "warmup", "winners": "qg==", "format": "molf-routing-log/compact-1",
     "experts": ["dense", "lora0_r128"], "modules": ["model.layers.0.self_attn.q_proj", ...]}
    {"step": 2, "phase": "routing", "winners": "mg=="}
    {"step": 100, "phase": "routing", "winners": "mg==", "scores": "AAAAAAAA8D8..."}

`winners` is the base64 of `numpy.packbits` of the [modules, experts] winner mask (row-major,
big bit order); `scores` the base64 of the [modules, experts] scores as little-endian
float64, non-finite ones kept. 450 modules and 2 experts, scores every 100 steps: about
310 bytes a step, 31 MB over 100,000 steps (4 experts: 55 MB).

"full" (molf's only format before the compact one): every line self-describing, each
module's scores (non-finite ones as null, since JSON has none) and winners; about 100
bytes per module and step (450 modules and 2 experts: 4.7 GB over 100,000 steps):

    {"step": 12, "phase": "routing", "experts": ["dense", "lora0_r128"],
     "modules": {"model.layers.0.self_attn.q_proj": {"scores": [3.1e-09, 2.7e-09], "winners": [0]}, ...}}

In both, a step skipped whole is `{"skipped_after_step": 12, "reason": "non-finite gradient"}`
(in the compact format the first line carries the names whatever its kind). A log's format
is told by its first line: the compact one has a "format" key.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["FORMATS", "Decoder", "Skip", "Step", "compact_header", "format_of", "skip_record", "step_record"]

FORMATS = ("compact", "full")
_COMPACT_TAG = "molf-routing-log/compact-1"
# Steps are drawn as float64, exact up to 2**53; a larger "step" is a corrupt record, not a step count.
_MAX_STEP = 2**53


def step_record(
    fmt: str,
    step: int,
    phase: str,
    experts: list[str],
    modules: Sequence[str],
    scores: np.ndarray | None,
    mask: np.ndarray,
) -> dict:
    """One logged step in format `fmt`; `scores` None leaves them out."""
    if fmt == "compact":
        record = {"step": step, "phase": phase, "winners": _b64(np.packbits(np.asarray(mask, dtype=bool).ravel()))}
        if scores is not None:
            record["scores"] = _b64(np.ascontiguousarray(scores, dtype="<f8"))
        return record
    entries = {}
    for m, (name, win) in enumerate(zip(modules, mask)):
        entry = {} if scores is None else {"scores": [float(s) if math.isfinite(s) else None for s in scores[m]]}
        entry["winners"] = [int(e) for e in np.flatnonzero(win)]
        entries[name] = entry
    return {"step": step, "phase": phase, "experts": experts, "modules": entries}


def skip_record(after_step: int, reason: str) -> dict:
    return {"skipped_after_step": after_step, "reason": reason}


def compact_header(experts: list[str], modules: list[str]) -> dict:
    """What the first line of a compact log carries besides its own record."""
    return {"format": _COMPACT_TAG, "experts": experts, "modules": modules}


def format_of(first_record) -> str:
    """The format of a log whose first line is `first_record`."""
    return "compact" if isinstance(first_record, dict) and "format" in first_record else "full"


def _b64(data: np.ndarray) -> str:
    return base64.b64encode(data.tobytes()).decode("ascii")


@dataclass(frozen=True)
class Step:
    """One logged step: `mask[m, e]` True when expert e won module m; `scores` [M, E] or None
    (not logged at this step; NaN for a non-finite score of the full format)."""

    step: int
    phase: str | None
    mask: np.ndarray
    scores: np.ndarray | None


@dataclass(frozen=True)
class Skip:
    """A step skipped whole after step `after_step` (no routing took place)."""

    after_step: int
    reason: str | None


def _step_number(value, key: str = "step") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_STEP:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ValueError(f"{key} {shown} is not a step number (an integer from 0 to 2**53)")
    return value


class Decoder:
    """Decodes the records of one log in order, learning its format and names from the
    first. `decode` raises ValueError (KeyError, TypeError or IndexError for a record of
    the wrong shape) without the line's place, which the reader adds."""

    def __init__(self) -> None:
        self.format: str | None = None
        self.experts: list[str] | None = None
        self.modules: list[str] | None = None

    def decode(self, record) -> Step | Skip:
        if not isinstance(record, dict):
            raise ValueError("not a routing record (not a JSON object)")
        if self.format is None:
            self.format = format_of(record)
            if self.format == "compact":
                self._read_header(record)
        if "skipped_after_step" in record:
            return Skip(_step_number(record["skipped_after_step"], "skipped_after_step"), record.get("reason"))
        return self._compact(record) if self.format == "compact" else self._full(record)

    def _read_header(self, record: dict) -> None:
        if record["format"] != _COMPACT_TAG:
            raise ValueError(f"unknown routing log format {record['format']!r} (expected {_COMPACT_TAG!r})")
        self.experts, self.modules = _names(record, "experts"), _names(record, "modules")

    def _compact(self, record: dict) -> Step:
        step = _step_number(record["step"])
        M, E = len(self.modules), len(self.experts)
        bits = np.frombuffer(_unb64(record, "winners", -(-M * E // 8), M, E), dtype=np.uint8)
        mask = np.unpackbits(bits, count=M * E).reshape(M, E).astype(bool)
        scores = None
        if "scores" in record:
            raw = _unb64(record, "scores", M * E * 8, M, E)
            scores = np.frombuffer(raw, dtype="<f8").reshape(M, E).astype(np.float64)
        return Step(step, _phase(record), mask, scores)

    def _full(self, record: dict) -> Step:
        entries = record.get("modules")
        if not {"step", "experts"} <= record.keys() or not isinstance(entries, dict) or not entries:
            raise ValueError("not a routing record (needs step, experts and modules)")
        step = _step_number(record["step"])
        if self.experts is None:
            self.experts, self.modules = _names(record, "experts"), list(entries)
        elif record["experts"] != self.experts or list(entries) != self.modules:
            raise ValueError("experts or modules differ from the first record's")
        E = len(self.experts)
        mask = np.zeros((len(self.modules), E), dtype=bool)
        for m, entry in enumerate(entries.values()):
            winners = entry["winners"]
            if not all(not isinstance(e, bool) and isinstance(e, int) and 0 <= e < E for e in winners):
                raise ValueError(f"winners {winners!r} are not expert indices (0 to {E - 1})")
            mask[m, winners] = True
        scores = None
        if "scores" in next(iter(entries.values())):
            rows = [[math.nan if s is None else s for s in entry["scores"]] for entry in entries.values()]
            scores = np.array(rows, dtype=np.float64)
            if scores.shape != mask.shape:
                raise ValueError(f"scores of shape {scores.shape}, expected {mask.shape} (modules, experts)")
        return Step(step, _phase(record), mask, scores)


def _names(record: dict, key: str) -> list[str]:
    names = record[key]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{key} must be a non-empty list of names, got {str(names)[:60]}")
    return names


def _phase(record: dict) -> str | None:
    phase = record.get("phase")
    if phase is not None and not isinstance(phase, str):
        raise ValueError(f"phase {phase!r} is not a name")
    return phase


def _unb64(record: dict, key: str, size: int, M: int, E: int) -> bytes:
    try:
        data = base64.b64decode(record[key], validate=True)
    except binascii.Error as exc:
        raise ValueError(f"{key} is not base64 ({exc})") from None
    if len(data) != size:
        raise ValueError(f"{key} holds {len(data)} bytes, expected {size} for {M} modules x {E} experts")
    return data
