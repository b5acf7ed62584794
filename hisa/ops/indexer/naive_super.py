"""Plain-PyTorch references of HISA's optional third level: super-blocks, then blocks, then tokens.

A super-block is a run of ``super_size`` (Bs) consecutive blocks in key-buffer coordinates,
super-block g = blocks [g * Bs, (g + 1) * Bs) = tokens [g * Bs * B, (g + 1) * Bs * B). The
stages before the token stage of :mod:`.naive` (the math lives in README.md beside this file):

=======================  ======================================================  ====================
stage                    computes                                                output
=======================  ======================================================  ====================
pool_supers              token-weighted mean of each super-block's block reps     fp32 [NS, D]
super_scores             J over eligible super-blocks; +inf on the forced two     fp32 [T, NS]
select_supers            top-ms super-blocks (ascending ids, -1 padded)           int32 [T, ms]
candidate_block_scores   J[t, b] for the blocks of the kept super-blocks          fp32 [T, ms * Bs]
select_candidate_blocks  top-m candidate blocks (ascending ids, -1 padded)        int32 [T, m]
=======================  ======================================================  ====================

then :func:`~.naive.naive_token_scores`, :func:`~.naive.naive_select_tokens` and
:func:`~.naive.naive_to_offsets` exactly as in two levels.

Every selection follows the rule of :mod:`hisa.ops.dsa.naive` (``+inf > finite > -inf > NaN``,
ties to the lower position, entries marked outside the window never selected). Super-blocks and
candidate blocks outside a query's eligible range are marked outside
(:func:`~hisa.ops.dsa.naive.mark_outside`); the forced ones are forced by position, not by
their +inf score alone: the first and last eligible super-block, and the first and last eligible
block, which are the first and last candidates not marked outside (they lie in the two forced
super-blocks, and candidates are ascending).

Candidate blocks come in ascending block order (kept super-blocks ascending, blocks inside each
ascending), and their scores are the two-level stage-1 scores of those blocks, so ties break as
in two levels (lower block wins). When every eligible super-block of a query is kept, its
candidates are all its eligible blocks, in two-level order, with two-level scores and the same
two forced, so the selection equals the two-level one entry for entry, NaN and infinite scores
included.
"""
from __future__ import annotations

import torch

from ...cache.layout import gather_request_keys, gather_request_pooled
from ...utils.validate import FP8_DTYPE
from ..dsa.naive import NAIVE_TILE_BYTES, mark_outside, naive_topk
from ..dsa.paged import per_request_reference
from .naive import (eligible_blocks, first_and_last_inside, naive_block_scores,
                    naive_pool_blocks, naive_select_blocks, naive_select_tokens,
                    naive_to_offsets, naive_token_scores)


