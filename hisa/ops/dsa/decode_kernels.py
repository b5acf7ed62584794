"""Flat DSA indexer over the paged FP8 cache in Triton (decode): paged logits, then top-k.

``_paged_logits_kernel``: one program per (request, run of PAGES_PER_PROG pages). It loads the
request's ``next_n`` query rows once as q^T [D, next_n * H] and, page by page, the 64 FP8 key
rows [64, D] and their 64 scales straight from the page bytes (SoA: values, then scales):
``dot(k_page[64, D], q^T[D, next_n * H])`` puts tokens on the MMA rows and heads on the columns,
so each row's ReLU-weighted head sum stays inside an MMA row. Every key row is read once from
HBM (132 B per token): the kernel is memory-bound by design. Scores go to an fp32
[rows, max_pages * 64] buffer (only [0, row length) is written), then :func:`decode_topk`
selects in two launches: each program keeps the top k of a 16K-key chunk of a row in registers,
then one program per row merges the survivors (register bisection of :mod:`..indexer.topk`;
ties to the lower position, as the references). Spreading a row over many programs matters in
decode, where a batch has few rows.

No host synchronisation, no data-dependent allocation: lengths are read on the device, clamped
to the block table's capacity, and pages whose id is outside [0, num_pages) are skipped, so the
two launches can be captured in a CUDA graph and replayed with new lengths and block tables.

The same logits kernel serves HISA's ``backend="auto"`` routing: with ``FLAT_MAX_KEYS`` it
handles only requests with at most that many keys and gives the other rows an empty window
(``ke = 0``), which HISA's kernels then fill.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...cache.layout import PAGE_SIZE, page_bytes
from ...utils.sizes import next_pow2
from ...utils.validate import FP8_DTYPE
from ..indexer.select import SELECT_MAX_ROW, select_warps
from ..indexer.topk import _masked_key, _outside_like, _relu, _select_row, topk_rows
from .prefill import check_kernel_shapes

#: Pages per logits program (256 tokens: enough work per program, many programs per request).
PAGES_PER_PROG = 4
#: Warps of the logits kernel.
LOGITS_WARPS = 4
#: "No limit" for FLAT_MAX_KEYS.
NO_LIMIT = 2**31 - 1
#: Cap on the fp32 logits buffer of the flat paged decode (bytes): 256 MiB = 64 rows of a
#: 1M-key context; a batch needing more is scored in groups of requests.
DECODE_LOGITS_BYTES = 256 << 20
#: Keys per program of the decode top-k's first stage (each keeps its chunk's top k in
#: registers; the second stage selects among the n_chunks * k survivors of a row).
TOPK_CHUNK = 16384


@triton.jit
def _row_len(seq_lens_ptr, b, i, max_keys, NEXT_N: tl.constexpr, SEQ_2D: tl.constexpr):
    """Keys visible to query row i of request b, clamped to [0, max_keys]."""
    if SEQ_2D:
        n = tl.load(seq_lens_ptr + b * NEXT_N + i)
    else:
        # Clamp before the offset: seq_len - next_n + 1 would wrap at INT32_MIN.
        n = tl.maximum(tl.load(seq_lens_ptr + b), 0) - NEXT_N + 1 + i
    return tl.minimum(tl.maximum(n, 0), max_keys)


@triton.jit
def _request_len(seq_lens_ptr, b, max_keys, NEXT_N: tl.constexpr, SEQ_2D: tl.constexpr):
    """Keys of request b any of its rows sees (the longest row)."""
    n = _row_len(seq_lens_ptr, b, 0, max_keys, NEXT_N, SEQ_2D)
    for i in tl.static_range(1, NEXT_N):
        n = tl.maximum(n, _row_len(seq_lens_ptr, b, i, max_keys, NEXT_N, SEQ_2D))
    return n


@triton.jit
def _page_scores(kv8_ptr, kv32_ptr, page, page_ok, q_t, w,
                 NH: tl.constexpr, NEXT_N: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                 PAGE: tl.constexpr, PREC: tl.constexpr):
    """fp32 [PAGE, NEXT_N]: k_scale * sum_h w * ReLU(k . q) of one page's tokens for each row."""
    t = tl.arange(0, PAGE)
    d = tl.arange(0, D)
    base = page.to(tl.int64) * (PAGE * (D + 4))
    kb = tl.load(kv8_ptr + base + t[:, None] * D + d[None, :], mask=page_ok, other=0.0)
    ksc = tl.load(kv32_ptr + base // 4 + (PAGE * D) // 4 + t, mask=page_ok, other=0.0)
    acc = tl.dot(kb.to(q_t.dtype), q_t, input_precision=PREC)                 # [PAGE, NH]
    r = _relu(acc) * w[None, :]
    s = tl.sum(tl.reshape(r, [PAGE, NEXT_N, H]), axis=2)                      # [PAGE, NEXT_N]
    return s * ksc[:, None]


@triton.jit
def _pick(s2, nn, i):
    """Column i of a [PAGE, NEXT_N] tile as [PAGE]."""
    return tl.sum(tl.where(nn[None, :] == i, s2, 0.0), axis=1)


@triton.jit
def _paged_logits_kernel(q_ptr, kv8_ptr, kv32_ptr, w_ptr, seq_lens_ptr, bt_ptr, logits_ptr,
                         ks_ptr, ke_ptr, num_pages, max_pages, stride_bt, stride_lg,
                         flat_max_keys, chunks,
                         NEXT_N: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                         SEQ_2D: tl.constexpr, PPP: tl.constexpr, PAGE: tl.constexpr,
                         PREC: tl.constexpr):
    # A 1-D grid of requests x page chunks: axis 0 allows 2**31 - 1 programs, axis 1 only
    # 65,535 (a request of 2**24 keys has 65,537 chunks).
    pid = tl.program_id(0)
    b = pid // chunks
    chunk = pid % chunks
    NH: tl.constexpr = NEXT_N * H
    max_keys = max_pages * PAGE
    n_req = _request_len(seq_lens_ptr, b, max_keys, NEXT_N, SEQ_2D)
    mine = n_req <= flat_max_keys
    nn = tl.arange(0, NEXT_N)
    if chunk == 0:
        for i in tl.static_range(NEXT_N):
            row = b * NEXT_N + i
            tl.store(ks_ptr + row, 0)
            n_i = _row_len(seq_lens_ptr, b, i, max_keys, NEXT_N, SEQ_2D)
            tl.store(ke_ptr + row, tl.where(mine, n_i, 0))
    p0 = chunk * PPP
    if mine & (p0 * PAGE < n_req):
        c = tl.arange(0, NH)
        d = tl.arange(0, D)
        b64 = b.to(tl.int64)
        q_t = tl.load(q_ptr + b64 * (NH * D) + c[None, :] * D + d[:, None])       # [D, NH]
        w = tl.load(w_ptr + b64 * NH + c)                                           # [NH]
        t = tl.arange(0, PAGE)
        for p in range(p0, tl.minimum(p0 + PPP, tl.cdiv(n_req, PAGE))):
            page = tl.load(bt_ptr + b64 * stride_bt + p)
            page_ok = (page >= 0) & (page < num_pages)
            s2 = _page_scores(kv8_ptr, kv32_ptr, tl.where(page_ok, page, 0), page_ok, q_t, w,
                              NH, NEXT_N, H, D, PAGE, PREC)
            pos = p * PAGE + t
            for i in tl.static_range(NEXT_N):
                n_i = _row_len(seq_lens_ptr, b, i, max_keys, NEXT_N, SEQ_2D)
                row = (b64 * NEXT_N + i) * stride_lg
                sc = _pick(s2, nn, i)
                sc = tl.where(page_ok, sc, _outside_like(sc))     # a page id outside the cache
                tl.store(logits_ptr + row + pos, sc, mask=pos < n_i)


@triton.jit
def _chunk_topk_kernel(logits_ptr, stride_lg, ke_ptr, cval_ptr, cidx_ptr,
                       K: tl.constexpr, K_PAD: tl.constexpr, CH: tl.constexpr,
                       NC: tl.constexpr):
    """Top-K of keys [c*CH, (c+1)*CH) of a row, in index order, OUTSIDE / -1 padded."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    n = tl.load(ke_ptr + row)
    i = tl.arange(0, CH)
    pos = c * CH + i
    v = tl.load(logits_ptr + row * stride_lg + pos, mask=pos < n, other=0.0)
    keys = _masked_key(v, pos < n)
    sel, at, n_sel = _select_row(keys, K, 1)
    base = row * (NC * K) + c * K
    tl.store(cval_ptr + base + at, v, mask=sel)
    tl.store(cidx_ptr + base + at, pos, mask=sel)
    j = tl.arange(0, K_PAD)
    pad = (j >= n_sel) & (j < K)
    tl.store(cval_ptr + base + j, _outside_like(j.to(tl.float32)), mask=pad)
    tl.store(cidx_ptr + base + j, -1, mask=pad)


@triton.jit
def _merge_topk_kernel(cval_ptr, cidx_ptr, out_idx_ptr, out_val_ptr,
                       K: tl.constexpr, K_PAD: tl.constexpr, NCK: tl.constexpr,
                       NCK_PAD: tl.constexpr, WRITE_VALS: tl.constexpr):
    """Top-K of a row's NC*K chunk survivors; ties go to the lower position (lower chunk)."""
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, NCK_PAD)
    v = tl.load(cval_ptr + row * NCK + i, mask=i < NCK, other=0.0)
    keys = _masked_key(v, i < NCK)
    sel, at, n_sel = _select_row(keys, K, 1)
    pos = tl.load(cidx_ptr + row * NCK + i, mask=sel, other=-1)
    tl.store(out_idx_ptr + row * K + at, pos, mask=sel)
    if WRITE_VALS:
        tl.store(out_val_ptr + row * K + at, v, mask=sel)
    j = tl.arange(0, K_PAD)
    pad = (j >= n_sel) & (j < K)
    tl.store(out_idx_ptr + row * K + j, -1, mask=pad)
    if WRITE_VALS:
        tl.store(out_val_ptr + row * K + j, float("-inf"), mask=pad)


