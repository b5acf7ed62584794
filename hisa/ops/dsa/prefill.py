"""Flat DSA indexer for packed prefill in Triton: tiled logits, then a histogram/radix top-k.

    I[t, s] = k_scale[s] * sum_h w[t, h] * ReLU(q[t, h, :] . k[s, :])

``_dsa_logits_kernel``: one program per (key block of BS tokens, query tile of BQ queries). It
loads its key block once and loops over the queries: ``dot(k_blk[BS, D], q_t^T[D, H])`` puts the
tokens on the MMA rows and the heads on the columns, so the ReLU-weighted head sum stays inside
a row (the orientation measured about 2x faster than heads-as-rows on Hopper). Query tiles whose
windows miss the key block exit at once (causal prefill skips the upper triangle).

Memory: logits are materialised only for a tile of query rows, [R, W] fp32 with
R * W * 4 <= :data:`FLAT_LOGITS_BYTES` (W = the tile's key extent), then reduced by
:func:`hisa.ops.indexer.topk.topk_rows`; no [T, S] matrix exists for long S.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ...utils.validate import FP8_DTYPE
from ..indexer.topk import TOPK_SCRATCH, _relu, persistent_programs, topk_rows

#: Cap on the fp32 logits tile of the flat path (bytes): 1 GiB = 4,096 rows of a 64K context.
FLAT_LOGITS_BYTES = 1 << 30
#: Query rows per logits program (each program loops over them with one key block resident).
FLAT_BQ = 64
#: Key tokens per logits program (the MMA's M dimension).
FLAT_BS = 128
#: Queries per MMA of the logits kernel (N = FLAT_QPD * H). 1 is the layout measured at
#: 565 TFLOP/s (64K, H200, commit 21362b1f9e05); wider N is probed by
#: benchmarks/flat_probe.py before it becomes the default.
FLAT_QPD = 1
#: Software-pipeline depth of the logits kernel's loop over queries (>= 2: the next queries'
#: q tiles arrive by asynchronous copies during the current MMA; 1: plain loads, what the
#: loop inside ``if live`` compiled to before). H200 flat prefill 1 / 2 / 3: 32K 17.7 / 16.3
#: / 16.2 ms, 64K 66.1 / 60.6 / 60.7 ms (benchmarks/stages_probe.py).
FLAT_STAGES = 2
#: Warps per top-k program. H200, 4,096 rows of 32K-64K keys (benchmarks/select_probe.py):
#: 4 warps 1.82 ms, 8 warps 2.15, 16 warps 2.43 (reduction-latency bound).
FLAT_TOPK_WARPS = 4

SUPPORTED_HEAD_DIMS = (64, 128)


def check_kernel_shapes(q: torch.Tensor, k: torch.Tensor) -> None:
    """What the Triton kernels support beyond the public contract: ValueError naming the arg."""
    H, D = q.shape[1], q.shape[2]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: expected head_dim in {SUPPORTED_HEAD_DIMS} for the Triton kernels, "
                         f"got {D}")
    if H < 16 or H > 128 or H & (H - 1):
        raise ValueError(f"q: expected a power-of-two head count in [16, 128] for the Triton "
                         f"kernels, got {H}")
    if k.shape[1] != D:
        raise ValueError(f"k: expected head_dim {D} (that of q), got {k.shape[1]}")


def prepare_operands(q: torch.Tensor, k: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Contiguous q/k of one dtype the MMA accepts, and the dot precision to use.

    fp8 x fp8 and bf16 x bf16 (fp16 likewise) run as they are; mixed inputs are upcast (fp8 to
    bf16 is exact). fp32 runs with IEEE fp32 dots so it matches the fp32 reference.
    """
    if q.dtype != k.dtype:
        low = {FP8_DTYPE, torch.bfloat16}
        target = torch.bfloat16 if {q.dtype, k.dtype} <= low else torch.float32
        q, k = q.to(target), k.to(target)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    return q.contiguous(), k.contiguous(), prec


