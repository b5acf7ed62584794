"""Plain-PyTorch reference of the flat DSA lightning indexer (fp32 math, CPU or GPU).

    I[t, s] = k_scale[s] * sum_h w[t, h] * ReLU(q[t, h, :] . k[s, :])

Written for clarity, not speed. No [T, S] matrix is ever materialised for the whole batch:
:func:`naive_dsa_index` walks the queries in tiles whose temporaries stay under
:data:`NAIVE_TILE_BYTES`, so a 128K-token context fits a 24 GiB CPU machine.

Tie-breaking is fixed everywhere in the references: among equal scores the lower key index wins
(a stable descending sort). HISA's references inherit the rule, which is what makes
"HISA equals DSA whenever every block is kept" an exact, testable statement.

The selection rule for non-finite scores (README "NaN and Inf", ``hisa/ops/indexer/README.md``),
shared bit for bit by these references and every Triton selection:

* inside the window every key is selectable, ranked ``+inf > finite > -inf > NaN`` (ties, NaN
  with NaN included, to the lower position), so a window of at most k keys comes back whole;
* keys outside the window are never selected. Score tensors mark them with :data:`OUTSIDE_BITS`,
  a signalling-NaN bit pattern that no arithmetic produces (every NaN an operation returns is
  quiet), so it can never be confused with a computed score, NaN included;
* the head sum propagates NaN: ``ReLU(NaN) = NaN`` (``clamp_min`` here, a NaN-propagating
  maximum in the kernels).
"""
from __future__ import annotations

import torch

#: Cap on the bytes of one tile's largest temporary in the references (fp32 scores of a query
#: tile against its key range, or gathered candidate keys in HISA's token stage).
NAIVE_TILE_BYTES = 256 * 2**20

#: fp32 bit pattern of "outside the window" in every score buffer (a signalling NaN).
OUTSIDE_BITS = 0x7F800001
#: Rank of a key that must be selected before any score (HISA's forced blocks).
FORCED_RANK = 2**32 - 1