def eligible_supers(ks: torch.Tensor, ke: torch.Tensor, block_size: int, super_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query eligible super-block range [ks // (Bs B), ceil(ke / (Bs B)))."""
    return eligible_blocks(ks, ke, block_size * super_size)


def naive_pool_supers(pooled: torch.Tensor, num_keys: int, *, block_size: int, super_size: int,
                      pooled_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Super-block representatives: the token-count-weighted mean of their blocks' reps.

    With fp32 block means (:func:`~.naive.naive_pool_blocks`) this is the mean of the
    super-block's keys up to fp32 rounding; with FP8 block reps (``pooled_scale`` given) it is
    the mean of what the block stage itself scores. A tail super-block (and its tail block)
    counts only the tokens it holds. A NaN in a block rep (a NaN key, or a NaN scale such as
    the paged cache's unknown row) makes its super-block's rep NaN: it then scores NaN and
    ranks last.

    Args:
        pooled: [NB, D] block representatives (any float dtype); pooled_scale: fp32 [NB] or None.
        num_keys: S, the keys the blocks were pooled from (block b holds min(B, S - b B)).

    Returns:
        fp32 [NS, D], NS = ceil(NB / Bs).
    """
    nb, D = pooled.shape
    reps = pooled.float()
    if pooled_scale is not None:
        reps = reps * pooled_scale.float().unsqueeze(1)
    counts = (num_keys - torch.arange(nb, device=pooled.device) * block_size).clamp(0, block_size)
    counts = counts.float()                                                   # [NB]
    ns = -(-nb // super_size)
    pad = ns * super_size - nb
    sums = torch.nn.functional.pad(reps * counts.unsqueeze(1), (0, 0, 0, pad))
    sums = sums.view(ns, super_size, D).sum(dim=1)                            # [NS, D]
    totals = torch.nn.functional.pad(counts, (0, pad)).view(ns, super_size).sum(dim=1)
    return sums / totals.clamp_min(1.0).unsqueeze(1)


def naive_super_scores(q: torch.Tensor, super_pooled: torch.Tensor, weights: torch.Tensor,
                       ks: torch.Tensor, ke: torch.Tensor, *, block_size: int, super_size: int,
                       super_scale: torch.Tensor | None = None) -> torch.Tensor:
    """J over super-blocks: the block-stage formula at block size Bs * B. fp32 [T, NS].

    Ineligible super-blocks are marked outside (never selected); the first and last eligible
    (the sink and the query's own) get +inf, and :func:`naive_select_supers` forces them. A
    super-block that straddles two packed sequences or holds future tokens is always one of
    those two, so its contaminated mean never ranks anything.
    """
    return naive_block_scores(q, super_pooled, weights, ks, ke,
                              block_size=block_size * super_size, pooled_scale=super_scale)


def naive_select_supers(super_scores: torch.Tensor, super_topk: int) -> torch.Tensor:
    """Top-ms super-blocks per query, ascending ids then -1. int32 [T, ms]; the first and last
    eligible super-block are kept whatever their score (:func:`~.naive.naive_select_blocks`)."""
    return naive_select_blocks(super_scores, super_topk)


def candidate_blocks(super_ids: torch.Tensor, super_size: int) -> torch.Tensor:
    """Block ids of the kept super-blocks, int64 [T, ms * Bs], -1 for padding super-blocks
    (ids past the last block of the buffer are kept: they are never eligible)."""
    offs = torch.arange(super_size, device=super_ids.device)
    blk = super_ids.long().unsqueeze(-1) * super_size + offs                   # [T, ms, Bs]
    return torch.where(super_ids.unsqueeze(-1) >= 0, blk, -1).flatten(1)


def naive_candidate_block_scores(q: torch.Tensor, pooled: torch.Tensor, weights: torch.Tensor,
                                 ks: torch.Tensor, ke: torch.Tensor, super_ids: torch.Tensor, *,
                                 block_size: int, super_size: int,
                                 pooled_scale: torch.Tensor | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 scores of the blocks of the kept super-blocks, in candidate order.

    The scores are the two-level ones (:func:`~.naive.naive_block_scores`, gathered), so a kept
    block scores exactly as it would in two levels: marked outside beyond the eligible range
    (and for padding or blocks past the buffer), +inf on the first and last eligible block
    (they lie in the forced super-blocks).

    Returns:
        (scores fp32 [T, ms * Bs]; block ids int64 [T, ms * Bs], -1 for padding).
    """
    blk = candidate_blocks(super_ids, super_size)
    if pooled.shape[0] == 0:
        return mark_outside(torch.empty(blk.shape, device=q.device),
                            torch.ones_like(blk, dtype=torch.bool)), blk
    full = naive_block_scores(q, pooled, weights, ks, ke, block_size=block_size,
                              pooled_scale=pooled_scale)                      # [T, NB]
    inside = (blk >= 0) & (blk < pooled.shape[0])
    scores = torch.gather(full, 1, blk.clamp(0, pooled.shape[0] - 1))
    return mark_outside(scores, ~inside), blk


def naive_select_candidate_blocks(scores: torch.Tensor, block_ids: torch.Tensor, block_topk: int
                                  ) -> torch.Tensor:
    """Top-m candidate blocks per query as ascending block ids, then -1. int32 [T, m].

    The first and last candidates not marked outside are forced: candidates ascend, and the
    query's first and last eligible block lie in its two forced super-blocks, so these are
    exactly the blocks two levels force (whatever the scores, +inf or NaN ones included).
    """
    cols, _ = naive_topk(scores, block_topk, forced=first_and_last_inside(scores))
    ids = torch.gather(block_ids, 1, cols.clamp_min(0))
    big = torch.iinfo(torch.int64).max
    ids = torch.sort(torch.where(cols >= 0, ids, big), dim=1).values
    return torch.where(ids == big, -1, ids).to(torch.int32)


def naive_hisa_index_super(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor,
                           ks: torch.Tensor, ke: torch.Tensor, *,
                           k_scale: torch.Tensor | None = None, topk: int = 2048,
                           block_size: int = 128, block_topk: int = 64, super_size: int = 16,
                           super_topk: int = 64, pooled: torch.Tensor | None = None,
                           pooled_scale: torch.Tensor | None = None,
                           super_pooled: torch.Tensor | None = None,
                           super_scale: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Three-level HISA, tiled over queries (temporaries O(tile * max(NB, m * B * D))).

    Args:
        pooled, pooled_scale: block representatives, by default the fp32 means.
        super_pooled, super_scale: super-block representatives, by default
            :func:`naive_pool_supers` of the block representatives.

    Returns:
        (offsets int32 [T, topk] relative to ks, -1 padded; scores fp32 [T, topk]).
    """
    T, _, D = q.shape
    if pooled is None:
        pooled, pooled_scale = naive_pool_blocks(k, k_scale, block_size), None
    if super_pooled is None:
        super_pooled = naive_pool_supers(pooled, k.shape[0], block_size=block_size,
                                         super_size=super_size, pooled_scale=pooled_scale)
    idx = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    vals = torch.full((T, topk), float("-inf"), dtype=torch.float32, device=q.device)
    # Largest temporaries per query: the gathered candidate keys (m*B*D fp32) and the full row
    # of block scores the candidates are gathered from (NB fp32).
    per_query = 4 * (block_topk * block_size * D + pooled.shape[0])
    tile = max(1, NAIVE_TILE_BYTES // per_query)
    for start in range(0, T, tile):
        sl = slice(start, min(T, start + tile))
        qs, ws, kss, kes = q[sl], weights[sl], ks[sl], ke[sl]
        sup = naive_select_supers(
            naive_super_scores(qs, super_pooled, ws, kss, kes, block_size=block_size,
                               super_size=super_size, super_scale=super_scale), super_topk)
        cs, cb = naive_candidate_block_scores(qs, pooled, ws, kss, kes, sup,
                                              block_size=block_size, super_size=super_size,
                                              pooled_scale=pooled_scale)
        blocks = naive_select_candidate_blocks(cs, cb, block_topk)
        scores, pos = naive_token_scores(qs, k, ws, kss, kes, blocks, block_size=block_size,
                                         k_scale=k_scale)
        sel, v = naive_select_tokens(scores, pos, topk)
        idx[sl], vals[sl] = naive_to_offsets(sel, kss), v
    return idx, vals


def _with_tail_placeholder(values: torch.Tensor, scales: torch.Tensor, total: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Append zero rows (scale 1) up to ``total`` rows: the incomplete tail, always forced."""
    missing = total - values.shape[0]
    if missing <= 0:
        return values, scales
    D = values.shape[1]
    zeros = torch.zeros(missing, D, device=values.device).to(FP8_DTYPE)
    return (torch.cat([values, zeros]),
            torch.cat([scales, torch.ones(missing, device=scales.device)]))


def naive_hisa_index_paged_super(q: torch.Tensor, pages: torch.Tensor,
                                 pooled_cache: torch.Tensor, super_cache: torch.Tensor,
                                 weights: torch.Tensor, seq_lens: torch.Tensor,
                                 block_table: torch.Tensor, *, topk: int = 2048,
                                 block_size: int = 128, block_topk: int = 64,
                                 super_size: int = 16, super_topk: int = 64
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Three-level reference over the paged cache: each request's keys, block rows and
    super-block rows gathered from the caches (never re-pooled), then
    :func:`naive_hisa_index_super`. The incomplete tail block and tail super-block (always
    forced) get zero placeholders.

    Returns:
        (positions int32 [batch * next_n, topk], -1 padded; scores fp32, -inf padded).
    """
    next_n, D = q.shape[1], q.shape[3]
    zeros = torch.zeros(next_n, dtype=torch.int32, device=q.device)
    span = block_size * super_size

    def select(b, length, row_lens):
        k, k_scale = gather_request_keys(pages, block_table[b], length, D)
        pv, ps = gather_request_pooled(pooled_cache, block_table[b], length // block_size,
                                       block_size, D)
        pv, ps = _with_tail_placeholder(pv, ps, -(-length // block_size))
        sv, ss = gather_request_pooled(super_cache, block_table[b], length // span, span, D)
        sv, ss = _with_tail_placeholder(sv, ss, -(-length // span))
        return naive_hisa_index_super(q[b], k, weights[b * next_n:(b + 1) * next_n], zeros,
                                      row_lens, k_scale=k_scale, topk=topk,
                                      block_size=block_size, block_topk=block_topk,
                                      super_size=super_size, super_topk=super_topk, pooled=pv,
                                      pooled_scale=ps, super_pooled=sv, super_scale=ss)

    return per_request_reference(q, seq_lens, topk, select)
