"""Register top-k selection rows for the decode kernels.

The threshold search is :func:`hisa.ops.indexer.topk._radix_threshold` (early exit once exactly
``need`` keys sit at or above the threshold; ``RADIX`` bits per reduction pass), shared with the
prefill selections. ``_select_mask_count`` then takes the same set as a full bisection would
(ties to the lower index), and ``select._store_candidates`` writes a token row's selection.
Twins: the references' selections (``naive_select_blocks``, ``naive_select_tokens``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .select import _store_candidates
from .topk import PACK_BITS, _masked_key, _radix_threshold, _select_mask_count


@triton.jit
def _select_row(keys, need, RADIX: tl.constexpr):
    """(selection mask, output slot of each selected entry, number selected) of the top
    ``need`` of selection keys (``topk._ordered_key``: key 0 never selected; ties to the lower
    index)."""
    sel, n_sel = _select_mask_count(keys, need, _radix_threshold(keys, need, RADIX))
    return sel, tl.cumsum(sel.to(tl.int32), axis=0) - 1, n_sel


@triton.jit
def _select_token_row_fast(src_ptr, ids_ptr, out_idx_ptr, out_val_ptr, B: tl.constexpr,
                           MB: tl.constexpr, MB_PAD: tl.constexpr, K: tl.constexpr,
                           K_PAD: tl.constexpr, WRITE_VALS: tl.constexpr,
                           RADIX: tl.constexpr):
    """Top-K of the MB candidate scores src[0:MB] (candidate c = token c % B of block
    ids[c // B]) as request positions (and scores), -1 / -inf padded."""
    i = tl.arange(0, MB_PAD)
    v = tl.load(src_ptr + i, mask=i < MB, other=0.0, cache_modifier=".cg")
    keys = _masked_key(v, i < MB)
    sel, n_sel = _select_mask_count(keys, K, _radix_threshold(keys, K, RADIX))
    _store_candidates(sel, v, ids_ptr, out_idx_ptr, out_val_ptr, 0, B, MB, MB_PAD, WRITE_VALS)
    j = tl.arange(0, K_PAD)
    pad = (j >= n_sel) & (j < K)
    tl.store(out_idx_ptr + j, -1, mask=pad)
    if WRITE_VALS:
        tl.store(out_val_ptr + j, float("-inf"), mask=pad)


def radix_ok(n_pad: int) -> bool:
    """Whether the packed RADIX = 2 counts fit a row of n_pad keys."""
    return n_pad < (1 << PACK_BITS.value)


__all__ = ["PACK_BITS", "radix_ok", "triton"]
