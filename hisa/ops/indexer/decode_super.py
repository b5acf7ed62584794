"""The super-block level of HISA paged decode (Triton): no host synchronisation, no
data-dependent allocation (every buffer's shape follows from the batch, the block table width
and the parameters), so the launches can be captured in a CUDA graph.

==========================  ==============================================  ===================
kernel                      work                                            grid
==========================  ==============================================  ===================
super scores + selection    ``decode_kernels.block_select`` at block size   as there
                            Bs * B on the super-block cache: J over the
                            rows of complete super-blocks, +inf on the
                            first and last, top-ms ids
_candidate_scores_kernel    J[row, c] for the ms * Bs blocks of the kept    (rows, C_PAD / TILE)
                            super-blocks (block rows of the pooled cache)
_candidate_select_kernel    top-m candidates -> ascending block ids         one program per row
==========================  ==============================================  ===================

Candidate c is block ``super_ids[c // Bs] * Bs + c % Bs``; only complete blocks other than the
first (``1 <= j < nb - 1``) read a pooled row, the first and last eligible block score +inf and
are forced by position (the first and last candidates not marked outside), so neither the tail
block nor the tail super-block ever needs a row. Padding, blocks past the row and blocks whose
page id is outside the cache are marked outside (``OUTSIDE_BITS``, never selected); an unknown
pooled or super row scores NaN and ranks last (the rule of :mod:`hisa.ops.dsa.naive`). The
token stage that follows is the two-level one (:mod:`.decode_kernels`). Twins:
``naive_super_scores`` + ``naive_select_supers`` and ``naive_candidate_block_scores`` +
``naive_select_candidate_blocks`` of :mod:`.naive_super`, on the request's cached rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...cache.layout import PAGE_SIZE
from ...utils.sizes import next_pow2
from ..dsa.decode_kernels import _request_len, _row_len
from ..pdl import pdl_launch, pdl_trigger, pdl_wait
from . import decode_kernels
from .decode_kernels import (BLOCK_TILE, SCORE_WARPS, _nb_pad, _paged_pooled_scores,
                             block_select)
from .select import SELECT_MAX_ROW, select_warps
from .topk import _force_ends, _masked_key, _select_row


def check_decode_super_params(block_size: int, super_size: int, super_topk: int,
                              max_pages: int) -> None:
    """What the Triton super-block decode supports beyond the public contract."""
    if _nb_pad(max_pages, block_size * super_size) > SELECT_MAX_ROW:
        raise ValueError(f"block_table: at most {SELECT_MAX_ROW} super-blocks per request for "
                         f"the Triton super-block selection, got {max_pages} pages at "
                         f"block_size {block_size}, super_size {super_size}")
    if next_pow2(super_size * super_topk) > SELECT_MAX_ROW:
        raise ValueError(f"super_topk * super_size: expected at most {SELECT_MAX_ROW} candidate "
                         f"blocks for the Triton block selection, got {super_size * super_topk}")


@triton.jit
def _candidate_scores_kernel(q_ptr, pl8_ptr, pl32_ptr, w_ptr, seq_lens_ptr, bt_ptr, sup_ptr,
                             scratch_ptr, num_pages, max_pages, stride_bt, hisa_min_keys,
                             NEXT_N: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                             B: tl.constexpr, BS: tl.constexpr, MS: tl.constexpr,
                             C_PAD: tl.constexpr, SEQ_2D: tl.constexpr, TILE: tl.constexpr,
                             PAGE: tl.constexpr, PREC: tl.constexpr,
                             PDL: tl.constexpr = False):
    C: tl.constexpr = MS * BS
    pdl_wait(PDL)
    pdl_trigger(PDL)
    row = tl.program_id(0)
    c0 = tl.program_id(1) * TILE
    b = row // NEXT_N
    PPB: tl.constexpr = B // PAGE
    max_keys = max_pages * PAGE
    n = _row_len(seq_lens_ptr, b, row % NEXT_N, max_keys, NEXT_N, SEQ_2D)
    nb = tl.cdiv(n, B).to(tl.int64)
    if (_request_len(seq_lens_ptr, b, max_keys, NEXT_N, SEQ_2D) > hisa_min_keys) & (c0 < C):
        r64 = row.to(tl.int64)
        h = tl.arange(0, H)
        d = tl.arange(0, D)
        q_t = tl.load(q_ptr + r64 * (H * D) + h[None, :] * D + d[:, None])          # [D, H]
        w = tl.load(w_ptr + r64 * H + h)                                            # [H]
        c = c0 + tl.arange(0, TILE)
        cm = c < C
        g = tl.load(sup_ptr + r64 * MS + c // BS, mask=cm, other=-1).to(tl.int64)
        blk = g * BS + c % BS                                                       # int64
        valid = cm & (g >= 0) & (blk < nb)
        need = valid & (blk >= 1) & (blk < nb - 1)
        # outside for padding, past the row, or a page outside the cache
        s = _paged_pooled_scores(pl8_ptr, pl32_ptr, bt_ptr + b.to(tl.int64) * stride_bt, blk,
                                 need, num_pages, q_t, w, d, D, PPB, PREC)
        s = tl.where(valid & ((blk == 0) | (blk == nb - 1)), float("inf"), s)
        tl.store(scratch_ptr + r64 * C_PAD + c, s, mask=cm)


@triton.jit
def _candidate_select_kernel(scratch_ptr, seq_lens_ptr, sup_ptr, ids_ptr, max_pages,
                             hisa_min_keys, NEXT_N: tl.constexpr, SEQ_2D: tl.constexpr,
                             BS: tl.constexpr, MS: tl.constexpr, C_PAD: tl.constexpr,
                             M: tl.constexpr, M_PAD: tl.constexpr, PAGE: tl.constexpr,
                             RADIX: tl.constexpr, PDL: tl.constexpr = False):
    C: tl.constexpr = MS * BS
    pdl_wait(PDL)
    pdl_trigger(PDL)
    row = tl.program_id(0)
    b = row // NEXT_N
    if _request_len(seq_lens_ptr, b, max_pages * PAGE, NEXT_N, SEQ_2D) > hisa_min_keys:
        r64 = row.to(tl.int64)
        i = tl.arange(0, C_PAD)
        v = tl.load(scratch_ptr + r64 * C_PAD + i, mask=i < C, other=0.0, cache_modifier=".cg")
        # forced by position: the first and last candidates inside the row (blocks 0, nb - 1)
        keys = _force_ends(_masked_key(v, i < C), i, C_PAD)
        sel, pos, n_sel = _select_row(keys, M, RADIX)
        g = tl.load(sup_ptr + r64 * MS + i // BS, mask=sel, other=0)
        tl.store(ids_ptr + r64 * M + pos, g * BS + i % BS, mask=sel)
        j = tl.arange(0, M_PAD)
        tl.store(ids_ptr + r64 * M + j, -1, mask=(j >= n_sel) & (j < M))


def candidate_scores_paged(q, pooled_cache, weights, seq_lens, block_table, super_ids, *,
                           block_size, super_size, hisa_min_keys=-1, prec="tf32",
                           num_pages=None, pdl=False):
    """fp32 [rows, C_PAD] scores of the kept super-blocks' blocks in candidate order (C =
    ms * Bs valid columns): +inf on the forced first and last block, marked outside
    (``OUTSIDE_BITS``) for padding, blocks past the row and pages outside the cache. Twin:
    ``naive_candidate_block_scores`` on the request's rows."""
    batch, next_n, H, D = q.shape
    rows, ms = super_ids.shape
    c_pad = max(16, next_pow2(ms * super_size))
    scratch = torch.empty(rows, c_pad, dtype=torch.float32, device=q.device)
    tile = min(BLOCK_TILE, c_pad)
    if rows:
        _candidate_scores_kernel[(rows, triton.cdiv(ms * super_size, tile))](
            q, pooled_cache.view(torch.float8_e4m3fn), pooled_cache.view(torch.float32),
            weights, seq_lens, block_table, super_ids, scratch,
            pooled_cache.shape[0] if num_pages is None else num_pages, block_table.shape[1],
            block_table.stride(0), hisa_min_keys, NEXT_N=next_n, H=H, D=D, B=block_size,
            BS=super_size, MS=ms, C_PAD=c_pad, SEQ_2D=seq_lens.dim() == 2, TILE=tile,
            PAGE=PAGE_SIZE, PREC=prec, PDL=pdl, num_warps=SCORE_WARPS, **pdl_launch(pdl))
    return scratch


