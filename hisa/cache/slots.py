"""Positions in a request -> the engine's KV slots (or ragged offsets), in one Triton launch.

SGLang's fused top-k returns KV slots, not positions: for row i, position p becomes
``table[row_i, p // 64] * 64 + p % 64`` (PAGED) or ``p + offset[i]`` (RAGGED); -1 stays -1.
With torch ops that is 10 small kernels per call (pinned in
tests/interpret/test_slot_transform.py), and the SGLang decode hook makes the
call once per layer inside the CUDA graph, where each small kernel costs its launch slot. One
program per (row, tile of K) here does all of it. int32 throughout: the engine's own top-k
writes int32 slots from an int32 page table, so every slot it can address fits.

Twin: the torch ops of :func:`hisa.integrations.sglang.transform_output` (``backend="torch"``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils.backend import runs_on_device_of
from .layout import PAGE_SIZE

#: Entries of a row per program.
SLOTS_BLOCK = 512


@triton.jit(do_not_specialize=["K", "local_stride", "table_stride_r", "W"])
def _slots_kernel(local_ptr, local_stride, K, table_ptr, table_stride_r, table_stride_c, W,
                  rows_ptr, offset_ptr, out_ptr, RAGGED: tl.constexpr, HAS_ROWS: tl.constexpr,
                  PAGE: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = c < K
    pos = tl.load(local_ptr + r * local_stride + c, mask=inside, other=-1)
    valid = inside & (pos >= 0)
    if RAGGED:
        slot = pos + tl.load(offset_ptr + r)
    else:
        if HAS_ROWS:
            trow = tl.load(rows_ptr + r).to(tl.int64)
        else:
            trow = r
        col = pos // PAGE
        # A position past the row's table is never selected (the selection read the same
        # table); it is masked so nothing is read out of bounds, and comes back -1.
        ok = valid & (col < W)
        page = tl.load(table_ptr + trow * table_stride_r + col.to(tl.int64) * table_stride_c,
                       mask=ok, other=-1)
        valid = ok
        slot = page * PAGE + pos % PAGE
    tl.store(out_ptr + r * K + c, tl.where(valid, slot, -1).to(tl.int32), mask=inside)


@runs_on_device_of("local")
def positions_to_slots(local: torch.Tensor, *, table: torch.Tensor | None = None,
                       rows: torch.Tensor | None = None,
                       offset: torch.Tensor | None = None) -> torch.Tensor:
    """int32 [R, K]: ``local`` int32 [R, K] positions (-1 padded) mapped through ``table`` int32
    [*, W] (PAGED; row i reads table row ``rows[i]``, or i when ``rows`` is None) or shifted by
    ``offset`` int32 [R] (RAGGED, when ``table`` is None)."""
    R, K = local.shape
    out = torch.empty(R, K, dtype=torch.int32, device=local.device)
    if R == 0 or K == 0:
        return out
    ragged = table is None
    if local.stride(1) != 1:
        local = local.contiguous()
    rows = None if rows is None else rows.contiguous()          # no-ops when already so
    offset = None if offset is None else offset.contiguous()
    dummy = out
    grid = (R, triton.cdiv(K, SLOTS_BLOCK))
    _slots_kernel[grid](local, local.stride(0), K,
                        dummy if ragged else table, 0 if ragged else table.stride(0),
                        0 if ragged else table.stride(1), 0 if ragged else table.shape[1],
                        dummy if rows is None else rows, dummy if offset is None else offset,
                        out, RAGGED=ragged, HAS_ROWS=rows is not None, PAGE=PAGE_SIZE,
                        BLOCK=SLOTS_BLOCK)
    return out
