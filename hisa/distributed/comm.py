"""The collectives sharded selection uses, and a counter of the bytes they move.

Every exchange is a fixed-size all-gather (or, for split-block pooling, an all-reduce) on
``torch.distributed`` (NCCL on GPUs, gloo on CPU): sizes depend only on shapes, never on data,
so the decode path has no host synchronisation and can be captured in a CUDA graph together
with its NCCL collectives (conditions in docs/distributed.md).

A candidate exchange packs scores and ids into one int32 tensor ``[rows, 2, c]`` (the fp32
scores bit-cast, not converted) so each step is a single collective.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..utils.validate import check_positive_int


@dataclass
class CommRecord:
    """Bytes each rank contributed to every collective in a :func:`count_bytes` block."""

    steps: list = field(default_factory=list)     # [(name, bytes contributed by this rank)]

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.steps)


_RECORDS: list[CommRecord] = []


@contextlib.contextmanager
def count_bytes():
    """Record the collectives issued inside the block (per rank, bytes this rank sends in).

    Example:
        >>> with count_bytes() as rec:
        ...     hisa.distributed.hisa_index_paged(...)
        >>> rec.steps     # [("blocks", 7936), ("tokens", 262144)]
    """
    rec = CommRecord()
    _RECORDS.append(rec)
    try:
        yield rec
    finally:
        _RECORDS.remove(rec)


def _note(name: str, nbytes: int) -> None:
    for rec in _RECORDS:
        rec.steps.append((name, nbytes))


def group_rank(group) -> tuple[int, int]:
    """(rank, world size) of this process in ``group`` (the default group when None)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: expected an initialized torch.distributed process group "
                         "(call torch.distributed.init_process_group first), got none")
    return dist.get_rank(group), dist.get_world_size(group)


def check_group(layout, group) -> int:
    """This process's rank; the group's size must be the layout's world size."""
    rank, world = group_rank(group)
    if world != layout.world_size:
        raise ValueError(f"layout: expected world_size {world} (the process group's size), got "
                         f"{layout.world_size}")
    return rank


def all_gather(x: torch.Tensor, group, name: str) -> torch.Tensor:
    """[world, *x.shape]: every rank's ``x`` (fixed size), stacked in rank order."""
    world = dist.get_world_size(group)
    x = x.contiguous().view(1, *x.shape)
    _note(name, x.numel() * x.element_size())
    # The concatenation form (dim 0 = world * 1): what both NCCL and gloo accept.
    out = torch.empty((world,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)
    return out


def all_reduce_sum(x: torch.Tensor, group, name: str) -> torch.Tensor:
    """Elementwise sum over ranks, in place."""
    _note(name, x.numel() * x.element_size())
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def exchange_candidates(scores: torch.Tensor, ids: torch.Tensor, group, name: str
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather every rank's [rows, c] candidates: (scores [rows, world * c], ids int64 same).

    Ids travel as int32 (positions and block ids of one request fit), scores bit-exactly.
    """
    rows, c = scores.shape
    packed = torch.stack([scores.float().contiguous().view(torch.int32),
                          ids.to(torch.int32)], dim=1)                      # [rows, 2, c]
    got = all_gather(packed, group, name)                                   # [R, rows, 2, c]
    got = got.permute(1, 2, 0, 3).reshape(rows, 2, -1)                      # [rows, 2, R*c]
    return got[:, 0].contiguous().view(torch.float32), got[:, 1].long()


def exchange_bytes(rows: int, candidates: int) -> int:
    """Bytes one rank contributes to one candidate exchange of ``rows`` x ``candidates``."""
    check_positive_int("rows", rows, minimum=0)
    return rows * candidates * 8
