"""HISA over the paged FP8 cache in Triton (decode): four launches (three with the block
selection fused into the token stage, ``fuse_block_select``; six at three levels, see
:mod:`.decode_super`), no host synchronisation.

====================  =====================================================  ===================
kernel                work                                                   grid
====================  =====================================================  ===================
_block_scores_kernel  J[row, j] over the pooled rows of complete blocks,     (rows, blocks / TILE)
                      +inf on the first and last eligible block, to a
                      scratch row
_block_select_kernel  the top-m block ids of the scratch row in registers    one program per row
                      (ascending, -1 padded)
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
from ...utils.sizes import next_pow2
from ..dsa.decode_kernels import (NO_LIMIT, _page_scores, _pick, _request_len, _row_len,
                                  decode_layout, decode_operands, dsa_decode)
from ..pdl import pdl_launch, pdl_supported, pdl_trigger, pdl_wait
from .select import SELECT_MAX_ROW, _select_token_row, select_warps
from .topk import _force_key, _masked_key, _outside_like, _relu, _select_row

#: Crossover of ``backend="auto"``: requests with at most this many keys take the flat path;
#: 0 means HISA for every request. Measured on an H100 (benchmarks/decode_probe.py, CUDA
#: graphs, H = 64, B = 128, m = 64, k = 2048): HISA was faster than the flat kernels at every
#: shape, 1.2-1.4x at 8K (where it returns the flat selection exactly) up to 8.7x at
#: 128K x 128, so no request is routed to flat; after the split block stage, an H200 gave
#: 8K x 8: flat 45.2 us, HISA 25.4 us (benchmarks/decode_notes.md). The routing (two extra launches, 5-30 %
#: overhead when unused) stays available for GPUs or shapes where flat wins.
HISA_MIN_KEYS = 0
#: Pooled rows scored per block-stage program (one dot; a row's blocks spread over programs).
BLOCK_TILE = 64
#: Token-stage programs wanted per SM: a row's m kept blocks are split over
#: ``min(m, TOKEN_PROGS_PER_SM * SMs / rows)`` programs (rounded down to a power of two), so a
#: small batch still fills the GPU and a large one keeps the redundant block selection cheap.
TOKEN_PROGS_PER_SM = 8
#: Block selection inside the token-stage programs (one launch fewer) rather than its own
#: launch; see ``_token_scores_kernel``. Off: measured slower on an H200 (128K x 8: 30.5 vs
#: 29.1 us, x 32: 49.8 vs 43.6 us), the redundant selections cost more than the launch saved.
FUSE_BLOCK_SELECT = False
#: Threshold search of the register selections (:func:`.topk._select_row`): 0, the interpolation
#: search, measured 0.8-2.3 us faster than the bit search (1) on an H200 (128K x 1 / 8 / 32:
#: 23.1 / 25.0 / 39.8 against 24.9 / 27.3 / 40.6 us); 1 with the early exit beat the packed
#: 2-bit passes by 1.5-2 us and the byte histograms (8) by 7-10 us (benchmarks/decode_notes.md).
SELECT_RADIX = 0
#: The token select's slots per block (``select._store_candidates``) rather than one scan
#: over the row. Off: alone the per-block kernel is faster (H200, CUDA graphs, 8 warps:
#: 11.1 / 11.2 / 13.5 against 11.8 / 11.7 / 14.1 us at 128K x 1 / 8 / 32), but its 64 KB of
#: shared memory a program keeps it from being scheduled beside the token scores under PDL:
#: whole steps, same run, slots on / off: 128K x 1 22.0 / 22.7, x 8 30.4 / 24.5, x 32 39.1 /
#: 38.9 us, 8K x 8 25.5 / 21.2 (benchmarks/results/round3/kernel_ab_h200_f2c3b12.txt,
#: decode_probe.py --variants and --select). Session 17 (rows lost) also ran the slots with
#: PDL off, where they won at x 8 (25.5 against 26.8 us): the loss is the overlap.
SELECT_BLOCK_SLOTS = False
#: Warps of the score kernels.
SCORE_WARPS = 4
#: Launch the block select, token scores and token select kernels with programmatic dependent
#: launch (:mod:`hisa.ops.pdl`) where the GPU has it, so each is scheduled while the kernel
#: before it finishes (the step is four short dependent launches), for steps of at most
#: :data:`PDL_MAX_ROWS` rows. H200, CUDA graphs (decode_probe --pdl, benchmarks/decode_notes.md):
#: 1.4-2.0 us saved at 128K x 1 / 8 / 32 / 48 / 64, 1.8-2.3 us at 1M x 1 / 8 (three levels),
#: nothing at 128K x 96, 1.5-1.9 us lost at 128K x 128 (the waiting dependents hold SM slots
#: the wide grids need).
USE_PDL = True
PDL_MAX_ROWS = 64
#: Register widths the block selection may use below the block table's (``_nb_pad``): a row
#: of ``nb`` blocks is selected at the narrowest width here that holds it, else at the table's.
#: An engine's table is as wide as its longest allowed request (1M tokens: 8,192 blocks of
#: 128), so without them every request paid the widest selection, whatever its length; the
#: set selected is the same at any width. ``()`` turns it off (probes compare the two).
BLOCK_SELECT_TIERS = (256, 2048)


@triton.jit
def _paged_pooled_scores(pl8_ptr, pl32_ptr, bt_row, blk, need, num_pages, q_t, w, d,
                         D: tl.constexpr, PPB: tl.constexpr, PREC: tl.constexpr):
    """Stage-1 scores [TILE] of a request's blocks ``blk`` where ``need``, from the pooled
    rows stored in each block's last page (``bt_row``: the request's block-table row): the
    gated head sum of ReLU(row . q) times the row's scale; marked outside where the block is
    not needed or its page id lies outside the cache. Shared by the two-level block stage and
    the three-level candidate stage, so the scoring rule lives once."""
    page = tl.load(bt_row + (blk + 1) * PPB - 1, mask=need, other=0)
    ok = need & (page >= 0) & (page < num_pages)
    base = tl.where(ok, page, 0).to(tl.int64) * (D + 4)
    kb = tl.load(pl8_ptr + base[:, None] + d[None, :], mask=ok[:, None], other=0.0)
    sc = tl.load(pl32_ptr + base // 4 + D // 4, mask=ok, other=0.0)
    acc = tl.dot(kb.to(q_t.dtype), q_t, input_precision=PREC)                       # [TILE, H]
    s = tl.sum(_relu(acc) * w[None, :], axis=1) * sc
    return tl.where(ok, s, _outside_like(s))


@triton.jit
def _block_scores_kernel(q_ptr, pl8_ptr, pl32_ptr, w_ptr, seq_lens_ptr, bt_ptr, scratch_ptr,
                         num_pages, max_pages, stride_bt, hisa_min_keys,
                         NEXT_N: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                         B: tl.constexpr, SEQ_2D: tl.constexpr, NB_PAD: tl.constexpr,
                         TILE: tl.constexpr, PAGE: tl.constexpr, PREC: tl.constexpr,
                         PDL: tl.constexpr = False):
    # The chain's first kernel (launched normally): it only lets the block select in early.
    pdl_trigger(PDL)
    row = tl.program_id(0)
    j0 = tl.program_id(1) * TILE
    b = row // NEXT_N
    i = row % NEXT_N
    PPB: tl.constexpr = B // PAGE
    max_keys = max_pages * PAGE
    n = _row_len(seq_lens_ptr, b, i, max_keys, NEXT_N, SEQ_2D)
    nb = tl.cdiv(n, B)
    if (_request_len(seq_lens_ptr, b, max_keys, NEXT_N, SEQ_2D) > hisa_min_keys) & (j0 < nb):
        r64 = row.to(tl.int64)
        h = tl.arange(0, H)
        d = tl.arange(0, D)
        q_t = tl.load(q_ptr + r64 * (H * D) + h[None, :] * D + d[:, None])          # [D, H]
        w = tl.load(w_ptr + r64 * H + h)                                            # [H]
        j = j0 + tl.arange(0, TILE)
        need = (j >= 1) & (j < nb - 1)
        s = _paged_pooled_scores(pl8_ptr, pl32_ptr, bt_ptr + b.to(tl.int64) * stride_bt, j,
                                 need, num_pages, q_t, w, d, D, PPB, PREC)
        s = tl.where((j == 0) | (j == nb - 1), float("inf"), s)
        tl.store(scratch_ptr + r64 * NB_PAD + j, s, mask=j < nb)


@triton.jit
def _row_blocks(scratch_ptr, r64, nb, M: tl.constexpr, NB_PAD: tl.constexpr,
                RADIX: tl.constexpr, WIDTH: tl.constexpr = 0):
    """(block ids [WIDTH], selection mask, slot of each selected block, count) of a row's
    top-M blocks from its scores in the scratch (rows NB_PAD apart); the first and last block
    are forced. ``WIDTH`` (0: NB_PAD) must hold the row's ``nb`` blocks."""
    W: tl.constexpr = NB_PAD if WIDTH == 0 else WIDTH
    bi = tl.arange(0, W)
    v = tl.load(scratch_ptr + r64 * NB_PAD + bi, mask=bi < nb, other=0.0, cache_modifier=".cg")
    keys = _force_key(_masked_key(v, bi < nb), (bi == 0) | (bi == nb - 1))
    sel, pos, n_sel = _select_row(keys, M, RADIX)
    return bi, sel, pos, n_sel


