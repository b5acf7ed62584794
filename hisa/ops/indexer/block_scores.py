"""Stage 1: block scores J[t, b] over each query's eligible blocks (Triton), optionally fused
with the top-m block selection.

    J[t, b] = pooled_scale[b] * sum_h w[t, h] * ReLU(q[t, h] . kbar[b]),  b in [ks//B, ceil(ke/B))

The first and last eligible block score +inf (and the selection forces them), blocks outside the
eligible range are marked outside (never selected; ``hisa.ops.dsa.naive.OUTSIDE_BITS``).
One persistent program per query at a time; ``dot(kbar[BN, D], q_t^T[D, H])`` puts blocks on
the MMA rows and heads on the columns. With ``SELECT`` the scores of the eligible range go to a
per-program scratch row (L2-resident) and the program selects the top m in registers, writing
int32 [T, m] ascending ids; without it the full fp32 [T, NB] row is written (the twin's output:
:func:`~hisa.ops.indexer.naive.naive_block_scores`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...utils.sizes import next_pow2
from .reps import check_reps_hold_queries
from .select import SELECT_MAX_ROW, _select_block_row, select_warps
from .topk import _outside_like, _relu, persistent_programs

#: Blocks scored per MMA (rows of the dot).
BLOCK_BN = 64
#: Software-pipeline depth of the loop over a query's block tiles (the token stage's
#: TOKEN_STAGES, for the pooled rows); also the three-level candidate kernel's.
BLOCK_STAGES = 2


@triton.jit
def _pooled_row_scores(p_ptr, p_scale_ptr, blk, valid, q_t, w_t, d, D: tl.constexpr,
                       HAS_SCALE: tl.constexpr, PREC: tl.constexpr):
    """Stage-1 scores [BN] of the pooled rows ``blk`` (int64) where ``valid`` (0 elsewhere):
    the gated head sum of ReLU(row . q), times the row's scale for FP8 rows. Shared by the
    block stage and the three-level candidate stage, so the scoring rule lives once."""
    kb = tl.load(p_ptr + blk[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
    acc = tl.dot(kb, q_t, input_precision=PREC)                                     # [BN, H]
    sc = tl.sum(_relu(acc) * w_t[None, :], axis=1)
    if HAS_SCALE:
        sc = sc * tl.load(p_scale_ptr + blk, mask=valid, other=0.0)
    return sc


@triton.jit
def _block_scores_kernel(q_ptr, p_ptr, p_scale_ptr, w_ptr, ks_ptr, ke_ptr, scores_ptr, stride_s,
                         ids_ptr, T, NB,
                         H: tl.constexpr, D: tl.constexpr, B: tl.constexpr, BN: tl.constexpr,
                         M: tl.constexpr, M_PAD: tl.constexpr, N_PAD: tl.constexpr,
                         HAS_SCALE: tl.constexpr, SELECT: tl.constexpr, PREC: tl.constexpr,
                         STAGES: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    d = tl.arange(0, D)
    h = tl.arange(0, H)
    cb = tl.arange(0, BN)
    for t in range(pid, T, nprog):
        t64 = tl.cast(t, tl.int64)
        s0 = tl.load(ks_ptr + t64)
        s1 = tl.load(ke_ptr + t64)
        first = s0 // B
        end = tl.where(s1 > s0, (s1 + B - 1) // B, first)
        # With SELECT, at most m eligible blocks are all kept, ascending (what the selection
        # returns for them), so the row is neither scored nor searched: two thirds of the
        # queries of a 12K causal prefill. The loop still runs for every row (empty for
        # these): a loop inside a branch was not software-pipelined (prefill_notes v7).
        keep_all = (end - first <= M) & SELECT
        stop = tl.where(keep_all, first, end)
        # [D, H] in the reps' dtype: FP8 queries against bf16 reps upcast exactly (a no-op
        # when the dtypes already agree).
        q_t = tl.load(q_ptr + t64 * (H * D) + h[None, :] * D + d[:, None]).to(
            p_ptr.dtype.element_ty)
        w_t = tl.load(w_ptr + t64 * H + h)                                          # [H]
        if SELECT:
            row = scores_ptr + pid.to(tl.int64) * stride_s - first   # block b at column b-first
            tl.debug_barrier()  # the previous query's scratch reads are done
        else:
            row = scores_ptr + t64 * stride_s
            for c0 in range(0, NB, BN):
                c = c0 + cb
                tl.store(row + c, _outside_like(c.to(tl.float32)),
                         mask=(c < NB) & ((c < first) | (c >= end)))
        for c0 in tl.range(first, stop, BN, num_stages=STAGES):
            c = c0 + cb
            m = c < end
            sc = _pooled_row_scores(p_ptr, p_scale_ptr, c.to(tl.int64), m, q_t, w_t, d, D,
                                    HAS_SCALE, PREC)
            sc = tl.where((c == first) | (c == end - 1), float("inf"), sc)
            tl.store(row + c, sc, mask=m)
        if SELECT:
            tl.debug_barrier()
            if keep_all:
                j = tl.arange(0, M_PAD)
                tl.store(ids_ptr + t64 * M + j,
                         tl.where(j < end - first, first + j, -1).to(tl.int32), mask=j < M)
            else:
                _select_block_row(row + first, end - first, first, ids_ptr + t64 * M, M,
                                  M_PAD, N_PAD)


def _launch(q, pooled, weights, ks, ke, pooled_scale, scores, ids, *, block_size, block_topk,
            select, prec, grid, row_blocks):
    check_reps_hold_queries(pooled, q)
    T, H, D = q.shape
    NB = pooled.shape[0]
    n_pad = max(16, next_pow2(max(row_blocks, 1)))
    _block_scores_kernel[(grid,)](
        q, pooled, pooled_scale if pooled_scale is not None else weights, weights, ks, ke,
        scores, scores.stride(0), ids, T, NB, H=H, D=D, B=block_size, BN=BLOCK_BN,
        M=block_topk, M_PAD=next_pow2(block_topk), N_PAD=n_pad,
        HAS_SCALE=pooled_scale is not None, SELECT=select, PREC=prec, STAGES=BLOCK_STAGES,
        num_warps=select_warps(n_pad) if select else 4)


def block_scores(q: torch.Tensor, pooled: torch.Tensor, weights: torch.Tensor, ks: torch.Tensor,
                 ke: torch.Tensor, *, block_size: int, pooled_scale: torch.Tensor | None = None,
                 prec: str = "tf32") -> torch.Tensor:
    """fp32 [T, NB] block scores, +inf on the forced blocks, marked outside the eligible range
    (twin: ``naive_block_scores``). q and pooled share a dtype (prepared operands), or q is
    FP8 or bf16 and pooled of a wider dtype (:func:`~.reps.rep_dtype`)."""
    T = q.shape[0]
    NB = pooled.shape[0]
    scores = torch.empty(T, NB, dtype=torch.float32, device=q.device)
    if T and NB:
        _launch(q, pooled, weights, ks, ke, pooled_scale, scores, scores, block_size=block_size,
                block_topk=2, select=False, prec=prec,
                grid=persistent_programs(T, q.device, 16), row_blocks=NB)
    return scores


def window_blocks(ks: torch.Tensor, ke: torch.Tensor, block_size: int) -> tuple[int, int]:
    """(smallest first eligible block, largest eligible block count) over the queries, read
    with one host synchronisation. Blocks before the first are never scored (nor pooled); the
    count bounds the register row of the block selection."""
    if ks.numel() == 0:
        return 0, 0
    first = ks.long() // block_size
    end = torch.where(ke > ks, (ke.long() + block_size - 1) // block_size, first)
    lo, most = torch.stack([first.min(), (end - first).max()]).tolist()
    return int(lo), int(most)


def check_window_blocks(max_blocks: int, block_size: int) -> None:
    """ValueError when a query's window spans more blocks than the register selection holds."""
    if max(16, next_pow2(max(max_blocks, 1))) > SELECT_MAX_ROW:
        raise ValueError(f"ks/ke: expected windows of at most {SELECT_MAX_ROW} blocks "
                         f"({SELECT_MAX_ROW * block_size} keys at block_size={block_size}) for "
                         f"the Triton block selection, got a window of {max_blocks} blocks")


