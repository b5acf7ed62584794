"""Pooled block keys of a sharded key buffer (prefill), and of split blocks in a paged cache.

Whole blocks: a rank's local buffer is its blocks back to back in ascending order (only the
global last block can be partial, and it is the rank's last), so pooling the local buffer gives
exactly the single-process means of the rank's blocks; no communication.

Split blocks (each rank holds ``B / R`` tokens of every block): each rank sums its tokens of
every block, one all-reduce of the ``[NB, D]`` fp32 partial sums gives the block sums, divided by
the block's true token count. The mean is the single-process mean up to the order of the fp32
additions (bit-identical when the sums are exact, as in the tests' integer-valued inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cache.layout import PAGE_SIZE, page_views
from ..utils.quant import quantize_fp8
from ..utils.validate import FP8_DTYPE
from .comm import all_reduce_sum
from .layout import BlockMap


def dequantized(k: torch.Tensor, k_scale: torch.Tensor | None) -> torch.Tensor:
    """fp32 keys [S, D] (k times its per-token scale)."""
    return k.float() if k_scale is None else k.float() * k_scale.float().unsqueeze(1)


def _chunk_sums(kf: torch.Tensor, chunk: int) -> torch.Tensor:
    """fp32 sums of consecutive ``chunk``-row groups of kf [S, D] -> [ceil(S / chunk), D]."""
    S, D = kf.shape
    n = -(-S // chunk)
    return F.pad(kf, (0, 0, 0, n * chunk - S)).view(n, chunk, D).sum(dim=1)


def pool_sharded(k: torch.Tensor, k_scale: torch.Tensor | None, bmap: BlockMap, num_keys: int,
                 group, *, rep_dtype: torch.dtype = torch.float32
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Representatives of the blocks this rank scores, in ascending global order.

    Args:
        k, k_scale: this rank's local keys [S_r, D] (and fp32 scales).
        num_keys: S, keys in the global buffer.
        rep_dtype: how the means are stored: fp32 (the torch reference's and, by default,
            the Triton pipeline's, :func:`hisa.ops.indexer.reps.rep_dtype`), bf16, or
            float8_e4m3fn (re-quantized with one scale per block).

    Returns:
        (pooled [NB_scored, D] of ``rep_dtype``, per-block fp32 scale for FP8 else None).
    """
    B, D = bmap.B, k.shape[1]
    kf = dequantized(k, k_scale)
    if not bmap.split:
        sums = _chunk_sums(kf, B)
        counts = torch.full((sums.shape[0],), float(B), device=k.device)
        if sums.shape[0] and k.shape[0] % B:
            counts[-1] = k.shape[0] % B
        means = sums / counts.unsqueeze(1)
    else:
        nb = -(-num_keys // B)
        sums = torch.zeros(nb, D, dtype=torch.float32, device=k.device)
        part = _chunk_sums(kf, bmap.max_run)                     # [local sub-blocks, D]
        sums[:part.shape[0]] = part
        all_reduce_sum(sums, group, "pool")
        counts = (num_keys - torch.arange(nb, device=k.device) * B).clamp(max=B).float()
        n_mine = int(bmap.scored_before(torch.tensor(nb)))
        mine = bmap.scored_global(torch.arange(n_mine, device=k.device))
        means = sums[mine] / counts[mine].unsqueeze(1)
    if rep_dtype == torch.float8_e4m3fn:
        return quantize_fp8(means, group_size=D)
    return means.to(rep_dtype), None


def _write_rows(pooled_cache: torch.Tensor, rows: torch.Tensor, values: torch.Tensor,
                valid: torch.Tensor) -> None:
    """pooled_cache[rows[i]] = values[i] where valid[i], without a host sync.

    Invalid entries must not race valid ones for a row, so each is redirected to the first
    valid entry's row carrying that entry's bytes (duplicates then write identical bytes);
    with no valid entry at all every entry rewrites row 0 with its current bytes.
    """
    first = torch.argmax(valid.to(torch.int32)).view(1)                   # first valid (or 0)
    any_valid = valid.any()
    # index_select, not rows[first]: a 0-d index would be read on the host.
    fallback_row = torch.where(any_valid, rows.index_select(0, first)[0], 0)
    fallback_val = torch.where(any_valid, values.index_select(0, first)[0], pooled_cache[0])
    target = torch.where(valid, rows, fallback_row)
    data = torch.where(valid.unsqueeze(1), values, fallback_val.unsqueeze(0))
    pooled_cache.index_copy_(0, target, data)


#: Appends of more tokens than this (prefill chunks) first keep only the tokens that complete a
#: block, a host sync; decode-sized appends stay sync-free.
SYNC_FREE_APPEND = 4096
#: Completed blocks pooled per all-reduce (their [chunk, B / R, D] fp32 keys are gathered).
POOL_CHUNK = 1024


def pool_split_blocks_paged(pages: torch.Tensor, pooled_cache: torch.Tensor,
                            positions: torch.Tensor, req_indices: torch.Tensor,
                            block_table: torch.Tensor, bmap: BlockMap, group) -> None:
    """Pool every split block that the new tokens complete (decode steps, prefill chunks).

    ``positions`` [T] are the global positions of all new tokens of the step (the same on every
    rank, after this rank's keys were written); a token with ``(p + 1) % B == 0`` completes
    block ``p // B``. Each rank sums its ``B / R`` tokens of each completed block from its pages,
    one fixed-size all-reduce of [T, D] fp32 adds the ranks' sums, and the scoring rank
    (``b % R``) writes the FP8 mean (quantized as the single-process append does) to the
    pooled row of the page holding its last tokens of the block. Tokens that complete nothing
    contribute zeros. Every rank derives the same chunks from the same positions, so the
    collectives match.
    """
    pos, req = positions.long(), req_indices.long()
    B = bmap.B
    if pos.numel() > SYNC_FREE_APPEND:
        keep = ((pos >= 0) & ((pos + 1) % B == 0)).nonzero().squeeze(1)
        pos, req = pos[keep], req[keep]
    for c0 in range(0, pos.numel(), POOL_CHUNK):
        _pool_chunk(pages, pooled_cache, pos[c0:c0 + POOL_CHUNK], req[c0:c0 + POOL_CHUNK],
                    block_table, bmap, group)


def _pool_chunk(pages, pooled_cache, pos, req, block_table, bmap: BlockMap, group) -> None:
    D = pages.shape[1] // PAGE_SIZE - 4
    B, R, run = bmap.B, bmap.layout.world_size, bmap.max_run
    done = (pos >= 0) & ((pos + 1) % B == 0)
    g = torch.where(done, pos // B, 0)                                     # [T]
    start = g * run                                                        # local run start
    local = start.unsqueeze(1) + torch.arange(run, device=pos.device)      # [T, run]
    bt = block_table[req]                                                  # [T, max_pages]
    page = torch.gather(bt.long(), 1, (local // PAGE_SIZE).clamp(max=bt.shape[1] - 1))
    ok = done.unsqueeze(1) & (page >= 0) & (page < pages.shape[0])
    page = page.clamp(0, pages.shape[0] - 1)
    values, scales = page_views(pages, D)
    off = local % PAGE_SIZE
    kf = values[page, off].view(FP8_DTYPE).float() * scales[page, off].unsqueeze(-1)
    # where, not a product: bytes of unused pages may decode to NaN.
    sums = torch.where(ok.unsqueeze(-1), kf, 0.0).sum(dim=1)               # [T, D]
    all_reduce_sum(sums, group, "pool")
    v, s = quantize_fp8(sums / B, group_size=D)
    row_bytes = torch.cat([v.view(torch.uint8), s.unsqueeze(1).view(torch.uint8)], dim=1)
    mine = done & (g % R == bmap.rank)
    col = bmap.pooled_column(g)
    rows = torch.gather(bt.long(), 1, col.clamp(max=bt.shape[1] - 1).unsqueeze(1)).squeeze(1)
    mine &= (rows >= 0) & (rows < pooled_cache.shape[0])
    _write_rows(pooled_cache, rows.clamp(0, pooled_cache.shape[0] - 1), row_bytes, mine)
