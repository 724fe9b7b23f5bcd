"""The routing log: one JSON line per optimizer step.

Each line is self-describing:

    {"step": 12, "phase": "routing", "experts": ["dense", "lora0_r128"],
     "modules": {"model.layers.0.self_attn.q_proj": {"scores": [3.1e-09, 2.7e-09], "winners": [0]}, ...}}

Scores are written at full precision (Python's shortest round-trip repr);
non-finite scores are written as null, since JSON has no NaN or Infinity.
A step skipped for non-finite gradients is one line
`{"skipped_after_step": 12, "reason": "non-finite gradient"}`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterator, Sequence

import numpy as np

__all__ = ["RoutingLog", "read_routing_log"]


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


class RoutingLog:
    """Appends routing decisions to a JSONL file, one line per logged step."""

    def __init__(self, path: str | os.PathLike, module_names: Sequence[str], expert_names: Sequence[str], every: int = 1):
        self.path = os.fspath(path)
        self.module_names = list(module_names)
        self.expert_names = list(expert_names)
        self.every = every
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)

    def write(self, step: int, phase: str, scores: np.ndarray, mask: np.ndarray) -> None:
        if step % self.every:
            return
        modules = {
            name: {
                "scores": [_finite_or_none(float(s)) for s in row],
                "winners": [int(e) for e in np.flatnonzero(win)],
            }
            for name, row, win in zip(self.module_names, scores, mask)
        }
        line = json.dumps(
            {"step": step, "phase": phase, "experts": self.expert_names, "modules": modules},
            allow_nan=False,
        )
        self._append(line)

    def write_skip(self, after_step: int, reason: str) -> None:
        """A step skipped whole: no routing took place, the step count did not advance."""
        self._append(json.dumps({"skipped_after_step": after_step, "reason": reason}))

    def _append(self, line: str) -> None:
        # One write of a whole line: a crash leaves at most a missing line, never a torn one.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def read_routing_log(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the records of a routing log, skipping a torn last line if any."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            yield json.loads(line)
