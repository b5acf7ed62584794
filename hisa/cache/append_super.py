"""Super-block pooling at append time (Triton): the third launch of a cache append.

``_pool_super_kernel``, one program per appended token: if the token completes a super-block
(``(position + 1) % (Bs * B) == 0``) and the append wrote it (a valid slot, and the last token
of the call naming that slot: :mod:`hisa.cache.append`'s duplicate rule), it reads the
super-block's ``Bs`` block rows from the pooled cache (the pages holding each block's last 64
tokens, through ``block_table[req_indices[t]]``; the last one is the token's own page, whose
block row the block-pooling launch before this one has just written), averages them dequantized
in fp32, quantizes the mean (DeepSeek's recipe, plain scale) and writes the super-block row of
that page (:mod:`hisa.cache.layout`). Other programs exit at once. Reading ``Bs`` rows of
D + 4 bytes instead of the ``Bs * B`` keys keeps the step that completes a super-block as cheap
as any other decode step. No host sync.

The row gets the *unknown* sentinel (zero values, NaN scale) instead of a mean when the
super-block cannot be read consistently, by the block level's rules: the slot is not its page's
last token, the token's block-table row or a needed column is outside the table, a block page
is outside the cache, or the table's page for the last block is not the slot's page (page reuse
with a stale table); and when any of its block rows has a non-finite scale (an unknown block
row, or a block pooled from a NaN or infinite key). Nothing is read out of bounds, and a super
row never describes another request's keys.

Twin: the super-block pass of :func:`hisa.cache.paged.naive_cache_append` (which raises
ValueError for the inconsistent inputs); the fp32 sum runs in another order, so a value may
differ by one FP8 step at a rounding boundary.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils.sizes import next_pow2
from .append import _store_pooled_row
from .layout import PAGE_SIZE


@triton.jit
def _pool_super_kernel(pos_ptr, slot_ptr, win_ptr, req_ptr, bt_ptr, pl8_ptr, pl32_ptr, sp8_ptr,
                       sp32_ptr, num_pages, stride_bt, max_rows, max_cols,
                       D: tl.constexpr, B: tl.constexpr, BS: tl.constexpr,
                       BS_PAD: tl.constexpr, PAGE: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    last = slot // PAGE
    SPAN: tl.constexpr = B * BS
    # The token completes a super-block and was written (valid slot, not a duplicate's loser).
    done = (pos >= 0) & ((pos + 1) % SPAN == 0) & (tl.load(win_ptr + t) != 0)
    if done:
        PPB: tl.constexpr = B // PAGE
        d = tl.arange(0, D)
        i = tl.arange(0, BS_PAD)
        req = tl.load(req_ptr + t).to(tl.int64)
        row_ok = (req >= 0) & (req < max_rows)
        col = ((pos // SPAN) * BS + i + 1) * PPB - 1                       # int64 [BS_PAD]
        use = (i < BS) & row_ok & (col < max_cols)
        page = tl.load(bt_ptr + req * stride_bt + col, mask=use, other=-1).to(tl.int64)
        page_ok = (page >= 0) & (page < num_pages)
        base = tl.where(page_ok, page, 0) * (D + 4)
        x = tl.load(pl8_ptr + base[:, None] + d[None, :], mask=page_ok[:, None],
                    other=0.0).to(tl.float32)                                   # [BS_PAD, D]
        s = tl.load(pl32_ptr + base // 4 + D // 4, mask=page_ok, other=0.0)    # [BS_PAD]
        # Readable: every block row on a page of the cache with a finite scale, and the table's
        # page for the last block is the slot's own (a stale table names another).
        good = page_ok & (tl.abs(s) < float("inf"))
        bad = tl.sum(((i < BS) & ~good).to(tl.int32), axis=0)
        named = tl.sum(tl.where(i == BS - 1, page, 0), axis=0)
        ok = (bad == 0) & (named == last) & (slot % PAGE == PAGE - 1)
        mean = tl.sum(x * s[:, None], axis=0) / BS        # every block is full: equal weights
        _store_pooled_row(sp8_ptr, sp32_ptr, last, mean, ok, d, D)


def pool_super_rows(pooled_cache: torch.Tensor, super_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, positions: torch.Tensor,
                    block_table: torch.Tensor, req_indices: torch.Tensor, *, num_pages: int,
                    block_size: int, super_size: int, written: torch.Tensor) -> None:
    """Pool the super-blocks completed by an append (validated inputs, blocks already pooled).

    ``written``: int8 [T], nonzero for the tokens the append wrote (``cache_append``'s winners:
    valid slots, the last token of the call for a duplicated slot).
    """
    T = slot_mapping.shape[0]
    D = pooled_cache.shape[1] - 4
    if T == 0:
        return
    if block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    _pool_super_kernel[(T,)](
        positions.contiguous(), slot_mapping.contiguous(), written, req_indices.contiguous(),
        block_table, pooled_cache.view(torch.float8_e4m3fn), pooled_cache.view(torch.float32),
        super_cache.view(torch.float8_e4m3fn), super_cache.view(torch.float32), num_pages,
        block_table.stride(0), block_table.shape[0], block_table.shape[1], D=D, B=block_size,
        BS=super_size, BS_PAD=next_pow2(super_size), PAGE=PAGE_SIZE, num_warps=4)
