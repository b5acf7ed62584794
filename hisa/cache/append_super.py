"""Super-block pooling at append time (Triton): the third launch of a cache append.

``_pool_super_kernel``, one program per appended token: if the token completes a super-block
(``(position + 1) % (Bs * B) == 0``, slot offset 63), it reads the super-block's ``Bs`` block
rows from the pooled cache (the pages holding each block's last 64 tokens, through
``block_table[req_indices[t]]``; the last one is the token's own page, whose block row the
block-pooling launch before this one has just written), averages them dequantized in fp32,
quantizes the mean (DeepSeek's recipe, plain scale) and writes the super-block row of that
page (:mod:`hisa.cache.layout`). Other programs exit at once. Reading ``Bs`` rows of D + 4
bytes instead of the ``Bs * B`` keys keeps the step that completes a super-block as cheap as
any other decode step. Inconsistent inputs (a page id outside the cache, a block-table column
past the table) skip the super-block instead of reading out of bounds. No host sync.

Twin: the super-block pass of :func:`hisa.cache.paged.naive_cache_append`; the fp32 sum runs in
another order, so a value may differ by one FP8 step at a rounding boundary.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .append import _fp8_scale, _to_e4m3
from .layout import PAGE_SIZE


@triton.jit
def _pool_super_kernel(pos_ptr, slot_ptr, req_ptr, bt_ptr, pl8_ptr, pl32_ptr, sp8_ptr, sp32_ptr,
                       num_pages, stride_bt, max_cols,
                       D: tl.constexpr, B: tl.constexpr, BS: tl.constexpr,
                       BS_PAD: tl.constexpr, PAGE: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    last = slot // PAGE
    SPAN: tl.constexpr = B * BS
    done = (pos >= 0) & ((pos + 1) % SPAN == 0) & (slot >= 0) & (last < num_pages) & \
        (slot % PAGE == PAGE - 1)
    if done:
        PPB: tl.constexpr = B // PAGE
        d = tl.arange(0, D)
        i = tl.arange(0, BS_PAD)
        req = tl.load(req_ptr + t).to(tl.int64)
        col = ((pos // SPAN) * BS + i + 1) * PPB - 1                       # int64 [BS_PAD]
        use = (i < BS) & (col < max_cols)
        page = tl.load(bt_ptr + req * stride_bt + col, mask=use, other=-1).to(tl.int64)
        page = tl.where(i == BS - 1, last, page)        # the last block ends in the slot's page
        ok = (i < BS) & (page >= 0) & (page < num_pages)
        all_ok = tl.sum(((i < BS) & ~ok).to(tl.int32), axis=0) == 0
        base = tl.where(ok, page, 0) * (D + 4)
        x = tl.load(pl8_ptr + base[:, None] + d[None, :], mask=ok[:, None],
                    other=0.0).to(tl.float32)                                   # [BS_PAD, D]
        s = tl.load(pl32_ptr + base // 4 + D // 4, mask=ok, other=0.0)
        mean = tl.sum(x * s[:, None], axis=0) / BS        # every block is full: equal weights
        scale = _fp8_scale(tl.max(tl.abs(mean), axis=0), False)
        vals = _to_e4m3(tl.minimum(tl.maximum(mean / scale, -448.0), 448.0))
        row = last * (D + 4)
        tl.store(sp8_ptr + row + d, vals, mask=all_ok)
        tl.store(sp32_ptr + row // 4 + D // 4, scale, mask=all_ok)


def pool_super_rows(pooled_cache: torch.Tensor, super_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, positions: torch.Tensor,
                    block_table: torch.Tensor, req_indices: torch.Tensor, *, num_pages: int,
                    block_size: int, super_size: int) -> None:
    """Pool the super-blocks completed by an append (validated inputs, blocks already pooled)."""
    T = slot_mapping.shape[0]
    D = pooled_cache.shape[1] - 4
    if T == 0:
        return
    _pool_super_kernel[(T,)](
        positions.contiguous(), slot_mapping.contiguous(), req_indices.contiguous(),
        block_table, pooled_cache.view(torch.float8_e4m3fn), pooled_cache.view(torch.float32),
        super_cache.view(torch.float8_e4m3fn), super_cache.view(torch.float32), num_pages,
        block_table.stride(0), block_table.shape[1], D=D, B=block_size, BS=super_size,
        BS_PAD=triton.next_power_of_2(super_size), PAGE=PAGE_SIZE, num_warps=4)
