"""The routing log: one JSON line per optimizer step.

Each line is self-describing:

    {"step": 12, "phase": "routing", "experts": ["dense", "lora0_r128"],
     "modules": {"model.layers.0.self_attn.q_proj": {"scores": [3.1e-09, 2.7e-09], "winners": [0]}, ...}}

Scores are written at full precision (Python's shortest round-trip repr);
non-finite scores are written as null, since JSON has no NaN or Infinity.
A step skipped for non-finite gradients is one line
`{"skipped_after_step": 12, "reason": "non-finite gradient"}`.

Robustness (docs/reliability.md):

* Logging never stops training. A write that fails (disk full, unwritable path) warns once
  with a `RuntimeWarning` naming the path and the error; later steps keep trying.
* The file stays valid JSONL: each line goes to the kernel in one `os.write` (no Python
  buffer, so a crash of the process loses at most the line being written, never a part of
  it); a short write is taken back; a torn last line (from a crash or power loss) is dropped
  when the log is next opened by `resume` or repaired before the next write after a failure.
* Resume: `MoLFAdamW.load_state_dict` calls `resume(step, skipped_steps)`, which drops the
  records past the checkpoint (written after the save by a run that then crashed), so the
  log continues without gaps or repeats.
* A new run (an optimizer at step 0 that was not loaded from a checkpoint) never appends to
  an existing log: on its first write it moves the old file aside to `<path>.prev` (replacing
  an older one) with a `RuntimeWarning`, and starts the file afresh.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np

__all__ = ["RoutingLog", "read_routing_log"]


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


class RoutingLog:
    """Appends routing decisions to a JSONL file, one line per logged step."""

    def __init__(
        self, path: str | os.PathLike, module_names: Sequence[str], expert_names: Sequence[str], every: int = 1
    ):
        self.path = os.fspath(path)
        self.module_names = list(module_names)
        self.expert_names = list(expert_names)
        self.every = every
        # The file is looked at on the first write (a new run) or by `resume`, whichever
        # comes first: an optimizer is built before the checkpoint it resumes is loaded.
        self._opened = False
        self._warned = False
        self._failed = False  # a write failed: the file may end in a torn line
        self._end: int | None = None  # the file's size after this log's last write (None: unknown)
        self._warned_writer = False

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

    def resume(self, step: int, skipped_steps: int) -> None:
        """Continue the log of a run restored at `step` (with `skipped_steps` skips so far):
        drop a torn last line and every record past that point."""
        self._opened = True
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._rewrite(lambda records: _records_until(records, step, skipped_steps))
            self._end = os.path.getsize(self.path) if os.path.isfile(self.path) else 0
        except OSError as exc:
            self._warn(exc)

    def _start(self) -> None:
        """First write of a new run: move an existing log aside rather than append to it."""
        self._opened = True
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            if os.path.isfile(self.path) and os.path.getsize(self.path) > 0:
                aside = self.path + ".prev"
                os.replace(self.path, aside)
                warnings.warn(
                    f"routing log {self.path} already held records; this optimizer starts a new run "
                    f"(step 0, no checkpoint loaded), so the old log was moved to {aside}",
                    RuntimeWarning,
                    stacklevel=4,
                )
            self._end = 0
        except OSError as exc:
            self._warn(exc)

    def _append(self, line: str) -> None:
        if not self._opened:
            self._start()
        data = (line + "\n").encode("utf-8")
        try:
            if self._failed:
                self._rewrite(lambda records: records)  # drop a torn line a failed write left
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                end = os.fstat(fd).st_size
                if self._end is not None and end != self._end and os.path.isfile(self.path):
                    self._warn_other_writer(end)
                written = os.write(fd, data)
                if written != len(data):
                    self._failed = True
                    os.ftruncate(fd, end)  # take the part-line back
                    raise OSError(f"short write ({written} of {len(data)} bytes; disk full?)")
                self._end = end + written
            finally:
                os.close(fd)
        except OSError as exc:
            self._failed = True
            self._end = None
            self._warn(exc)
        else:
            self._failed = False

    def _warn_other_writer(self, size: int) -> None:
        """The file changed size since this log's last write: someone else writes to it (two
        optimizers given one log_path interleave their records)."""
        if not self._warned_writer:
            self._warned_writer = True
            warnings.warn(
                f"routing log {self.path} was written by someone else since this optimizer's last record "
                f"({self._end} bytes then, {size} now): two optimizers with one log_path? Their records "
                "interleave; give each optimizer its own log_path",
                RuntimeWarning,
                stacklevel=5,
            )

    def _rewrite(self, keep) -> None:
        """Replace the file by its whole lines that `keep` (a filter over (record, line)
        pairs) passes; atomic (a crash leaves the old file or the new one), and a no-op when
        nothing changes. Only regular files: a device such as /dev/null has no lines."""
        if not os.path.isfile(self.path):
            return
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")[:-1]  # what follows the last newline is a torn line
        records = []
        for raw in lines:
            try:
                records.append((json.loads(raw), raw))
            except ValueError:
                break
        kept = b"".join(raw + b"\n" for _, raw in keep(records))
        if kept == data:
            return
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(kept)
        os.replace(tmp, self.path)

    def _warn(self, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"routing log {self.path}: {exc}; training continues, the log may miss records",
                RuntimeWarning,
                stacklevel=4,
            )


def _records_until(records: list, step: int, skipped_steps: int) -> list:
    """The leading records a run had written when it was saved at `step` after
    `skipped_steps` skips; the log is in step order, so the first record past that point
    and everything after it came from the run going on after the save."""
    kept, skips = [], 0
    for record, raw in records:
        if "step" in record:
            if record["step"] > step:
                break
        else:
            if record.get("skipped_after_step", math.inf) > step or skips >= skipped_steps:
                break
            skips += 1
        kept.append((record, raw))
    return kept


def read_routing_log(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the records of a routing log, skipping a torn last line if any."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            yield json.loads(line)


def phase_of_last_step(router) -> str:
    """The routing phase of the step `router` just routed."""
    # The router's `phase` is that of its next call; the step just routed was call step-1.
    s = router.step - 1
    r = router
    if s < r.warmup_steps:
        return "warmup"
    if r.freeze_after is not None and s >= r.freeze_after:
        return "frozen"
    return "routing"
