"""The super-block level of HISA prefill (Triton): pool super-blocks, keep the best ones, then
score and select blocks only inside them.

========================  ===============================================  ======================
stage                     kernel                                           twin (``naive_super``)
========================  ===============================================  ======================
pool_supers               ``_pool_supers_kernel``: one program per          ``naive_pool_supers``
                          super-block, token-weighted mean of its block
                          reps, re-quantized like a block rep
super_select              ``block_scores.block_select`` at block size       ``naive_super_scores``
                          Bs * B on the super reps: the same formula,       + ``naive_select_supers``
                          forced first/last and top-ms selection
candidate_block_scores    ``_candidate_blocks_kernel``: the blocks of the   ``naive_candidate_block_
/ candidate_block_select  kept super-blocks, ``dot(kbar[BN, D], q^T)``,     scores`` (+ ``naive_select_
                          optionally the top m in registers                 candidate_blocks``)
========================  ===============================================  ======================

Candidate c of a query is block ``super_ids[c // Bs] * Bs + c % Bs``: kept super-blocks are
ascending, so candidates are ascending block ids and the register selection (ties to the lower
index) breaks ties as two levels do. Selection follows the rule of :mod:`hisa.ops.dsa.naive`
through ``topk._ordered_key``: candidates outside the eligible range (or padding) are marked
outside (``OUTSIDE_BITS``, never selected), the first and last candidates not marked outside
(the query's first and last eligible block) are forced by position, ReLU keeps NaN. Offsets
are int64 throughout (block ids times D, query rows times H * D, per-program scratch rows), so
1M-token buffers and beyond stay in range.

Temporaries: the super reps [NS, D], int32 [T, ms] super ids, one fp32 scratch row of the
longest window's super-blocks per persistent program (the super selection), and one of
ms * Bs candidates (the block selection).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...cache.append import _clamp_e4m3, _nan_amax
from ...utils.quant import AMAX_FLOOR, FP8_MAX
from ...utils.sizes import next_pow2
from ...utils.validate import FP8_DTYPE
from .block_scores import BLOCK_BN, _pooled_row_scores, block_select, window_blocks
from .reps import check_reps_hold_queries
from .select import SELECT_MAX_ROW, select_warps
from .topk import _force_ends, _masked_key, _outside_like, _select_row, persistent_programs

#: Software-pipeline depth of the candidate kernel's loop over its block tiles (as
#: block_scores.BLOCK_STAGES).
CANDIDATE_STAGES = 2

#: Block reps summed per iteration of the super-block pooling loop.
POOL_SUPER_CHUNK = 16


def check_super_kernel_params(ks: torch.Tensor, ke: torch.Tensor, *, block_size: int,
                              super_size: int, super_topk: int,
                              windows: tuple[int, int] | None = None) -> tuple[int, int]:
    """Every limit of the Triton super-block level beyond the public contract; reads the
    windows (one host synchronisation, as :func:`.block_scores.window_blocks`) unless
    ``windows`` gives the result of that read (the public op reads it with its window check).

    The three-level path has no per-window block limit (the block stage scores only the
    ms * Bs candidates); its limits are the candidate row and each window's super-blocks.

    Returns:
        (smallest first eligible super-block, largest eligible super-block count) over the
        queries: super-blocks before the first are never pooled nor scored, and the count
        sizes the super selection's register row.
    """
    if not candidate_row_fits(super_size, super_topk):
        raise ValueError(f"super_topk * super_size: expected at most {SELECT_MAX_ROW} candidate "
                         f"blocks for the Triton block selection, got {super_size * super_topk}")
    span = block_size * super_size
    first_super, max_supers = window_blocks(ks, ke, span) if windows is None else windows
    if not super_row_fits(max_supers):
        raise ValueError(f"ks/ke: expected windows of at most {SELECT_MAX_ROW} super-blocks "
                         f"({SELECT_MAX_ROW * span} keys at block_size={block_size}, "
                         f"super_size={super_size}) for the Triton super-block selection, got "
                         f"a window of {max_supers} super-blocks")
    return first_super, max_supers


def candidate_row_fits(super_size: int, super_topk: int) -> bool:
    """Whether the kept super-blocks' candidate blocks fit one register selection row."""
    return next_pow2(super_size * super_topk) <= SELECT_MAX_ROW


