"""The routing log: one JSON line per logged step, in one of two formats
(`molf._log_format`): "compact" (the default: the names once, then per step the winners as
a bitmask, the scores every `scores_every` steps; about 31 MB for 450 modules and 2
experts over 100,000 steps) or "full" (every line self-describing, each module's scores
and winners; 4.7 GB for the same run). `read_routing_log` and `read_routing_records` read
both, telling them apart by the first line.

Robustness (docs/reliability.md):

* Logging never stops training. A write that fails (disk full, unwritable path) warns once
  with a `RuntimeWarning` naming the path and the error; later steps keep trying.
* The file stays valid JSONL: each line goes to the kernel in one `os.write` (no Python
  buffer, so a crash of the process loses at most the line being written, never a part of
  it); a short write is taken back; a torn last line (from a crash or power loss) is dropped
  when the log is next opened by `resume` or repaired before the next write after a failure,
  and passed over by the readers.
* Resume: `MoLFAdamW.load_state_dict` calls `resume(step, skipped_steps)`, which drops the
  records past the checkpoint (written after the save by a run that then crashed), so the
  log continues without gaps or repeats, in the format its first line was written in.
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
from dataclasses import dataclass

import numpy as np

from ._core import ConfigError
from ._log_format import FORMATS, Decoder, Skip, Step, compact_header, format_of, skip_record, step_record

__all__ = ["LogSettings", "RoutingLog", "RoutingRecords", "read_routing_log", "read_routing_records"]

# The compact format's default score interval: 1,000 snapshots of a 100,000-step run.
DEFAULT_SCORES_EVERY = 100


@dataclass(frozen=True)
class LogSettings:
    """Where and how the routing log goes (`MoLFAdamW(log=...)`; a plain path there is
    `LogSettings(path)`): one JSON line per `every` steps with every module's winners, and
    its scores on the logged steps that are multiples of `scores_every` (None: 100 in the
    compact format, every logged step in the full one). `format`: "compact" (the default;
    the winners as one bitmask a step: about 31 MB for 450 modules and 2 experts over
    100,000 steps) or "full" (each module's scores and winners as JSON on every logged
    line: 4.7 GB for the same run); see `molf._log_format`. Bad values raise ConfigError."""

    path: str
    every: int = 1
    scores_every: int | None = None
    format: str = "compact"

    def __post_init__(self) -> None:
        try:
            path = os.fspath(self.path)
        except TypeError:
            raise ConfigError(f"LogSettings: path must be a file path, got {self.path!r}") from None
        object.__setattr__(self, "path", path)  # (frozen: the one normalisation)
        periods = [("every", self.every)] + ([] if self.scores_every is None else [("scores_every", self.scores_every)])
        for name, value in periods:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"LogSettings: {name} must be an integer >= 1, got {value!r}")
        if self.format not in FORMATS:
            raise ConfigError(
                f"LogSettings: format must be one of {', '.join(map(repr, FORMATS))}, got {self.format!r}"
            )

    @classmethod
    def of(cls, log: LogSettings | str | os.PathLike) -> LogSettings:
        """`log` itself, or a plain path's `LogSettings(path)`."""
        return log if isinstance(log, cls) else cls(log)


