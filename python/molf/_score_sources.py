"""One step's score sums: the flat device tensor of per-tensor score numerators (and the
non-finite flag), its host copy (lagged mode: started in the background), and the
[modules x experts] score matrix made from them (SPEC §2, §4)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from . import distributed

__all__ = ["_ScoreSources", "routed_score_group"]


class _ScoreSources:
    """One step's per-tensor score sums on the device, the non-finite flag of its
    gradients, and what turns them into the [modules x experts] score matrix on
    the host (slot, lr and element count per tensor); also the step counters the
    step advanced, so a skipped step can give them back."""

    def __init__(self, flag: torch.Tensor | None, group=None) -> None:
        self.flag = flag
        self.group = group  # FSDP2: the shard group whose ranks' sums add up to the global ones
        self.sums: list[torch.Tensor] = []
        self.slots: list[int] = []
        self.lrs: list[float] = []
        self.numels: list[int] = []
        self.steps: list[torch.Tensor] = []
        self.won: torch.Tensor | None = None  # the device's winners, where it decided the step
        self.won_host: np.ndarray | None = None
        self._host: torch.Tensor | None = None
        self._event = None

    def add(self, sums: torch.Tensor, slots: Sequence[int], lrs: Sequence[float], numels: Sequence[int]) -> None:
        self.sums.append(sums)
        self.slots.extend(slots)
        self.lrs.extend(lrs)
        self.numels.extend(numels)

    def _flat(self) -> torch.Tensor:
        parts = list(self.sums)
        if self.flag is not None:
            parts.append(self.flag.to(torch.float64))
        if self.won is not None:
            parts.append(self.won.to(torch.float64))
        flat = torch.cat(parts)
        if self.group is not None:
            # Global numerators (and the non-finite flag of any rank), identical on every rank.
            torch.distributed.all_reduce(flat, group=self.group)
        return flat

    def start_copy(self) -> None:
        """Begin the device-to-host copy without waiting for it (lagged mode, a step the
        device decided)."""
        if not self.sums or self.sums[0].device.type != "cuda":
            return
        flat = self._flat()
        self._host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        self._host.copy_(flat, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def resolve(self, shape: tuple[int, int], score: str) -> np.ndarray | None:
        """The score matrix, or None when the step's gradients were not finite."""
        M, E = shape
        if not self.sums:
            return np.full(shape, np.nan)
        if self._host is not None:
            if not self._event.query():
                self._event.synchronize()
            flat = self._host.numpy()
        else:
            flat = self._flat().cpu().numpy()  # the step's one device-to-host transfer
        if self.won is not None:
            flat, self.won_host = flat[: -self.won.numel()], flat[-self.won.numel() :] != 0
        if self.flag is not None:
            if flat[-1] != 0:
                return None
            flat = flat[:-1]
        slots = np.asarray(self.slots, dtype=np.int64)
        numel = np.bincount(slots, weights=np.asarray(self.numels, dtype=np.float64), minlength=M * E)
        with np.errstate(divide="ignore", invalid="ignore"):
            if score == "epd":
                num = np.bincount(slots, weights=np.asarray(self.lrs) * flat, minlength=M * E)
                scores = num / numel
            else:
                num = np.bincount(slots, weights=flat, minlength=M * E)
                scores = np.sqrt(num) / np.sqrt(numel)
        scores[numel == 0] = np.nan  # an expert without gradients this step never wins
        return scores.reshape(M, E)

    def give_back_steps(self) -> None:
        if self.steps:
            torch._foreach_sub_(self.steps, 1)


def routed_score_group(param_groups: list[dict], key: tuple | None) -> tuple:
    """(first routed parameter, the process group the score sums are all-reduced over (None:
    no reduction)): `key` as it is while the first routed parameter object is the same, else
    looked up again (accelerate and FSDP2 swap parameters after construction)."""
    first = next(g["params"][0] for g in param_groups if g["molf_role"] != "plain" and g["params"])
    if key is None or key[0] is not first:
        routed = [p for g in param_groups if g["molf_role"] != "plain" for p in g["params"]]
        key = (first, distributed.score_group(routed))
    return key