@triton.jit
def _store_ids(ids_ptr, bi, sel, pos, n_sel, M: tl.constexpr, M_PAD: tl.constexpr):
    tl.store(ids_ptr + pos, bi, mask=sel)
    jm = tl.arange(0, M_PAD)
    tl.store(ids_ptr + jm, -1, mask=(jm >= n_sel) & (jm < M))


@triton.jit
def _select_store_blocks(scratch_ptr, ids_ptr, r64, nb, M: tl.constexpr, M_PAD: tl.constexpr,
                         NB_PAD: tl.constexpr, RADIX: tl.constexpr, WIDTH: tl.constexpr):
    bi, sel, pos, n_sel = _row_blocks(scratch_ptr, r64, nb, M, NB_PAD, RADIX, WIDTH)
    _store_ids(ids_ptr + r64 * M, bi, sel, pos, n_sel, M, M_PAD)


@triton.jit
def _block_select_kernel(scratch_ptr, seq_lens_ptr, ids_ptr, max_pages, hisa_min_keys,
                         NEXT_N: tl.constexpr, B: tl.constexpr, SEQ_2D: tl.constexpr,
                         M: tl.constexpr, M_PAD: tl.constexpr, NB_PAD: tl.constexpr,
                         PAGE: tl.constexpr, RADIX: tl.constexpr, PDL: tl.constexpr = False,
                         TIER1: tl.constexpr = 0, TIER2: tl.constexpr = 0):
    # TIER1 < TIER2 < NB_PAD (0: unused): a row of at most TIER blocks is selected at that
    # register width (fewer keys a thread in every pass, a shorter slot scan), not the table's.
    pdl_wait(PDL)
    pdl_trigger(PDL)
    row = tl.program_id(0)
    b = row // NEXT_N
    max_keys = max_pages * PAGE
    if _request_len(seq_lens_ptr, b, max_keys, NEXT_N, SEQ_2D) > hisa_min_keys:
        r64 = row.to(tl.int64)
        nb = tl.cdiv(_row_len(seq_lens_ptr, b, row % NEXT_N, max_keys, NEXT_N, SEQ_2D), B)
        # The tiers are compile-time guards around runtime tests (an unused tier compiles
        # to nothing); a row selected in a tier leaves nb = -1 so that no later one takes it
        # (a separate `done` flag compiled to 149 registers a thread at 8 warps, this to 128).
        if TIER1 > 0:
            if nb <= TIER1:
                _select_store_blocks(scratch_ptr, ids_ptr, r64, nb, M, M_PAD, NB_PAD, RADIX,
                                     TIER1)
                nb = -1
        if TIER2 > 0:
            if (nb >= 0) & (nb <= TIER2):
                _select_store_blocks(scratch_ptr, ids_ptr, r64, nb, M, M_PAD, NB_PAD, RADIX,
                                     TIER2)
                nb = -1
        if nb >= 0:
            _select_store_blocks(scratch_ptr, ids_ptr, r64, nb, M, M_PAD, NB_PAD, RADIX, 0)


