"""A prefill chunk's request layout and windows in Triton: two launches where the torch ops
made eleven, all of them in the step's first indexer layer before its one host read.

vLLM describes a prefill chunk by ``cu_seq_lens`` (int [R + 1], the requests' keys packed end
to end) and, per query, ``cu_seqlen_ks`` / ``cu_seqlen_ke`` (its window in that packing). The
plugins gather the keys request-aligned instead (each request starting at a multiple of B,
:mod:`hisa.cache.gather`), so each window moves to its request's aligned start:

* ``_layout_kernel`` (one program): each request's key count and aligned start (a running sum
  of the counts rounded up to B, tile by tile), and a zeroed bad-page flag for the gather.
* ``_windows_kernel`` (one program per ``WINDOW_ROWS`` queries): each query's request by a
  binary search over ``cu_seq_lens`` (the requests ending at or before its ``ks``), then
  ``[start, start + ke - ks)``; a window is turned the wrong way round (``ks = ke + 1``) when
  the gather raised the bad-page flag or the query's ``ks`` lies past the last request (read
  at the last request's start), so the window read of the indexer op fails and the caller
  names the page (or the windows).

The first layer of a step waits for these at its window read while the host launches them:
each small torch kernel there is host time the GPU idles for (an H200 profile of the vLLM
prefill plugin, tests/gpu/profile_vllm_prefill.py, found its longest idle gaps there; how much
of its 9 % over the direct ops these two launches recover is not yet measured). Negative key counts (inconsistent metadata)
count as empty, as in the torch twin.

Twins: :func:`hisa.integrations._engine_common.request_layout` and
:func:`hisa.integrations._engine_common.prefill_windows` over
:func:`hisa.integrations.vllm.chunk_requests`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gather import SEARCH_STEPS

#: Requests per step of the layout's running sum.
LAYOUT_TILE = 1024
#: Queries per program of the window kernel.
WINDOW_ROWS = 256


@triton.jit(do_not_specialize=["R"])
def _layout_kernel(cu_ptr, lens_ptr, starts_ptr, bad_ptr, R, B: tl.constexpr,
                   TILE: tl.constexpr):
    carry = tl.zeros([], dtype=tl.int64)
    for r0 in range(0, R, TILE):
        r = r0 + tl.arange(0, TILE)
        m = r < R
        n = (tl.load(cu_ptr + r + 1, mask=m, other=0).to(tl.int64)
             - tl.load(cu_ptr + r, mask=m, other=0).to(tl.int64))
        n = tl.maximum(n, 0)
        padded = (n + B - 1) // B * B
        tl.store(lens_ptr + r, n.to(tl.int32), mask=m)
        tl.store(starts_ptr + r, (carry + tl.cumsum(padded, axis=0) - padded).to(tl.int32),
                 mask=m)
        carry += tl.sum(padded, axis=0)
    tl.store(bad_ptr, 0)


@triton.jit(do_not_specialize=["R", "T"])
def _windows_kernel(cu_ptr, cks_ptr, cke_ptr, starts_ptr, bad_ptr, ks_ptr, ke_ptr, R, T,
                    ROWS: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    live = t < T
    cks = tl.load(cks_ptr + t, mask=live, other=0).to(tl.int64)
    cke = tl.load(cke_ptr + t, mask=live, other=0).to(tl.int64)
    # Requests ending at or before ks: the number of r in [1, R] with cu[r] <= ks.
    lo = tl.zeros([ROWS], dtype=tl.int64)
    hi = tl.zeros([ROWS], dtype=tl.int64) + R
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        searching = lo < hi
        end = tl.load(cu_ptr + mid + 1, mask=searching & (mid < R), other=0).to(tl.int64)
        go_right = searching & (end <= cks)
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(searching & ~go_right, mid, hi)
    known = lo < R
    # Past the last request: that request's start (the torch twin clamps alike), poisoned.
    start = tl.load(starts_ptr + tl.minimum(lo, R - 1), mask=live & (R > 0),
                    other=0).to(tl.int64)
    ke = start + (cke - cks)
    poisoned = (tl.load(bad_ptr) != 0) | ~known
    tl.store(ks_ptr + t, tl.where(poisoned, ke + 1, start).to(tl.int32), mask=live)
    tl.store(ke_ptr + t, ke.to(tl.int32), mask=live)


def chunk_layout_triton(cu_seq_lens: torch.Tensor, block_size: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lens int32 [R], aligned starts int32 [R], bad-page flag uint8 0-d zeroed) of the chunk's
    R = ``cu_seq_lens.numel() - 1`` requests; the caller has checked that the aligned buffer's
    size fits int32."""
    R = cu_seq_lens.shape[0] - 1
    dev = cu_seq_lens.device
    lens = torch.empty(R, dtype=torch.int32, device=dev)
    starts = torch.empty(R, dtype=torch.int32, device=dev)
    bad = torch.empty((), dtype=torch.uint8, device=dev)
    _layout_kernel[(1,)](cu_seq_lens.contiguous(), lens, starts, bad, R, B=block_size,
                         TILE=LAYOUT_TILE)
    return lens, starts, bad


def chunk_windows_triton(cu_seq_lens: torch.Tensor, cu_seqlen_ks: torch.Tensor,
                         cu_seqlen_ke: torch.Tensor, starts: torch.Tensor,
                         bad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ks, ke) int32 [T]: each query's window over the request-aligned keys, poisoned
    (``ks = ke + 1``) when ``bad`` (the gather's flag, 0-d bool or uint8; None: no flag) is set
    or the query's ``ks`` lies past the last request."""
    T = cu_seqlen_ks.shape[0]
    R = cu_seq_lens.shape[0] - 1
    if starts.shape[0] != R:
        raise ValueError(f"starts: expected one start per request of cu_seq_lens ({R}), got "
                         f"{starts.shape[0]} (keys gathered for another chunk's requests?)")
    dev = cu_seqlen_ks.device
    if bad is None:
        bad = torch.zeros((), dtype=torch.uint8, device=dev)
    ks = torch.empty(T, dtype=torch.int32, device=dev)
    ke = torch.empty(T, dtype=torch.int32, device=dev)
    if T:
        _windows_kernel[(triton.cdiv(T, WINDOW_ROWS),)](
            cu_seq_lens.contiguous(), cu_seqlen_ks.contiguous(), cu_seqlen_ke.contiguous(),
            starts, bad.view(torch.uint8), ks, ke, R, T, ROWS=WINDOW_ROWS,
            SEARCH_STEPS=SEARCH_STEPS)
    return ks, ke
