"""Byte layout of the paged indexer key cache and of its pooled-block companion.

Key cache (DeepGEMM ``fp8_paged_mqa_logits`` / vLLM / SGLang layout): pages of
:data:`PAGE_SIZE` = 64 tokens, ``uint8 [num_pages, 64 * (D + 4)]``. Inside a page the first
``64 * D`` bytes are the FP8 e4m3 key values, token-major (token ``t`` at bytes
``[t * D, (t + 1) * D)``), then 64 fp32 scales (structure of arrays): 132 B per token at D = 128.
The 4-D view ``[num_pages, 64, 1, D + 4]`` that DeepGEMM takes is accepted too (same bytes).

Pooled cache: ``uint8 [num_pages, D + 4]``, one row per *physical page*: D FP8 values of a block
representative, then its fp32 scale (a key row's layout). The representative of block ``b`` of a
request (tokens ``[b * B, (b + 1) * B)``) lives in the row of the physical page that holds the
block's LAST 64 tokens, ``block_table[r, (b + 1) * B // 64 - 1]``. Why that page:

* a page's content (and, with page-granular prefix caching, its whole prefix) is fixed once the
  page is full, so a page shared by several requests always carries the right pooled row;
* the row is written exactly when the block completes, and the completing token sits in that page
  (it is the page's last token), so the writer knows the row from the slot mapping alone;
* freeing a page needs no action; a reused page is overwritten when its new block completes, and
  before that the row is never read (an incomplete block is the tail block, always forced);
* an engine that moves pages (swap, offload, defragmentation) must move row ``p`` of the pooled
  cache with page ``p`` (:meth:`hisa.cache.PagedIndexerCache.copy_pages`).

The *unknown* row. A pooled row never describes another request's keys: it holds either the mean
of the block that last completed on its page, or the sentinel "unknown" (D zero bytes, then a NaN
scale; :func:`mark_pooled_unknown`). The sentinel is written

* into every row of a new :class:`hisa.PagedIndexerCache` (a row that no append has written yet);
* by the Triton append when a token completes a block it cannot read consistently: the slot is
  not the last token of its page, a page of the block is outside the cache, the token's row or
  the block's columns are outside the block table, or the table's last page for the block is
  not the slot's page (page reuse with a stale table). The torch append raises ValueError for
  these instead.

An unknown row scores NaN in stage 1 (0 * NaN), and the selection rule ranks NaN below every
real score: the block can never displace a block with a real representative; it is kept only
when a row has free block slots, and stage 2 then scores its tokens exactly from the pages.

Super-block cache (the optional third level): ``uint8 [num_pages, D + 4]``, the same row layout.
Super-block ``g`` of a request (its blocks ``[g * Bs, (g + 1) * Bs)``, tokens
``[g * Bs * B, (g + 1) * Bs * B)``) lives in row ``block_table[r, (g + 1) * Bs * B // 64 - 1]``:
the page holding the super-block's last 64 tokens, exactly the rule above with block size
``Bs * B``, so each point of the argument carries over: the page is full, and its prefix fixed,
when the super-block completes; the completing token is that page's last token (and completes
the super-block's last block in the same append, so all ``Bs`` block rows exist when the super
row is pooled from them); a freed page needs nothing; a reused page's stale row is never read
before it is rewritten, because the incomplete super-block is the query's own, always forced;
the row moves with its page. It is a separate tensor, not a wider pooled row, because a
super-block's last page is also its last block's page: one row cannot hold both, and engines
that run two levels keep the pooled cache unchanged.
"""
from __future__ import annotations

import torch

from ..utils.validate import FP8_DTYPE, check_tensor

#: Tokens per page of the key cache (DeepGEMM's SM90 paged kernel supports only 64).
PAGE_SIZE = 64
#: Bytes of one fp32 scale.
SCALE_BYTES = 4


#: Scale of the unknown pooled row (its D values are zero bytes).
UNKNOWN_POOLED_SCALE = float("nan")


