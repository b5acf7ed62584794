"""Every window fact a HISA prefill call reads on the host, from one Triton launch.

:func:`hisa.ops.indexer.prefill.read_window_plan` needs, per call: whether some ``ks > ke``, min(ks),
max(ke), the largest number of blocks (and super-blocks) a window spans, and whether a window
of at most ``topk`` keys spans more blocks than are kept. With torch ops that is 18 small
kernels (28 at three levels; pinned in tests/interpret/test_window_stats.py) launched back to
back before the call's one host read, while the GPU waits. On an H200 (``hisa bench``) this
launch took HISA at 8K (the exact-regime route, served by the flat kernels) from 1.85 to
1.64 ms, now faster than the flat indexer's 1.68 ms. One program here walks the windows in tiles of
``BLOCK`` and writes the six facts; the host reads them in the same single transfer.

Twin: the torch ops of :func:`hisa.ops.indexer.prefill.read_window_plan` (``fused=False``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Windows per tile of the single program.
STATS_BLOCK = 1024
# Kernel constants must be constexpr globals (Triton refuses plain ones on the GPU).
INT32_MAX = tl.constexpr(2**31 - 1)
INT32_MIN = tl.constexpr(-2**31)


@triton.jit
def _spanned(ks, ke, span):
    """Blocks of ``span`` keys in each window (0 when empty); windows are valid when read."""
    return tl.where(ke <= ks, 0, (ke - 1) // span - ks // span + 1)


# Not specialized on the per-call sizes: one compiled kernel per level count while serving.
@triton.jit(do_not_specialize=["ks_stride", "ke_stride", "T", "topk"])
def _window_stats_kernel(ks_ptr, ke_ptr, ks_stride, ke_stride, T, out_ptr, topk, span0, limit0,
                         span1, limit1, TWO_LEVELS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    lo = tl.full([BLOCK], INT32_MAX, dtype=tl.int32)
    hi = tl.full([BLOCK], INT32_MIN, dtype=tl.int32)
    most0 = tl.zeros([BLOCK], dtype=tl.int32)
    most1 = tl.zeros([BLOCK], dtype=tl.int32)
    short = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, T, BLOCK):
        t = (start + offs).to(tl.int64)
        live = t < T
        ks = tl.load(ks_ptr + t * ks_stride, mask=live, other=0)
        ke = tl.load(ke_ptr + t * ke_stride, mask=live, other=0)
        bad = tl.maximum(bad, (ks > ke).to(tl.int32))
        lo = tl.minimum(lo, tl.where(live, ks, INT32_MAX))
        hi = tl.maximum(hi, tl.where(live, ke, INT32_MIN))
        # Block counts matter only for valid windows (the host raises first otherwise); dead
        # lanes load (0, 0), an empty window, so they count 0 and never look pruned.
        blocks = _spanned(ks, ke, span0)
        most0 = tl.maximum(most0, blocks)
        pruned = blocks > limit0
        if TWO_LEVELS:
            supers = _spanned(ks, ke, span1)
            most1 = tl.maximum(most1, supers)
            pruned = pruned | (supers > limit1)
        short = tl.maximum(short, (pruned & (ke - ks <= topk)).to(tl.int32))
    tl.store(out_ptr + 0, tl.max(bad, axis=0).to(tl.int64))
    tl.store(out_ptr + 1, tl.min(lo, axis=0).to(tl.int64))
    tl.store(out_ptr + 2, tl.max(hi, axis=0).to(tl.int64))
    tl.store(out_ptr + 3, tl.max(most0, axis=0).to(tl.int64))
    tl.store(out_ptr + 4, tl.max(most1, axis=0).to(tl.int64))
    tl.store(out_ptr + 5, tl.max(short, axis=0).to(tl.int64))


def window_stats(ks: torch.Tensor, ke: torch.Tensor, *, topk: int, block_size: int,
                 block_topk: int, super_span: int | None = None,
                 super_topk: int | None = None) -> tuple[int, int, int, int, int, bool]:
    """(any ks > ke, min(ks), max(ke), max blocks, max super-blocks, some window of at most
    ``topk`` keys is pruned) of int32 windows ``ks``, ``ke`` [T], T >= 1, in one launch and
    one host read. ``super_span``: keys per super-block (B * super_size), None for two levels.
    """
    out = torch.empty(6, dtype=torch.int64, device=ks.device)
    two = super_span is not None
    _window_stats_kernel[(1,)](ks, ke, ks.stride(0), ke.stride(0), ks.shape[0], out, topk,
                               block_size, block_topk, super_span if two else 1,
                               super_topk if two else 0, TWO_LEVELS=two, BLOCK=STATS_BLOCK)
    bad, lo, hi, most0, most1, short = out.tolist()
    return bool(bad), lo, hi, most0, most1, bool(short)


def window_bounds(ks: torch.Tensor, ke: torch.Tensor) -> tuple[bool, int, int]:
    """(any ks > ke, min(ks), max(ke)) of int32 windows [T], T >= 1, in one launch and one host
    read: what :func:`hisa.utils.validate.check_windows` reads with four torch reductions and a
    stack (five launches), for the flat op on CUDA (:func:`hisa.dsa_index`). The same kernel
    with blocks of one key that are never pruned (its block facts are unused here)."""
    bad, lo, hi, _, _, _ = window_stats(ks, ke, topk=0, block_size=1, block_topk=2**31 - 1)
    return bad, lo, hi