def block_select_tiers(nb_pad: int, tiers=None) -> dict:
    """TIER1 / TIER2 of ``_block_select_kernel``: the widths of ``tiers`` (default
    :data:`BLOCK_SELECT_TIERS`) narrower than ``nb_pad``, at most two, ascending."""
    tiers = tuple(BLOCK_SELECT_TIERS if tiers is None else tiers)
    use = sorted(t for t in tiers if t < nb_pad)
    if len(use) > 2 or any(t & (t - 1) or t < 16 for t in use):
        raise ValueError(f"tiers: expected at most two powers of two >= 16 below the row "
                         f"width {nb_pad}, got {tiers}")
    use = [0] * (2 - len(use)) + use
    return {"TIER1": use[0], "TIER2": use[1]}


@triton.jit
def _token_scores_kernel(q_ptr, kv8_ptr, kv32_ptr, w_ptr, seq_lens_ptr, bt_ptr, scratch_ptr,
                         ids_ptr, cand_ptr, num_pages, max_pages, stride_bt, hisa_min_keys,
                         NEXT_N: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                         B: tl.constexpr, SEQ_2D: tl.constexpr, M: tl.constexpr,
                         M_PAD: tl.constexpr, NB_PAD: tl.constexpr, BPP: tl.constexpr,
                         PAGE: tl.constexpr, PREC: tl.constexpr, FUSE_SELECT: tl.constexpr,
                         RADIX: tl.constexpr, PDL: tl.constexpr = False):
    # FUSE_SELECT: every program selects its row's top-M blocks from the block scores itself
    # (a redundant register selection, in parallel) instead of a separate launch reading them.
    pdl_trigger(PDL)
    row = tl.program_id(0)
    jb = tl.program_id(1)
    b = row // NEXT_N
    i = row % NEXT_N
    PPB: tl.constexpr = B // PAGE
    max_keys = max_pages * PAGE
    r64 = row.to(tl.int64)
    # The query, its weights and the lengths are the chain's inputs: read before the wait, so
    # under PDL these loads overlap the block selection's tail.
    h = tl.arange(0, H)
    d = tl.arange(0, D)
    q_t = tl.load(q_ptr + r64 * (H * D) + h[None, :] * D + d[:, None])              # [D, H]
    w = tl.load(w_ptr + r64 * H + h)
    live = _request_len(seq_lens_ptr, b, max_keys, NEXT_N, SEQ_2D) > hisa_min_keys
    n = _row_len(seq_lens_ptr, b, i, max_keys, NEXT_N, SEQ_2D)
    pdl_wait(PDL)
    if live:
        if FUSE_SELECT:
            bi, sel, pos, n_sel = _row_blocks(scratch_ptr, r64, tl.cdiv(n, B), M, NB_PAD,
                                              RADIX)
            if jb == 0:
                _store_ids(ids_ptr + r64 * M, bi, sel, pos, n_sel, M, M_PAD)
        one = tl.arange(0, 1)
        t = tl.arange(0, PAGE)
        for jj in range(BPP):
            j = jb * BPP + jj
            if FUSE_SELECT:
                blk = tl.sum(tl.where(sel & (pos == j), bi, 0), axis=0)
                blk = tl.where(j < n_sel, blk, -1)
            else:
                blk = tl.load(ids_ptr + r64 * M + j, mask=j < M, other=-1)
            for p in tl.static_range(PPB):
                col = blk * PPB + p
                # col < max_pages: the tail block of a table whose width is not a multiple of
                # B / 64 ends inside the row.
                page = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + col,
                               mask=(blk >= 0) & (col < max_pages), other=-1)
                pos_t = col * PAGE + t
                page_ok = (blk >= 0) & (page >= 0) & (page < num_pages)
                s2 = _page_scores(kv8_ptr, kv32_ptr, tl.where(page_ok, page, 0), page_ok, q_t,
                                  w, H, 1, H, D, PAGE, PREC)
                sc = _pick(s2, one, 0)
                sc = tl.where(page_ok & (pos_t < n), sc, _outside_like(sc))
                tl.store(cand_ptr + r64 * (M * B) + j * B + p * PAGE + t, sc, mask=j < M)


