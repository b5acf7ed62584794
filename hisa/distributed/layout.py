"""Which rank holds which key positions, and where HISA's blocks fall in each rank's shard.

Two layouts, the two that serving engines use for a sharded key cache (docs/distributed.md):

* ``contiguous(world_size, shard_size=C)``: rank ``r`` holds positions ``[r * C, (r + 1) * C)``
  (of each request in decode, of the packed key buffer in prefill); the last ranks may hold
  fewer keys or none. Appends go to the rank whose range holds the new position.
* ``interleaved(world_size, unit=U)``: position ``p`` lives on rank ``(p // U) % R``, the layout
  of vLLM's decode context parallelism (``cp_kv_cache_interleave_size = U``; U = 1 is its
  default, token-level round robin; U = 64 is page-level).

On every rank the local keys keep the global order: local position ``j`` is the ``j``-th
smallest global position the rank holds. The global range ``[a, c)`` then maps to the local
range ``[count_before(r, a), count_before(r, c))``, a contiguous run, in every layout.

HISA's blocks tile global positions from 0. A layout either keeps every block whole on one rank
(contiguous with ``C % B == 0``; interleaved with ``U % B == 0``: "whole blocks") or splits every
block evenly over all ranks (interleaved with ``B % (U * R) == 0``: "split blocks", each rank
holding ``B / R`` consecutive local positions of each block). Split blocks need the pooled mean
assembled from per-rank partial sums (:mod:`.pool`); any other split (a block on some ranks but
not all, unevenly) is rejected by :meth:`ShardLayout.check_hisa`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache.layout import PAGE_SIZE
from ..utils.validate import check_positive_int

LAYOUT_KINDS = ("contiguous", "interleaved")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ShardLayout:
    """How global key positions are spread over ``world_size`` ranks.

    Build one with :meth:`contiguous`, :meth:`contiguous_for` or :meth:`interleaved`.
    ``unit`` is the shard size C for "contiguous" and the round-robin unit U for "interleaved".

    Example:
        >>> layout = ShardLayout.interleaved(2, unit=1)       # vLLM DCP, token round robin
        >>> layout.local_length(1, 1000)                      # rank 1 holds 500 keys
        500
    """

    kind: str
    world_size: int
    unit: int

    def __post_init__(self) -> None:
        if self.kind not in LAYOUT_KINDS:
            raise ValueError(f"layout.kind: expected one of {LAYOUT_KINDS}, got {self.kind!r}")
        check_positive_int("layout.world_size", self.world_size)
        check_positive_int("layout.unit", self.unit)

    @classmethod
    def contiguous(cls, world_size: int, shard_size: int) -> "ShardLayout":
        """Rank r holds positions [r * shard_size, (r + 1) * shard_size)."""
        return cls("contiguous", world_size, shard_size)

    @classmethod
    def contiguous_for(cls, num_keys: int, world_size: int, *, block_size: int) -> "ShardLayout":
        """The even contiguous split of ``num_keys`` keys into whole ``block_size`` blocks.

        Each rank gets ``ceil(ceil(num_keys / B) / R)`` blocks; trailing ranks may get fewer
        keys, or none when there are fewer blocks than ranks.
        """
        check_positive_int("num_keys", num_keys, minimum=0)
        check_positive_int("block_size", block_size)
        blocks = max(1, _ceil_div(_ceil_div(num_keys, block_size), world_size))
        return cls.contiguous(world_size, blocks * block_size)

    @classmethod
    def interleaved(cls, world_size: int, unit: int = 1) -> "ShardLayout":
        """Position p on rank (p // unit) % world_size (vLLM's DCP layout)."""
        return cls("interleaved", world_size, unit)

    # ---- position maps (tensors: int64 math on the tensor's device, no host sync) ----------

    @property
    def capacity(self) -> int | None:
        """Largest number of positions the layout can hold (None: unbounded)."""
        return self.world_size * self.unit if self.kind == "contiguous" else None

    def check_rank(self, rank: int) -> int:
        check_positive_int("rank", rank, minimum=0)
        if rank >= self.world_size:
            raise ValueError(f"rank: expected a value in [0, {self.world_size}) (the layout's "
                             f"world_size), got {rank}")
        return rank

    def owner(self, pos: torch.Tensor) -> torch.Tensor:
        """Rank holding each global position (int64)."""
        pos = pos.long()
        if self.kind == "contiguous":
            return pos // self.unit
        return (pos // self.unit) % self.world_size

    def count_before(self, rank: int, pos: torch.Tensor) -> torch.Tensor:
        """Keys rank ``rank`` holds at global positions < ``pos`` (int64, elementwise).

        This is also the local length of a request whose global length is ``pos``, and the
        local position of the first key at or after ``pos``.
        """
        pos = pos.long().clamp_min(0)
        U, R = self.unit, self.world_size
        if self.kind == "contiguous":
            return (pos - rank * U).clamp(0, U)
        G = U * R
        return (pos // G) * U + (pos % G - rank * U).clamp(0, U)

    def to_global(self, rank: int, local: torch.Tensor) -> torch.Tensor:
        """Global position of local position ``local`` on rank ``rank`` (int64)."""
        local = local.long()
        U, R = self.unit, self.world_size
        if self.kind == "contiguous":
            return rank * U + local
        return ((local // U) * R + rank) * U + local % U

    def local_length(self, rank: int, num_keys: int) -> int:
        """Keys rank ``rank`` holds out of global positions [0, num_keys)."""
        return int(self.count_before(rank, torch.tensor(num_keys)))

    def positions(self, rank: int, num_keys: int, device=None) -> torch.Tensor:
        """Global positions rank ``rank`` holds out of [0, num_keys), ascending (int64)."""
        n = self.local_length(rank, num_keys)
        return self.to_global(rank, torch.arange(n, device=device))

    # ---- blocks ---------------------------------------------------------------------------

    def whole_blocks(self, block_size: int) -> bool:
        """Every B-token block lies on one rank."""
        return self.world_size == 1 or self.unit % block_size == 0

    def split_blocks(self, block_size: int) -> bool:
        """Every block is spread evenly, B / R consecutive local positions on each rank."""
        return (self.kind == "interleaved" and self.world_size > 1
                and block_size % (self.unit * self.world_size) == 0)

    def check_hisa(self, block_size: int, *, name: str = "layout") -> None:
        """Raise ValueError unless sharded HISA supports this layout at ``block_size``.

        The per-rank token stage hands each query's kept blocks to the paged flat indexer as a
        compact page table, so each block's run on a rank must be whole 64-token pages.
        """
        if block_size % PAGE_SIZE:
            raise ValueError(f"block_size: expected a multiple of the page size {PAGE_SIZE} for "
                             f"sharded HISA (each rank's token stage reads whole pages of kept "
                             f"blocks), got {block_size}")
        if self.whole_blocks(block_size):
            return
        if not self.split_blocks(block_size):
            raise ValueError(
                f"{name}: {self.kind} with unit {self.unit} over {self.world_size} ranks puts "
                f"{block_size}-token blocks partly on some ranks; expected whole blocks (unit a "
                f"multiple of {block_size}) or an even split (interleaved, {block_size} a "
                f"multiple of unit * world_size)")
        if (block_size // self.world_size) % PAGE_SIZE:
            raise ValueError(
                f"{name}: interleaved unit {self.unit} over {self.world_size} ranks leaves "
                f"{block_size // self.world_size} tokens of each {block_size}-token block on a "
                f"rank; the token stage needs whole {PAGE_SIZE}-token pages: use "
                f"block_size >= {PAGE_SIZE * self.world_size} or a unit that is a multiple of "
                f"{block_size}")


class BlockMap:
    """HISA's blocks as seen from one rank: which blocks it scores, where their tokens are.

    Every block is scored (and, in decode, has its pooled row stored) by exactly one rank:
    with whole blocks the rank that holds it; with split blocks rank ``b % R`` ("scored" index
    ``j`` is then block ``j * R + r``). Scored blocks are numbered in ascending global order.
    """

    def __init__(self, layout: ShardLayout, rank: int, block_size: int) -> None:
        layout.check_hisa(block_size)
        self.layout, self.rank, self.B = layout, layout.check_rank(rank), block_size
        self.split = not layout.whole_blocks(block_size)

    def scored_before(self, g: torch.Tensor) -> torch.Tensor:
        """Number of blocks this rank scores with global id < g (int64)."""
        g = g.long().clamp_min(0)
        if self.split:
            R = self.layout.world_size
            return (g - self.rank + R - 1).clamp_min(0) // R
        return self.layout.count_before(self.rank, g * self.B) // self.B

    def scored_global(self, j: torch.Tensor) -> torch.Tensor:
        """Global id of this rank's scored block ``j`` (int64)."""
        j = j.long()
        if self.split:
            return j * self.layout.world_size + self.rank
        return self.layout.to_global(self.rank, j * self.B) // self.B

    def run(self, g: torch.Tensor, lo: torch.Tensor | None = None,
            hi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Local [start, end) of this rank's tokens of block g, clipped to global [lo, hi)."""
        a = g.long() * self.B
        c = a + self.B
        if lo is not None:
            a = torch.maximum(a, lo.long())
        if hi is not None:
            c = torch.minimum(c, hi.long())
        c = torch.maximum(a, c)
        return self.layout.count_before(self.rank, a), self.layout.count_before(self.rank, c)

    def pooled_column(self, g: torch.Tensor) -> torch.Tensor:
        """Local block-table column of the page that holds the pooled row of scored block g:
        the page with this rank's last tokens of the block (int64)."""
        end = self.layout.count_before(self.rank, (g.long() + 1) * self.B)
        return (end - 1).clamp_min(0) // PAGE_SIZE

    def scored_capacity(self, local_tokens: int) -> int:
        """Blocks this rank can score whose tokens fit in ``local_tokens`` local positions (the
        capacity of a block-table row)."""
        if self.split:
            fits = local_tokens // (self.B // self.layout.world_size)
            return int(self.scored_before(torch.tensor(fits)))
        return local_tokens // self.B

    @property
    def max_run(self) -> int:
        """Most tokens of one block on one rank."""
        return self.B // self.layout.world_size if self.split else self.B
