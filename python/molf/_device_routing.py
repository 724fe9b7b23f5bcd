"""The exact step without its host sync (issue #32).

An exact step waits for its own scores: the host copies them, the Rust router decides,
and only then launches the winners' updates. That wait drains the device's queue every
step, and the next forward is then issued while the device idles. Where the router's
next decision is a plain rule of the step's scores (`Router.forecast`: an expert mask
gated by finite scores — warm-up, policy "heldout", a frozen router — or top-1, the
paper's policy), the device computes the scores and the winners itself and the update
follows on the device; the host books the step (`Router.route`, the Ledger, the log)
later, from a copy that has long arrived, and checks that the router picked the same
winners (`DeviceDecision.check`).

The device's scores are bitwise the host's (`_ScoreSources.resolve`, which the booking
still uses): per slot the same float64 products lr·sum summed onto 0.0 in the same order
(a slot has at most two tensors — a dense weight and its bias, or a LoRA pair —, and the
plan checks it), the same correctly rounded division (and, for PFN, square roots: CUDA's
are, and √N is numpy's once per plan; torch's vectorized CPU sqrt, met only by the tests'
interpreter runs, is within an ulp, so a PFN score there within two), and NaN where a slot
has no tensor.
"""

from __future__ import annotations

import numpy as np
import torch

from ._core import InternalError

__all__ = ["DeviceDecision"]


class DeviceDecision:
    """Per plan: the routed tensors' slots as two gather indices per slot (the second
    pointing at a zero where a slot has one tensor), and each slot's element count."""

    def __init__(self, slots: np.ndarray, numels: np.ndarray, num_slots: int, device: torch.device) -> None:
        T = len(slots)
        first = np.full(num_slots, T, dtype=np.int64)  # T: the appended zero (no tensor)
        second = np.full(num_slots, T, dtype=np.int64)
        for t, slot in enumerate(slots):  # in tensor order, as np.bincount adds
            if first[slot] == T:
                first[slot] = t
            else:
                second[slot] = t
        count = np.bincount(slots, weights=numels.astype(np.float64), minlength=num_slots)
        self.num_slots = num_slots
        self.device = device
        index = np.stack([first, second])
        self._index = torch.from_numpy(index).to(device)
        self._numel = torch.from_numpy(count).to(device)
        self._root_numel = torch.from_numpy(np.sqrt(count)).to(device)  # PFN's √N, as the host takes it
        self._empty = torch.from_numpy(count == 0).to(device)
        self._slots = torch.from_numpy(np.asarray(slots, dtype=np.int64)).to(device)
        self._gates: tuple[bytes, torch.Tensor] | None = None

    @staticmethod
    def applies(slots: np.ndarray, num_slots: int) -> bool:
        """Whether every slot has at most two tensors (sums that any order adds alike)."""
        return len(slots) == 0 or int(np.bincount(slots, minlength=num_slots).max()) <= 2

    def scores(self, sums: torch.Tensor, lrs: torch.Tensor, score: str) -> torch.Tensor:
        """The [slots] float64 score vector, bitwise `_ScoreSources.resolve`'s (`lrs`: each
        routed tensor's float64 learning rate, on the device)."""
        terms = lrs * sums if score == "epd" else sums
        terms = torch.cat([terms, terms.new_zeros(1)])
        num = (terms.new_zeros(self.num_slots) + terms[self._index[0]]) + terms[self._index[1]]
        if score == "epd":
            scores = num / self._numel
        else:
            scores = num.sqrt() / self._root_numel
        return scores.masked_fill_(self._empty, float("nan"))

    def winners(self, scores: torch.Tensor, rule: tuple[str, np.ndarray | None], num_experts: int) -> torch.Tensor:
        """Bool [slots]: the rule of `Router.forecast` applied to `scores`."""
        finite = scores.isfinite()
        kind, mask = rule
        if kind == "gated":
            return finite & self._gate(mask)
        rows = scores.view(-1, num_experts)
        finite = finite.view(-1, num_experts)
        # argmax returns the first of equal maxima: ties go to the lower index.
        best = rows.masked_fill(~finite, float("-inf")).argmax(1, keepdim=True)
        won = torch.zeros_like(finite).scatter_(1, best, finite.gather(1, best))
        return won.view(-1)

    def per_tensor(self, won: torch.Tensor) -> torch.Tensor:
        """The apply flag (float64, 1 or 0) of every routed tensor."""
        return won[self._slots].to(torch.float64)

    def _gate(self, mask: np.ndarray) -> torch.Tensor:
        """The rule's mask on the device (uploaded again only when it changes)."""
        key = np.ascontiguousarray(mask, dtype=bool).tobytes()
        if self._gates is None or self._gates[0] != key:
            self._gates = key, torch.from_numpy(np.frombuffer(key, dtype=bool).copy()).to(self.device)
        return self._gates[1]

    @staticmethod
    def check(routed: np.ndarray, device_won: np.ndarray) -> None:
        """The router's winners of a step the device decided must be the device's."""
        if not np.array_equal(routed.reshape(-1), device_won.astype(bool)):
            diff = np.flatnonzero(routed.reshape(-1) != device_won.astype(bool))
            raise InternalError(
                f"the device's routing of a step differs from the router's at slots {diff[:8].tolist()}: "
                "please report this (fused=False avoids the device decision)"
            )