@triton.jit
def _token_select_kernel(cand_ptr, ids_ptr, seq_lens_ptr, out_idx_ptr, out_val_ptr, max_pages,
                         hisa_min_keys, NEXT_N: tl.constexpr, SEQ_2D: tl.constexpr,
                         B: tl.constexpr, M: tl.constexpr, MB_PAD: tl.constexpr,
                         K: tl.constexpr, K_PAD: tl.constexpr, PAGE: tl.constexpr,
                         WRITE_VALS: tl.constexpr, RADIX: tl.constexpr,
                         BLOCK_SLOTS: tl.constexpr, PDL: tl.constexpr = False):
    pdl_wait(PDL)
    row = tl.program_id(0)
    b = row // NEXT_N
    if _request_len(seq_lens_ptr, b, max_pages * PAGE, NEXT_N, SEQ_2D) > hisa_min_keys:
        r64 = row.to(tl.int64)
        # Request positions (s0 = 0); decode rows are rarely short: no count first.
        _select_token_row(cand_ptr + r64 * (M * B), ids_ptr + r64 * M, 0,
                          out_idx_ptr + r64 * K, out_val_ptr + r64 * K, B, M * B, MB_PAD, K,
                          K_PAD, WRITE_VALS, RADIX, False, BLOCK_SLOTS)


