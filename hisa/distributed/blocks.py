"""Block stage of sharded HISA: per-rank candidates, one exchange, the same global top-m everywhere.

A query's eligible blocks are ``[first, end)`` (contract section 3); ``first`` and ``end - 1``
are forced. Every rank derives the forced blocks from the query's window, so they are never
sent: each rank sends only its best ``m - 2`` non-forced blocks (scores and global ids). The
global top ``m - 2`` non-forced blocks are in the union of those lists, and merging them by
(score desc, block id asc) reproduces the single-process top-m with its tie rule. The forced
blocks plus the merged ones are the kept blocks, identical on every rank.

The scores come from the public flat indexers run over the pooled rows: the block score
``J[t, b] = sum_h w[t, h] ReLU(q[t, h] . kbar[b])`` (times the pooled row's scale) is the flat
indexer's formula with the pooled rows as keys. A rank's scored blocks are in ascending global
order, so a query's non-forced eligible blocks on the rank are one contiguous local range.
"""
from __future__ import annotations

import torch

from .. import dsa_index, dsa_index_paged
from ..cache.layout import PAGE_SIZE, pooled_row_bytes
from .comm import exchange_candidates
from .layout import BlockMap
from .merge import merge_topk


def eligible_range(ks: torch.Tensor, ke: torch.Tensor, block_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """[first, end) eligible global blocks of each query (end == first for an empty window)."""
    first = ks.long() // block_size
    end = (ke.long() + block_size - 1) // block_size
    return first, torch.where(ke.long() > ks.long(), end, first)


def nonforced_range(bmap: BlockMap, first: torch.Tensor, end: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Local scored-block range [lo, hi) of each query's non-forced eligible blocks."""
    lo = bmap.scored_before(first + 1)
    hi = torch.maximum(bmap.scored_before(end - 1), lo)
    return lo, hi


def kept_blocks(cand_scores: torch.Tensor, cand_ids: torch.Tensor, first: torch.Tensor,
                end: torch.Tensor, *, block_topk: int, group) -> torch.Tensor:
    """Exchange this rank's non-forced candidates; the global kept blocks of every query.

    Args:
        cand_scores, cand_ids: fp32 / int64 [rows, m - 2], this rank's best non-forced blocks
            (global ids, -1 where fewer).

    Returns:
        int64 [rows, m] global block ids, ascending, -1 padded (the same on every rank).
    """
    rows = first.shape[0]
    c = block_topk - 2
    has = end > first
    f0 = torch.where(has, first, -1)
    f1 = torch.where(end - 1 > first, end - 1, -1)
    if c > 0:
        scores, ids = exchange_candidates(cand_scores, cand_ids, group, "blocks")
        merged, _ = merge_topk(scores, ids, c)
    else:
        merged = torch.empty(rows, 0, dtype=torch.long, device=first.device)
    kept = torch.cat([f0.unsqueeze(1), f1.unsqueeze(1), merged], dim=1)
    big = torch.iinfo(torch.int64).max
    kept = torch.sort(torch.where(kept >= 0, kept, big), dim=1).values
    return torch.where(kept == big, -1, kept)


def packed_candidates(q: torch.Tensor, pooled: torch.Tensor, pooled_scale: torch.Tensor | None,
                      weights: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                      bmap: BlockMap, *, count: int, backend: str
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's best ``count`` non-forced blocks per query (prefill), via :func:`hisa.dsa_index`
    over its pooled rows [NB_scored, D]. Returns (scores fp32, global ids int64) [T, count]."""
    T = q.shape[0]
    if pooled.shape[0] == 0 or T == 0:
        return (torch.full((T, count), float("-inf"), device=q.device),
                torch.full((T, count), -1, dtype=torch.long, device=q.device))
    off, scores = dsa_index(q, pooled, weights, lo.to(torch.int32), hi.to(torch.int32),
                            k_scale=pooled_scale, topk=count, return_scores=True,
                            backend=backend)
    ids = torch.where(off >= 0, bmap.scored_global(lo.unsqueeze(1) + off.long()), -1)
    return scores, ids


def pooled_pages(pooled_cache: torch.Tensor, block_table: torch.Tensor, bmap: BlockMap,
                 lo: int, head_dim: int, local_tokens: int
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each request's scored pooled rows from ``lo`` on, repacked as key-cache pages.

    The pooled cache keeps one row (D FP8 values + fp32 scale) per physical page; the paged
    flat indexer reads pages of 64 rows (values, then scales). Request b's virtual sequence is
    its scored blocks lo, lo + 1, ... in order.

    ``local_tokens`` bounds a request's local length (the block table's capacity, or less when
    the caller knows a smaller maximum length), so the repack's size is fixed per shape.

    Returns:
        (pages uint8 [batch * P, 64 * (D + 4)], block table int32 [batch, P], scored count NV).
    """
    batch, cols = block_table.shape
    nv = max(bmap.scored_capacity(min(local_tokens, cols * PAGE_SIZE)) - lo, 0)
    n_pages = -(-nv // PAGE_SIZE)
    dev = block_table.device
    row_bytes = pooled_row_bytes(head_dim)
    if n_pages == 0:
        return (torch.empty(0, PAGE_SIZE * row_bytes, dtype=torch.uint8, device=dev),
                torch.empty(batch, 0, dtype=torch.int32, device=dev), 0)
    j = lo + torch.arange(n_pages * PAGE_SIZE, device=dev)
    col = bmap.pooled_column(bmap.scored_global(j)).clamp(max=cols - 1)
    page = block_table.long()[:, col].clamp(0, pooled_cache.shape[0] - 1)     # [batch, NP*64]
    rows = pooled_cache[page].view(batch * n_pages, PAGE_SIZE, row_bytes)
    n = batch * n_pages
    packed = torch.cat([rows[:, :, :head_dim].reshape(n, PAGE_SIZE * head_dim),      # values
                        rows[:, :, head_dim:].reshape(n, PAGE_SIZE * (row_bytes - head_dim))],
                       dim=1)                                                         # scales
    table = torch.arange(batch * n_pages, dtype=torch.int32, device=dev).view(batch, n_pages)
    return packed.contiguous(), table, nv


def paged_candidates(q: torch.Tensor, pooled_cache: torch.Tensor, weights: torch.Tensor,
                     block_table: torch.Tensor, first: torch.Tensor, end: torch.Tensor,
                     bmap: BlockMap, *, count: int, backend: str, local_tokens: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's best ``count`` non-forced blocks per query row (decode), via
    :func:`hisa.dsa_index_paged` over its pooled rows repacked as pages.

    Args:
        q: [batch, next_n, H, D]; first, end: int64 [batch, next_n] eligible block ranges.

    Returns:
        (scores fp32, global ids int64) [batch * next_n, count].
    """
    batch, next_n, _, D = q.shape
    rows = batch * next_n
    lo, hi = nonforced_range(bmap, first, end)
    lo0 = int(bmap.scored_before(torch.tensor(1)))     # first == 0 in decode: one lo per rank
    pages, table, nv = pooled_pages(pooled_cache, block_table, bmap, lo0, D, local_tokens)
    if nv == 0 or rows == 0:
        return (torch.full((rows, count), float("-inf"), device=q.device),
                torch.full((rows, count), -1, dtype=torch.long, device=q.device))
    lens = (hi - lo0).clamp(0, nv).to(torch.int32)                            # [batch, next_n]
    idx, scores = dsa_index_paged(q, pages, weights, lens, table, topk=count,
                                  return_scores=True, backend=backend)
    ids = torch.where(idx >= 0, bmap.scored_global(lo0 + idx.long()), -1)
    return scores, ids