def super_block_select(q, pooled_cache, super_cache, weights, seq_lens, block_table, *,
                       block_size, block_topk, super_size, super_topk, hisa_min_keys=-1,
                       prec="tf32", num_pages=None, radix=None, pdl=False, tiers=None):
    """int32 [rows, m] ascending block ids, -1 padded, through the super-block level (rows of
    requests with at most ``hisa_min_keys`` keys are left unwritten). Four launches: super
    scores, super selection (at ``block_select``'s ``tiers``), candidate scores, candidate
    selection (the last three launched with PDL when ``pdl``)."""
    check_decode_super_params(block_size, super_size, super_topk, block_table.shape[1])
    batch, next_n = q.shape[:2]
    rows = batch * next_n
    # Read at call time, so that the decode switch (and a probe's patch of it) reaches here.
    radix = decode_kernels.SELECT_RADIX if radix is None else radix
    sids = block_select(q, super_cache, weights, seq_lens, block_table,
                        block_size=block_size * super_size, block_topk=super_topk,
                        hisa_min_keys=hisa_min_keys, prec=prec, num_pages=num_pages,
                        radix=radix, pdl=pdl, tiers=tiers)
    scratch = candidate_scores_paged(q, pooled_cache, weights, seq_lens, block_table, sids,
                                     block_size=block_size, super_size=super_size,
                                     hisa_min_keys=hisa_min_keys, prec=prec,
                                     num_pages=num_pages, pdl=pdl)
    c_pad = scratch.shape[1]
    ids = torch.empty(rows, block_topk, dtype=torch.int32, device=q.device)
    if rows:
        _candidate_select_kernel[(rows,)](
            scratch, seq_lens, sids, ids, block_table.shape[1], hisa_min_keys, NEXT_N=next_n,
            SEQ_2D=seq_lens.dim() == 2, BS=super_size, MS=super_topk, C_PAD=c_pad,
            M=block_topk, M_PAD=next_pow2(block_topk), PAGE=PAGE_SIZE,
            RADIX=radix, PDL=pdl, num_warps=select_warps(c_pad), **pdl_launch(pdl))
    return ids