def decode_topk(logits: torch.Tensor, ke: torch.Tensor, *, topk: int, out_idx: torch.Tensor,
                out_val: torch.Tensor | None) -> None:
    """Top-k of each row's [0, ke) in two launches that spread a row over many programs: chunk
    top-k (grid rows x chunks), then a merge of the survivors. Falls back to
    :func:`hisa.ops.indexer.topk.topk_rows` (one program per row) when the survivors of a row
    exceed a register selection. Twin: :func:`hisa.ops.dsa.naive.naive_topk`."""
    rows, width = logits.shape
    ch = TOPK_CHUNK
    nc = triton.cdiv(width, ch)
    k_pad = next_pow2(topk)
    nck_pad = next_pow2(nc * topk)
    if topk >= ch or nck_pad > SELECT_MAX_ROW:
        topk_rows(logits, torch.zeros_like(ke), ke, t0=0, lo=0, topk=topk, out_idx=out_idx,
                  out_val=out_val)
        return
    cval = torch.empty(rows, nc * topk, dtype=torch.float32, device=logits.device)
    cidx = torch.empty(rows, nc * topk, dtype=torch.int32, device=logits.device)
    _chunk_topk_kernel[(rows, nc)](logits, logits.stride(0), ke, cval, cidx, K=topk,
                                   K_PAD=k_pad, CH=ch, NC=nc, num_warps=select_warps(ch))
    _merge_topk_kernel[(rows,)](cval, cidx, out_idx, out_val if out_val is not None else cval,
                                K=topk, K_PAD=k_pad, NCK=nc * topk, NCK_PAD=nck_pad,
                                WRITE_VALS=out_val is not None, num_warps=select_warps(nck_pad))