def super_row_fits(max_supers: int) -> bool:
    """Whether a window's super-blocks fit one register selection row."""
    return max(16, next_pow2(max(max_supers, 1))) <= SELECT_MAX_ROW


@triton.jit
def _pool_supers_kernel(p_ptr, p_scale_ptr, out_ptr, out_scale_ptr, NB, S, first_super,
                        B: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
                        HAS_SCALE: tl.constexpr, QUANT: tl.constexpr,
                        AMAX_MIN: tl.constexpr, QMAX: tl.constexpr):
    g = (first_super + tl.program_id(0)).to(tl.int64)
    d = tl.arange(0, D)
    acc = tl.zeros([D], dtype=tl.float32)
    total = tl.zeros([], dtype=tl.float32)
    for c in tl.static_range(0, BS, CHUNK):
        i = c + tl.arange(0, CHUNK)
        b = g * BS + i                                                            # int64
        m = (i < BS) & (b < NB)
        cnt = tl.where(m, tl.minimum(tl.maximum(S - b * B, 0), B), 0).to(tl.float32)
        x = tl.load(p_ptr + b[:, None] * D + d[None, :], mask=m[:, None], other=0.0)
        x = x.to(tl.float32)                                                      # [CHUNK, D]
        if HAS_SCALE:
            x = x * tl.load(p_scale_ptr + b, mask=m, other=0.0)[:, None]
        acc += tl.sum(x * cnt[:, None], axis=0)
        total += tl.sum(cnt, axis=0)
    mean = acc / tl.maximum(total, 1.0)                                           # [D]
    if QUANT:
        # NaN-propagating, as pool.py: a NaN block rep gives the super rep a NaN scale
        scale = tl.maximum(_nan_amax(mean, 0), AMAX_MIN,
                           propagate_nan=tl.PropagateNan.ALL) / QMAX
        v = _clamp_e4m3(mean / scale)
        tl.store(out_ptr + g * D + d, v.to(out_ptr.dtype.element_ty))
        tl.store(out_scale_ptr + g, scale)
    else:
        tl.store(out_ptr + g * D + d, mean.to(out_ptr.dtype.element_ty))


