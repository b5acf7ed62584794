"""Plain-PyTorch references of every HISA stage (fp32 math, CPU or GPU).

The stages, in order (the math lives in README.md beside this file):

====================  =========================================================  ==================
stage                 computes                                                    output
====================  =========================================================  ==================
pool_blocks           mean of the dequantized keys of each B-token block          fp32 [NB, D]
block_scores          J[t, b] over eligible blocks; +inf on the forced two        fp32 [T, NB]
select_blocks         top-m blocks per query (ascending ids, -1 padded)           int32 [T, m]
token_scores          exact I[t, s] for the tokens of the kept blocks             fp32 [T, m*B]
select_tokens         top-k candidates (absolute positions, -1 padded)            int64 [T, K]
to_offsets            positions relative to ks (the contract's output format)     int32 [T, K]
====================  =========================================================  ==================

Tie-breaking matches :mod:`hisa.ops.dsa.naive` (lower position wins), so when every eligible
block of a query is kept, the selection equals the flat DSA reference exactly.
"""
from __future__ import annotations

import torch

from ..dsa.naive import (NAIVE_TILE_BYTES, is_outside, mark_outside, naive_scores, naive_topk,
                         window_mask)


def eligible_blocks(ks: torch.Tensor, ke: torch.Tensor, block_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query eligible block range [first, last + 1) = [ks // B, ceil(ke / B)).

    An empty window (ke == ks) has no eligible block: last + 1 == first.
    """
    first = ks.long() // block_size
    end = (ke.long() + block_size - 1) // block_size
    end = torch.where(ke > ks, end, first)
    return first, end


def naive_pool_blocks(k: torch.Tensor, k_scale: torch.Tensor | None, block_size: int
                      ) -> torch.Tensor:
    """Block representatives: fp32 mean of the dequantized keys of each block [NB, D].

    The tail block divides by the number of tokens it actually holds.
    """
    S, D = k.shape
    kf = k.float() if k_scale is None else k.float() * k_scale.float().unsqueeze(1)
    nb = (S + block_size - 1) // block_size
    pad = nb * block_size - S
    sums = torch.nn.functional.pad(kf, (0, 0, 0, pad)).view(nb, block_size, D).sum(dim=1)
    counts = torch.full((nb,), float(block_size), device=k.device)
    if pad:
        counts[-1] = block_size - pad
    return sums / counts.unsqueeze(1)


def naive_block_scores(q: torch.Tensor, pooled: torch.Tensor, weights: torch.Tensor,
                       ks: torch.Tensor, ke: torch.Tensor, *, block_size: int,
                       pooled_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 1: J[t, b] = sum_h w[t, h] ReLU(q[t, h] . kbar[b]) over eligible blocks.

    Ineligible blocks are marked outside (:func:`~hisa.ops.dsa.naive.mark_outside`); the first
    and last eligible block get +inf (and :func:`naive_select_blocks` forces them).

    Returns:
        fp32 [T, NB].
    """
    scores = naive_scores(q, pooled, weights, pooled_scale)
    first, end = eligible_blocks(ks, ke, block_size)
    b = torch.arange(pooled.shape[0], device=q.device)
    mark_outside(scores, ~window_mask(first, end, b))
    has = end > first
    rows = torch.nonzero(has).squeeze(1)
    scores[rows, first[rows]] = float("inf")
    scores[rows, end[rows] - 1] = float("inf")
    return scores


def first_and_last_inside(scores: torch.Tensor) -> torch.Tensor:
    """bool [T, N]: the first and the last column of each row not marked outside (a row's
    forced entries; none in a row that is all outside)."""
    N = scores.shape[1]
    inside = ~is_outside(scores)
    col = torch.arange(N, device=scores.device)
    first = torch.where(inside, col, N).amin(1, keepdim=True) if N else col[None]
    last = torch.where(inside, col, -1).amax(1, keepdim=True) if N else col[None]
    return (col == first) | (col == last)


def naive_select_blocks(block_scores: torch.Tensor, block_topk: int) -> torch.Tensor:
    """Top-m blocks per query, as ascending block ids followed by -1 padding. int32 [T, m].

    The first and last eligible (not outside) block of a row are kept whatever their score.
    """
    cols, _ = naive_topk(block_scores, block_topk, forced=first_and_last_inside(block_scores))
    # Ascending ids (padding last) so candidate tokens come out in position order.
    key = torch.where(cols >= 0, cols, torch.iinfo(torch.int64).max)
    ids = torch.sort(key, dim=1).values
    return torch.where(ids == torch.iinfo(torch.int64).max, -1, ids).to(torch.int32)


def candidate_positions(block_ids: torch.Tensor, block_size: int, num_keys: int) -> torch.Tensor:
    """Absolute key positions of the kept blocks' tokens, int64 [T, m*B], -1 where none."""
    offs = torch.arange(block_size, device=block_ids.device)
    pos = block_ids.long().unsqueeze(-1) * block_size + offs                 # [T, m, B]
    pos = torch.where((block_ids.unsqueeze(-1) >= 0) & (pos < num_keys), pos, -1)
    return pos.flatten(1)


def naive_token_scores(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor,
                       ks: torch.Tensor, ke: torch.Tensor, block_ids: torch.Tensor, *,
                       block_size: int, k_scale: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2: exact indexer scores of every token of the kept blocks.

    Returns:
        (scores fp32 [T, m*B], marked outside for tokens outside [ks, ke) or padding;
         positions int64 [T, m*B], absolute, -1 for padding).
    """
    pos = candidate_positions(block_ids, block_size, k.shape[0])
    if k.shape[0] == 0:                      # no keys at all: every candidate is padding
        return mark_outside(torch.empty(pos.shape, device=q.device),
                            torch.ones_like(pos, dtype=torch.bool)), pos
    safe = pos.clamp_min(0)
    scale = None if k_scale is None else k_scale[safe]
    scores = naive_scores(q, k[safe], weights, scale)                         # [T, m*B]
    valid = (pos >= 0) & window_mask(ks, ke, pos)
    return mark_outside(scores, ~valid), pos


def naive_select_tokens(scores: torch.Tensor, positions: torch.Tensor, topk: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k candidates. Returns (absolute positions int64 [T, K], -1 padded; scores [T, K])."""
    cols, vals = naive_topk(scores, topk)
    sel = torch.gather(positions, 1, cols.clamp_min(0))
    return torch.where(cols >= 0, sel, -1), vals


def naive_to_offsets(positions: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """Absolute positions -> offsets relative to ks (int32), -1 kept."""
    rel = positions - ks.long().unsqueeze(1)
    return torch.where(positions >= 0, rel, -1).to(torch.int32)


def naive_hisa_index(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor,
                     ks: torch.Tensor, ke: torch.Tensor, *, k_scale: torch.Tensor | None = None,
                     topk: int = 2048, block_size: int = 128, block_topk: int = 64,
                     pooled: torch.Tensor | None = None,
                     pooled_scale: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole HISA pipeline, tiled over queries so temporaries stay O(tile * m * B * D).

    Args:
        pooled, pooled_scale: precomputed block representatives (for example FP8 with a
            per-block scale); by default the fp32 means of :func:`naive_pool_blocks`.

    Returns:
        (offsets int32 [T, topk] relative to ks, -1 padded; scores fp32 [T, topk]).
    """
    T, _, D = q.shape
    if pooled is None:
        pooled = naive_pool_blocks(k, k_scale, block_size)
    idx = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    vals = torch.full((T, topk), float("-inf"), dtype=torch.float32, device=q.device)
    # The gathered candidate keys [tile, m*B, D] fp32 are the largest temporary.
    tile = max(1, NAIVE_TILE_BYTES // (4 * block_topk * block_size * D))
    for start in range(0, T, tile):
        sl = slice(start, min(T, start + tile))
        bs = naive_block_scores(q[sl], pooled, weights[sl], ks[sl], ke[sl],
                                block_size=block_size, pooled_scale=pooled_scale)
        blocks = naive_select_blocks(bs, block_topk)
        scores, pos = naive_token_scores(q[sl], k, weights[sl], ks[sl], ke[sl], blocks,
                                         block_size=block_size, k_scale=k_scale)
        sel, v = naive_select_tokens(scores, pos, topk)
        idx[sl], vals[sl] = naive_to_offsets(sel, ks[sl]), v
    return idx, vals
