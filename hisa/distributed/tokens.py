"""Token stage of sharded HISA: exact scores of the local tokens of the kept blocks.

Each rank scores only its own tokens of the globally kept blocks. It hands them to the public
paged flat indexer (:func:`hisa.dsa_index_paged`) as one compact page table per query row:
the pages of its kept-block runs in ascending order, so the row's "sequence" is exactly its
local candidate tokens and the flat top-k over it is the rank's exact token top-k (ties to the
lower position, because page order is position order). Positions come back through the same
table: virtual position v is local position ``logical[v // 64] * 64 + v % 64``.

A run clipped at its end (the query's own block, or the buffer's partial last block) is always
the last kept block, so the valid tokens form a prefix of the table and one length per row
describes them. In packed prefill the first eligible block may also start before the window
(a block straddling two sequences); its part after ``ks`` is scored by :func:`hisa.dsa_index`
over a window of the rank's packed keys and merged in.
"""
from __future__ import annotations

import torch

from .. import dsa_index, dsa_index_paged
from ..cache.layout import PAGE_SIZE, SCALE_BYTES
from .layout import BlockMap, ShardLayout
from .merge import merge_topk


def page_table(bmap: BlockMap, kept: torch.Tensor, ws: torch.Tensor, we: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compact local page table of each row's kept blocks, clipped to the window [ws, we).

    Args:
        kept: int64 [rows, m] global block ids, ascending, -1 padded.
        ws, we: int64 [rows] global window of each row.

    Returns:
        (logical int64 [rows, m * pages_per_run] local page indices, -1 padded;
         length int64 [rows], valid virtual tokens;
         front_start, front_end int64 [rows]: local window of a first block that starts before
         ``ws`` on this rank (scored separately), empty where there is none).
    """
    rows, m = kept.shape
    ppr = -(-bmap.max_run // PAGE_SIZE)
    valid = kept >= 0
    g = kept.clamp_min(0)
    full_start, _ = bmap.run(g)
    a, c = bmap.run(g, ws.unsqueeze(1), we.unsqueeze(1))                       # [rows, m]
    live = valid & (c > a)
    front = live & (a > full_start)             # only the first eligible block can start late
    paged = live & ~front
    n_pages = torch.where(paged, (c - a + PAGE_SIZE - 1) // PAGE_SIZE, 0)
    offset = torch.cumsum(n_pages, dim=1) - n_pages
    j = torch.arange(ppr, device=kept.device)
    slot = offset.unsqueeze(2) + j                                             # [rows, m, ppr]
    use = j < n_pages.unsqueeze(2)
    width = m * ppr
    slot = torch.where(use, slot, width)                                       # spare column
    table = torch.full((rows, width + 1), -1, dtype=torch.long, device=kept.device)
    value = (a // PAGE_SIZE).unsqueeze(2) + j
    table.scatter_(1, slot.flatten(1), value.flatten(1))
    length = torch.where(paged, c - a, 0).sum(dim=1)
    zero = torch.zeros(rows, dtype=torch.long, device=kept.device)
    has_front = front[:, 0] if m else zero.bool()
    f_start = torch.where(has_front, a[:, 0], zero) if m else zero
    f_end = torch.where(has_front, c[:, 0], zero) if m else zero
    return table[:, :width], length, f_start, f_end


def virtual_to_global(bmap: BlockMap, idx: torch.Tensor, logical: torch.Tensor) -> torch.Tensor:
    """Global positions of the paged indexer's virtual positions ``idx`` [rows, k] (-1 kept)."""
    v = idx.long()
    page = torch.gather(logical, 1, (v // PAGE_SIZE).clamp_min(0))
    local = page * PAGE_SIZE + v % PAGE_SIZE
    return torch.where(v >= 0, bmap.layout.to_global(bmap.rank, local), -1)


def paged_token_candidates(q_rows: torch.Tensor, pages: torch.Tensor, weights: torch.Tensor,
                           physical: torch.Tensor, logical: torch.Tensor, length: torch.Tensor,
                           bmap: BlockMap, *, topk: int, backend: str
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's exact token top-k over each row's compact page table.

    Args:
        q_rows: [rows, H, D] one query per row; pages: the rank's uint8 key pages;
        physical / logical: int [rows, W] page ids / local page indices of the table.

    Returns:
        (global positions int64 [rows, topk], -1 padded; scores fp32, -inf padded).
    """
    rows = q_rows.shape[0]
    if pages.shape[0] == 0 or rows == 0 or physical.shape[1] == 0:
        return (torch.full((rows, topk), -1, dtype=torch.long, device=q_rows.device),
                torch.full((rows, topk), float("-inf"), device=q_rows.device))
    idx, scores = dsa_index_paged(q_rows.unsqueeze(1), pages, weights, length.to(torch.int32),
                                  physical.to(torch.int32), topk=topk, return_scores=True,
                                  backend=backend)
    return virtual_to_global(bmap, idx, logical), scores


def pack_pages(k: torch.Tensor, k_scale: torch.Tensor) -> torch.Tensor:
    """Local FP8 keys [S_r, D] (+ fp32 scales) as key-cache pages,
    uint8 [ceil(S_r / 64), 64 * (D + 4)]; page i holds local positions [64 i, 64 i + 64)."""
    S, D = k.shape
    n = -(-S // PAGE_SIZE)
    pad = n * PAGE_SIZE - S
    values = torch.nn.functional.pad(k.view(torch.uint8), (0, 0, 0, pad)).view(n, PAGE_SIZE * D)
    scales = torch.nn.functional.pad(k_scale.float(), (0, pad)).view(torch.uint8)
    return torch.cat([values, scales.view(n, PAGE_SIZE * SCALE_BYTES)], dim=1).contiguous()


def window_token_candidates(q: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor | None,
                            weights: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                            layout: ShardLayout, rank: int, *, topk: int, backend: str
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of the local positions [start, end) of each row, via :func:`hisa.dsa_index`
    over the rank's packed keys (host sync: prefill only). Only rows with a non-empty window
    are scored. Returns (global positions int64 [T, topk], scores fp32)."""
    T = q.shape[0]
    pos = torch.full((T, topk), -1, dtype=torch.long, device=q.device)
    val = torch.full((T, topk), float("-inf"), device=q.device)
    rows = (end > start).nonzero().squeeze(1)
    if rows.numel() == 0:
        return pos, val
    off, sc = dsa_index(q[rows], k, weights[rows], start[rows].to(torch.int32),
                        end[rows].to(torch.int32), k_scale=k_scale, topk=topk,
                        return_scores=True, backend=backend)
    local = start[rows].unsqueeze(1) + off.long()
    pos[rows] = torch.where(off >= 0, layout.to_global(rank, local), -1)
    val[rows] = sc
    return pos, val


def merge_local(pairs: list[tuple[torch.Tensor, torch.Tensor]], topk: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a rank's candidate lists [(positions, scores)] into its top-k."""
    if len(pairs) == 1:
        return pairs[0]
    pos = torch.cat([p for p, _ in pairs], dim=1)
    val = torch.cat([v for _, v in pairs], dim=1)
    return merge_topk(val, pos, topk)
