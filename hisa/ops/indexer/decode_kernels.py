"""HISA over the paged FP8 cache in Triton (decode): three launches, no host synchronisation.

====================  =====================================================  ===================
kernel                work                                                   grid
====================  =====================================================  ===================
_block_select_kernel  J[row, j] over the pooled rows of complete blocks,     one program per row
                      +inf on the first and last eligible block, then the
                      top-m block ids in registers (ascending, -1 padded)
_token_scores_kernel  exact scores of the kept blocks' tokens, page by page  (rows, m / BLK_PER_P)
_token_select_kernel  top-k of the m*B candidates -> request positions       one program per row
====================  =====================================================  ===================

Block ``j`` of request ``b`` reads its pooled row from page
``block_table[b, (j + 1) * B / 64 - 1]`` (:mod:`hisa.cache.layout`); only blocks
``1 <= j < nb - 1`` are read (the forced first and last block never are, so the tail block
needs no pooled value). Scores use ``dot(rows[TILE, D], q^T[D, H])`` (tokens or blocks on the
MMA rows, heads on the columns). Selection reuses the register bisection of
:mod:`hisa.ops.indexer.select` (ties to the lower index, exactly as the references).

Routing (``backend="auto"``): a request whose longest row sees at most :data:`HISA_MIN_KEYS`
keys goes to the flat kernels of :mod:`hisa.ops.dsa.decode_kernels` (launched first; their
top-k leaves HISA rows empty) and the HISA kernels skip it; the choice is made per request on
the device, from ``seq_lens``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...cache.layout import PAGE_SIZE
from ..dsa.decode_kernels import (NO_LIMIT, _page_scores, _pick, _request_len, _row_len,
                                  decode_operands, dsa_decode)
from .select import SELECT_MAX_ROW, _select_block_row, _select_token_row, select_warps

#: Crossover of ``backend="auto"``: requests with at most this many keys take the flat path;
#: 0 means HISA for every request. Measured on an H100 (benchmarks/decode_probe.py, CUDA
#: graphs, H = 64, B = 128, m = 64, k = 2048): HISA was faster than the flat kernels at every
#: shape, 1.2-1.4x at 8K (where it returns the flat selection exactly) up to 8.7x at
#: 128K x 128, so no request is routed to flat. The routing (two extra launches, 5-30 %
#: overhead when unused) stays available for GPUs or shapes where flat wins.
HISA_MIN_KEYS = 0
#: Pooled rows scored per dot in the block stage.
BLOCK_TILE = 64
#: Kept blocks handled by one token-stage program.
BLOCKS_PER_PROG = 2
#: Warps of the score kernels.
SCORE_WARPS = 4


@triton.jit
def _block_select_kernel(q_ptr, pl8_ptr, pl32_ptr, w_ptr, seq_lens_ptr, bt_ptr, scratch_ptr,
                         ids_ptr, num_pages, max_pages, stride_bt, hisa_min_keys,
                         NEXT_N: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                         B: tl.constexpr, SEQ_2D: tl.constexpr, M: tl.constexpr,
                         M_PAD: tl.constexpr, NB_PAD: tl.constexpr, TILE: tl.constexpr,
                         PAGE: tl.constexpr, PREC: tl.constexpr):
    row = tl.program_id(0)
    b = row // NEXT_N
    i = row % NEXT_N
    PPB: tl.constexpr = B // PAGE
    max_keys = max_pages * PAGE
    if _request_len(seq_lens_ptr, b, max_keys, NEXT_N, SEQ_2D) > hisa_min_keys:
        n = _row_len(seq_lens_ptr, b, i, max_keys, NEXT_N, SEQ_2D)
        nb = tl.cdiv(n, B)
        r64 = row.to(tl.int64)
        h = tl.arange(0, H)
        d = tl.arange(0, D)
        q_t = tl.load(q_ptr + r64 * (H * D) + h[None, :] * D + d[:, None])          # [D, H]
        w = tl.load(w_ptr + r64 * H + h)                                            # [H]
        out = scratch_ptr + r64 * NB_PAD
        for j0 in range(0, nb, TILE):
            j = j0 + tl.arange(0, TILE)
            need = (j >= 1) & (j < nb - 1)
            page = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + (j + 1) * PPB - 1,
                           mask=need, other=0)
            ok = need & (page >= 0) & (page < num_pages)
            base = tl.where(ok, page, 0).to(tl.int64) * (D + 4)
            kb = tl.load(pl8_ptr + base[:, None] + d[None, :], mask=ok[:, None], other=0.0)
            sc = tl.load(pl32_ptr + base // 4 + D // 4, mask=ok, other=0.0)
            acc = tl.dot(kb.to(q_t.dtype), q_t, input_precision=PREC)               # [TILE, H]
            s = tl.sum(tl.maximum(acc, 0.0) * w[None, :], axis=1) * sc
            s = tl.where(ok, s, float("-inf"))
            s = tl.where((j == 0) | (j == nb - 1), float("inf"), s)
            tl.store(out + j, s, mask=j < nb)
        tl.debug_barrier()
        _select_block_row(out, nb, 0, ids_ptr + r64 * M, M, M_PAD, NB_PAD)


@triton.jit
def _token_scores_kernel(q_ptr, kv8_ptr, kv32_ptr, w_ptr, seq_lens_ptr, bt_ptr, ids_ptr,
                         cand_ptr, num_pages, max_pages, stride_bt, hisa_min_keys,
                         NEXT_N: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                         B: tl.constexpr, SEQ_2D: tl.constexpr, M: tl.constexpr,
                         BPP: tl.constexpr, PAGE: tl.constexpr, PREC: tl.constexpr):
    row = tl.program_id(0)
    jb = tl.program_id(1)
    b = row // NEXT_N
    i = row % NEXT_N
    PPB: tl.constexpr = B // PAGE
    max_keys = max_pages * PAGE
    if _request_len(seq_lens_ptr, b, max_keys, NEXT_N, SEQ_2D) > hisa_min_keys:
        n = _row_len(seq_lens_ptr, b, i, max_keys, NEXT_N, SEQ_2D)
        r64 = row.to(tl.int64)
        h = tl.arange(0, H)
        d = tl.arange(0, D)
        one = tl.arange(0, 1)
        q_t = tl.load(q_ptr + r64 * (H * D) + h[None, :] * D + d[:, None])          # [D, H]
        w = tl.load(w_ptr + r64 * H + h)
        t = tl.arange(0, PAGE)
        for jj in tl.static_range(BPP):
            j = jb * BPP + jj
            blk = tl.load(ids_ptr + r64 * M + j, mask=j < M, other=-1)
            for p in tl.static_range(PPB):
                col = blk * PPB + p
                page = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + col, mask=blk >= 0,
                               other=-1)
                pos = col * PAGE + t
                page_ok = (blk >= 0) & (page >= 0) & (page < num_pages)
                s2 = _page_scores(kv8_ptr, kv32_ptr, tl.where(page_ok, page, 0), page_ok, q_t,
                                  w, H, 1, H, D, PAGE, PREC)
                sc = tl.where(page_ok & (pos < n), _pick(s2, one, 0), float("-inf"))
                tl.store(cand_ptr + r64 * (M * B) + j * B + p * PAGE + t, sc, mask=j < M)


@triton.jit
def _token_select_kernel(cand_ptr, ids_ptr, seq_lens_ptr, out_idx_ptr, out_val_ptr, max_pages,
                         hisa_min_keys, NEXT_N: tl.constexpr, SEQ_2D: tl.constexpr,
                         B: tl.constexpr, M: tl.constexpr, MB_PAD: tl.constexpr,
                         K: tl.constexpr, K_PAD: tl.constexpr, PAGE: tl.constexpr,
                         WRITE_VALS: tl.constexpr):
    row = tl.program_id(0)
    b = row // NEXT_N
    if _request_len(seq_lens_ptr, b, max_pages * PAGE, NEXT_N, SEQ_2D) > hisa_min_keys:
        r64 = row.to(tl.int64)
        _select_token_row(cand_ptr + r64 * (M * B), ids_ptr + r64 * M, 0, out_idx_ptr + r64 * K,
                          out_val_ptr + r64 * K, B, M * B, MB_PAD, K, K_PAD, WRITE_VALS)


def check_decode_params(block_size: int, block_topk: int, max_pages: int) -> None:
    """What the Triton HISA decode supports beyond the public contract."""
    nb_pad = triton.next_power_of_2(max(1, -(-max_pages * PAGE_SIZE // block_size)))
    if nb_pad > SELECT_MAX_ROW:
        raise ValueError(f"block_table: at most {SELECT_MAX_ROW} blocks per request for the "
                         f"Triton block selection, got {max_pages} pages of block_size "
                         f"{block_size}")
    if triton.next_power_of_2(block_topk * block_size) > SELECT_MAX_ROW:
        raise ValueError(f"block_topk * block_size: expected at most {SELECT_MAX_ROW} "
                         f"candidates for the Triton token selection, got "
                         f"{block_topk * block_size}")


def block_select(q, pooled_cache, weights, seq_lens, block_table, *, block_size, block_topk,
                 hisa_min_keys=-1, prec="tf32", num_pages=None):
    """Top-m block ids per row, int32 [rows, m], ascending, -1 padded (rows of requests with at
    most ``hisa_min_keys`` keys are left unwritten). Twin: ``naive_block_scores`` +
    ``naive_select_blocks`` on the request's pooled rows."""
    batch, next_n, H, D = q.shape
    rows = batch * next_n
    max_pages = block_table.shape[1]
    nb_pad = max(16, triton.next_power_of_2(-(-max_pages * PAGE_SIZE // block_size)))
    scratch = torch.empty(rows, nb_pad, dtype=torch.float32, device=q.device)
    ids = torch.empty(rows, block_topk, dtype=torch.int32, device=q.device)
    if rows:
        _block_select_kernel[(rows,)](
            q, pooled_cache.view(torch.float8_e4m3fn), pooled_cache.view(torch.float32),
            weights, seq_lens, block_table, scratch, ids,
            pooled_cache.shape[0] if num_pages is None else num_pages, max_pages,
            block_table.stride(0), hisa_min_keys, NEXT_N=next_n, H=H, D=D, B=block_size,
            SEQ_2D=seq_lens.dim() == 2, M=block_topk,
            M_PAD=triton.next_power_of_2(block_topk), NB_PAD=nb_pad, TILE=BLOCK_TILE,
            PAGE=PAGE_SIZE, PREC=prec, num_warps=max(SCORE_WARPS, select_warps(nb_pad)))
    return ids


def token_scores_paged(q, pages, weights, seq_lens, block_table, block_ids, *, block_size,
                       hisa_min_keys=-1, prec="tf32"):
    """fp32 [rows, m*B] exact scores of the kept blocks' tokens, -inf outside the row's window
    and for padding blocks. Twin: ``naive_token_scores`` on the request's keys."""
    batch, next_n, H, D = q.shape
    rows, M = block_ids.shape
    cand = torch.empty(rows, M * block_size, dtype=torch.float32, device=q.device)
    if rows:
        grid = (rows, triton.cdiv(M, BLOCKS_PER_PROG))
        _token_scores_kernel[grid](
            q, pages.view(torch.float8_e4m3fn), pages.view(torch.float32), weights, seq_lens,
            block_table, block_ids, cand, pages.shape[0], block_table.shape[1],
            block_table.stride(0), hisa_min_keys, NEXT_N=next_n, H=H, D=D, B=block_size,
            SEQ_2D=seq_lens.dim() == 2, M=M, BPP=BLOCKS_PER_PROG, PAGE=PAGE_SIZE, PREC=prec,
            num_warps=SCORE_WARPS)
    return cand


def hisa_decode(q: torch.Tensor, pages: torch.Tensor, pooled_cache: torch.Tensor,
                weights: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor, *,
                topk: int, block_size: int, block_topk: int, out: torch.Tensor | None = None,
                need_scores: bool = False, route_short_to_flat: bool = False,
                hisa_min_keys: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HISA paged decode: (int32 [rows, topk] positions, -1 padded; fp32 scores or None).

    ``route_short_to_flat`` (``backend="auto"``) sends requests with at most ``hisa_min_keys``
    (default ``max(HISA_MIN_KEYS, block_topk * block_size)``) keys to the flat kernels; the choice is per request, on
    the device. Launches: 3 (HISA only) or 5 (both paths)."""
    batch, next_n, H, D = q.shape
    check_decode_params(block_size, block_topk, block_table.shape[1])
    max_keys = block_table.shape[1] * PAGE_SIZE
    if not route_short_to_flat:
        thr = 0
    else:
        thr = HISA_MIN_KEYS if hisa_min_keys is None else hisa_min_keys
    thr = thr if thr > 0 else -1           # -1: HISA takes every request, empty ones included
    rows = batch * next_n
    if thr >= max_keys:                    # no request can be long enough for HISA
        return dsa_decode(q, pages, weights, seq_lens, block_table, topk=topk, out=out,
                          need_scores=need_scores)
    idx = out if out is not None else torch.empty(rows, topk, dtype=torch.int32,
                                                  device=q.device)
    vals = torch.empty(rows, topk, dtype=torch.float32, device=q.device) if need_scores else None
    if thr > 0:
        dsa_decode(q, pages, weights, seq_lens, block_table, topk=topk, out=idx,
                   out_scores=vals, flat_max_keys=thr)
    q, _, _, prec = decode_operands(q, pages)
    ids = block_select(q, pooled_cache, weights, seq_lens, block_table, block_size=block_size,
                       block_topk=block_topk, hisa_min_keys=thr, prec=prec,
                       num_pages=pages.shape[0])
    cand = token_scores_paged(q, pages, weights, seq_lens, block_table, ids,
                              block_size=block_size, hisa_min_keys=thr, prec=prec)
    mb = block_topk * block_size
    if rows:
        _token_select_kernel[(rows,)](
            cand, ids, seq_lens, idx, vals if vals is not None else cand, block_table.shape[1],
            thr, NEXT_N=next_n, SEQ_2D=seq_lens.dim() == 2, B=block_size, M=block_topk,
            MB_PAD=triton.next_power_of_2(mb), K=topk, K_PAD=triton.next_power_of_2(topk),
            PAGE=PAGE_SIZE, WRITE_VALS=vals is not None,
            num_warps=select_warps(triton.next_power_of_2(mb)))
    return idx, vals


__all__ = ["HISA_MIN_KEYS", "NO_LIMIT", "block_select", "hisa_decode", "token_scores_paged"]