def mark_outside(scores: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """Write :data:`OUTSIDE_BITS` where ``outside`` is true (fp32, in place; returns ``scores``).

    Written through an int32 view: a float fill would quiet the signalling NaN.
    """
    scores.view(torch.int32).masked_fill_(outside, OUTSIDE_BITS)
    return scores


def is_outside(scores: torch.Tensor) -> torch.Tensor:
    """True where an fp32 score tensor holds the outside-the-window marker."""
    return scores.view(torch.int32) == OUTSIDE_BITS


def selection_rank(scores: torch.Tensor) -> torch.Tensor:
    """int64 rank of each fp32 score under the selection rule (larger is selected first).

    0 outside the window (never selected), 1 NaN, then the order-preserving map of the float
    bits (-inf maps to 0x7FFFFF, +inf to 0xFF800000); -0.0 ranks as +0.0 (the sign of a zero
    head sum depends on the weights' signs, not on the key). The Triton twin is
    ``hisa.ops.indexer.topk._ordered_key``; both map a score to the same number.
    """
    bits = scores.float().view(torch.int32).long() & 0xFFFFFFFF           # the uint32 bits
    bits = torch.where(bits == 2**31, 0, bits)                            # -0.0 -> +0.0
    rank = torch.where(bits >= 2**31, bits ^ 0xFFFFFFFF, bits | 2**31)
    rank = torch.where(torch.isnan(scores), 1, rank)
    return torch.where(bits == OUTSIDE_BITS, 0, rank)


def naive_scores(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor,
                 key_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Indexer scores of queries against keys, fp32.

    Args:
        q: [T, H, D] (any float dtype, fp8 included: its scale is folded into ``weights``).
        keys: [S, D] shared by all queries, or [T, S, D] per-query candidates.
        weights: fp32 [T, H].
        key_scale: fp32 [S] or [T, S] per-key scale, or None.

    Returns:
        fp32 [T, S].
    """
    qf, kf, w = q.float(), keys.float(), weights.float()
    T, H, _ = qf.shape
    shared = kf.dim() == 2
    out = torch.zeros(T, kf.shape[-2], dtype=torch.float32, device=qf.device)
    for h in range(H):  # one head at a time keeps the temporary at [T, S]
        if shared:
            dots = qf[:, h] @ kf.T                                   # [T, S]
        else:
            dots = torch.bmm(kf, qf[:, h].unsqueeze(-1)).squeeze(-1)  # [T, S]
        out += w[:, h:h + 1] * dots.clamp_min_(0)
    if key_scale is not None:
        out *= key_scale.float()
    return out


def naive_topk(scores: torch.Tensor, topk: int, *, forced: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``topk`` columns of each row under the selection rule (:func:`selection_rank`).

    Columns marked outside the window (:func:`mark_outside`) are never selected; every other
    column is, ``+inf > finite > -inf > NaN``, ties to the lower column. ``forced`` (bool, like
    ``scores``) columns rank above every score.

    Returns:
        (columns int64 [T, topk] with -1 in unused slots, scores fp32 [T, topk] with -inf there).
        Valid entries come first, in descending rank order.
    """
    T, n = scores.shape
    rank = selection_rank(scores)
    if forced is not None:
        rank = torch.where(forced & (rank > 0), FORCED_RANK, rank)
    rank, cols = torch.sort(rank, dim=1, descending=True, stable=True)
    rank, cols = rank[:, :topk], cols[:, :topk]
    vals = torch.gather(scores.float(), 1, cols)
    if n < topk:
        pad = topk - n
        rank = torch.cat([rank, rank.new_zeros((T, pad))], dim=1)
        vals = torch.cat([vals, vals.new_full((T, pad), float("-inf"))], dim=1)
        cols = torch.cat([cols, cols.new_full((T, pad), -1)], dim=1)
    unused = rank == 0
    return cols.masked_fill(unused, -1), vals.masked_fill(unused, float("-inf"))


def window_mask(ks: torch.Tensor, ke: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """True where key ``positions`` ([T, N] or [N]) lie inside each query's [ks, ke)."""
    return (positions >= ks.long().unsqueeze(-1)) & (positions < ke.long().unsqueeze(-1))


def naive_dsa_logits(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor,
                     ks: torch.Tensor, ke: torch.Tensor, *,
                     k_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The full logits matrix fp32 [T, S], marked outside each query's window
    (:func:`mark_outside`). Small inputs only."""
    logits = naive_scores(q, k, weights, k_scale)
    pos = torch.arange(k.shape[0], device=q.device)
    return mark_outside(logits, ~window_mask(ks, ke, pos))


def naive_dsa_index(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor,
                    ks: torch.Tensor, ke: torch.Tensor, *, k_scale: torch.Tensor | None = None,
                    topk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat DSA selection, tiled over queries.

    Returns:
        (offsets int32 [T, topk] relative to ks, -1 padded; scores fp32 [T, topk], -inf padded).
    """
    T = q.shape[0]
    idx = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    vals = torch.full((T, topk), float("-inf"), dtype=torch.float32, device=q.device)
    max_len = max(int((ke.long() - ks.long()).max()), 1) if T else 1
    start = 0
    while start < T:
        tile = max(1, min(T - start, NAIVE_TILE_BYTES // (4 * max_len)))
        # A tile that straddles packed sequences spans more keys than one window: shrink it.
        while tile > 1 and 4 * tile * (int(ke[start:start + tile].max())
                                       - int(ks[start:start + tile].min())) > NAIVE_TILE_BYTES:
            tile //= 2
        sl = slice(start, start + tile)
        lo, hi = int(ks[sl].min()), int(ke[sl].max())
        if hi > lo:
            logits = naive_scores(q[sl], k[lo:hi], weights[sl],
                                  None if k_scale is None else k_scale[lo:hi])
            pos = torch.arange(lo, hi, device=q.device)
            mark_outside(logits, ~window_mask(ks[sl], ke[sl], pos))
            cols, v = naive_topk(logits, topk)
            rel = torch.where(cols >= 0, cols + lo - ks[sl].long().unsqueeze(1), cols)
            idx[sl], vals[sl] = rel.to(torch.int32), v
        start += tile
    return idx, vals
