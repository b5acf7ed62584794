"""Stage 0: block mean-pooling of the key buffer (Triton).

Block b holds key positions [b*B, min((b+1)*B, S)). Its representative is the fp32 mean of the
dequantized keys over the tokens it actually holds, stored as bf16 or fp32 (no scale), or
re-quantized to e4m3 with its own scale, ``max(amax, 1e-4) / 448`` (the activation recipe of
:mod:`hisa.utils.quant`). The prefill pipeline stores them as fp32 (:mod:`.reps`); the paged
cache stores them as FP8.
Twin: :func:`hisa.ops.indexer.naive.naive_pool_blocks`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...cache.append import _clamp_e4m3, _nan_amax
from ...utils.quant import AMAX_FLOOR, FP8_MAX
from ...utils.validate import FP8_DTYPE

#: Key rows summed per iteration of the pooling loop.
POOL_CHUNK = 32


def check_block_size(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size: expected a power of two >= 16 for the Triton kernels, "
                         f"got {block_size}")


@triton.jit
def _pool_blocks_kernel(k_ptr, k_scale_ptr, out_ptr, out_scale_ptr, S, first_block,
                        B: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
                        HAS_SCALE: tl.constexpr, QUANT: tl.constexpr,
                        AMAX_MIN: tl.constexpr, QMAX: tl.constexpr):
    b = (first_block + tl.program_id(0)).to(tl.int64)   # int64: b * B * D passes 2**31
    d = tl.arange(0, D)
    acc = tl.zeros([D], dtype=tl.float32)
    for c in tl.static_range(0, B, CHUNK):
        pos = b * B + c + tl.arange(0, CHUNK)
        m = pos < S
        x = tl.load(k_ptr + pos[:, None] * D + d[None, :], mask=m[:, None], other=0.0)
        x = x.to(tl.float32)                                                      # [CHUNK, D]
        if HAS_SCALE:
            x = x * tl.load(k_scale_ptr + pos, mask=m, other=0.0)[:, None]
        acc += tl.sum(x, axis=0)
    count = tl.minimum(S - b * B, B).to(tl.float32)
    mean = acc / count                                                            # [D]
    if QUANT:
        scale = tl.maximum(_nan_amax(mean, 0), AMAX_MIN, propagate_nan=tl.PropagateNan.ALL) / QMAX
        v = _clamp_e4m3(mean / scale)
        tl.store(out_ptr + b * D + d, v.to(out_ptr.dtype.element_ty))
        tl.store(out_scale_ptr + b, scale)
    else:
        tl.store(out_ptr + b * D + d, mean.to(out_ptr.dtype.element_ty))


def pool_blocks(k: torch.Tensor, k_scale: torch.Tensor | None, *, block_size: int,
                out_dtype: torch.dtype | None = None, first_block: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block representatives of the key buffer.

    Args:
        k: [S, D] float8_e4m3fn (with ``k_scale`` fp32 [S]), bf16 or fp32; contiguous.
        out_dtype: dtype of the representatives, k's dtype by default; float8_e4m3fn
            re-quantizes each block with its own scale, anything else stores the plain mean.
        first_block: pool only blocks [first_block, NB); the rows before are left unset (the
            prefill pipeline passes min(ks) // B: no query's eligible range starts earlier).

    Returns:
        (pooled [NB, D], pooled_scale fp32 [NB] for FP8 output else None),
        NB = ceil(S / block_size).
    """
    check_block_size(block_size)
    S, D = k.shape
    nb = triton.cdiv(S, block_size)
    out_dtype = k.dtype if out_dtype is None else out_dtype
    quant = out_dtype == FP8_DTYPE
    pooled = torch.empty(nb, D, dtype=out_dtype, device=k.device)
    pscale = torch.empty(nb, dtype=torch.float32, device=k.device) if quant else None
    if nb > first_block:
        _pool_blocks_kernel[(nb - first_block,)](
            k, k_scale if k_scale is not None else pooled, pooled,
            pscale if quant else pooled, S, first_block, B=block_size, D=D,
            CHUNK=min(POOL_CHUNK, block_size), HAS_SCALE=k_scale is not None, QUANT=quant,
            AMAX_MIN=AMAX_FLOOR, QMAX=FP8_MAX, num_warps=4)
    return pooled, pscale
