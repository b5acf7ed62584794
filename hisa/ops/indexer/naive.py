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


#: Cap on each of the two buffers of :func:`score_kept_blocks` (a chunk of a block's queries:
#: their gathered rows [n, H, D] and their dots [n, H, B]). Smaller chunks keep the product's
#: output in cache for the ReLU and the head sum; larger ones mean fewer operations, each a
#: parallel region whose threads must meet again, which on a shared, loaded CPU costs a
#: scheduler slice whenever a thread is preempted. On a 2-core EPYC (1 MiB L2 per core, 32 MiB
#: L3), 4K-token prefill, k = 256, m = 8, two threads, quiet: 0.76 s at 4 MiB, 0.83 s at 8 MiB,
#: 0.97 s at 32 MiB; under load 2 MiB chunks took about twice as long as 16 MiB ones.
TOKEN_CHUNK_BYTES = 8 * 2**20


def score_kept_blocks(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor,
                      block_ids: torch.Tensor, *, block_size: int,
                      k_scale: torch.Tensor | None, out: torch.Tensor) -> None:
    """Indexer scores of every token of every kept block, written into ``out`` [T, m, B].

    Candidates are whole blocks, so the work is grouped by block instead of by query: for each
    block kept by some query, the rows of the queries that keep it are gathered and all their
    heads are scored against the block's B keys in one product, [n * H, D] x [D, B] (n up to a
    cache-sized chunk); the ReLU'd dots are folded into the head sum by one batched product
    with the gates. A few operations per chunk replace a per-query gather of m * B keys and H
    passes over it, and no work is spent on padding slots.

    The math is :func:`hisa.ops.dsa.naive.naive_scores` (fp32 accumulation, ReLU per head, the
    key scale applied after the head sum), but the head sum runs in a different order, so a
    score can differ from the flat reference's by fp32 rounding; with exact arithmetic (and
    in ranking, up to such near-ties) the two agree. NaN propagates as there (clamp_min keeps
    it); a change to naive_scores' ReLU or NaN rule must be made here too. Padding slots (-1)
    and the part of a tail block beyond the buffer are left untouched. The scores carry no
    gradient (a selection's input; the models that call it may hold parameters that do).

    Args:
        q: [T, H, D] (fp32 saves a conversion); weights fp32 [T, H].
        k: [S, D], S > 0; k_scale: fp32 [S] or None.
        block_ids: int [T, m] kept block ids, -1 padded, unique per row.
        out: fp32 [T, m, B], written in place.
    """
    with torch.no_grad():   # in-place products into reused buffers: no autograd graph
        _score_kept_blocks(q, k, weights, block_ids, block_size=block_size, k_scale=k_scale,
                           out=out)


def _score_kept_blocks(q, k, weights, block_ids, *, block_size, k_scale, out) -> None:
    T, m = block_ids.shape
    S = k.shape[0]
    flat = block_ids.reshape(-1).long()                                      # [T*m]
    pairs = (flat >= 0).nonzero().squeeze(1)                                 # (query, slot)
    if pairs.numel() == 0:
        return
    # Stable: within a block the queries stay in ascending order.
    blocks, perm = torch.sort(flat[pairs], stable=True)
    pairs = pairs[perm]
    rows_all, slots_all = pairs // m, pairs % m
    ids, counts = torch.unique_consecutive(blocks, return_counts=True)
    qf, w = q.float(), weights.float()
    H, D = qf.shape[1:]
    # A block's queries go through in chunks whose gathered rows and dots stay in cache, in
    # buffers reused by every chunk (a fresh large allocation would be page-faulted each time).
    chunk = max(1, min(int(counts.max()), TOKEN_CHUNK_BYTES // (4 * H * max(D, block_size))))
    rows_buf = qf.new_empty(chunk, H, D)
    dots_buf = qf.new_empty(chunk * H * block_size)
    ends = torch.cumsum(counts, 0).tolist()
    for b, end, count in zip(ids.tolist(), ends, counts.tolist()):
        lo, hi = b * block_size, min(S, (b + 1) * block_size)
        if lo >= S:                          # a block past the buffer has only padding
            continue
        keys = k[lo:hi].float().T                                            # [D, L]
        scale = None if k_scale is None else k_scale[lo:hi].float()
        for c in range(end - count, end, chunk):
            rows, slots = rows_all[c:min(c + chunk, end)], slots_all[c:min(c + chunk, end)]
            n = rows.numel()
            qb = torch.index_select(qf, 0, rows, out=rows_buf[:n])             # [n, H, D]
            dots = dots_buf[:n * H * (hi - lo)].view(n * H, hi - lo)
            torch.mm(qb.view(n * H, D), keys, out=dots)
            dots = dots.view(n, H, hi - lo).clamp_min_(0)
            scores = torch.bmm(w[rows].unsqueeze(1), dots).squeeze(1)        # [n, L]
            if scale is not None:
                scores *= scale
            out[rows, slots, :hi - lo] = scores


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
    # Padding slots are left unwritten by score_kept_blocks and marked outside below.
    scores = torch.zeros(pos.shape, device=q.device)
    if k.shape[0] == 0:                      # no keys at all: every candidate is padding
        return mark_outside(scores, torch.ones_like(pos, dtype=torch.bool)), pos
    score_kept_blocks(q, k, weights, block_ids, block_size=block_size, k_scale=k_scale,
                      out=scores.view(block_ids.shape[0], block_ids.shape[1], block_size))
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
    """The whole HISA pipeline, tiled over queries so temporaries stay O(tile * m * B).

    Args:
        pooled, pooled_scale: precomputed block representatives (for example FP8 with a
            per-block scale); by default the fp32 means of :func:`naive_pool_blocks`.

    Returns:
        (offsets int32 [T, topk] relative to ks, -1 padded; scores fp32 [T, topk]).
    """
    T, H, D = q.shape
    if pooled is None:
        pooled = naive_pool_blocks(k, k_scale, block_size)
    idx = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    vals = torch.full((T, topk), float("-inf"), dtype=torch.float32, device=q.device)
    # The largest temporaries: the candidates' int64 positions (and their sort) [tile, m*B]
    # and the tile's fp32 queries [tile, H, D].
    tile = max(1, NAIVE_TILE_BYTES // max(8 * block_topk * block_size, 4 * H * D))
    for start in range(0, T, tile):
        sl = slice(start, min(T, start + tile))
        qf = q[sl].float()                   # converted once, shared by both scoring stages
        bs = naive_block_scores(qf, pooled, weights[sl], ks[sl], ke[sl],
                                block_size=block_size, pooled_scale=pooled_scale)
        blocks = naive_select_blocks(bs, block_topk)
        # Kept ids are ascending with the padding last: columns past the tile's largest kept
        # count are padding in every row, so neither scored nor sorted.
        width = max(1, int((blocks >= 0).sum(1).max()))
        scores, pos = naive_token_scores(qf, k, weights[sl], ks[sl], ke[sl], blocks[:, :width],
                                         block_size=block_size, k_scale=k_scale)
        sel, v = naive_select_tokens(scores, pos, topk)
        idx[sl], vals[sl] = naive_to_offsets(sel, ks[sl]), v
    return idx, vals
