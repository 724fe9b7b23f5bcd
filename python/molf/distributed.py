"""torch.distributed support (DDP, FSDP2): the process group over which the
per-rank score sums add up, the check that every rank routes alike, and the
merge of sharded layers.

Under FSDP2 (`fully_shard`) parameters, gradients and moments are DTensors
sharded over a device mesh; the optimizer's math runs on the local shards and
each rank's score sums cover its shard only, so one SUM all-reduce of the flat
score tensor over the mesh's shard dimension gives every rank the global sums
(under HSDP the replicate dimension already holds equal copies and is left out).
Under DDP gradients arrive averaged, so every rank holds bitwise the same
moments and scores and no reduction is needed; `check_ranks_agree` is the
insurance that catches a rank that diverged anyway.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ._core import ConfigError

__all__ = ["RankDivergenceError", "to_local", "is_sharded", "score_group", "any_on_group", "check_ranks_agree"]

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed
    DTensor = None


class RankDivergenceError(RuntimeError):
    """Ranks took different routing decisions (their ledgers disagree)."""


def is_sharded(t: torch.Tensor | None) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def to_local(t: torch.Tensor) -> torch.Tensor:
    """The rank's local shard of a DTensor (a view: in-place ops write the
    DTensor), any other tensor as is."""
    return t.to_local() if is_sharded(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it),
    any other tensor as is."""
    return t.full_tensor() if is_sharded(t) else t


def local_part(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of `whole` laid out as the DTensor `like` (every rank passes the
    same `whole`), or `whole` itself when `like` is not sharded."""
    if not is_sharded(like):
        return whole
    return distribute_tensor(whole, like.device_mesh, like.placements).to_local()


def _shard_dims(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(i for i, placement in enumerate(p.placements) if placement.is_shard())


def score_group(params: Iterable[torch.Tensor]):
    """The process group whose ranks' score sums add up to the global sums: the
    sharded dimension of the parameters' device mesh; None when the parameters
    are plain tensors (one process, or DDP) or their mesh has one rank there."""
    params = list(params)
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return None
    mesh, dims = sharded[0].device_mesh, _shard_dims(sharded[0])
    if len(sharded) != len(params):
        raise ConfigError(
            "routed parameters must be all DTensors (FSDP2 fully_shard) or all plain tensors; got a mix: "
            "shard the whole model, or every wrapped layer"
        )
    for p in sharded:
        if p.device_mesh != mesh or _shard_dims(p) != dims:
            raise ConfigError(
                f"routed parameters must share one device mesh and sharded mesh dimension; got {mesh} dims {dims} "
                f"and {p.device_mesh} dims {_shard_dims(p)}"
            )
    if len(dims) > 1:
        raise ConfigError(f"parameters sharded over several mesh dimensions {dims} (e.g. FSDP x TP) are not supported")
    if not dims or mesh.size(dims[0]) == 1:
        return None
    return mesh.get_group(dims[0])


def _collective_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_on_group(flag: bool, group) -> bool:
    """True if `flag` is set on any rank of `group` (no collective without a group)."""
    if group is None:
        return flag
    t = torch.tensor([float(flag)], device=_collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def world_mean(x: float) -> float:
    """The mean of `x` over every rank of the default process group (`x` itself when
    torch.distributed is not running): a held-out loss each rank measured on its own rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=_collective_device(None))
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _gather(rows: np.ndarray, group) -> list[np.ndarray]:
    mine = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(_collective_device(group))
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    return [t.cpu().numpy() for t in everyone]


def check_ranks_agree(optimizer, group=None) -> None:
    """Compare the optimizer ledger's decision checksum across the ranks of
    `group` (default: all); on a mismatch raise RankDivergenceError, on every
    rank, naming the first module whose routing history differs. One tiny
    all-gather when the ranks agree."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    ledger = optimizer.ledger
    checksum = ledger.checksum
    signed = checksum - (1 << 64) if checksum >= 1 << 63 else checksum
    heads = _gather(np.array([ledger.step, signed]), group)
    if all(np.array_equal(h, heads[0]) for h in heads):
        return
    steps = [int(h[0]) for h in heads]
    if len(set(steps)) > 1:
        raise RankDivergenceError(f"ranks have routed different numbers of steps: {steps}")
    # Per module: wins per expert, switches, last switch step and the last mask row.
    M = ledger.num_modules
    rows = np.concatenate(
        [
            ledger.wins().astype(np.int64),
            ledger.switches().astype(np.int64)[:, None],
            ledger.last_switch_step()[:, None],
            ledger.last_mask().astype(np.int64),
        ],
        axis=1,
    )
    tables = [t.reshape(M, -1) for t in _gather(rows, group)]
    names = optimizer.module_names
    for m in range(M):
        differing = [r for r, t in enumerate(tables) if not np.array_equal(t[m], tables[0][m])]
        if differing:
            raise RankDivergenceError(
                f"ranks disagree on the routing of module {names[m]!r} (index {m}) at step {steps[0]}: "
                f"rank 0 wins {tables[0][m][: ledger.num_experts].tolist()}, "
                f"rank {differing[0]} wins {tables[differing[0]][m][: ledger.num_experts].tolist()}"
            )
    raise RankDivergenceError(
        f"ranks' routing checksums differ at step {steps[0]} although per-module win counts agree: "
        "some module's winners differed at an earlier step"
    )


@torch.no_grad()
def merged_sharded(layer: nn.Module) -> nn.Module:
    """`MoLFLinear.merged` for DTensor (FSDP2) parameters: the delta from the
    gathered full LoRA tensors, added to the gathered dense weight and written
    back to each rank's shard. The base layer stays sharded like before."""
    w = layer.base.weight
    delta = layer.delta_weight(lambda t: t.full_tensor())
    merged = w.full_tensor().to(delta.dtype) + delta
    w.copy_(distribute_tensor(merged.to(w.dtype), w.device_mesh, w.placements))
    return layer.base