def mark_pooled_unknown(pooled_cache: torch.Tensor, pages: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """Write the unknown sentinel into rows ``pages`` (int [n]; every row by default), in place.

    For an engine-allocated pooled cache (``torch.zeros`` rows would score 0, which can beat
    real blocks with negative scores), and for pages an engine recycles outside the append path.
    """
    head_dim = pooled_cache.shape[1] - SCALE_BYTES
    rows = pooled_cache if pages is None else pooled_cache[pages.long()]
    rows[:, :head_dim] = 0
    rows[:, head_dim:].view(torch.float32).fill_(UNKNOWN_POOLED_SCALE)
    if pages is not None:
        pooled_cache[pages.long()] = rows
    return pooled_cache


def cache_head_dim(kv_cache: torch.Tensor, *, name: str = "kv_cache") -> int:
    """D of a key cache from its shape: uint8 [P, 64 * (D + 4)] or [P, 64, 1, D + 4]."""
    check_tensor(name, kv_cache, dtypes=(torch.uint8,))
    if kv_cache.dim() == 4 and kv_cache.shape[1:3] == (PAGE_SIZE, 1):
        d = kv_cache.shape[3] - SCALE_BYTES
    elif kv_cache.dim() == 2 and kv_cache.shape[1] % PAGE_SIZE == 0:
        d = kv_cache.shape[1] // PAGE_SIZE - SCALE_BYTES
    else:
        d = 0
    if d < 1:
        raise ValueError(f"{name}: expected uint8 [num_pages, 64 * (D + 4)] (pages of "
                         f"{PAGE_SIZE} tokens) or [num_pages, {PAGE_SIZE}, 1, D + 4], got shape "
                         f"{list(kv_cache.shape)}")
    return d


def page_bytes(head_dim: int) -> int:
    """Bytes of one page: 64 * (D + 4)."""
    return PAGE_SIZE * (head_dim + SCALE_BYTES)


def pooled_row_bytes(head_dim: int) -> int:
    """Bytes of one pooled row: D FP8 values + one fp32 scale."""
    return head_dim + SCALE_BYTES


def as_pages(kv_cache: torch.Tensor, head_dim: int, *, name: str = "kv_cache") -> torch.Tensor:
    """The cache as ``uint8 [num_pages, 64 * (D + 4)]`` (a view; 2-D or DeepGEMM's 4-D form)."""
    check_tensor(name, kv_cache, dtypes=(torch.uint8,))
    nbytes = page_bytes(head_dim)
    four_d = (kv_cache.dim() == 4 and tuple(kv_cache.shape[1:]) == (PAGE_SIZE, 1,
                                                                     head_dim + SCALE_BYTES))
    if not (four_d or (kv_cache.dim() == 2 and kv_cache.shape[1] == nbytes)):
        raise ValueError(f"{name}: expected uint8 [num_pages, {nbytes}] (pages of {PAGE_SIZE} "
                         f"tokens, D = {head_dim}) or [num_pages, {PAGE_SIZE}, 1, "
                         f"{head_dim + SCALE_BYTES}], got shape {list(kv_cache.shape)}")
    if not kv_cache.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides "
                         f"{tuple(kv_cache.stride())}")
    return kv_cache.view(kv_cache.shape[0], nbytes)


def check_pooled_cache(pooled_cache: torch.Tensor, head_dim: int, num_pages: int,
                       *, name: str = "pooled_cache") -> torch.Tensor:
    check_tensor(name, pooled_cache, dtypes=(torch.uint8,), ndim=2, contiguous=True)
    want = (num_pages, pooled_row_bytes(head_dim))
    if tuple(pooled_cache.shape) != want:
        raise ValueError(f"{name}: expected uint8 {list(want)} (one row of D + 4 bytes per page "
                         f"of the key cache), got shape {list(pooled_cache.shape)}")
    return pooled_cache


def page_views(pages: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values uint8 [P, 64, D] (FP8 bits), scales fp32 [P, 64]) views of ``uint8 [P, bytes]``."""
    P = pages.shape[0]
    values = pages[:, :PAGE_SIZE * head_dim].view(P, PAGE_SIZE, head_dim)
    scales = pages[:, PAGE_SIZE * head_dim:].view(torch.float32)
    return values, scales


def pooled_views(pooled_cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values uint8 [P, D] (FP8 bits), scales fp32 [P]) views of the pooled cache."""
    return pooled_cache[:, :head_dim], pooled_cache[:, head_dim:].view(torch.float32)[:, 0]


def gather_request_keys(pages: torch.Tensor, block_table_row: torch.Tensor, length: int,
                        head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of positions [0, length) of one request: (fp8 [length, D], fp32 scales [length])."""
    n_pages = -(-length // PAGE_SIZE)
    values, scales = page_views(pages, head_dim)
    ids = block_table_row[:n_pages].long()
    k = values[ids].reshape(-1, head_dim)[:length].view(FP8_DTYPE)
    return k, scales[ids].reshape(-1)[:length]


def block_last_pages(block_table_row: torch.Tensor, num_blocks: int, block_size: int
                     ) -> torch.Tensor:
    """Physical page holding the last 64 tokens of each of blocks [0, num_blocks): int64."""
    per_block = block_size // PAGE_SIZE
    cols = torch.arange(1, num_blocks + 1, device=block_table_row.device) * per_block - 1
    return block_table_row.long()[cols]


def gather_request_pooled(pooled_cache: torch.Tensor, block_table_row: torch.Tensor,
                          num_blocks: int, block_size: int, head_dim: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled rows of complete blocks [0, num_blocks) of one request: (fp8 [nb, D], fp32 [nb])."""
    values, scales = pooled_views(pooled_cache, head_dim)
    ids = block_last_pages(block_table_row, num_blocks, block_size)
    return values[ids].contiguous().view(FP8_DTYPE), scales[ids]