class RoutingLog:
    """Appends routing decisions to a JSONL file as `log` (a `LogSettings`, or a plain
    path with the defaults) says."""

    def __init__(
        self, log: LogSettings | str | os.PathLike, module_names: Sequence[str], expert_names: Sequence[str]
    ) -> None:
        settings = LogSettings.of(log)
        self.path = settings.path
        self.every = settings.every
        self.format = settings.format  # a resumed log goes on in the format it began in (`resume`)
        self._scores_every = settings.scores_every
        self.module_names = list(module_names)
        self.expert_names = list(expert_names)
        # The file is looked at on the first write (a new run) or by `resume`, whichever
        # comes first: an optimizer is built before the checkpoint it resumes is loaded.
        self._opened = False
        self._warned = False
        self._failed = False  # a write failed: the file may end in a torn line
        self._end: int | None = None  # the file's size after this log's last write (None: unknown)
        # ... and its (device, inode) (None: unknown): a file of the same size may be another
        # writer's, which moved this one's aside (a compact log's lines are often of one length).
        self._inode: tuple[int, int] | None = None
        self._warned_writer = False

    @property
    def scores_every(self) -> int:
        """The scores go on the logged steps that are multiples of this."""
        if self._scores_every is not None:
            return self._scores_every
        return DEFAULT_SCORES_EVERY if self.format == "compact" else 1

    def write(self, step: int, phase: str, scores: np.ndarray, mask: np.ndarray) -> None:
        if step % self.every:
            return
        shown = scores if step % self.scores_every == 0 else None
        self._append(step_record(self.format, step, phase, self.expert_names, self.module_names, shown, mask))

    def write_skip(self, after_step: int, reason: str) -> None:
        """A step skipped whole: no routing took place, the step count did not advance."""
        self._append(skip_record(after_step, reason))

    def resume(self, step: int, skipped_steps: int) -> None:
        """Continue the log of a run restored at `step` (with `skipped_steps` skips so far):
        drop a torn last line and every record past that point."""
        self._opened = True
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            kept = self._rewrite(lambda records: _records_until(records, step, skipped_steps))
            if kept:  # a log goes on in the format it began in (say, one an older molf wrote)
                self.format = format_of(kept[0][0])
            self._end = os.path.getsize(self.path) if os.path.isfile(self.path) else 0
            self._inode = None
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
            self._end, self._inode = 0, None
        except OSError as exc:
            self._warn(exc)

    def _append(self, record: dict) -> None:
        if not self._opened:
            self._start()
        try:
            if self._failed:
                self._rewrite(lambda records: records)  # drop a torn line a failed write left
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                stat = os.fstat(fd)
                end, inode = stat.st_size, (stat.st_dev, stat.st_ino)
                replaced = self._inode is not None and inode != self._inode
                if self._end is not None and (end != self._end or replaced) and os.path.isfile(self.path):
                    self._warn_other_writer(end, replaced)
                if end == 0 and self.format == "compact":  # the first line names the modules and experts
                    record = {**record, **compact_header(self.expert_names, self.module_names)}
                data = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
                written = os.write(fd, data)
                if written != len(data):
                    self._failed = True
                    os.ftruncate(fd, end)  # take the part-line back
                    raise OSError(f"short write ({written} of {len(data)} bytes; disk full?)")
                self._end, self._inode = end + written, inode
            finally:
                os.close(fd)
        except OSError as exc:
            self._failed = True
            self._end = self._inode = None
            self._warn(exc)
        else:
            self._failed = False

    def _warn_other_writer(self, size: int, replaced: bool) -> None:
        """The file changed size or was replaced since this log's last write: someone else
        writes to it (two optimizers given one log path interleave their records)."""
        if not self._warned_writer:
            self._warned_writer = True
            warnings.warn(
                f"routing log {self.path} was written by someone else since this optimizer's last record "
                f"({self._end} bytes then, {size} now{'; the file was replaced' if replaced else ''}): "
                "two optimizers with one log path? Their records interleave; give each optimizer its own",
                RuntimeWarning,
                stacklevel=5,
            )

    def _rewrite(self, keep) -> list:
        """Replace the file by its whole lines that `keep` (a filter over (record, line)
        pairs) passes, and return those; atomic (a crash leaves the old file or the new
        one), and a no-op when nothing changes. Only regular files: a device such as
        /dev/null has no lines."""
        if not os.path.isfile(self.path):
            return []
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")[:-1]  # what follows the last newline is a torn line
        records = []
        for raw in lines:
            try:
                records.append((json.loads(raw), raw))
            except ValueError:
                break
        kept = keep(records)
        new = b"".join(raw + b"\n" for _, raw in kept)
        if new != data:
            tmp = f"{self.path}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(new)
            os.replace(tmp, self.path)
        return kept

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


@dataclass(frozen=True)
class RoutingRecords:
    """A routing log as arrays: `winners[t, m, e]` is True when expert e won module m at
    logged step `steps[t]`, in routing phase `phases[t]`; `scores[s, m, e]` is the score
    of expert e in module m at step `score_steps[s]` (NaN: non-finite in the full format);
    `skipped` lists the steps after which a step was skipped whole (non-finite gradients)."""

    steps: np.ndarray
    experts: list[str]
    modules: list[str]
    winners: np.ndarray
    skipped: list[int]
    phases: list[str | None]
    score_steps: np.ndarray
    scores: np.ndarray


def _decoded(path: str | os.PathLike, decoder: Decoder) -> Iterator[Step | Skip]:
    """The records of a log of either format, decoded in order by `decoder` (which learns
    the log's names), passing over a torn last line; ValueError names the file and line of
    a bad record."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                break  # a torn last line: the write a crash cut short
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: malformed routing log (not a JSON line: {exc})") from None
            try:
                item = decoder.decode(record)
            except (KeyError, TypeError, IndexError) as exc:
                raise ValueError(f"{path}:{lineno}: malformed routing record ({type(exc).__name__}: {exc})") from None
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from None
            yield item


def read_routing_log(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the records of a routing log of either format in the full format's shape
    (`molf._log_format`; a module's "scores" only where they were logged), passing over a
    torn last line. ValueError names the file and line of a bad record."""
    decoder = Decoder()
    for item in _decoded(path, decoder):
        if isinstance(item, Skip):
            yield skip_record(item.after_step, item.reason)
        else:
            experts = list(decoder.experts)
            yield step_record("full", item.step, item.phase, experts, decoder.modules, item.scores, item.mask)


def read_routing_records(path: str | os.PathLike) -> RoutingRecords:
    """A routing log of either format as arrays (what `molf plot` draws); ValueError names
    the file and line of a bad record, or says the log holds no logged step."""
    steps, phases, masks, skipped, score_steps, scores = [], [], [], [], [], []
    decoder = Decoder()
    for item in _decoded(path, decoder):
        if isinstance(item, Skip):
            skipped.append(item.after_step)
            continue
        steps.append(item.step)
        phases.append(item.phase)
        masks.append(item.mask)
        if item.scores is not None:
            score_steps.append(item.step)
            scores.append(item.scores)
    if not steps:
        raise ValueError(f"{path}: no routing records")
    shape = (0, len(decoder.modules), len(decoder.experts))
    return RoutingRecords(
        steps=np.asarray(steps, dtype=np.int64),
        experts=list(decoder.experts),
        modules=list(decoder.modules),
        winners=np.stack(masks),
        skipped=skipped,
        phases=phases,
        score_steps=np.asarray(score_steps, dtype=np.int64),
        scores=np.stack(scores) if scores else np.zeros(shape),
    )


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
