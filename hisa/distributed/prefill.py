"""Sharded packed prefill: HISA and the flat indexer over a key buffer split across ranks.

Every rank passes the same queries (q, weights, ks, ke in global key-buffer coordinates) and its
own shard of the keys (its positions, ascending, as :meth:`ShardLayout.positions` lists them);
every rank gets the same result, in the single-process output format.

Per query tile (:data:`QUERY_TILE` rows), HISA runs: block stage (local candidates, one
all-gather, global top-m), token stage (local kept tokens, one all-gather, exact merge). The
flat indexer runs one local top-k and one all-gather. Prefill may synchronise with the host (the
public ops validate windows); the decode path (:mod:`.decode`) does not.
"""
from __future__ import annotations

import torch

from ..ops.indexer.reps import rep_dtype
from ..utils.output import check_out_buffer, finish_output
from ..utils.validate import (FP8_DTYPE, check_hisa_params, check_indexer_inputs,
                              check_positive_int, check_shape, check_tensor, check_windows)
from .blocks import eligible_range, kept_blocks, nonforced_range, packed_candidates
from .comm import check_group, exchange_candidates
from .layout import BlockMap, ShardLayout
from .merge import merge_topk
from .pool import pool_sharded
from .tokens import (merge_local, pack_pages, page_table, paged_token_candidates,
                     window_token_candidates)

#: Queries per round of exchanges. The token stage's paged flat indexer keeps fp32 scores of
#: [rows, m * B] (256 MiB at m * B = 8,192) and each token exchange gathers [R, rows, 2, k]
#: int32 (128 MiB per rank at k = 2,048).
QUERY_TILE = 8192


def _check_sharded_inputs(q, k, weights, ks, ke, k_scale, layout, num_keys, group):
    if not isinstance(layout, ShardLayout):
        raise TypeError(f"layout: expected a hisa.distributed.ShardLayout, got "
                        f"{type(layout).__name__}")
    rank = check_group(layout, group)
    check_positive_int("num_keys", num_keys, minimum=0)
    cap = layout.capacity
    if cap is not None and num_keys > cap:
        raise ValueError(f"num_keys: expected at most {cap} (world_size * shard_size of the "
                         f"contiguous layout), got {num_keys}")
    T, H, D, S_local = check_indexer_inputs(q, k, weights, ks, ke, k_scale)
    want = layout.local_length(rank, num_keys)
    if S_local != want:
        raise ValueError(f"k: expected {want} rows on rank {rank} (its share of num_keys = "
                         f"{num_keys} under {layout}), got {S_local}")
    check_windows(ks, ke, num_keys)
    return rank, T