def decode_operands(q: torch.Tensor, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                    torch.Tensor, str]:
    """(q contiguous in a dot dtype, pages as fp8 bytes, pages as fp32 words, dot precision).

    The cache is FP8: fp8 q dots it directly, bf16/fp16 q upcasts the keys exactly in the
    kernel, fp32 q runs IEEE fp32 dots (matches the fp32 reference).
    """
    check_kernel_shapes(q.flatten(0, 1), q.new_empty(0, q.shape[-1]))
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    return (q.contiguous(), pages.view(FP8_DTYPE), pages.view(torch.float32), prec)


def decode_layout(weights: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layouts the decode kernels index: weights and seq_lens contiguous, block-table
    columns unit-stride (its row stride is passed to the kernels). Free for inputs already so;
    otherwise one copy each, captured like any kernel under a CUDA graph."""
    if block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    return weights.contiguous(), seq_lens.contiguous(), block_table


def paged_logits(q: torch.Tensor, pages: torch.Tensor, weights: torch.Tensor,
                 seq_lens: torch.Tensor, block_table: torch.Tensor, *,
                 flat_max_keys: int = NO_LIMIT, out: torch.Tensor | None = None,
                 ks: torch.Tensor | None = None, ke: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores of every visible key: (fp32 [rows, max_pages * 64], defined on [0, ke[row]);
    ks int32 [rows] (zeros); ke int32 [rows] row lengths, 0 for requests longer than
    ``flat_max_keys``). ``out`` / ``ks`` / ``ke``: optional buffers of those shapes (``out``
    may have more rows; its head is used). Twin: :func:`hisa.ops.dsa.naive.naive_dsa_logits`
    on gathered keys."""
    batch, next_n, H, D = q.shape
    q, kv8, kv32, prec = decode_operands(q, pages)
    weights, seq_lens, block_table = decode_layout(weights, seq_lens, block_table)
    max_pages = block_table.shape[1]
    rows = batch * next_n
    if out is None:
        out = torch.empty(rows, max_pages * PAGE_SIZE, dtype=torch.float32, device=q.device)
    logits = out[:rows]
    ks = torch.empty(rows, dtype=torch.int32, device=q.device) if ks is None else ks
    ke = torch.empty(rows, dtype=torch.int32, device=q.device) if ke is None else ke
    assert page_bytes(D) % 4 == 0
    chunks = triton.cdiv(max_pages, PAGES_PER_PROG)
    if batch and chunks:
        _paged_logits_kernel[(batch * chunks,)](
            q, kv8, kv32, weights, seq_lens, block_table, logits, ks, ke, pages.shape[0],
            max_pages, block_table.stride(0), logits.stride(0), flat_max_keys, chunks,
            NEXT_N=next_n, H=H, D=D, SEQ_2D=seq_lens.dim() == 2, PPP=PAGES_PER_PROG,
            PAGE=PAGE_SIZE, PREC=prec, num_warps=LOGITS_WARPS)
    return logits, ks, ke


def logits_requests_per_launch(batch: int, next_n: int, max_pages: int) -> int:
    """Requests scored per logits launch so that the fp32 buffer stays within
    :data:`DECODE_LOGITS_BYTES` (at least one request). Decided from shapes alone."""
    per_request = next_n * max_pages * PAGE_SIZE * 4
    return max(1, min(batch, DECODE_LOGITS_BYTES // max(per_request, 1)))


def dsa_decode(q: torch.Tensor, pages: torch.Tensor, weights: torch.Tensor,
               seq_lens: torch.Tensor, block_table: torch.Tensor, *, topk: int,
               out: torch.Tensor | None = None, need_scores: bool = False,
               out_scores: torch.Tensor | None = None, flat_max_keys: int = NO_LIMIT
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flat paged decode: (int32 [rows, topk] positions, -1 padded; fp32 scores or None).

    Two launches (logits, top-k) per group of :func:`logits_requests_per_launch` requests: the
    fp32 logits buffer never exceeds :data:`DECODE_LOGITS_BYTES` (or one request's rows), and
    the grouping depends on shapes only, so the call stays CUDA-graph capturable.
    ``out_scores`` receives the scores when given. With ``flat_max_keys`` rows of longer
    requests come out as all -1 (HISA's routing fills them afterwards). A zero-page block table
    gives all -1 rows."""
    batch, next_n = q.shape[:2]
    weights, seq_lens, block_table = decode_layout(weights, seq_lens, block_table)
    rows = batch * next_n
    max_pages = block_table.shape[1]
    idx = out if out is not None else torch.empty(rows, topk, dtype=torch.int32,
                                                  device=q.device)
    vals = out_scores
    if vals is None and need_scores:
        vals = torch.empty(rows, topk, dtype=torch.float32, device=q.device)
    if rows == 0:
        return idx, vals
    if max_pages == 0:
        idx.fill_(-1)
        if vals is not None:
            vals.fill_(float("-inf"))
        return idx, vals
    group = logits_requests_per_launch(batch, next_n, max_pages)
    buf = torch.empty(group * next_n, max_pages * PAGE_SIZE, dtype=torch.float32,
                      device=q.device)
    ks = torch.empty(rows, dtype=torch.int32, device=q.device)
    ke = torch.empty(rows, dtype=torch.int32, device=q.device)
    for b0 in range(0, batch, group):
        b1 = min(batch, b0 + group)
        r = slice(b0 * next_n, b1 * next_n)
        logits, _, ke_r = paged_logits(q[b0:b1], pages, weights[r], seq_lens[b0:b1],
                                       block_table[b0:b1], flat_max_keys=flat_max_keys,
                                       out=buf, ks=ks[r], ke=ke[r])
        decode_topk(logits, ke_r, topk=topk, out_idx=idx[r],
                    out_val=None if vals is None else vals[r])
    return idx, vals
