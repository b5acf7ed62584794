"""Stage 2: exact indexer scores of the tokens of each query's kept blocks (Triton), optionally
fused with the token top-k and the mapping to offsets.

    I[t, s] = k_scale[s] * sum_h w[t, h] * ReLU(q[t, h] . k[s]),   s in the m kept blocks

Tokens outside [ks, ke) and padding blocks (id -1) are marked outside (never selected). One
persistent program per query at a time loops over its kept blocks: ``dot(k_blk[B, D],
q_t^T[D, H])``, tokens on the MMA rows and heads on the columns, the ReLU-weighted head sum
inside a row. q_t^T and w_t are loaded once per query. The MMA loop stops after the last kept
block (ids are -1 padded at the end for queries with fewer than m eligible blocks: half the
queries of a 16K causal prefill), and the padding's scores are only marked outside. With
``SELECT`` the m*B scores go to a per-program scratch row that stays in L2, and the same
program selects the top k in registers and writes the final offsets (and scores); without it
the fp32 [T, m*B] scores are written (the twin's output:
:func:`~hisa.ops.indexer.naive.naive_token_scores`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...utils.sizes import next_pow2
from ..dsa.naive import OUTSIDE_BITS
from . import select as select_mod
from .select import SELECT_MAX_ROW, _select_token_row
from .topk import _outside_like, _relu, persistent_programs

#: Persistent programs per SM of the token stage (fused and unfused).
TOKEN_PROGRAMS_PER_SM = 8
#: Warps of the token stage (4: one warpgroup per MMA, the fastest in the Hopper probe).
TOKEN_WARPS = 4
#: How far the MMA loop runs: "live" (default) to the last non-padding block id of the query,
#: "all" over every one of the m ids (padding blocks as masked reads and a discarded MMA, the
#: loop before 2026-12; kept for benchmarks/token_trip_probe.py). Outputs are identical.
TOKEN_TRIP = "live"
#: Software-pipeline depth of the loop over a query's blocks: at >= 2 Triton issues the next
#: block's key gather as an asynchronous copy while the current block's MMA runs (at 1 each
#: gather is a plain load the MMA waits for). H200, 64K (benchmarks/stages_probe.py): 1 /
#: 2 / 3 = 19.7 / 16.4 / 16.5 ms for the fused stage; a plain ``range`` loop pipelined as 2.
TOKEN_STAGES = 2


@triton.jit
def _token_scores_kernel(q_ptr, k_ptr, k_scale_ptr, w_ptr, ks_ptr, ke_ptr, ids_ptr,
                         scores_ptr, out_idx_ptr, out_val_ptr, T, S,
                         H: tl.constexpr, D: tl.constexpr, B: tl.constexpr, M: tl.constexpr,
                         MB_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                         HAS_SCALE: tl.constexpr, SELECT: tl.constexpr,
                         WRITE_VALS: tl.constexpr, PREC: tl.constexpr,
                         STAGES: tl.constexpr, M_PAD: tl.constexpr, LIVE_TRIP: tl.constexpr,
                         RADIX: tl.constexpr, BLOCK_SLOTS: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    d = tl.arange(0, D)
    h = tl.arange(0, H)
    tok = tl.arange(0, B)
    for t in range(pid, T, nprog):
        t64 = tl.cast(t, tl.int64)
        s0 = tl.load(ks_ptr + t64)
        s1 = tl.load(ke_ptr + t64)
        q_t = tl.load(q_ptr + t64 * (H * D) + h[None, :] * D + d[:, None])          # [D, H]
        w_t = tl.load(w_ptr + t64 * H + h)                                          # [H]
        if SELECT:
            row = scores_ptr + pid.to(tl.int64) * (M * B)
            tl.debug_barrier()  # the previous query's scratch reads are done
        else:
            row = scores_ptr + t64 * (M * B)
        if LIVE_TRIP:
            tl.static_assert(M_PAD >= M)
            # One past the last kept block (any padding before it still runs, masked).
            jm = tl.arange(0, M_PAD)
            ids_row = tl.load(ids_ptr + t64 * M + jm, mask=jm < M, other=-1)
            n_live = tl.max(tl.where(ids_row >= 0, jm + 1, 0), axis=0)
            for j in range(n_live, M):
                tl.store(row + j * B + tok, _outside_like(tok.to(tl.float32)))
        else:
            n_live = M
        for j in tl.range(n_live, num_stages=STAGES):
            blk = tl.load(ids_ptr + t64 * M + j)
            pos = blk * B + tok                                                     # [B]
            valid = (blk >= 0) & (pos >= s0) & (pos < s1)
            # A masked read, not a clamped one: reading the rows outside the window from
            # a clamped position (no mask) took 31 fewer of 333 instructions per iteration and ran
            # 1.2-3.8x slower on an H200 (prefill_notes v8).
            kb = tl.load(k_ptr + pos[:, None].to(tl.int64) * D + d[None, :],
                         mask=valid[:, None], other=0.0)                            # [B, D]
            acc = tl.dot(kb, q_t, input_precision=PREC)                             # [B, H]
            sc = tl.sum(_relu(acc) * w_t[None, :], axis=1)                           # [B]
            if HAS_SCALE:
                sc = sc * tl.load(k_scale_ptr + pos, mask=valid, other=0.0)
            tl.store(row + j * B + tok, tl.where(valid, sc, _outside_like(sc)))
        if SELECT:
            tl.debug_barrier()
            _select_token_row(row, ids_ptr + t64 * M, s0, out_idx_ptr + t64 * K,
                              out_val_ptr + t64 * K, B, M * B, MB_PAD, K, K_PAD, WRITE_VALS,
                              RADIX, True, BLOCK_SLOTS)


def _launch(q, k, weights, ks, ke, block_ids, k_scale, scores, out_idx, out_val, *, block_size,
            topk, select, prec, grid, num_warps=TOKEN_WARPS):
    T, H, D = q.shape
    M = block_ids.shape[1]
    _token_scores_kernel[(grid,)](
        q, k, k_scale if k_scale is not None else weights, weights, ks, ke, block_ids, scores,
        out_idx, out_val if out_val is not None else scores, T, k.shape[0], H=H, D=D, B=block_size, M=M,
        MB_PAD=next_pow2(M * block_size), K=topk,
        K_PAD=next_pow2(topk), HAS_SCALE=k_scale is not None, SELECT=select,
        WRITE_VALS=out_val is not None and select, PREC=prec, STAGES=TOKEN_STAGES,
        M_PAD=next_pow2(M), LIVE_TRIP=TOKEN_TRIP == "live",
        RADIX=select_mod.SELECT_TOKENS_RADIX,
        BLOCK_SLOTS=select_mod.SELECT_TOKENS_BLOCK_SLOTS, num_warps=num_warps)


def token_scores(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, ks: torch.Tensor,
                 ke: torch.Tensor, block_ids: torch.Tensor, *, block_size: int,
                 k_scale: torch.Tensor | None = None, prec: str = "tf32",
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [T, m*B] candidate scores, marked outside the window and for padding blocks
    (twin: ``naive_token_scores``, whose positions are ``candidate_positions(block_ids)``).

    ``out``: optional fp32 buffer of at least T * m*B elements (its head is used)."""
    T = q.shape[0]
    M = block_ids.shape[1]
    if out is None:
        scores = torch.empty(T, M * block_size, dtype=torch.float32, device=q.device)
    else:
        scores = out.view(-1)[:T * M * block_size].view(T, M * block_size)
    if T and k.shape[0] == 0:   # no keys: every candidate is outside (nothing to read)
        scores.view(torch.int32).fill_(OUTSIDE_BITS)
    elif T:
        _launch(q, k, weights, ks, ke, block_ids, k_scale, scores, scores, None,
                block_size=block_size, topk=1, select=False, prec=prec,
                grid=persistent_programs(T, q.device, TOKEN_PROGRAMS_PER_SM))
    return scores


