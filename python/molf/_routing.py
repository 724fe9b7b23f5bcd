"""The routing half of `MoLFAdamW`: one call into the Rust router per step for all
modules, the ledger and the routing log, lagged mode's pending scores, skipped steps,
the held-out probe's measurements (through `expert_view()`), the process group the score
sums are reduced over, and the read-only insight (`router`, `ledger`, `routing_summary`).
A base class of `MoLFAdamW` only."""

from __future__ import annotations

import os

import numpy as np

from . import distributed
from ._core import Ledger, Router
from ._device_routing import DeviceDecision
from ._expert_view import ExpertView
from ._score_sources import _ScoreSources, routed_score_group
from .checkpoint import is_state_init_step
from .routing_log import LogSettings, RoutingLog, phase_of_last_step
from .summary import RoutingSummary

__all__ = ["_Routing"]


class _Routing:
    """Routing, bookkeeping and insight of `MoLFAdamW` (mixed in before `torch.optim.Optimizer`)."""

    def _measure_heldout(self) -> None:
        # Not on torch.distributed.checkpoint's state-init step: a load replaces it.
        if self._probe is not None and self._probe.due(self._router.step) and not self._state_init_step:
            self._probe.measure(self)  # which measures through `expert_view()`

    def _route(self, scores: np.ndarray) -> np.ndarray:
        """One call into the Rust router for all modules; book and log it."""
        mask = self._router.route(scores)
        self._ledger.record(scores, mask)
        # Only what keeps records (the log, the held-out probe) needs to know.
        keeps_records = self._log is not None or self._probe is not None
        self._state_init_step = keeps_records and is_state_init_step(self._ledger.step, scores, self.param_groups)
        if self._check_every and self._ledger.step % self._check_every == 0:
            distributed.check_ranks_agree(self)
        if self._log is not None and not self._state_init_step:
            self._log.write(self._ledger.step, phase_of_last_step(self._router), scores, mask)
        return mask

    def _settle(self) -> None:
        """Book the step the device decided (`molf._device_routing`), whose scores and
        winners reached the host meanwhile: route it, check the router picked the device's
        winners, record and log it (or count it skipped). Everything that reads or replaces
        the routing state calls this first."""
        sources, self._unbooked = self._unbooked, None
        if sources is None:
            return
        scores = sources.resolve(self._shape, self.score)
        if scores is None:
            sources.give_back_steps()
            self._record_skip()
            return
        DeviceDecision.check(self._route(scores), sources.won_host)

    def _record_skip(self) -> None:
        self._skipped_steps += 1
        if self._log is not None:
            self._log.write_skip(self._ledger.step, "non-finite gradient")

    def _resolve_pending(self) -> None:
        """Lagged mode: read the previous step's scores before this step counts.
        If its gradients were not finite its device work was skipped: give its
        step counters back and route this step on its own scores."""
        if isinstance(self._pending, _ScoreSources):
            matrix = self._pending.resolve(self._shape, self.score)
            if matrix is None:
                self._pending.give_back_steps()
                self._record_skip()
            self._pending = matrix

    def _scores_to_route(self, sources: _ScoreSources) -> np.ndarray | None:
        """This step's score matrix (exact mode: one device-to-host transfer), or in
        lagged mode the previous step's while this step's copies in the background.
        None when the scores to route on came from non-finite gradients."""
        if not self.lagged:
            return sources.resolve(self._shape, self.score)
        previous, self._pending = self._pending, sources
        sources.start_copy()
        if previous is None:  # the first step, or the one after a skipped step: its own scores
            previous = self._pending = sources.resolve(self._shape, self.score)
        return previous

    def _score_group(self):
        """The process group the score sums are all-reduced over (None: no reduction)."""
        self._group_key = routed_score_group(self.param_groups, self._group_key)
        return self._group_key[1]

    @property
    def _shape(self) -> tuple[int, int]:
        return len(self.module_names), len(self.expert_names)

    @property
    def log_path(self) -> str | None:
        """Where the routing log goes (None: no log)."""
        return None if self._log is None else self._log.path

    def set_log(self, log: LogSettings | str | os.PathLike | None) -> None:
        """Write the routing log as `log` says from now on (a `LogSettings` or a plain path,
        as `MoLFAdamW(log=...)` takes; None: stop): at step 0 a new log (an existing file is
        moved aside on the first write); past it, as after `load_state_dict`, the log of the
        run so far, in the format it began in (records past this step are dropped)."""
        self._settle()
        if log is None:
            self._log = None
            return
        routing_log = RoutingLog(log, self.module_names, self.expert_names)
        if self._ledger.step or self._skipped_steps:
            routing_log.resume(self._ledger.step, self._skipped_steps)
        self._log = routing_log

    # ---------------------------------------------------------------- insight

    @property
    def router(self) -> Router:
        """The Rust router (read it, don't step it: the optimizer does)."""
        self._settle()
        return self._router

    @property
    def ledger(self) -> Ledger:
        """The Rust ledger of scores, wins and switches."""
        self._settle()
        return self._ledger

    def routing_summary(self) -> RoutingSummary:
        """Per-expert shares, switches and per-module statistics so far."""
        self._settle()
        return RoutingSummary.from_ledger(
            self._ledger,
            self._router.incumbents(),
            self.module_names,
            self.expert_names,
            self._router.phase,
            self._skipped_steps,
        )

    def expert_view(self) -> ExpertView:
        """The view of this optimizer's expert tensors that the held-out probe measures
        through (`molf.heldout`): groups, state, routing shape, score group, and the live
        router and ledger, which it may put back."""

        self._settle()

        def set_routing(router: Router, ledger: Ledger) -> None:
            self._router, self._ledger = router, ledger

        return ExpertView(
            self.param_groups,
            self.state,
            self._shape,
            self._score_group,
            lambda: (self._router, self._ledger),
            set_routing,
        )