def check_decode_params(block_size: int, block_topk: int, max_pages: int, *,
                        block_rows: bool = True) -> None:
    """What the Triton HISA decode supports beyond the public contract. ``block_rows=False``
    for three levels, whose block stage scores only the kept super-blocks' candidates (their
    limits: ``decode_super.check_decode_super_params``)."""
    nb_pad = next_pow2(max(1, -(-max_pages * PAGE_SIZE // block_size)))
    if block_rows and nb_pad > SELECT_MAX_ROW:
        raise ValueError(f"block_table: at most {SELECT_MAX_ROW} blocks per request for the "
                         f"Triton block selection, got {max_pages} pages of block_size "
                         f"{block_size}")
    if next_pow2(block_topk * block_size) > SELECT_MAX_ROW:
        raise ValueError(f"block_topk * block_size: expected at most {SELECT_MAX_ROW} "
                         f"candidates for the Triton token selection, got "
                         f"{block_topk * block_size}")


def _num_pages(pages_or_pooled, num_pages):
    return pages_or_pooled.shape[0] if num_pages is None else num_pages


def _nb_pad(max_pages: int, block_size: int) -> int:
    return max(16, next_pow2(-(-max_pages * PAGE_SIZE // block_size)))


def block_scores_paged(q, pooled_cache, weights, seq_lens, block_table, *, block_size,
                       hisa_min_keys=-1, prec="tf32", num_pages=None, out=None, pdl=False):
    """fp32 [rows, NB_PAD] block scores J[row, j] on [0, nb): +inf on the forced first and last
    block, the pooled-row score between, garbage beyond nb. Grid (rows, NB_PAD / TILE): a row's
    blocks are spread over programs. Twin: ``naive_block_scores`` on the request's pooled rows."""
    batch, next_n, H, D = q.shape
    rows = batch * next_n
    max_pages = block_table.shape[1]
    nb_pad = _nb_pad(max_pages, block_size)
    scratch = out if out is not None else torch.empty(rows, nb_pad, dtype=torch.float32,
                                                      device=q.device)
    tile = min(BLOCK_TILE, nb_pad)
    if rows:
        _block_scores_kernel[(rows, nb_pad // tile)](
            q, pooled_cache.view(torch.float8_e4m3fn), pooled_cache.view(torch.float32),
            weights, seq_lens, block_table, scratch, _num_pages(pooled_cache, num_pages),
            max_pages, block_table.stride(0), hisa_min_keys, NEXT_N=next_n, H=H, D=D,
            B=block_size, SEQ_2D=seq_lens.dim() == 2, NB_PAD=nb_pad, TILE=tile, PAGE=PAGE_SIZE,
            PREC=prec, PDL=pdl, num_warps=SCORE_WARPS)
    return scratch


def block_select(q, pooled_cache, weights, seq_lens, block_table, *, block_size, block_topk,
                 hisa_min_keys=-1, prec="tf32", num_pages=None, radix=None, pdl=False,
                 tiers=None):
    """Top-m block ids per row, int32 [rows, m], ascending, -1 padded (rows of requests with at
    most ``hisa_min_keys`` keys are left unwritten): block scores, then one selection program
    per row, at the narrowest register width of ``tiers`` (default
    :data:`BLOCK_SELECT_TIERS`) that holds the row. Twin: ``naive_block_scores`` +
    ``naive_select_blocks`` on the request's pooled rows."""
    batch, next_n = q.shape[:2]
    rows = batch * next_n
    scratch = block_scores_paged(q, pooled_cache, weights, seq_lens, block_table,
                                 block_size=block_size, hisa_min_keys=hisa_min_keys, prec=prec,
                                 num_pages=num_pages, pdl=pdl)
    nb_pad = scratch.shape[1]
    ids = torch.empty(rows, block_topk, dtype=torch.int32, device=q.device)
    if rows:
        _block_select_kernel[(rows,)](
            scratch, seq_lens, ids, block_table.shape[1], hisa_min_keys, NEXT_N=next_n,
            B=block_size, SEQ_2D=seq_lens.dim() == 2, M=block_topk,
            M_PAD=next_pow2(block_topk), NB_PAD=nb_pad, PAGE=PAGE_SIZE,
            RADIX=SELECT_RADIX if radix is None else radix, PDL=pdl,
            num_warps=select_warps(nb_pad), **block_select_tiers(nb_pad, tiers),
            **pdl_launch(pdl))
    return ids


def token_programs(rows: int, block_topk: int, device: torch.device) -> int:
    """Token-stage programs per row (see :data:`TOKEN_PROGS_PER_SM`)."""
    if device.type != "cuda":
        return min(block_topk, 4)               # the interpreter runs programs one by one
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, TOKEN_PROGS_PER_SM * sms // max(rows, 1))
    return max(1, min(block_topk, 1 << (want.bit_length() - 1)))


def token_scores_paged(q, pages, weights, seq_lens, block_table, block_ids, *, block_size,
                       hisa_min_keys=-1, prec="tf32", block_scores=None, programs=None,
                       radix=None, pdl=False):
    """fp32 [rows, m*B] exact scores of the kept blocks' tokens, -inf outside the row's window
    and for padding blocks. With ``block_scores`` (from :func:`block_scores_paged`) the programs
    select the blocks themselves and write ``block_ids``; else they read ``block_ids``.
    Twin: ``naive_token_scores`` on the request's keys."""
    batch, next_n, H, D = q.shape
    rows, M = block_ids.shape
    cand = torch.empty(rows, M * block_size, dtype=torch.float32, device=q.device)
    progs = programs or token_programs(rows, M, q.device)
    bpp = -(-M // progs)
    fuse = block_scores is not None
    if rows:
        _token_scores_kernel[(rows, -(-M // bpp))](
            q, pages.view(torch.float8_e4m3fn), pages.view(torch.float32), weights, seq_lens,
            block_table, block_scores if fuse else cand, block_ids, cand, pages.shape[0],
            block_table.shape[1], block_table.stride(0), hisa_min_keys, NEXT_N=next_n, H=H, D=D,
            B=block_size, SEQ_2D=seq_lens.dim() == 2, M=M, M_PAD=next_pow2(M),
            NB_PAD=block_scores.shape[1] if fuse else 16, BPP=bpp, PAGE=PAGE_SIZE, PREC=prec,
            FUSE_SELECT=fuse, RADIX=SELECT_RADIX if radix is None else radix, PDL=pdl,
            num_warps=SCORE_WARPS, **pdl_launch(pdl))
    return cand


def hisa_decode(q: torch.Tensor, pages: torch.Tensor, pooled_cache: torch.Tensor,
                weights: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor, *,
                topk: int, block_size: int, block_topk: int, out: torch.Tensor | None = None,
                need_scores: bool = False, route_short_to_flat: bool = False,
                hisa_min_keys: int | None = None, fuse_block_select: bool | None = None,
                radix: int | None = None, programs: int | None = None,
                block_slots: bool | None = None, super_cache: torch.Tensor | None = None, super_size: int | None = None,
                super_topk: int | None = None, pdl: bool | None = None,
                tiers: tuple[int, ...] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HISA paged decode: (int32 [rows, topk] positions, -1 padded; fp32 scores or None).

    ``route_short_to_flat`` (``backend="auto"``) sends requests with at most ``hisa_min_keys``
    (default :data:`HISA_MIN_KEYS`) keys to the flat kernels; the choice is per request, on the
    device. Launches: 3 with the fused block selection (block scores, token scores, token
    select), 4 without, 2 more when the routing is live. ``fuse_block_select``, ``radix`` and
    ``programs`` override :data:`FUSE_BLOCK_SELECT`, :data:`SELECT_RADIX` and
    :func:`token_programs`, ``block_slots`` :data:`SELECT_BLOCK_SLOTS`, ``pdl`` :data:`USE_PDL` and :data:`PDL_MAX_ROWS`, ``tiers``
    :data:`BLOCK_SELECT_TIERS` (variants for tests and probes; PDL is
    off wherever the GPU lacks it). With ``super_cache`` /
    ``super_size`` / ``super_topk`` the block ids come through the super-block level
    (:mod:`.decode_super`, 4 launches in place of the block stage's 2)."""
    batch, next_n, H, D = q.shape
    check_decode_params(block_size, block_topk, block_table.shape[1],
                        block_rows=super_cache is None)
    if super_cache is not None:
        from .decode_super import check_decode_super_params
        check_decode_super_params(block_size, super_size, super_topk, block_table.shape[1])
    weights, seq_lens, block_table = decode_layout(weights, seq_lens, block_table)
    max_keys = block_table.shape[1] * PAGE_SIZE
    if not route_short_to_flat:
        thr = 0
    else:
        thr = HISA_MIN_KEYS if hisa_min_keys is None else hisa_min_keys
    thr = thr if thr > 0 else -1           # -1: HISA takes every request, empty ones included
    rows = batch * next_n
    if thr >= max_keys or max_keys == 0:   # no request can be long enough for HISA; no page
        return dsa_decode(q, pages, weights, seq_lens, block_table, topk=topk, out=out,
                          need_scores=need_scores)
    idx = out if out is not None else torch.empty(rows, topk, dtype=torch.int32,
                                                  device=q.device)
    vals = torch.empty(rows, topk, dtype=torch.float32, device=q.device) if need_scores else None
    if thr > 0:
        dsa_decode(q, pages, weights, seq_lens, block_table, topk=topk, out=idx,
                   out_scores=vals, flat_max_keys=thr)
    radix = SELECT_RADIX if radix is None else radix
    fuse = FUSE_BLOCK_SELECT if fuse_block_select is None else fuse_block_select
    q, _, _, prec = decode_operands(q, pages)
    if pdl is None:
        pdl = USE_PDL and batch * next_n <= PDL_MAX_ROWS
    pdl = pdl and pdl_supported(q.device)
    common = dict(block_size=block_size, hisa_min_keys=thr, prec=prec, pdl=pdl)
    if super_cache is not None:
        from .decode_super import super_block_select
        ids = super_block_select(q, pooled_cache, super_cache, weights, seq_lens, block_table,
                                 block_topk=block_topk, super_size=super_size,
                                 super_topk=super_topk, num_pages=pages.shape[0], radix=radix,
                                 tiers=tiers, **common)
        js = None
    elif fuse:
        ids = torch.empty(rows, block_topk, dtype=torch.int32, device=q.device)
        js = block_scores_paged(q, pooled_cache, weights, seq_lens, block_table,
                                num_pages=pages.shape[0], **common)
    else:
        ids = block_select(q, pooled_cache, weights, seq_lens, block_table,
                           block_topk=block_topk, num_pages=pages.shape[0], radix=radix,
                           tiers=tiers, **common)
        js = None
    cand = token_scores_paged(q, pages, weights, seq_lens, block_table, ids, block_scores=js,
                              programs=programs, radix=radix, **common)
    mb = block_topk * block_size
    if rows:
        _token_select_kernel[(rows,)](
            cand, ids, seq_lens, idx, vals if vals is not None else cand, block_table.shape[1],
            thr, NEXT_N=next_n, SEQ_2D=seq_lens.dim() == 2, B=block_size, M=block_topk,
            MB_PAD=next_pow2(mb), K=topk, K_PAD=next_pow2(topk),
            PAGE=PAGE_SIZE, WRITE_VALS=vals is not None, RADIX=radix,
            BLOCK_SLOTS=SELECT_BLOCK_SLOTS if block_slots is None else block_slots, PDL=pdl,
            num_warps=select_warps(next_pow2(mb)), **pdl_launch(pdl))
    return idx, vals


__all__ = ["BLOCK_SELECT_TIERS", "HISA_MIN_KEYS", "NO_LIMIT", "PDL_MAX_ROWS", "USE_PDL",
           "block_scores_paged", "block_select", "block_select_tiers", "hisa_decode",
           "token_programs", "token_scores_paged"]
