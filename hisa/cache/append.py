"""Cache append in Triton: quantize + write through the slot mapping, then pool completed blocks.

Two launches (the second reads keys the first wrote, possibly from other programs), and a third
for the super-block level (:mod:`hisa.cache.append_super`, which follows the same rules):

* ``_append_kernel``, one program per TOKENS tokens: DeepSeek FP8 quantization of each key
  (scale = max(amax, 1e-4) / 448, ue8m0 rounding by exponent bits, values cast with
  round-to-nearest-even, as :func:`hisa.quantize_fp8`; a NaN anywhere in a key gives a NaN
  scale and e4m3 NaN values, as there), stored at ``slot`` in the page's SoA layout. Slots
  outside [0, num_pages * 64) are skipped. **Duplicate slots** (a caller bug the torch path
  rejects): the last token of the call that names a slot wins, deterministically; the others
  are neither written nor pooled. Up to :data:`APPEND_SCAN_MAX_TOKENS` tokens (decode batches)
  each program compares its tokens' slots with every later token's, inside the one launch;
  longer calls (prefill chunks) find the later duplicates with a stable sort of the slots
  first (O(T log T), a few more launches). No host sync either way.
* ``_pool_kernel``, one program per token: if the token completes a block
  (``(position + 1) % B == 0``), it averages the block's B dequantized keys (earlier pages from
  ``block_table[req_indices[t]]``, the last page from the slot), quantizes the mean and writes
  the pooled row of that last page. Other programs exit at once. When the block cannot be read
  consistently (the slot is not the page's last token, a page id outside the cache, a row or
  column outside the block table, or a table whose last page for the block is not the slot's
  page), the row gets the *unknown* sentinel of :mod:`hisa.cache.layout` instead, so it never
  keeps a previous owner's value; nothing is read out of bounds.

Twin: :func:`hisa.cache.paged.naive_cache_append`. The fp32 block sum runs in a different order
than the twin's, so a pooled FP8 value may differ by one unit in the last place.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import PAGE_SIZE

#: Tokens quantized per append program.
APPEND_TOKENS = 16
#: Later slots compared per step of the duplicate-slot scan.
APPEND_SCAN = 256
#: Calls up to this many tokens find duplicate slots inside the append kernel (T^2 / 2
#: compares); longer ones sort the slots first.
APPEND_SCAN_MAX_TOKENS = 2048
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4


@triton.jit
def _nan_amax(x, axis: tl.constexpr):
    """max |x| along ``axis``, NaN when any entry is NaN (torch's ``amax``; ``tl.max`` drops
    NaN)."""
    amax = tl.max(tl.abs(x), axis=axis)
    has_nan = tl.max((x != x).to(tl.int32), axis=axis) > 0
    return tl.where(has_nan, float("nan"), amax)


@triton.jit
def _fp8_scale(amax, UE8M0: tl.constexpr):
    """DeepSeek's scale from a group's amax; ue8m0 rounds up to a power of two exactly. A NaN
    amax gives a NaN scale, an infinite one an infinite scale (as :func:`hisa.quantize_fp8`)."""
    scale = tl.maximum(amax, 1e-4, propagate_nan=tl.PropagateNan.ALL) / 448.0
    if UE8M0:
        bits = scale.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFFFF) & 0x7F800000
        scale = tl.where(scale == scale, bits.to(tl.float32, bitcast=True), scale)
    return scale


@triton.jit
def _clamp_e4m3(y):
    """Clamp to the e4m3 range [-448, 448]; NaN stays NaN, made positive (one byte, 0x7F)."""
    y = tl.minimum(tl.maximum(y, -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0,
                   propagate_nan=tl.PropagateNan.ALL)
    return tl.where(y == y, y, float("nan"))


@triton.jit
def _to_e4m3(y):
    """fp32 in [-448, 448] -> float8e4nv with round-to-nearest-even, done on the e4m3 grid in
    fp32 first so the final cast is exact. (Triton 3.6's interpreter drops the carry of a
    rounding that bumps the exponent, 125.0 -> 64.0; hardware casts agree with this path.)
    NaN passes through to the cast (the e4m3 NaN)."""
    bits = y.to(tl.uint32, bitcast=True)
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & 0xFFF00000).to(tl.float32, bitcast=True)
    magic = 24576.0                                   # 1.5 * 2**14: fp32 ulp there is 2**-9
    sub = (tl.abs(y) + magic) - magic                 # subnormal grid of e4m3: multiples of 2**-9
    sub = (sub.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)
    return tl.where(y == y, tl.where(tl.abs(y) < 0.015625, sub, normal), y).to(tl.float8e4nv)


@triton.jit
def _store_pooled_row(p8_ptr, p32_ptr, page, mean, ok, d, D: tl.constexpr):
    """Write ``mean`` [D] as the pooled row of ``page`` (its FP8 values, then its fp32 scale):
    re-quantized with its own scale where ``ok``, else the unknown sentinel (zero values, NaN
    scale) for a row that could not be read. Shared by the block and super-block appends."""
    scale = _fp8_scale(_nan_amax(mean, 0), False)
    vals = _to_e4m3(tl.where(ok, _clamp_e4m3(mean / scale), 0.0))
    row = page.to(tl.int64) * (D + 4)
    tl.store(p8_ptr + row + d, vals)
    tl.store(p32_ptr + row // 4 + D // 4, tl.where(ok, scale, float("nan")))


@triton.jit
def _append_kernel(k_ptr, ksc_ptr, slot_ptr, kv8_ptr, kv32_ptr, win_ptr, later_ptr, T,
                   num_pages, D: tl.constexpr, TOK: tl.constexpr, PAGE: tl.constexpr,
                   SCAN: tl.constexpr, SCAN_IN_KERNEL: tl.constexpr, IS_FP8: tl.constexpr,
                   UE8M0: tl.constexpr):
    t = tl.program_id(0) * TOK + tl.arange(0, TOK)
    d = tl.arange(0, D)
    tmask = t < T
    slot = tl.load(slot_ptr + t, mask=tmask, other=-1).to(tl.int64)
    ok = tmask & (slot >= 0) & (slot // PAGE < num_pages)
    # Last writer wins: skip a token when a later token of the call has the same slot.
    if SCAN_IN_KERNEL:
        later = tl.zeros([TOK], dtype=tl.int32)
        for c in range(tl.program_id(0) * TOK, T, SCAN):
            j = c + tl.arange(0, SCAN)
            sj = tl.load(slot_ptr + j, mask=j < T, other=-1).to(tl.int64)
            hit = (sj[None, :] == slot[:, None]) & (j[None, :] > t[:, None]) & (j < T)[None, :]
            later = tl.maximum(later, tl.max(hit.to(tl.int32), axis=1))
    else:
        later = tl.load(later_ptr + t, mask=tmask, other=0).to(tl.int32)
    ok = ok & (later == 0)
    tl.store(win_ptr + t, ok.to(tl.int8), mask=tmask)
    x = tl.load(k_ptr + t.to(tl.int64)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    if IS_FP8:
        vals = x
        scale = tl.load(ksc_ptr + t, mask=ok, other=1.0)
    else:
        xf = x.to(tl.float32)
        scale = _fp8_scale(_nan_amax(xf, 1), UE8M0)                                # [TOK]
        vals = _to_e4m3(_clamp_e4m3(xf / scale[:, None]))
    page = slot // PAGE
    off = slot % PAGE
    base = page * (PAGE * (D + 4))
    tl.store(kv8_ptr + base[:, None] + off[:, None] * D + d[None, :], vals, mask=ok[:, None])
    tl.store(kv32_ptr + base // 4 + (PAGE * D) // 4 + off, scale, mask=ok)


@triton.jit
def _pool_kernel(pos_ptr, slot_ptr, win_ptr, req_ptr, bt_ptr, kv8_ptr, kv32_ptr, pl8_ptr,
                 pl32_ptr, num_pages, stride_bt, max_rows, max_cols,
                 D: tl.constexpr, B: tl.constexpr, PAGE: tl.constexpr,
                 HAS_TABLE: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    last = slot // PAGE
    # The token completes a block and was written (valid slot, not a duplicate's loser).
    done = (pos >= 0) & ((pos + 1) % B == 0) & (tl.load(win_ptr + t) != 0)
    if done:
        PPB: tl.constexpr = B // PAGE
        d = tl.arange(0, D)
        tk = tl.arange(0, PAGE)
        acc = tl.zeros([D], dtype=tl.float32)
        ok = slot % PAGE == PAGE - 1
        blk = pos // B
        if HAS_TABLE:
            req = tl.load(req_ptr + t).to(tl.int64)
            row_ok = (req >= 0) & (req < max_rows)
            col = (blk + 1) * PPB - 1
            named = tl.load(bt_ptr + req * stride_bt + col, mask=row_ok & (col < max_cols),
                            other=-1).to(tl.int64)
            ok = ok & (named == last)
        for p in tl.static_range(PPB):
            if p == PPB - 1:
                page = last
            else:
                if HAS_TABLE:
                    col = blk * PPB + p
                    page = tl.load(bt_ptr + req * stride_bt + col,
                                   mask=row_ok & (col < max_cols), other=-1).to(tl.int64)
                else:
                    page = tl.full([], -1, tl.int64)
            page_ok = (page >= 0) & (page < num_pages)
            ok = ok & page_ok
            base = tl.where(page_ok, page, 0) * (PAGE * (D + 4))
            kb = tl.load(kv8_ptr + base + tk[:, None] * D + d[None, :], mask=page_ok,
                         other=0.0).to(tl.float32)
            ks = tl.load(kv32_ptr + base // 4 + (PAGE * D) // 4 + tk, mask=page_ok, other=0.0)
            acc += tl.sum(kb * ks[:, None], axis=0)
        mean = acc / B
        _store_pooled_row(pl8_ptr, pl32_ptr, last, mean, ok, d, D)


def later_duplicates(slots: torch.Tensor) -> torch.Tensor:
    """int8 [T]: 1 where a later token of the call has the same slot (a stable sort keeps
    equal slots in call order, so each but the last of a run has a later twin)."""
    order = torch.argsort(slots.long(), stable=True)
    ss = slots.long()[order]
    later = torch.zeros(slots.shape[0], dtype=torch.int8, device=slots.device)
    later[order[:-1]] = (ss[1:] == ss[:-1]).to(torch.int8)
    return later


def cache_append(pages: torch.Tensor, pooled_cache: torch.Tensor | None, k: torch.Tensor,
                 slot_mapping: torch.Tensor, positions: torch.Tensor, *,
                 k_scale: torch.Tensor | None, block_table: torch.Tensor | None,
                 req_indices: torch.Tensor | None, block_size: int, ue8m0: bool,
                 super_cache: torch.Tensor | None = None, super_size: int | None = None
                 ) -> None:
    """Triton twin of :func:`hisa.cache.paged.naive_cache_append` (validated inputs): two
    launches, a third (:mod:`hisa.cache.append_super`) with the super-block level."""
    T, D = k.shape
    if T == 0:
        return
    kv8, kv32 = pages.view(torch.float8_e4m3fn), pages.view(torch.float32)
    is_fp8 = k.dtype == torch.float8_e4m3fn
    slots = slot_mapping.contiguous()
    written = torch.empty(T, dtype=torch.int8, device=k.device)   # 1: token written (winner)
    scan = T <= APPEND_SCAN_MAX_TOKENS
    later = written if scan else later_duplicates(slots)
    _append_kernel[(triton.cdiv(T, APPEND_TOKENS),)](
        k.contiguous(), k_scale.contiguous() if is_fp8 else kv32, slots, kv8, kv32, written,
        later, T, pages.shape[0], D=D, TOK=APPEND_TOKENS, PAGE=PAGE_SIZE, SCAN=APPEND_SCAN,
        SCAN_IN_KERNEL=scan, IS_FP8=is_fp8, UE8M0=ue8m0, num_warps=4)
    if pooled_cache is None:
        return
    has_table = block_table is not None and req_indices is not None
    if has_table and block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    bt = block_table if has_table else slots
    _pool_kernel[(T,)](
        positions.contiguous(), slots, written,
        req_indices.contiguous() if has_table else slots, bt,
        kv8, kv32, pooled_cache.view(torch.float8_e4m3fn), pooled_cache.view(torch.float32),
        pages.shape[0], bt.stride(0) if has_table else 0, bt.shape[0] if has_table else 0,
        bt.shape[1] if has_table else 0, D=D, B=block_size, PAGE=PAGE_SIZE,
        HAS_TABLE=has_table, num_warps=4)
    if super_cache is not None:
        from .append_super import pool_super_rows
        pool_super_rows(pooled_cache, super_cache, slots, positions, block_table, req_indices,
                        num_pages=pages.shape[0], block_size=block_size, super_size=super_size,
                        written=written)
