"""Request-aligned key gather in Triton: R requests' keys from the paged cache into one buffer,
each request starting at a multiple of B, in a single launch.

The engine plugins gather a prefill chunk's keys before every indexer call. Done with torch
ops it is 36 small kernels (request and position of each key, its page, the bad-page test, two
index-puts, the zero and one fills; counted by :mod:`hisa.testing.launches`, pinned in
tests/interpret/test_request_gather.py), each a host launch made while the GPU waits for the
indexer op's window read: the likely bulk of the vLLM prefill plugin's 34.7 % over the direct
ops on an H200 (not yet profiled there: tests/gpu/profile_vllm_prefill.py). Here one program per ``ROWS`` output rows finds each row's
request by a binary search over the request starts, reads the row's page from the block table
and copies the key's D bytes and its scale, or writes a zero key with scale 1 for the rows
between requests (which no window covers). A page outside ``[0, num_pages)`` is clamped into
it (read, never out of bounds, as the torch twin does), and a key past its request's table
row (more keys than W columns hold) reads no table entry; either raises the bad-page flag: the caller names the page later,
off the hot path.

Twin: the torch path of :func:`hisa.integrations._engine_common.gather_request_keys`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import PAGE_SIZE

#: Output rows per program.
GATHER_ROWS = 64
#: Steps of the request search: enough for any R < 2**31 (a fixed count, masked once a lane
#: has converged, so the request count never selects a new compiled kernel).
SEARCH_STEPS = 31


# The sizes change with every prefill step of a server: not specialized on (no recompile for
# a batch whose request count or key count happens to be 1 or a multiple of 16).
@triton.jit(do_not_specialize=["table_stride_r", "R", "W", "size", "num_pages"])
def _gather_kernel(values_ptr, scales_ptr, page_stride, scale_page_stride, table_ptr,
                   table_stride_r, table_stride_c, lens_ptr, starts_ptr, R, W, size, num_pages,
                   k_ptr, k_scale_ptr, bad_ptr, D: tl.constexpr, ROWS: tl.constexpr,
                   SEARCH_STEPS: tl.constexpr, PAGE: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)   # [ROWS]
    live = rows < size
    # Request of each row: the last r with starts[r] <= row (upper bound, minus one). Empty
    # requests share their start with the next one, so the search lands on the later one.
    lo = tl.zeros([ROWS], dtype=tl.int64)
    hi = tl.zeros([ROWS], dtype=tl.int64) + R
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        searching = lo < hi
        s = tl.load(starts_ptr + mid, mask=searching & (mid < R), other=0)
        go_right = searching & (s <= rows)
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(searching & ~go_right, mid, hi)
    req = tl.maximum(lo - 1, 0)
    pos = rows - tl.load(starts_ptr + req, mask=live, other=0).to(tl.int64)
    length = tl.load(lens_ptr + req, mask=live, other=0).to(tl.int64)
    is_key = live & (pos >= 0) & (pos < length)
    col = pos // PAGE
    in_table = col < W                  # a request longer than its table row: flagged, unread
    page = tl.load(table_ptr + req * table_stride_r + col * table_stride_c,
                   mask=is_key & in_table, other=-1).to(tl.int64)
    bad = is_key & ((page < 0) | (page >= num_pages))
    tl.store(bad_ptr, 1, mask=tl.max(bad.to(tl.int32), axis=0) > 0)
    page = tl.minimum(tl.maximum(page, 0), num_pages - 1)          # as the torch twin clamps
    slot = pos % PAGE
    d = tl.arange(0, D).to(tl.int64)
    src = values_ptr + (page * page_stride + slot * D)[:, None] + d[None, :]
    key = tl.load(src, mask=is_key[:, None], other=0)
    tl.store(k_ptr + (rows * D)[:, None] + d[None, :], key, mask=live[:, None])
    scale = tl.load(scales_ptr + page * scale_page_stride + slot, mask=is_key, other=1.0)
    tl.store(k_scale_ptr + rows, scale, mask=live)


def gather_request_keys_triton(values: torch.Tensor, scales: torch.Tensor,
                               block_table: torch.Tensor, lens: torch.Tensor,
                               starts: torch.Tensor, size: int, bad: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k uint8 [size, D], k_scale fp32 [size], bad 0-d bool) of the gather described above.

    Args:
        values: uint8 [P, 64, D] page values with unit strides inside a page (a view of the
            engine's pages, :func:`hisa.cache.layout.page_views`); scales: fp32 [P, 64], the
            same pages' scales, unit stride inside a page.
        block_table: int32 [R, W]; lens: int32 [R] keys per request; starts: int32 [R] each
            request's first row (non-decreasing, ``starts[r] + lens[r] <= starts[r + 1]``).
        size: rows of the buffer; rows past the last request are zero keys too.
        bad: a uint8 0-d flag to raise (zeroed by the caller, :mod:`.chunk_windows`'s layout
            launch; it is only ever set), instead of a fresh zeroed one.
    """
    P, page, D = values.shape
    if page != PAGE_SIZE or values.stride(1) != D or values.stride(2) != 1:
        raise ValueError("values: expected [P, 64, D] with unit strides inside a page")
    if scales.stride(-1) != 1:
        raise ValueError("scales: expected unit stride inside a page")
    R = block_table.shape[0]
    dev = values.device
    k = torch.empty(size, D, dtype=torch.uint8, device=dev)
    k_scale = torch.empty(size, dtype=torch.float32, device=dev)
    bad = torch.zeros((), dtype=torch.uint8, device=dev) if bad is None else bad.view(torch.uint8)
    if size == 0:
        return k, k_scale, bad.view(torch.bool)
    grid = (triton.cdiv(size, GATHER_ROWS),)
    _gather_kernel[grid](values, scales, values.stride(0), scales.stride(0), block_table,
                         block_table.stride(0), block_table.stride(1), lens, starts, R,
                         block_table.shape[1], size, P, k, k_scale, bad, D=D, ROWS=GATHER_ROWS,
                         SEARCH_STEPS=SEARCH_STEPS, PAGE=PAGE_SIZE)
    return k, k_scale, bad.view(torch.bool)
