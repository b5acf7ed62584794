"""Register top-k selection for the decode kernels: fewer reduction passes than a plain bisection.

The selection of :mod:`hisa.ops.indexer.select` finds the k-th key with one ``tl.sum`` per bit
(32 cross-warp reductions, each ending in a barrier). In decode a selection runs on the critical
path of every step with few rows in flight, so its latency is the cost. Two changes, both exact:

* ``RADIX = 2``: each pass tests the three thresholds ``thr | 1, 2, 3 << s`` at once and gets
  their counts from one int64 ``tl.sum`` of packed indicators (21 bits a count), so 16 passes
  settle the 32 bits.
* Early exit: once an accepted threshold has exactly ``need`` keys at or above it, the set
  ``keys >= thr`` already is the top ``need`` (no key ties across the boundary), so the loop
  stops. For continuous scores this saves the low mantissa bits.

``_select_mask`` of :mod:`hisa.ops.indexer.topk` then takes the same set as with the full
bisection (ties to the lower index). Twins: the references' ``torch.topk``-based selections
(``naive_select_blocks``, ``naive_select_tokens``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .topk import _ordered_key, _select_mask

#: Count field width of the packed RADIX = 2 reduction (rows up to 2**21 - 1 keys).
PACK_BITS = tl.constexpr(21)
PACK_BITS2 = tl.constexpr(42)
PACK_MASK = tl.constexpr((1 << 21) - 1)


@triton.jit
def _threshold(keys, need, RADIX: tl.constexpr):
    """A key ``thr`` for which ``_select_mask(keys, need, thr)`` is the top ``need`` of keys.

    It is the largest ``t`` with #(keys >= t) >= need, or (early exit) any ``t`` with
    #(keys >= t) == need. Returns 0 when fewer than ``need`` keys are positive.
    """
    thr = tl.zeros([], dtype=tl.uint32)
    shift = tl.full([], 32, tl.int32)
    go = shift > 0
    while go:
        shift -= RADIX
        one = tl.full([], 1, tl.uint32) << shift.to(tl.uint32)
        if RADIX == 2:
            c1 = thr | one
            c2 = thr | (one << 1)
            c3 = c2 | one
            packed = ((keys >= c1).to(tl.int64) + ((keys >= c2).to(tl.int64) << PACK_BITS)
                      + ((keys >= c3).to(tl.int64) << PACK_BITS2))
            s = tl.sum(packed, axis=0)
            n1 = (s & PACK_MASK).to(tl.int32)
            n2 = ((s >> PACK_BITS) & PACK_MASK).to(tl.int32)
            n3 = (s >> PACK_BITS2).to(tl.int32)
            cnt = tl.where(n3 >= need, n3, tl.where(n2 >= need, n2, tl.where(n1 >= need, n1,
                                                                              0)))
            thr = tl.where(n3 >= need, c3, tl.where(n2 >= need, c2, tl.where(n1 >= need, c1,
                                                                             thr)))
        else:
            c1 = thr | one
            cnt = tl.sum((keys >= c1).to(tl.int32), axis=0)
            thr = tl.where(cnt >= need, c1, thr)
        go = (shift > 0) & (cnt != need)
    return thr


@triton.jit
def _select_row(v, need, RADIX: tl.constexpr):
    """(selection mask, output slot of each selected entry, number selected) of the top
    ``need`` of fp32 scores ``v`` (-inf never selected; ties to the lower index)."""
    keys = _ordered_key(v)
    sel = _select_mask(keys, need, _threshold(keys, need, RADIX))
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    return sel, pos, tl.sum(sel.to(tl.int32), axis=0)


@triton.jit
def _select_token_row_fast(src_ptr, ids_ptr, out_idx_ptr, out_val_ptr, B: tl.constexpr,
                           MB: tl.constexpr, MB_PAD: tl.constexpr, K: tl.constexpr,
                           K_PAD: tl.constexpr, WRITE_VALS: tl.constexpr,
                           RADIX: tl.constexpr):
    """Top-K of the MB candidate scores src[0:MB] (candidate c = token c % B of block
    ids[c // B]) as request positions (and scores), -1 / -inf padded."""
    i = tl.arange(0, MB_PAD)
    v = tl.load(src_ptr + i, mask=i < MB, other=float("-inf"), cache_modifier=".cg")
    sel, pos, n_sel = _select_row(v, K, RADIX)
    blk = tl.load(ids_ptr + i // B, mask=sel, other=0)
    tl.store(out_idx_ptr + pos, blk * B + (i % B), mask=sel)
    if WRITE_VALS:
        tl.store(out_val_ptr + pos, v, mask=sel)
    j = tl.arange(0, K_PAD)
    pad = (j >= n_sel) & (j < K)
    tl.store(out_idx_ptr + j, -1, mask=pad)
    if WRITE_VALS:
        tl.store(out_val_ptr + j, float("-inf"), mask=pad)


def radix_ok(n_pad: int) -> bool:
    """Whether the packed RADIX = 2 counts fit a row of n_pad keys."""
    return n_pad < (1 << PACK_BITS.value)


__all__ = ["PACK_BITS", "radix_ok", "triton"]
