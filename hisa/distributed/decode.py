"""Sharded decode: HISA and the flat indexer over a paged key cache split across ranks.

Each rank owns a paged key cache holding its positions of every request (local position ``j``
of request ``b`` is the ``j``-th smallest position of ``b`` the rank holds, at slot
``block_table[b, j // 64] * 64 + j % 64`` of its own block table) and the pooled rows of the
blocks it scores (:class:`.layout.BlockMap`). The queries, weights and the *global* sequence
lengths are the same on every rank (vLLM's decode context parallelism gathers the queries of
the group); every rank gets the same selection.

No host synchronisation and nothing data-dependent is allocated on this path: local lengths are
computed from the global ones on the device, each exchange is a fixed-size all-gather
(``[rows, m - 2]`` block candidates and ``[rows, k]`` token candidates, score and id each), the
merges are ``torch.topk`` over fixed-width rows, and each rank's local work runs through the
public paged ops (Triton on CUDA with ``backend="auto"``), which are sync-free themselves.
"""
from __future__ import annotations

import torch

from .. import dsa_index_paged as local_dsa_index_paged
from ..cache.layout import PAGE_SIZE, as_pages, check_pooled_cache
from ..cache.paged import check_block_size
from ..ops.dsa.paged import check_paged_inputs, paged_row_lengths
from ..utils.backend import resolve_backend
from ..utils.output import check_out_buffer, finish_output
from ..utils.validate import check_hisa_params, check_positive_int, check_tensor
from .blocks import eligible_range, kept_blocks, paged_candidates
from .comm import check_group, exchange_candidates
from .layout import BlockMap, ShardLayout
from .merge import merge_topk
from .pool import pool_split_blocks_paged
from .tokens import page_table, paged_token_candidates


def _check(layout, group):
    if not isinstance(layout, ShardLayout):
        raise TypeError(f"layout: expected a hisa.distributed.ShardLayout, got "
                        f"{type(layout).__name__}")
    return check_group(layout, group)


def _check_lengths(layout: ShardLayout, rank: int, lens: torch.Tensor,
                   block_table: torch.Tensor, backend: str, device,
                   max_seq_len: int | None = None) -> None:
    """Global lengths fit the layout (and ``max_seq_len``) and this rank's share fits its block
    table (reads the values, so only where the torch backend runs; the sync-free path clamps
    instead)."""
    if resolve_backend(backend, device) != "torch" or lens.numel() == 0:
        return
    longest = int(lens.max())
    if max_seq_len is not None and longest > max_seq_len:
        raise ValueError(f"seq_lens: expected at most max_seq_len = {max_seq_len}, got "
                         f"{longest}")
    cap = layout.capacity
    if cap is not None and longest > cap:
        raise ValueError(f"seq_lens: expected at most {cap} (world_size * shard_size of the "
                         f"contiguous layout), got {longest}")
    local = int(layout.count_before(rank, lens).max())
    room = block_table.shape[1] * PAGE_SIZE
    if local > room:
        raise ValueError(f"block_table: rank {rank} holds up to {local} keys of a request, "
                         f"expected at most block_table.shape[1] * {PAGE_SIZE} = {room}")