def _to_offsets(pos: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    return torch.where(pos >= 0, pos - ks.long().unsqueeze(1), -1).to(torch.int32)


def _flat_rows(q, k, weights, ks, ke, k_scale, layout, rank, group, *, topk, backend):
    """Flat sharded selection of all rows: (global positions int64 [T, topk], scores)."""
    if q.shape[0] == 0:
        return (torch.empty(0, topk, dtype=torch.long, device=q.device),
                torch.empty(0, topk, device=q.device))
    pos, val = window_token_candidates(q, k, k_scale, weights, layout.count_before(rank, ks),
                                       layout.count_before(rank, ke), layout, rank, topk=topk,
                                       backend=backend)
    for t0 in range(0, q.shape[0], QUERY_TILE):        # bounded exchange buffers
        sl = slice(t0, t0 + QUERY_TILE)
        scores, ids = exchange_candidates(val[sl], pos[sl], group, "tokens")
        pos[sl], val[sl] = merge_topk(scores, ids, topk)
    return pos, val


def dsa_index(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, ks: torch.Tensor,
              ke: torch.Tensor, *, layout: ShardLayout, num_keys: int,
              k_scale: torch.Tensor | None = None, topk: int = 2048, group=None,
              return_scores: bool = False, out: torch.Tensor | None = None,
              backend: str = "auto"):
    """Flat DSA selection over a key buffer sharded across the ranks of ``group``.

    Each rank scores its keys of each window, keeps its exact top ``topk`` with scores, and one
    all-gather of ``[T, topk]`` (score, position) pairs feeds an exact merge (score descending,
    position ascending): the result equals :func:`hisa.dsa_index` on the unsharded buffer.

    Args:
        q, weights, ks, ke: as in :func:`hisa.dsa_index`, the same on every rank; windows in
            global key-buffer coordinates.
        k, k_scale: this rank's keys, ``layout.positions(rank, num_keys)`` in that order.
        layout: how positions are spread over the ranks; num_keys: S of the global buffer.
        group: the process group (default group when None); its size is layout.world_size.
        topk, return_scores, out, backend: as in :func:`hisa.dsa_index` (``backend`` is used
            for each rank's local op).

    Returns:
        int32 [T, topk] offsets relative to ks, -1 padded (and fp32 scores), on every rank.

    Example:
        >>> layout = ShardLayout.interleaved(world_size, unit=64)
        >>> k_r, s_r = shard_keys(k, k_scale, layout, rank)
        >>> idx = hisa.distributed.dsa_index(q, k_r, w, ks, ke, layout=layout,
        ...                                  num_keys=k.shape[0], k_scale=s_r)
    """
    rank, T = _check_sharded_inputs(q, k, weights, ks, ke, k_scale, layout, num_keys, group)
    check_positive_int("topk", topk)
    check_out_buffer(out, T, topk, q.device)
    pos, val = _flat_rows(q, k, weights, ks, ke, k_scale, layout, rank, group, topk=topk,
                          backend=backend)
    return finish_output(_to_offsets(pos, ks), val, out=out, return_scores=return_scores)


def _hisa_tile(q, k, k_scale, pages, weights, ks, ke, pooled, pooled_scale, bmap, group, *,
               topk, block_topk, backend):
    first, end = eligible_range(ks, ke, bmap.B)
    lo, hi = nonforced_range(bmap, first, end)
    c = block_topk - 2
    if c > 0:
        cs, ci = packed_candidates(q, pooled, pooled_scale, weights, lo, hi, bmap, count=c,
                                   backend=backend)
    else:
        cs = ci = None
    kept = kept_blocks(cs, ci, first, end, block_topk=block_topk, group=group)
    logical, length, f_start, f_end = page_table(bmap, kept, ks.long(), ke.long())
    pairs = [paged_token_candidates(q, pages, weights, logical, logical, length, bmap,
                                    topk=topk, backend=backend)]
    if bool((f_end > f_start).any()):
        pairs.append(window_token_candidates(q, k, k_scale, weights, f_start, f_end,
                                             bmap.layout, bmap.rank, topk=topk,
                                             backend=backend))
    pos, val = merge_local(pairs, topk)
    scores, ids = exchange_candidates(val, pos, group, "tokens")
    return merge_topk(scores, ids, topk)


def hisa_index(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, ks: torch.Tensor,
               ke: torch.Tensor, *, layout: ShardLayout, num_keys: int,
               k_scale: torch.Tensor | None = None, topk: int = 2048, block_size: int = 128,
               block_topk: int = 64, group=None, return_scores: bool = False,
               out: torch.Tensor | None = None, backend: str = "auto"):
    """HISA selection over a key buffer sharded across the ranks of ``group``.

    The same selection as :func:`hisa.hisa_index` on the unsharded buffer (same sets up to
    score ties; ties broken to the lower position, as there): blocks are scored where they
    live, the ranks agree on the global top-m blocks through one exchange of their best
    ``m - 2`` non-forced blocks, then score their own tokens of the kept blocks and merge the
    per-rank top-k exactly. Rows whose window holds at most ``topk`` keys but spans more than
    ``block_topk`` blocks come back whole, as in the single-process op.

    Args:
        q, weights, ks, ke, k, k_scale, layout, num_keys, group: as in
            :func:`hisa.distributed.dsa_index`; ``k`` must be float8_e4m3fn with ``k_scale``
            (the token stage reads pages of the key-cache format).
        block_size: B, a multiple of 64; the layout must keep blocks whole or split them
            evenly in whole pages (:meth:`ShardLayout.check_hisa`).
        block_topk: m; ``block_topk * block_size >= topk``.
        topk, return_scores, out, backend: as in :func:`hisa.hisa_index`. Every block is
            scored on fp32 means for both backends (:mod:`hisa.ops.indexer.reps`), without
            the FP8 pre-selection the single-process Triton default runs past 8 m blocks.

    Returns:
        int32 [T, topk] offsets relative to ks, -1 padded (and fp32 scores), on every rank.

    Example:
        >>> layout = ShardLayout.contiguous_for(S, world_size, block_size=128)
        >>> k_r, s_r = shard_keys(k, k_scale, layout, rank)
        >>> idx = hisa.distributed.hisa_index(q, k_r, w, ks, ke, layout=layout, num_keys=S,
        ...                                   k_scale=s_r, block_size=128, block_topk=64)
    """
    rank, T = _check_sharded_inputs(q, k, weights, ks, ke, k_scale, layout, num_keys, group)
    check_hisa_params(topk=topk, block_size=block_size, block_topk=block_topk)
    check_tensor("k", k, dtypes=(FP8_DTYPE,))
    bmap = BlockMap(layout, rank, block_size)
    check_out_buffer(out, T, topk, q.device)
    # Every block is scored on fp32 means (both backends; rep_dtype gives fp32 for FP8 keys).
    # The single-process Triton default first pre-selects m + m/2 blocks on FP8 copies of them
    # on windows past 8 m blocks (pipeline.resolve_rescore_margin); not done here, so
    # near-tied blocks may differ there.
    reps = rep_dtype(k.dtype)
    pooled, pooled_scale = pool_sharded(k, k_scale, bmap, num_keys, group, rep_dtype=reps)
    pages = pack_pages(k, k_scale)
    pos = torch.full((T, topk), -1, dtype=torch.long, device=q.device)
    val = torch.full((T, topk), float("-inf"), device=q.device)
    for t0 in range(0, T, QUERY_TILE):
        sl = slice(t0, min(T, t0 + QUERY_TILE))
        pos[sl], val[sl] = _hisa_tile(q[sl], k, k_scale, pages, weights[sl], ks[sl], ke[sl],
                                      pooled, pooled_scale, bmap, group, topk=topk,
                                      block_topk=block_topk, backend=backend)
    _keep_short_windows(pos, val, q, k, weights, ks, ke, k_scale, layout, rank, group,
                        topk=topk, block_size=block_size, block_topk=block_topk,
                        backend=backend)
    return finish_output(_to_offsets(pos, ks), val, out=out, return_scores=return_scores)


def _keep_short_windows(pos, val, q, k, weights, ks, ke, k_scale, layout, rank, group, *,
                        topk, block_size, block_topk, backend):
    """Windows of <= topk keys come back whole: the rare ones spanning m + 1 blocks (unaligned,
    m * B close to k) are recomputed by the flat sharded path, as :func:`hisa.hisa_index`
    does. Every rank finds the same rows (replicated windows), so the collectives match."""
    first, end = eligible_range(ks, ke, block_size)
    rows = (((ke - ks).long() <= topk) & ((end - first) > block_topk)).nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    p, v = _flat_rows(q[rows], k, weights[rows], ks[rows], ke[rows], k_scale, layout, rank,
                      group, topk=topk, backend=backend)
    pos[rows], val[rows] = p, v


def shard_keys(k: torch.Tensor, k_scale: torch.Tensor | None, layout: ShardLayout, rank: int
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's keys of a global buffer k [S, D] (and scales), in the layout's local order."""
    check_tensor("k", k, ndim=2)
    if k_scale is not None:
        check_shape("k_scale", k_scale, (k.shape[0],))
    cap = layout.capacity
    if cap is not None and k.shape[0] > cap:
        raise ValueError(f"k: expected at most {cap} rows for {layout}, got {k.shape[0]}")
    pos = layout.positions(layout.check_rank(rank), k.shape[0], device=k.device)
    return k[pos], None if k_scale is None else k_scale[pos]
