"""`ExpertView`: what the optimizer hands the held-out probe (`molf.heldout`) of itself —
its param groups and state, the routing shape, the score group, the live Router and
Ledger and a way to put back saved ones — so the probe reads no optimizer internals."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from ._core import Ledger, Router
from .wrap import expert_tag

__all__ = ["ExpertView"]


class ExpertView:
    """An optimizer's expert tensors as the held-out probe sees them. `routing` returns the
    live (Router, Ledger) at each call (a measurement may replace them); `set_routing` puts
    a pair back; `score_group` returns the process group the sums are all-reduced over."""

    def __init__(
        self,
        param_groups: list[dict],
        state: dict,
        shape: tuple[int, int],
        score_group: Callable[[], Any],
        routing: Callable[[], tuple[Router, Ledger]],
        set_routing: Callable[[Router, Ledger], None],
    ) -> None:
        self.param_groups = param_groups
        self.state = state
        self.shape = shape
        self.score_group = score_group
        self._routing = routing
        self._set_routing = set_routing

    @property
    def router(self) -> Router:
        return self._routing()[0]

    @property
    def ledger(self) -> Ledger:
        return self._routing()[1]

    def restore_routing(self, router: Router, ledger: Ledger) -> None:
        """Put `router` and `ledger` in the optimizer in place of its own."""
        self._set_routing(router, ledger)

    def params(self) -> list[torch.Tensor]:
        """Every parameter of every param group, in order."""
        return [p for g in self.param_groups for p in g["params"]]

    def expert_tensors(self) -> Iterator[tuple[dict, torch.Tensor, int]]:
        """(group, parameter, its (module, expert) slot) of every routed expert tensor."""
        for group in self.param_groups:
            if group["molf_role"] != "plain":
                for p, slot in zip(group["params"], group["molf_slots"]):
                    if expert_tag(p) is not None:
                        yield group, p, slot