def dsa_index_paged(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                    seq_lens: torch.Tensor, block_table: torch.Tensor, *, layout: ShardLayout,
                    topk: int = 2048, group=None, return_scores: bool = False,
                    out: torch.Tensor | None = None, backend: str = "auto"):
    """Flat DSA decode over a paged key cache sharded across the ranks of ``group``.

    Each rank runs :func:`hisa.dsa_index_paged` over its own cache with the local lengths its
    share of each row implies, then one all-gather of [rows, topk] (score, position) pairs and an
    exact merge give every rank the single-process selection.

    Args:
        q, weights, topk, return_scores, out, backend: as in :func:`hisa.dsa_index_paged`,
            the same on every rank.
        kv_cache, block_table: this rank's cache and block table (local positions).
        seq_lens: int32 [batch] or [batch, next_n], global lengths (the same on every rank).
        layout: the sharding; group: the process group (size layout.world_size).

    Returns:
        int32 [batch * next_n, topk] global request positions, -1 padded (and fp32 scores).

    Example:
        >>> idx = hisa.distributed.dsa_index_paged(q, cache.kv_cache, w, seq_lens, bt,
        ...                                        layout=ShardLayout.interleaved(R, unit=1))
    """
    rank = _check(layout, group)
    batch, next_n, _, _, pages = check_paged_inputs(q, kv_cache, weights, seq_lens, block_table)
    check_positive_int("topk", topk)
    rows = batch * next_n
    check_out_buffer(out, rows, topk, q.device)
    lens = paged_row_lengths(seq_lens, next_n)
    _check_lengths(layout, rank, lens, block_table, backend, q.device)
    local = layout.count_before(rank, lens).to(torch.int32)
    idx, scores = local_dsa_index_paged(q, pages, weights, local, block_table, topk=topk,
                                        return_scores=True, backend=backend)
    pos = torch.where(idx >= 0, layout.to_global(rank, idx.long()), -1)
    scores, ids = exchange_candidates(scores, pos, group, "tokens")
    pos, val = merge_topk(scores, ids, topk)
    return finish_output(pos.to(torch.int32), val, out=out, return_scores=return_scores)


def hisa_index_paged(q: torch.Tensor, kv_cache: torch.Tensor, pooled_cache: torch.Tensor,
                     weights: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor, *,
                     layout: ShardLayout, topk: int = 2048, block_size: int = 128,
                     block_topk: int = 64, group=None, max_seq_len: int | None = None,
                     return_scores: bool = False, out: torch.Tensor | None = None,
                     backend: str = "auto"):
    """HISA decode over a paged key cache and pooled cache sharded across ``group``.

    The selection of :func:`hisa.hisa_index_paged` on the unsharded cache (same sets up to
    score ties, ties to the lower position): each rank scores the pooled rows of its blocks,
    one exchange of every rank's best ``m - 2`` non-forced blocks gives all ranks the same
    kept blocks (block 0 and the row's last block forced), each rank scores its tokens of the
    kept blocks, and one exchange of per-rank top-k lists is merged exactly.

    Args:
        q, weights, topk, block_size, block_topk, return_scores, out, backend: as in
            :func:`hisa.hisa_index_paged`, the same on every rank.
        kv_cache, block_table: this rank's cache and block table (local positions).
        pooled_cache: this rank's pooled rows: with whole blocks, maintained by
            :func:`hisa.paged_cache_append` on the local cache (local positions, the same
            ``block_size``); with split blocks, by :func:`cache_append` of this module.
        seq_lens: int32 [batch] or [batch, next_n], global lengths (the same on every rank).
        layout: the sharding (:meth:`ShardLayout.check_hisa` must accept it); group: the
            process group.
        max_seq_len: optional host-known bound on ``seq_lens`` (vLLM's metadata carries one),
            the same on every rank; it bounds the per-step repack of the pooled rows, which
            otherwise spans the block table's whole capacity.

    Returns:
        int32 [batch * next_n, topk] global request positions, -1 padded (and fp32 scores).

    Example:
        >>> idx = hisa.distributed.hisa_index_paged(q, kv, pooled, w, seq_lens, bt,
        ...                                         layout=layout, block_size=128)
    """
    rank = _check(layout, group)
    batch, next_n, H, D, pages = check_paged_inputs(q, kv_cache, weights, seq_lens,
                                                    block_table)
    check_pooled_cache(pooled_cache, D, pages.shape[0])
    check_hisa_params(topk=topk, block_size=block_size, block_topk=block_topk)
    check_block_size(block_size)
    bmap = BlockMap(layout, rank, block_size)
    rows = batch * next_n
    check_out_buffer(out, rows, topk, q.device)
    if max_seq_len is not None:
        check_positive_int("max_seq_len", max_seq_len, minimum=0)
    lens = paged_row_lengths(seq_lens, next_n)                             # [batch, next_n]
    _check_lengths(layout, rank, lens, block_table, backend, q.device, max_seq_len)
    first, end = eligible_range(torch.zeros_like(lens), lens, block_size)
    c = block_topk - 2
    cs = ci = None
    if c > 0:
        room = block_table.shape[1] * PAGE_SIZE
        if max_seq_len is not None:
            room = min(room, layout.local_length(rank, max_seq_len))
        cs, ci = paged_candidates(q, pooled_cache, weights, block_table, first, end, bmap,
                                  count=c, backend=backend, local_tokens=room)
    kept = kept_blocks(cs, ci, first.flatten(), end.flatten(), block_topk=block_topk,
                       group=group)
    flat_lens = lens.flatten()
    logical, length, _, _ = page_table(bmap, kept, torch.zeros_like(flat_lens), flat_lens)
    req = torch.arange(rows, device=q.device) // next_n
    table = block_table.long()[req]                                         # [rows, cols]
    physical = torch.gather(table, 1, logical.clamp(0, table.shape[1] - 1))
    physical = torch.where((logical >= 0) & (logical < table.shape[1]), physical, -1)
    pos, val = paged_token_candidates(q.reshape(rows, H, D), pages, weights, physical, logical,
                                      length, bmap, topk=topk, backend=backend)
    scores, ids = exchange_candidates(val, pos, group, "tokens")
    pos, val = merge_topk(scores, ids, topk)
    return finish_output(pos.to(torch.int32), val, out=out, return_scores=return_scores)


