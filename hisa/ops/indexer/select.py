"""Top-m block selection and top-k token selection of HISA (Triton), rows held in registers.

The row helpers are shared by the standalone kernels here (twins:
:func:`~hisa.ops.indexer.naive.naive_select_blocks`, and
:func:`~hisa.ops.indexer.naive.naive_select_tokens` followed by
:func:`~hisa.ops.indexer.naive.naive_to_offsets`) and by the fused score+select kernels of
``block_scores.py`` and ``token_scores.py``. Selection is the radix threshold search of ``topk.py``
under the selection rule (ties to the lower index, ``+inf > finite > -inf > NaN``, entries
marked outside the window never selected; the first and last eligible block of a row are
forced), valid entries come first in index order (so block ids come out ascending), then -1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...utils.sizes import next_pow2
from .topk import (_force_key, _masked_key, _maxnreg, _radix_threshold, _select_mask_count,
                   _select_row)

#: Widest row a register selection handles (blocks of a query, or m*B candidates).
SELECT_MAX_ROW = 32768


@triton.jit
def _select_block_row(src_ptr, n, first, ids_ptr, M: tl.constexpr, M_PAD: tl.constexpr,
                      N_PAD: tl.constexpr):
    """ids_ptr[0:M] = ascending ids first + i of the top-M of src[0:n], -1 padded; src[0] and
    src[n - 1] (the first and last eligible block) are forced."""
    i = tl.arange(0, N_PAD)
    v = tl.load(src_ptr + i, mask=i < n, other=0.0, cache_modifier=".cg")
    keys = _force_key(_masked_key(v, i < n), (i == 0) | (i == n - 1))
    sel, pos, n_sel = _select_row(keys, M, 1)
    tl.store(ids_ptr + pos, (first + i).to(tl.int32), mask=sel)
    j = tl.arange(0, M_PAD)
    tl.store(ids_ptr + j, -1, mask=(j >= n_sel) & (j < M))


@triton.jit
def _store_candidates(sel, v, ids_ptr, out_idx_ptr, out_val_ptr, base, B: tl.constexpr,
                      MB: tl.constexpr, MB_PAD: tl.constexpr, WRITE_VALS: tl.constexpr,
                      BLOCK_SLOTS: tl.constexpr):
    """Writes the selected candidates of a row (candidate c = token c % B of block
    ids[c // B]) to consecutive output slots in index order: the offset ids[c // B] * B +
    c % B - base, and the score v[c] where ``WRITE_VALS``.

    For a power-of-two B (every pipeline shape) the row is taken as [MB_PAD // B, B], a block
    per row: a block's slots are the exclusive prefix of the blocks' counts plus a scan along
    the block, and its id is one load. The same slots as one scan over the whole row, for
    half its shuffles and 40 % of its barriers, which bound these latency-bound selections
    (static SASS, 8,192 candidates, `benchmarks/sass_count.py`: the prefill select at 4 warps
    and 168 registers 7,456 -> 5,984 instructions, 55 -> 23 barriers, 8 bytes spilled; the
    decode token select at its 8 warps 4,032 -> 3,032, 35 -> 23 barriers). The 2-D store
    converts its addresses through 64 KB of shared memory, which still leaves three select
    rows per SM; keeping the store 1-D (the slots reshaped back, tried) took 255 registers.
    ``BLOCK_SLOTS`` off takes the one scan over the row for any B (the decode's choice while
    the 64 KB cost it more than the shuffles saved, ``decode_kernels.SELECT_BLOCK_SLOTS``)."""
    if BLOCK_SLOTS and (B & (B - 1)) == 0:
        in_block = tl.reshape(sel.to(tl.int32), [MB_PAD // B, B])
        count = tl.sum(in_block, axis=1)
        slot = (tl.cumsum(count, axis=0) - count)[:, None] + tl.cumsum(in_block, axis=1) - 1
        r = tl.arange(0, MB_PAD // B)
        blk = tl.load(ids_ptr + r, mask=r * B < MB, other=0)
        taken = in_block != 0
        tl.store(out_idx_ptr + slot, blk[:, None] * B + tl.arange(0, B)[None, :] - base,
                 mask=taken)
        if WRITE_VALS:
            tl.store(out_val_ptr + slot, tl.reshape(v, [MB_PAD // B, B]), mask=taken)
    else:
        i = tl.arange(0, MB_PAD)
        slot = tl.cumsum(sel.to(tl.int32), axis=0) - 1
        blk = tl.load(ids_ptr + i // B, mask=sel, other=0)
        tl.store(out_idx_ptr + slot, blk * B + (i % B) - base, mask=sel)
        if WRITE_VALS:
            tl.store(out_val_ptr + slot, v, mask=sel)


@triton.jit
def _select_token_row(src_ptr, ids_ptr, s0, out_idx_ptr, out_val_ptr,
                      B: tl.constexpr, MB: tl.constexpr, MB_PAD: tl.constexpr,
                      K: tl.constexpr, K_PAD: tl.constexpr, WRITE_VALS: tl.constexpr,
                      RADIX: tl.constexpr, COUNT_FIRST: tl.constexpr,
                      BLOCK_SLOTS: tl.constexpr):
    """Top-K of the MB candidate scores src[0:MB] (candidate c = token c % B of block
    ids[c // B]); writes offsets relative to s0 (and scores), -1 / -inf padded: the prefill
    token selects (s0 = the query's ks, ``COUNT_FIRST``: short rows skip the search) and the
    decode one (s0 = 0, request positions). ``RADIX`` and ``COUNT_FIRST`` as in
    :func:`~.topk._radix_threshold`, ``BLOCK_SLOTS`` as in :func:`_store_candidates`."""
    i = tl.arange(0, MB_PAD)
    v = tl.load(src_ptr + i, mask=i < MB, other=0.0, cache_modifier=".cg")
    keys = _masked_key(v, i < MB)
    sel, n_sel = _select_mask_count(keys, K, _radix_threshold(keys, K, RADIX, COUNT_FIRST))
    _store_candidates(sel, v, ids_ptr, out_idx_ptr, out_val_ptr, s0, B, MB, MB_PAD, WRITE_VALS,
                      BLOCK_SLOTS)
    j = tl.arange(0, K_PAD)
    pad = (j >= n_sel) & (j < K)
    tl.store(out_idx_ptr + j, -1, mask=pad)
    if WRITE_VALS:
        tl.store(out_val_ptr + j, float("-inf"), mask=pad)


@triton.jit
def _select_blocks_kernel(scores_ptr, stride_s, ks_ptr, ke_ptr, ids_ptr, T,
                          B: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr,
                          N_PAD: tl.constexpr):
    t = tl.program_id(0)
    s0 = tl.load(ks_ptr + t)
    s1 = tl.load(ke_ptr + t)
    first = s0 // B
    end = tl.where(s1 > s0, (s1 + B - 1) // B, first)
    _select_block_row(scores_ptr + t.to(tl.int64) * stride_s + first, end - first, first,
                      ids_ptr + t.to(tl.int64) * M, M, M_PAD, N_PAD)


@triton.jit
def _select_tokens_kernel(scores_ptr, ids_ptr, ks_ptr, out_idx_ptr, out_val_ptr,
                          B: tl.constexpr, M: tl.constexpr, MB_PAD: tl.constexpr,
                          K: tl.constexpr, K_PAD: tl.constexpr, WRITE_VALS: tl.constexpr,
                          RADIX: tl.constexpr, BLOCK_SLOTS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    _select_token_row(scores_ptr + t * (M * B), ids_ptr + t * M, tl.load(ks_ptr + t),
                      out_idx_ptr + t * K, out_val_ptr + t * K, B, M * B, MB_PAD, K, K_PAD,
                      WRITE_VALS, RADIX, True, BLOCK_SLOTS)


#: Warps per program of the prefill token selection (8,192 candidates a row). Measured on H200
#: at 64K x 8,192 (benchmarks/select_probe.py): 4 warps 4.15 ms, 8 warps 6.07, 16 warps 6.82:
#: the selection is bound by its cross-warp reductions, so fewer warps and more rows per SM win.
SELECT_TOKENS_WARPS = 4
#: Threshold search of the prefill token select, unfused and fused (``RADIX`` of
#: :func:`~.topk._radix_threshold`): 0, the interpolation search, about half the count passes of
#: the bit search (1) in a CPU emulation (benchmarks/select_passes.py) and measured 4.30 against
#: 4.41 ms on an H200 (65,536 rows of 8,192 candidates; clustered rows 1.049 vs 1.047 ms,
#: benchmarks/select_probe.py): each pass costs more, so the halved count gains little.
SELECT_TOKENS_RADIX = 0
#: Register cap of the unfused prefill token select (None: the compiler's choice; the fused
#: token stage is not capped: its MMAs need the registers). Uncapped it takes 177 registers
#: a thread at 8,192 candidates (236 at aeb0aa0, before the mask's count and the per-block
#: slots), so two 4-warp rows per SM for a kernel bound by its own latency; 168 leaves three
#: in flight for 8 bytes spilled (104 at aeb0aa0; `python benchmarks/sass_count.py
#: prefill_select --warps 4 --maxnreg 168`). H200, same run (select_probe.py --caps at
#: f2c3b12, 65,536 rows; benchmarks/results/round3/kernel_ab_h200_f2c3b12.txt): radix 0
#: 3.38 ms uncapped, 2.98 at 168, 2.98 at 128; radix 1 4.07 / 3.38 / 3.27. 168 for the
#: smaller spill at the same time.
SELECT_TOKENS_MAXNREG = 168
#: Slots per block in the prefill token selects' store (``_store_candidates``), unfused and
#: fused: static SASS 7,456 -> 5,984 instructions at 168 registers. Timed only together with
#: the mask's count (v13): 4.15 -> 2.98 ms at the cap, 4.31 -> 3.38 uncapped (H200, 65,536
#: rows, same run against 64652cc, benchmarks/results/round3/kernel_ab_h200_f2c3b12.txt);
#: alone only on 1,024-query chunks, where it is within the runs' spread (0.057-0.082 ms on,
#: 0.072-0.074 off; round3/chunk_select_h200_*.txt). The prefill selects run without PDL, so
#: the overlap its 64 KB of shared memory costs the decode
#: (``decode_kernels.SELECT_BLOCK_SLOTS``) is not at stake here.
SELECT_TOKENS_BLOCK_SLOTS = True


def select_warps(n_pad: int) -> int:
    """Warps for a register selection of n_pad keys (about 32 keys per thread)."""
    return max(4, min(16, n_pad // 1024))


def select_blocks(block_scores: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, *,
                  block_size: int, block_topk: int) -> torch.Tensor:
    """Top-m eligible blocks of each row of fp32 [T, NB] scores: int32 [T, m], ascending, -1
    padded (twin: ``naive_select_blocks``)."""
    T, NB = block_scores.shape
    n_pad = max(16, next_pow2(max(NB, 1)))
    if n_pad > SELECT_MAX_ROW:
        raise ValueError(f"block_scores: expected at most {SELECT_MAX_ROW} blocks per row for "
                         f"the register selection, got {NB}")
    ids = torch.empty(T, block_topk, dtype=torch.int32, device=block_scores.device)
    if T:
        _select_blocks_kernel[(T,)](block_scores, block_scores.stride(0), ks, ke, ids, T,
                                    B=block_size, M=block_topk,
                                    M_PAD=next_pow2(block_topk), N_PAD=n_pad,
                                    num_warps=select_warps(n_pad))
    return ids


def select_tokens(token_scores: torch.Tensor, block_ids: torch.Tensor, ks: torch.Tensor, *,
                  block_size: int, topk: int, out: torch.Tensor | None = None,
                  need_scores: bool = False, out_scores: torch.Tensor | None = None,
                  num_warps: int | None = None, radix: int | None = None,
                  maxnreg: int | None = None, block_slots: bool | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Top-k of fp32 [T, m*B] candidate scores mapped to offsets relative to ks.

    ``num_warps``, ``radix`` (1, 2 or 8 bits per pass of the threshold search, or 0 for
    the interpolation search, :func:`~.topk._interp_threshold`), ``maxnreg`` (a register
    cap, 0 for none) and ``block_slots`` (:data:`SELECT_TOKENS_BLOCK_SLOTS`) override the
    defaults, for probes (benchmarks/select_probe.py): the selected entries are the same.

    Returns (int32 [T, topk], -1 padded; fp32 [T, topk] or None). Twin:
    ``naive_to_offsets(*naive_select_tokens(...)[:1], ks)``.
    """
    T, MB = token_scores.shape
    M = block_ids.shape[1]
    assert MB == M * block_size
    mb_pad = next_pow2(MB)
    if mb_pad > SELECT_MAX_ROW:
        raise ValueError(f"block_topk * block_size: expected at most {SELECT_MAX_ROW} "
                         f"candidates per query for the Triton selection, got {MB}")
    idx = out if out is not None else torch.empty(T, topk, dtype=torch.int32,
                                                  device=token_scores.device)
    vals = out_scores
    if need_scores and vals is None:
        vals = torch.empty(T, topk, dtype=torch.float32, device=idx.device)
    if T:
        _select_tokens_kernel[(T,)](token_scores, block_ids, ks, idx,
                                    vals if vals is not None else token_scores,
                                    B=block_size, M=M, MB_PAD=mb_pad, K=topk,
                                    K_PAD=next_pow2(topk),
                                    WRITE_VALS=vals is not None,
                                    RADIX=SELECT_TOKENS_RADIX if radix is None else radix,
                                    BLOCK_SLOTS=(SELECT_TOKENS_BLOCK_SLOTS if block_slots is None
                                                 else block_slots),
                                    num_warps=num_warps or SELECT_TOKENS_WARPS,
                                    **_register_cap(idx.device, maxnreg))
    return idx, vals


def _register_cap(device: torch.device, maxnreg: int | None) -> dict:
    """Launch option of the token select's register cap: ``maxnreg`` (0: none), else
    :data:`SELECT_TOKENS_MAXNREG`; CUDA only (``topk._maxnreg``)."""
    regs = SELECT_TOKENS_MAXNREG if maxnreg is None else maxnreg
    return _maxnreg(device, regs) if regs else {}
