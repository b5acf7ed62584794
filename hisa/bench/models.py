"""FLOP and byte models of the indexer ops, so every row carries TFLOP/s and GB/s."""
from __future__ import annotations

import torch

from ..ops.indexer.naive import eligible_blocks


def pair_flops(heads: int, head_dim: int) -> int:
    """FLOP per scored (query, key) pair: H dot products of D multiply-adds."""
    return 2 * heads * head_dim


def flat_prefill_flops(ks: torch.Tensor, ke: torch.Tensor, heads: int, head_dim: int) -> float:
    return float((ke.long() - ks.long()).sum()) * pair_flops(heads, head_dim)


def hisa_prefill_flops(ks: torch.Tensor, ke: torch.Tensor, heads: int, head_dim: int, *,
                       block_size: int, block_topk: int, super_size: int | None = None,
                       super_topk: int | None = None) -> float:
    """Block stage: every eligible block; token stage: every token of the kept blocks. With
    the super-block level: every eligible super-block, then every block of the kept ones
    (at most ms * Bs, at most the eligible blocks), then the tokens."""
    first, end = eligible_blocks(ks, ke, block_size)
    nblocks = (end - first).clamp_min(0)
    if super_size is None:
        scored = nblocks
    else:
        nsup = (end + super_size - 1) // super_size - first // super_size
        nsup = torch.where(nblocks > 0, nsup, 0)
        scored = nsup + nblocks.clamp(max=super_topk * super_size)
    pairs = scored.sum() + nblocks.clamp(max=block_topk).sum() * block_size
    return float(pairs) * pair_flops(heads, head_dim)


def paged_decode_bytes(seq_lens: torch.Tensor, head_dim: int, *, rows_per_request: int,
                       heads: int, topk: int) -> float:
    """Flat paged decode floor: every key row (D fp8 + 4 B scale) once, q, weights, output."""
    keys = float(seq_lens.long().sum()) * (head_dim + 4)
    rows = seq_lens.numel() * rows_per_request
    return keys + rows * (heads * head_dim + heads * 4 + topk * 4)


def hisa_decode_bytes(seq_lens: torch.Tensor, head_dim: int, *, rows_per_request: int,
                      heads: int, topk: int, block_size: int, block_topk: int,
                      super_size: int | None = None, super_topk: int | None = None) -> float:
    """HISA decode floor: pooled rows of complete blocks (with the super-block level: rows of
    complete super-blocks, then the block rows of the kept ones) + the kept blocks' key rows."""
    lens = seq_lens.long()
    nblocks = (lens + block_size - 1) // block_size
    if super_size is None:
        pooled = float((lens // block_size).sum()) * (head_dim + 4)
    else:
        span = block_size * super_size
        rows = lens // span + (lens // block_size).clamp(max=super_topk * super_size)
        pooled = float(rows.sum()) * (head_dim + 4)
    kept = float((nblocks.clamp(max=block_topk) * block_size).clamp(max=lens).sum()) * (head_dim + 4)
    rows = seq_lens.numel() * rows_per_request
    return pooled + kept * rows_per_request + rows * (heads * head_dim + heads * 4 + topk * 4)