def cache_append(kv_cache: torch.Tensor, pooled_cache: torch.Tensor, k: torch.Tensor,
                 slot_mapping: torch.Tensor, positions: torch.Tensor, *, layout: ShardLayout,
                 block_table: torch.Tensor, req_indices: torch.Tensor, k_scale=None,
                 block_size: int = 128, group=None, ue8m0: bool = False,
                 backend: str = "auto") -> None:
    """Append one step's keys to this rank's shard and pool the blocks they complete.

    Every rank passes all new tokens of the step (``k``, global ``positions``, ``req_indices``)
    and its own ``slot_mapping`` (-1 for the tokens other ranks hold), as vLLM's decode context
    parallelism writes the cache. With whole blocks this is :func:`hisa.paged_cache_append`
    on the local cache with local positions (no communication). With split blocks the keys are
    written without pooling, then :func:`.pool.pool_split_blocks_paged` assembles each
    completed block's mean from the ranks' partial sums (one fixed-size all-reduce).

    Args:
        kv_cache, pooled_cache, block_table: this rank's cache, pooled rows and block table.
        k: [T, D] new keys (bf16/fp32, or FP8 with ``k_scale``); positions: int [T] global
            positions; req_indices: int [T] block-table row of each token; slot_mapping: int [T]
            this rank's slots (-1 where another rank holds the token).
    """
    from .. import paged_cache_append
    rank = _check(layout, group)
    check_block_size(block_size)
    bmap = BlockMap(layout, rank, block_size)
    check_tensor("positions", positions, dtypes=(torch.int32, torch.int64), ndim=1)
    pos = positions.long()
    cap = layout.capacity
    if cap is not None and resolve_backend(backend, k.device) == "torch" and pos.numel() \
            and int(pos.max()) >= cap:
        raise ValueError(f"positions: expected values < {cap} (world_size * shard_size of the "
                         f"contiguous layout), got {int(pos.max())}")
    local = layout.count_before(rank, pos)
    mine = layout.owner(pos) == rank
    slots = torch.where(mine, slot_mapping.long(), -1)
    if not bmap.split:
        paged_cache_append(kv_cache, pooled_cache, k, slots, torch.where(mine, local, -1),
                           k_scale=k_scale, block_table=block_table, req_indices=req_indices,
                           block_size=block_size, ue8m0=ue8m0, backend=backend)
        return
    paged_cache_append(kv_cache, None, k, slots, local, k_scale=k_scale,
                       block_table=block_table, req_indices=req_indices,
                       block_size=block_size, ue8m0=ue8m0, backend=backend)
    pages = as_pages(kv_cache, k.shape[1])
    pool_split_blocks_paged(pages, pooled_cache, pos, req_indices, block_table, bmap, group)