def token_select(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, ks: torch.Tensor,
                 ke: torch.Tensor, block_ids: torch.Tensor, *, block_size: int, topk: int,
                 k_scale: torch.Tensor | None = None, prec: str = "tf32",
                 out: torch.Tensor | None = None, need_scores: bool = False,
                 num_warps: int = TOKEN_WARPS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused stage 2 + token top-k + offsets: (int32 [T, topk] offsets relative to ks, -1
    padded; fp32 [T, topk] scores or None)."""
    T = q.shape[0]
    M = block_ids.shape[1]
    if next_pow2(M * block_size) > SELECT_MAX_ROW:
        raise ValueError(f"block_topk * block_size: expected at most {SELECT_MAX_ROW} candidates "
                         f"per query for the Triton token stage, got {M * block_size}")
    idx = out if out is not None else torch.empty(T, topk, dtype=torch.int32, device=q.device)
    vals = torch.empty(T, topk, dtype=torch.float32, device=q.device) if need_scores else None
    if T and k.shape[0] == 0:   # no keys: nothing selected (nothing to read)
        idx.fill_(-1)
        if vals is not None:
            vals.fill_(float("-inf"))
    elif T:
        grid = persistent_programs(T, q.device, TOKEN_PROGRAMS_PER_SM)
        scratch = torch.empty(grid, M * block_size, dtype=torch.float32, device=q.device)
        _launch(q, k, weights, ks, ke, block_ids, k_scale, scratch, idx, vals,
                block_size=block_size, topk=topk, select=True, prec=prec, grid=grid,
                num_warps=num_warps)
    return idx, vals