def pool_supers(pooled: torch.Tensor, pooled_scale: torch.Tensor | None, num_keys: int, *,
                block_size: int, super_size: int, out_dtype: torch.dtype | None = None,
                first_super: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Super-block representatives from the block representatives.

    Args:
        pooled: [NB, D] block reps (from :func:`hisa.ops.indexer.pool.pool_blocks`), contiguous;
            pooled_scale: fp32 [NB] for FP8 reps, else None.
        num_keys: S, the keys the blocks were pooled from.
        out_dtype: dtype of the result, that of ``pooled`` by default; float8_e4m3fn
            re-quantizes each super-block with its own scale.
        first_super: pool only super-blocks [first_super, NS), reading only block rows from
            ``first_super * super_size`` on; the rows before are left unset (the prefill
            pipeline passes min(ks) // (Bs B), and pools blocks from ``first_super * Bs``).

    Returns:
        (super reps [NS, D], fp32 [NS] scales for FP8 output else None), NS = ceil(NB / Bs).
    """
    nb, D = pooled.shape
    ns = triton.cdiv(nb, super_size)
    out_dtype = pooled.dtype if out_dtype is None else out_dtype
    quant = out_dtype == FP8_DTYPE
    sup = torch.empty(ns, D, dtype=out_dtype, device=pooled.device)
    sscale = torch.empty(ns, dtype=torch.float32, device=pooled.device) if quant else None
    if ns > first_super:
        _pool_supers_kernel[(ns - first_super,)](
            pooled, pooled_scale if pooled_scale is not None else sup, sup,
            sscale if quant else sup, nb, num_keys, first_super, B=block_size, BS=super_size,
            D=D,
            CHUNK=min(POOL_SUPER_CHUNK, next_pow2(super_size)),
            HAS_SCALE=pooled_scale is not None, QUANT=quant, AMAX_MIN=AMAX_FLOOR, QMAX=FP8_MAX,
            num_warps=4)
    return sup, sscale


def super_select(q: torch.Tensor, super_pooled: torch.Tensor, weights: torch.Tensor,
                 ks: torch.Tensor, ke: torch.Tensor, *, block_size: int, super_size: int,
                 super_topk: int, super_scale: torch.Tensor | None = None, prec: str = "tf32",
                 out: torch.Tensor | None = None, max_supers: int | None = None
                 ) -> torch.Tensor:
    """int32 [T, ms] ascending kept super-block ids, -1 padded: the fused block stage run on
    super-blocks (block size Bs * B), the first and last eligible forced, the others marked
    outside. q and super_pooled share a dtype (prepared operands). ``max_supers``: the largest
    eligible super-block count of any query (:func:`check_super_kernel_params`; NS by
    default), which sizes the register row and the scratch."""
    return block_select(q, super_pooled, weights, ks, ke, block_size=block_size * super_size,
                        block_topk=super_topk, pooled_scale=super_scale, prec=prec, out=out,
                        max_blocks=max_supers)


@triton.jit
def _candidate_blocks_kernel(q_ptr, p_ptr, p_scale_ptr, w_ptr, ks_ptr, ke_ptr, sup_ptr,
                             scores_ptr, stride_s, ids_ptr, T,
                             H: tl.constexpr, D: tl.constexpr, B: tl.constexpr,
                             BS: tl.constexpr, MS: tl.constexpr, C_PAD: tl.constexpr,
                             BN: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr,
                             HAS_SCALE: tl.constexpr, SELECT: tl.constexpr,
                             PREC: tl.constexpr, STAGES: tl.constexpr):
    C: tl.constexpr = MS * BS
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    d = tl.arange(0, D)
    h = tl.arange(0, H)
    cb = tl.arange(0, BN)
    for t in range(pid, T, nprog):
        t64 = tl.cast(t, tl.int64)
        s0 = tl.load(ks_ptr + t64).to(tl.int64)
        s1 = tl.load(ke_ptr + t64).to(tl.int64)
        first = s0 // B
        end = tl.where(s1 > s0, (s1 + B - 1) // B, first)
        q_t = tl.load(q_ptr + t64 * (H * D) + h[None, :] * D + d[:, None]).to(
            p_ptr.dtype.element_ty)                          # [D, H] in the reps' dtype
        w_t = tl.load(w_ptr + t64 * H + h)                                          # [H]
        if SELECT:
            row = scores_ptr + pid.to(tl.int64) * stride_s
            tl.debug_barrier()  # the previous query's scratch reads are done
        else:
            row = scores_ptr + t64 * stride_s
        for c0 in tl.range(0, C, BN, num_stages=STAGES):
            c = c0 + cb
            cm = c < C
            g = tl.load(sup_ptr + t64 * MS + c // BS, mask=cm, other=-1).to(tl.int64)
            blk = g * BS + c % BS
            valid = cm & (g >= 0) & (blk >= first) & (blk < end)
            sc = _pooled_row_scores(p_ptr, p_scale_ptr, blk, valid, q_t, w_t, d, D, HAS_SCALE,
                                    PREC)
            sc = tl.where(valid, sc, _outside_like(sc))
            sc = tl.where(valid & ((blk == first) | (blk == end - 1)), float("inf"), sc)
            tl.store(row + c, sc, mask=cm)
        if SELECT:
            tl.debug_barrier()
            i = tl.arange(0, C_PAD)
            v = tl.load(row + i, mask=i < C, other=0.0, cache_modifier=".cg")
            # forced by position: the first and last candidates inside the eligible range
            keys = _force_ends(_masked_key(v, i < C), i, C_PAD)
            sel, pos, n_sel = _select_row(keys, M, 1)
            g = tl.load(sup_ptr + t64 * MS + i // BS, mask=sel, other=0)
            tl.store(ids_ptr + t64 * M + pos, (g * BS + i % BS).to(tl.int32), mask=sel)
            j = tl.arange(0, M_PAD)
            tl.store(ids_ptr + t64 * M + j, -1, mask=(j >= n_sel) & (j < M))


def _launch(q, pooled, weights, ks, ke, super_ids, pooled_scale, scores, ids, *, block_size,
            super_size, block_topk, select, prec, grid):
    check_reps_hold_queries(pooled, q)
    T, H, D = q.shape
    ms = super_ids.shape[1]
    c_pad = max(16, next_pow2(ms * super_size))
    _candidate_blocks_kernel[(grid,)](
        q, pooled, pooled_scale if pooled_scale is not None else weights, weights, ks, ke,
        super_ids, scores, scores.stride(0), ids, T, H=H, D=D, B=block_size, BS=super_size,
        MS=ms, C_PAD=c_pad, BN=BLOCK_BN, M=block_topk,
        M_PAD=next_pow2(block_topk), HAS_SCALE=pooled_scale is not None,
        SELECT=select, PREC=prec, STAGES=CANDIDATE_STAGES,
        num_warps=select_warps(c_pad) if select else 4)


def candidate_block_scores(q: torch.Tensor, pooled: torch.Tensor, weights: torch.Tensor,
                           ks: torch.Tensor, ke: torch.Tensor, super_ids: torch.Tensor, *,
                           block_size: int, super_size: int,
                           pooled_scale: torch.Tensor | None = None, prec: str = "tf32"
                           ) -> torch.Tensor:
    """fp32 [T, ms * Bs] stage-1 scores of the kept super-blocks' blocks, in candidate order:
    +inf on the first and last eligible block, marked outside (``OUTSIDE_BITS``) for blocks
    outside the window or past the buffer and for padding super-blocks (twin:
    ``naive_candidate_block_scores``)."""
    T = q.shape[0]
    scores = torch.empty(T, super_ids.shape[1] * super_size, dtype=torch.float32,
                         device=q.device)
    if T:
        _launch(q, pooled, weights, ks, ke, super_ids, pooled_scale, scores, scores,
                block_size=block_size, super_size=super_size, block_topk=2, select=False,
                prec=prec, grid=persistent_programs(T, q.device, 16))
    return scores


def candidate_block_select(q: torch.Tensor, pooled: torch.Tensor, weights: torch.Tensor,
                           ks: torch.Tensor, ke: torch.Tensor, super_ids: torch.Tensor, *,
                           block_size: int, super_size: int, block_topk: int,
                           pooled_scale: torch.Tensor | None = None, prec: str = "tf32",
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused candidate scores + top-m: int32 [T, m] ascending block ids, -1 padded, the first
    and last eligible block forced (twin: ``naive_select_candidate_blocks`` of
    ``naive_candidate_block_scores``)."""
    T = q.shape[0]
    ids = out if out is not None else torch.empty(T, block_topk, dtype=torch.int32,
                                                  device=q.device)
    if T:
        grid = persistent_programs(T, q.device, 4)
        scratch = torch.empty(grid, super_ids.shape[1] * super_size, dtype=torch.float32,
                              device=q.device)
        _launch(q, pooled, weights, ks, ke, super_ids, pooled_scale, scratch, ids,
                block_size=block_size, super_size=super_size, block_topk=block_topk,
                select=True, prec=prec, grid=grid)
    return ids


def three_level_block_ids(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor,
                          ks: torch.Tensor, ke: torch.Tensor, pooled: torch.Tensor,
                          pooled_scale: torch.Tensor | None, *, block_size: int,
                          block_topk: int, super_size: int, super_topk: int, prec: str,
                          first_super: int, max_supers: int,
                          super_dtype: torch.dtype | None = None,
                          candidate_prec: str | None = None) -> torch.Tensor:
    """The block ids the token stage reads, through the super-block level (prepared operands;
    ``first_super`` / ``max_supers`` from :func:`check_super_kernel_params`, and ``pooled``
    set from block ``first_super * super_size`` on). ``super_dtype``: how the super-block reps
    are stored, ``pooled``'s dtype by default (float8_e4m3fn with ``super_size=1`` is the
    two-level FP8 pre-selection then fp32 re-score of :func:`~.pipeline.hisa_index_triton`).
    ``prec``: the super-block dots'; ``candidate_prec``: the candidate blocks' (``prec`` when
    None).

    Returns int32 [T, m] ascending, -1 padded."""
    sup, sscale = pool_supers(pooled, pooled_scale, k.shape[0], block_size=block_size,
                              super_size=super_size, first_super=first_super,
                              out_dtype=super_dtype)
    sids = super_select(q, sup, weights, ks, ke, block_size=block_size, super_size=super_size,
                        super_topk=super_topk, super_scale=sscale, prec=prec,
                        max_supers=max_supers)
    return candidate_block_select(q, pooled, weights, ks, ke, sids, block_size=block_size,
                                  super_size=super_size, block_topk=block_topk,
                                  pooled_scale=pooled_scale,
                                  prec=prec if candidate_prec is None else candidate_prec)
