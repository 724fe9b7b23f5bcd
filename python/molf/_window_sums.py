"""The held-out probe's per-tensor sums (`molf.heldout`): for each expert tensor, the window's
realized descent ½⟨g_prev + g, θ − θ_prev⟩, the potential η/(1 − β1^t)·⟨g, m / (√v/√(1 − β2^t)
+ ε)⟩ and the movement ‖θ − θ_prev‖₁, in float64.

An item is (slot, θ, θ_prev, g, g_prev, Adam's (m, v, step, (lr, β1, β2, ε)) or None). On
CUDA one Triton pass (`molf._probe_sums`) sums the items it can read; the rest, and every
item elsewhere, go through torch ops over tensors of one size at once (`_batch_sums`).
θ_prev and g_prev of a CUDA tensor may be in pinned host memory (`Heldout(offload=True)`):
they are copied to the device in runs of at most `STAGE_BYTES`, the next run's copy under way
while this one is summed, so the device never holds more than two runs of them."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch

from ._offload import fetch

__all__ = ["STAGE_BYTES", "tensor_sums", "stage_runs"]

STAGE_BYTES = 1 << 29  # host operands copied to the device per run (512 MiB)


def tensor_sums(items: list[tuple], remember: list | None = None) -> tuple[list[int], torch.Tensor, set]:
    """The slots of `items` and their (realized, potential, movement) rows in that order, as one
    float64 (n, 3) tensor on the device of the first row's batch; and the θ's of the items
    whose θ_prev ← θ and g_prev ← g copies a function appended to `remember` makes when called
    (the Triton pass's items whose operands are all on the device; none when `remember` is None)."""
    direct, hosted = [], []
    for item in items:
        (hosted if _host_operands(item) else direct).append(item)
    slots, rows, covered = _sums(direct, remember)
    runs = stage_runs(hosted, STAGE_BYTES)
    pending = _stage(runs[0]) if runs else None
    for i in range(len(runs)):
        staged = pending()
        pending = _stage(runs[i + 1]) if i + 1 < len(runs) else None
        more_slots, more_rows, _ = _sums(staged, None)
        slots += more_slots
        rows += more_rows
        del staged  # (its device copies go back to the pool for the run after next)
    return slots, torch.cat([r.to(rows[0].device) for r in rows]), covered


def _host_operands(item: tuple) -> list[int]:
    """The positions of the item's θ_prev and g_prev that are not on θ's device (in host memory)."""
    device = item[1].device
    return [k for k in (2, 4) if item[k].device != device]


def stage_runs(items: list[tuple], budget: int) -> list[list[tuple]]:
    """`items` in order, cut into runs whose host operands take at most `budget` bytes (a run
    of one item where that item alone takes more)."""
    runs: list[list[tuple]] = []
    size = budget  # (the first item opens a run)
    for item in items:
        n = sum(item[k].numel() * item[k].element_size() for k in _host_operands(item))
        if size + n > budget:
            runs.append([])
            size = 0
        runs[-1].append(item)
        size += n
    return runs


def _stage(run: list[tuple]) -> Callable[[], list[tuple]]:
    """Start copying the run's host operands to their devices; the returned function makes the
    current streams wait for the copies and returns the run with device operands."""
    where = [(i, k) for i, item in enumerate(run) for k in _host_operands(item)]
    ready = fetch([(run[i][k], run[i][1].device) for i, k in where])

    def staged() -> list[tuple]:
        out = [list(item) for item in run]
        for (i, k), t in zip(where, ready()):
            out[i][k] = t
        return [tuple(item) for item in out]

    return staged


def _sums(items: list[tuple], remember: list | None) -> tuple[list[int], list[torch.Tensor], set]:
    """Slots and row blocks of `items`, every operand on θ's device; the θ's of the items the
    function appended to `remember` copies (see `tensor_sums`)."""
    slots: list[int] = []
    rows: list[torch.Tensor] = []
    covered: set = set()
    device = items[0][1].device if items else None
    kernel = _fused_sums(device) if device is not None else None
    if kernel is not None:  # one Triton pass over the tensors it can read
        fused, rest = [], []
        for item in items:
            (fused if kernel.eligible(item, device) else rest).append(item)
        items = rest
        if fused:
            slots += [item[0] for item in fused]
            rows.append(kernel.heldout_sums(fused, remember))
            if remember is not None:
                covered = {item[1] for item in fused if kernel.remembers(item)}
    batches: dict[tuple, list[tuple]] = {}
    for item in items:
        batches.setdefault((item[1].numel(), item[1].device, item[5] is not None), []).append(item)
    for (numel, device, _), part_items in batches.items():
        per = max(1, _batch_elements(device) // numel)
        for start in range(0, len(part_items), per):
            part = part_items[start : start + per]
            slots += [item[0] for item in part]
            rows.append(_batch_sums(part))
    return slots, rows, covered


def _fused_sums(device: torch.device) -> ModuleType | None:
    """`molf._probe_sums` (one Triton pass for the sums) on CUDA where triton imports;
    None: the torch path (`_batch_sums`)."""
    if device.type != "cuda":
        return None
    try:
        from . import _probe_sums
    except ImportError:
        return None
    return _probe_sums


def _batch_elements(device: torch.device) -> int:
    """Elements of the tensors summed together at most (at least one tensor): on the CPU
    one tensor at a time (there are no kernel launches to save, and stacking copies)."""
    return 0 if device.type == "cpu" else 1 << 24


def _batch_sums(items: list[tuple]) -> torch.Tensor:
    """(realized, potential, movement) in float64 of each of `items`, tensors of one size and
    device: each operand stacked into one float32 (n, numel) matrix, so a few launches cover
    them all, and the temporaries stay bounded (`_batch_elements`). (One item: no stacking
    copy; so no operand is written to.)"""

    def operand(get: Callable[[tuple], torch.Tensor]) -> torch.Tensor:
        if len(items) == 1:
            return get(items[0]).reshape(1, -1).float()
        return torch.stack([get(item).reshape(-1) for item in items]).float()

    delta = operand(lambda item: item[1]) - operand(lambda item: item[2])
    g = operand(lambda item: item[3])
    # ⟨(g_prev + g)/2, θ − θ_prev⟩
    realized = (operand(lambda item: item[4]) + g).mul_(delta).sum(1).mul_(0.5)
    movement = torch.linalg.vector_norm(delta, ord=1, dim=1)
    if items[0][5] is None:
        potential = torch.zeros_like(realized)
    else:  # η ⟨g, m̂ / (√v̂ + ε)⟩ = η / (1 − β1^t) ⟨g, m / (√v / √(1 − β2^t) + ε)⟩
        steps = torch.stack([item[5][2] for item in items]).tolist()
        hyper = [
            (lr / (1 - beta1**t), (1 - beta2**t) ** -0.5, eps)
            for t, (_, _, _, _, _, (_, _, _, (lr, beta1, beta2, eps))) in zip(steps, items)
        ]
        scale, inv_sqrt_bc2, eps = torch.tensor(hyper, dtype=torch.float32).to(g.device).unsqueeze(-1).unbind(1)
        denom = torch.addcmul(eps, operand(lambda item: item[5][1]).sqrt(), inv_sqrt_bc2)
        potential = scale.squeeze(-1) * (operand(lambda item: item[5][0]) * g).div_(denom).sum(1)
    return torch.stack([realized, potential, movement], dim=1).double()