def block_select(q: torch.Tensor, pooled: torch.Tensor, weights: torch.Tensor, ks: torch.Tensor,
                 ke: torch.Tensor, *, block_size: int, block_topk: int,
                 pooled_scale: torch.Tensor | None = None, prec: str = "tf32",
                 out: torch.Tensor | None = None, max_blocks: int | None = None
                 ) -> torch.Tensor:
    """Fused stage 1 + top-m: int32 [T, m] ascending kept block ids, -1 padded.

    ``max_blocks``: the largest eligible block count of any query (:func:`window_blocks`; by
    default every block, NB). It sizes the register row and the per-program scratch, so a
    packed batch of many sequences is bounded by its longest window, not by its total length.
    """
    T = q.shape[0]
    NB = pooled.shape[0]
    max_blocks = NB if max_blocks is None else max_blocks
    check_window_blocks(max_blocks, block_size)
    ids = out if out is not None else torch.empty(T, block_topk, dtype=torch.int32,
                                                  device=q.device)
    if T:
        grid = persistent_programs(T, q.device, 4)
        scratch = torch.empty(grid, max(max_blocks, 1), dtype=torch.float32, device=q.device)
        _launch(q, pooled, weights, ks, ke, pooled_scale, scratch, ids, block_size=block_size,
                block_topk=block_topk, select=True, prec=prec, grid=grid, row_blocks=max_blocks)
    return ids