@triton.jit
def _dsa_logits_kernel(q_ptr, k_ptr, k_scale_ptr, w_ptr, ks_ptr, ke_ptr, out_ptr,
                       t0, n_rows, lo, W, S,
                       H: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BS: tl.constexpr,
                       QPD: tl.constexpr, HAS_SCALE: tl.constexpr, PREC: tl.constexpr,
                       STAGES: tl.constexpr):
    # out: fp32 [n_rows, W]; entry (r, c) = I[t0 + r, lo + c], written inside the window only.
    # QPD queries share one dot: q^T [D, QPD * H] (their rows are contiguous in q), so the
    # MMA's N is QPD * H; the head sum then runs per query on the [BS, QPD, H] view.
    pid_s = tl.program_id(0)
    pid_q = tl.program_id(1)
    s_start = lo + pid_s * BS
    qi = tl.arange(0, BQ)
    rows = pid_q * BQ + qi
    rmask = rows < n_rows
    ks_v = tl.load(ks_ptr + t0 + rows, mask=rmask, other=2147483647)
    ke_v = tl.load(ke_ptr + t0 + rows, mask=rmask, other=0)
    live = (s_start < tl.max(ke_v, axis=0)) & (s_start + BS > tl.min(ks_v, axis=0))
    if live:
        offs_s = s_start + tl.arange(0, BS)
        smask = (offs_s < S) & (offs_s < lo + W)
        d = tl.arange(0, D)
        qq = tl.arange(0, QPD)
        c = tl.arange(0, QPD * H)                    # column c: query c // H, head c % H
        # int64: offs_s * D passes 2**31 from 16,777,216 keys at D = 128.
        k_blk = tl.load(k_ptr + offs_s[:, None].to(tl.int64) * D + d[None, :],
                        mask=smask[:, None], other=0.0)                          # [BS, D]
        if HAS_SCALE:
            scale = tl.load(k_scale_ptr + offs_s, mask=smask, other=0.0)
        for i in tl.range(0, BQ, QPD, num_stages=STAGES):
            r = pid_q * BQ + i + qq                                              # [QPD]
            r_ok = r < n_rows
            t = (t0 + r).to(tl.int64)
            s0 = tl.load(ks_ptr + t, mask=r_ok, other=0)
            s1 = tl.load(ke_ptr + t, mask=r_ok, other=0)
            base = (t0 + pid_q * BQ + i).to(tl.int64)
            c_ok = (pid_q * BQ + i + c // H) < n_rows                            # [QPD * H]
            q_t = tl.load(q_ptr + base * (H * D) + c[None, :].to(tl.int64) * D + d[:, None],
                          mask=c_ok[None, :], other=0.0)                         # [D, QPD*H]
            w_t = tl.load(w_ptr + base * H + c, mask=c_ok, other=0.0)            # [QPD*H]
            acc = tl.dot(k_blk, q_t, input_precision=PREC)                       # [BS, QPD*H]
            if QPD == 1:
                logit = tl.sum(_relu(acc) * w_t[None, :], axis=1)[:, None]       # [BS, 1]
            else:
                logit = tl.sum(tl.reshape(_relu(acc) * w_t[None, :], [BS, QPD, H]),
                               axis=2)                                           # [BS, QPD]
            if HAS_SCALE:
                logit = logit * scale[:, None]
            wmask = (smask[:, None] & (offs_s[:, None] >= s0[None, :])
                     & (offs_s[:, None] < s1[None, :]) & r_ok[None, :])
            tl.store(out_ptr + r[None, :].to(tl.int64) * W + (offs_s - lo)[:, None], logit,
                     mask=wmask)


def dsa_logits(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, ks: torch.Tensor,
               ke: torch.Tensor, *, k_scale: torch.Tensor | None, t0: int, n_rows: int,
               lo: int, out: torch.Tensor, prec: str = "tf32",
               queries_per_dot: int | None = None) -> torch.Tensor:
    """Logits of queries [t0, t0 + n_rows) against key positions [lo, lo + W) into ``out``.

    Args:
        q, k: prepared operands (:func:`prepare_operands`); weights fp32 [T, H].
        out: fp32 [>= n_rows, W] (row stride W); only in-window entries are written.
        queries_per_dot: queries sharing one MMA (its N = queries_per_dot * H); default
            :data:`FLAT_QPD`. A power of two dividing :data:`FLAT_BQ`.
    """
    T, H, D = q.shape
    S = k.shape[0]
    W = out.shape[1]
    if n_rows == 0 or W == 0:
        return out
    grid = (triton.cdiv(W, FLAT_BS), triton.cdiv(n_rows, FLAT_BQ))
    _dsa_logits_kernel[grid](
        q, k, k_scale if k_scale is not None else weights, weights, ks, ke, out,
        t0, n_rows, lo, W, S, H=H, D=D, BQ=FLAT_BQ, BS=FLAT_BS,
        QPD=FLAT_QPD if queries_per_dot is None else queries_per_dot,
        HAS_SCALE=k_scale is not None, PREC=prec, STAGES=FLAT_STAGES, num_warps=4,
        num_stages=2)
    return out


#: Most queries of one logits tile (a longer batch is split whatever its windows).
FLAT_TILE_QUERIES = 16384


def tiles_need_windows(T: int, span: tuple[int, int], cap_bytes: int) -> bool:
    """Whether :func:`query_tiles` must read the windows: more than one tile, or no query."""
    lo, hi = span
    return not (0 < T <= FLAT_TILE_QUERIES and T * max(hi - lo, 1) <= max(1, cap_bytes // 4))


def query_tiles(ks: torch.Tensor, ke: torch.Tensor, cap_bytes: int,
                span: tuple[int, int] | None = None) -> list[tuple[int, int, int, int]]:
    """Split the queries into (t0, rows, lo, W) tiles whose fp32 logits fit ``cap_bytes``.

    ``span``: (min(ks), max(ke)), already read by the caller (:func:`check_windows` returns
    it); when one tile of every query fits, that tile is returned without reading the windows
    (no host sync). Otherwise the windows are read in one transfer.
    """
    T = ks.shape[0]
    max_rows = max(1, cap_bytes // 4)
    if span is not None and not tiles_need_windows(T, span, cap_bytes):
        lo, hi = span
        return [(0, T, lo, max(hi - lo, 0))]
    windows = torch.stack([ks, ke]).cpu().numpy().astype(np.int64)        # [2, T]
    ks_h, ke_h = windows[0], windows[1]
    tiles, t0 = [], 0
    while t0 < T:
        n = min(T - t0, FLAT_TILE_QUERIES)
        while True:
            lo, hi = int(ks_h[t0:t0 + n].min()), int(ke_h[t0:t0 + n].max())
            if n == 1 or n * max(hi - lo, 1) <= max_rows:
                break
            n = max(1, n // 2)
        tiles.append((t0, n, lo, max(hi - lo, 0)))
        t0 += n
    return tiles


def flat_workspace_bytes(ks: torch.Tensor, ke: torch.Tensor, *, programs: int
                         ) -> dict[str, int]:
    """Bytes of the temporaries :func:`dsa_index_triton` allocates for these windows: the
    logits tile (at most :data:`FLAT_LOGITS_BYTES`, whatever T and S), the top-k scratch of
    ``programs`` persistent programs (8 per SM, at most the widest tile's rows) and the list of
    rows the fast top-k leaves to the general one (a count per tile, then the widest tile's
    rows)."""
    tiles = query_tiles(ks, ke, FLAT_LOGITS_BYTES)
    rows = max((n for _, n, _, _ in tiles), default=1)
    return {"logits": 4 * max([n * W for _, n, _, W in tiles] + [1]),
            "topk_scratch": 2 * 4 * TOPK_SCRATCH * max(1, min(rows, programs)),
            "topk_left": 4 * (len(tiles) + rows)}


def dsa_index_triton(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, ks: torch.Tensor,
                     ke: torch.Tensor, *, k_scale: torch.Tensor | None, topk: int,
                     out: torch.Tensor | None = None, need_scores: bool = False,
                     span: tuple[int, int] | None = None, tiles: tuple | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flat DSA selection with Triton kernels (inputs validated by :func:`hisa.dsa_index`).

    ``span``: (min(ks), max(ke)) as :func:`check_windows` returned them; it spares the window
    read of :func:`query_tiles` when one logits tile holds every query. ``tiles``: the
    :func:`query_tiles` of these windows, already read (a HISA call's window plan carries
    them), which spares that read in every case.

    Returns:
        (int32 [T, topk] offsets relative to ks, -1 padded — ``out`` itself when given;
         fp32 [T, topk] aligned scores, -inf padded, or None unless ``need_scores``).
    """
    check_kernel_shapes(q, k)
    q, k, prec = prepare_operands(q, k)
    weights = weights.contiguous()
    ks, ke = ks.contiguous(), ke.contiguous()
    k_scale = None if k_scale is None else k_scale.contiguous()
    T = q.shape[0]
    idx = out if out is not None else torch.empty(T, topk, dtype=torch.int32, device=q.device)
    vals = torch.empty(T, topk, dtype=torch.float32, device=q.device) if need_scores else None
    if T == 0:
        return idx, vals
    if tiles is None:
        tiles = query_tiles(ks, ke, FLAT_LOGITS_BYTES, span)
    max_elems = max(n * W for _, n, _, W in tiles)
    buf = torch.empty(max(max_elems, 1), dtype=torch.float32, device=q.device)
    rows = max(n for _, n, _, _ in tiles)
    grid = persistent_programs(rows, q.device, 8)
    scratch = (torch.empty(grid, TOPK_SCRATCH, dtype=torch.int32, device=q.device),
               torch.empty(grid, TOPK_SCRATCH, dtype=torch.int32, device=q.device))
    # One zeroed count per tile (a single memset), then the list the tiles reuse in turn.
    left = torch.zeros(len(tiles) + rows, dtype=torch.int32, device=q.device)
    for i, (t0, n, lo, W) in enumerate(tiles):
        logits = buf[:n * max(W, 1)].view(n, max(W, 1))
        dsa_logits(q, k, weights, ks, ke, k_scale=k_scale, t0=t0, n_rows=n, lo=lo,
                   out=logits, prec=prec)
        topk_rows(logits, ks, ke, t0=t0, lo=lo, topk=topk, out_idx=idx, out_val=vals,
                  scratch=scratch, left=(left[len(tiles):], left[i:i + 1]),
                  num_warps=FLAT_TOPK_WARPS)
    return idx, vals
