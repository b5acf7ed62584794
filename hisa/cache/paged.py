"""The paged FP8 indexer key cache and its incrementally maintained pooled-block cache.

Appending takes what a serving engine has at the indexer's cache-write point:

* ``k`` [T, D]: the new keys (bf16/fp16/fp32, quantized here with
  :func:`hisa.quantize_fp8`, group = D), or already FP8 with ``k_scale`` [T];
* ``slot_mapping`` int32/int64 [T]: cache slot of each token, ``page * 64 + offset``;
  negative slots (vLLM's padding tokens) are skipped;
* ``positions`` int32/int64 [T]: each token's position in its request (0-based);
* ``block_table`` int32 [R, max_pages] and ``req_indices`` int32/int64 [T] (the block-table row of
  each token): needed only when ``block_size > 64``, to find the earlier pages of a block.

A token whose position ``p`` has ``(p + 1) % block_size == 0`` completes block
``p // block_size``: after every key of the call is written, the block's B keys are read back
from the pages, averaged in fp32 after dequantization, quantized to FP8 with their own scale
(plain, never ue8m0: the pooled rows feed only this library's block scores) and written to the
pooled row of the completing token's page (see :mod:`hisa.cache.layout`). Each block is pooled
exactly once, however its tokens were split over calls (prefill chunks, decode steps) and
whichever requests share its pages.

With the super-block level (``super_cache`` and ``super_size``), a token with
``(p + 1) % (super_size * block_size) == 0`` also completes super-block
``p // (super_size * block_size)``: once its last block is pooled, the mean of the super-block's
``super_size`` dequantized block rows is quantized the same way and written to the row of the
completing token's page in ``super_cache`` (the layout and why, :mod:`hisa.cache.layout`).
When any of those block rows has a non-finite scale (the unknown sentinel, or a block holding
a NaN or infinite key, whose row scores NaN) the super row gets the unknown sentinel instead of
a mean: a super-block is never described by a mean of rows that do not describe its blocks.

Inconsistent inputs: the torch path raises ValueError (duplicate valid slots in one call, a slot
whose offset is not its position's, a block-table row or page it cannot read); the Triton path
never synchronises, so it follows fixed rules instead: duplicates resolve to the last token of
the call, and an unreadable block's pooled row, or an unreadable super-block's row, gets the
unknown sentinel (:mod:`hisa.cache.append`, :mod:`hisa.cache.append_super`,
:mod:`hisa.cache.layout`).
"""
from __future__ import annotations

import torch

from ..ops.indexer.naive import naive_pool_blocks
from ..ops.indexer.naive_super import naive_pool_supers
from ..utils.backend import resolve_backend, runs_on_device_of
from ..utils.quant import quantize_fp8
from ..utils.validate import (FP8_DTYPE, check_device, check_key_scale, check_positive_int,
                              check_same_device, check_shape, check_tensor)
from .layout import (PAGE_SIZE, as_pages, cache_head_dim, check_pooled_cache,
                     gather_request_keys, gather_request_pooled, mark_pooled_unknown,
                     page_bytes, page_views, pooled_row_bytes, pooled_views)

KEY_DTYPES = (torch.float32, torch.bfloat16, torch.float16, FP8_DTYPE)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_block_size(block_size) -> int:
    block_size = check_positive_int("block_size", block_size)
    if block_size % PAGE_SIZE:
        raise ValueError(f"block_size: expected a multiple of the page size {PAGE_SIZE} (a block "
                         f"must end on a page boundary), got {block_size}")
    return block_size


def check_super_size(super_size) -> int:
    return check_positive_int("super_size", super_size, minimum=2)


def check_append_inputs(kv_cache, pooled_cache, k, slot_mapping, positions, k_scale,
                        block_table, req_indices, block_size, super_cache=None,
                        super_size=None) -> torch.Tensor:
    """Validate an append; returns the ``uint8 [P, 64 * (D + 4)]`` page view."""
    check_tensor("k", k, dtypes=KEY_DTYPES, ndim=2)
    T, D = k.shape
    cache_d = cache_head_dim(kv_cache)
    if D != cache_d:
        raise ValueError(f"k: expected head_dim {cache_d} (that of kv_cache, shape "
                         f"{list(kv_cache.shape)}), got shape {list(k.shape)}")
    pages = as_pages(kv_cache, D)
    check_block_size(block_size)
    if pooled_cache is not None:
        check_pooled_cache(pooled_cache, D, pages.shape[0])
    if (super_cache is None) != (super_size is None):
        raise ValueError(f"super_cache/super_size: expected both (a super-block level) or "
                         f"neither, got super_cache={type(super_cache).__name__}, "
                         f"super_size={super_size!r}")
    if super_cache is not None:
        check_super_size(super_size)
        if pooled_cache is None:
            raise ValueError("pooled_cache: expected a tensor because super_cache is given "
                             "(super-blocks are pooled from the block rows), got None")
        check_pooled_cache(super_cache, D, pages.shape[0], name="super_cache")
        if block_table is None or req_indices is None:
            raise ValueError(f"block_table/req_indices: expected both (a super-block of "
                             f"{super_size} blocks spans several pages, so pooling needs each "
                             f"token's block-table row), got block_table="
                             f"{type(block_table).__name__}, req_indices="
                             f"{type(req_indices).__name__}")
    check_tensor("slot_mapping", slot_mapping, dtypes=INDEX_DTYPES, ndim=1)
    check_shape("slot_mapping", slot_mapping, (T,))
    check_tensor("positions", positions, dtypes=INDEX_DTYPES, ndim=1)
    check_shape("positions", positions, (T,))
    check_key_scale(k, k_scale, "T")
    if k_scale is not None:
        check_tensor("k_scale", k_scale, dtypes=(torch.float32,), ndim=1)
        check_shape("k_scale", k_scale, (T,))
    if pooled_cache is not None and block_size > PAGE_SIZE:
        if block_table is None or req_indices is None:
            raise ValueError(f"block_table/req_indices: expected both (block_size={block_size} "
                             f"spans several pages, so pooling needs each token's block-table "
                             f"row), got block_table={type(block_table).__name__}, "
                             f"req_indices={type(req_indices).__name__}")
    if block_table is not None:
        check_tensor("block_table", block_table, dtypes=(torch.int32,), ndim=2)
    if req_indices is not None:
        check_tensor("req_indices", req_indices, dtypes=INDEX_DTYPES, ndim=1)
        check_shape("req_indices", req_indices, (T,))
    check_same_device(k=k, kv_cache=kv_cache, pooled_cache=pooled_cache,
                      slot_mapping=slot_mapping, positions=positions, k_scale=k_scale,
                      block_table=block_table, req_indices=req_indices,
                      super_cache=super_cache)
    return pages


def naive_cache_append(pages: torch.Tensor, pooled_cache: torch.Tensor | None,
                       k: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor, *,
                       k_scale: torch.Tensor | None = None,
                       block_table: torch.Tensor | None = None,
                       req_indices: torch.Tensor | None = None, block_size: int = 128,
                       ue8m0: bool = False, super_cache: torch.Tensor | None = None,
                       super_size: int | None = None) -> None:
    """Reference append (plain PyTorch, host-synchronising): write keys, pool completed blocks
    (and completed super-blocks when ``super_cache`` is given).

    ``pages`` is the ``uint8 [P, 64 * (D + 4)]`` view of the cache; other arguments as in
    :func:`paged_cache_append`. Raises ValueError when a completing token's slot is not in the
    page its block-table row names (the pooled row would land on the wrong page).
    """
    T, D = k.shape
    P = pages.shape[0]
    if k.dtype == FP8_DTYPE:
        values, scales = k, k_scale
    else:
        values, scales = quantize_fp8(k, group_size=D, ue8m0=ue8m0)
    slot = slot_mapping.long()
    valid = (slot >= 0) & (slot < P * PAGE_SIZE)
    used = torch.sort(slot[valid]).values
    dup = used[1:] == used[:-1]
    if bool(dup.any()):
        s = int(used[1:][dup][0])
        who = (slot == s).nonzero().flatten().tolist()
        raise ValueError(f"slot_mapping: expected distinct slots for the valid tokens of one "
                         f"append, got slot {s} for tokens {who}")
    page, off = slot // PAGE_SIZE, slot % PAGE_SIZE
    val_view, scale_view = page_views(pages, D)
    val_view[page[valid], off[valid]] = values.view(torch.uint8)[valid]
    scale_view[page[valid], off[valid]] = scales.float()[valid]
    if pooled_cache is None:
        return
    pos = positions.long()
    bad = valid & (pos >= 0) & (pos % PAGE_SIZE != off)
    if bool(bad.any()):
        t = int(bad.nonzero()[0, 0])
        raise ValueError(f"slot_mapping: expected slot % {PAGE_SIZE} == position % {PAGE_SIZE} "
                         f"(a request's pages hold its positions in order), got slot "
                         f"{int(slot[t])} for position {int(pos[t])} (token {t})")
    done = valid & (pos >= 0) & ((pos + 1) % block_size == 0)
    pool_val, pool_scale = pooled_views(pooled_cache, D)
    per_block = block_size // PAGE_SIZE
    for t in torch.nonzero(done).flatten().tolist():
        last = int(page[t])
        if per_block == 1:
            block_pages = torch.tensor([last], device=pages.device)
        else:
            r = int(req_indices[t])
            if not 0 <= r < block_table.shape[0]:
                raise ValueError(f"req_indices: expected rows in [0, {block_table.shape[0]}) of "
                                 f"block_table, got {r} for token {t}")
            row = block_table[r].long()
            b = int(pos[t]) // block_size
            if (b + 1) * per_block > row.numel():
                raise ValueError(f"block_table: row {int(req_indices[t])} has {row.numel()} "
                                 f"pages, token {t} (position {int(pos[t])}) needs "
                                 f"{(b + 1) * per_block}")
            block_pages = row[b * per_block:(b + 1) * per_block]
            if int(block_pages[-1]) != last:
                raise ValueError(f"block_table: row {int(req_indices[t])} column "
                                 f"{(b + 1) * per_block - 1} holds page {int(block_pages[-1])} "
                                 f"but slot_mapping[{t}] = {int(slot[t])} is in page {last}")
            if bool(((block_pages < 0) | (block_pages >= P)).any()):
                raise ValueError(f"block_table: row {int(req_indices[t])} names pages "
                                 f"{block_pages.tolist()} outside [0, {P})")
        keys = val_view[block_pages].reshape(block_size, D).view(FP8_DTYPE)
        key_scale = scale_view[block_pages].reshape(block_size)
        mean = naive_pool_blocks(keys, key_scale, block_size)            # [1, D] fp32
        pv, ps = quantize_fp8(mean, group_size=D)
        pool_val[last] = pv[0].view(torch.uint8)
        pool_scale[last] = ps[0]
    if super_cache is not None:
        _naive_pool_super_rows(pooled_cache, super_cache, page, pos, valid, block_table,
                               req_indices, block_size=block_size, super_size=super_size)


def _naive_pool_super_rows(pooled_cache, super_cache, page, pos, valid, block_table,
                           req_indices, *, block_size, super_size) -> None:
    """Pool each super-block a token of this append completes from its block rows (which the
    block pass above has just completed)."""
    D = pooled_cache.shape[1] - 4
    P = pooled_cache.shape[0]
    span = block_size * super_size
    per_block = block_size // PAGE_SIZE
    pool_val, pool_scale = pooled_views(pooled_cache, D)
    sup_val, sup_scale = pooled_views(super_cache, D)
    done = valid & (pos >= 0) & ((pos + 1) % span == 0)
    for t in torch.nonzero(done).flatten().tolist():
        row = block_table[int(req_indices[t])].long()
        g = int(pos[t]) // span
        blocks = torch.arange(g * super_size, (g + 1) * super_size, device=row.device)
        cols = (blocks + 1) * per_block - 1                  # last page of each block
        if int(cols[-1]) >= row.numel():
            raise ValueError(f"block_table: row {int(req_indices[t])} has {row.numel()} "
                             f"pages, token {t} (position {int(pos[t])}) needs "
                             f"{int(cols[-1]) + 1}")
        rows = row[cols]
        if int(rows[-1]) != int(page[t]):
            raise ValueError(f"block_table: row {int(req_indices[t])} column {int(cols[-1])} "
                             f"holds page {int(rows[-1])} but the token completing super-block "
                             f"{g} (token {t}) is in page {int(page[t])}")
        if bool(((rows < 0) | (rows >= P)).any()):
            raise ValueError(f"block_table: row {int(req_indices[t])} names pages "
                             f"{rows.tolist()} outside [0, {P})")
        last = int(page[t])
        if not bool(torch.isfinite(pool_scale[rows]).all()):
            # A block row that is unknown (or pooled from a NaN or infinite key, which
            # scores NaN itself): no mean describes the super-block, so its row is unknown
            # too (the Triton append's rule as well).
            mark_pooled_unknown(super_cache, page[t:t + 1])
            continue
        reps = pool_val[rows].contiguous().view(FP8_DTYPE)
        mean = naive_pool_supers(reps, span, block_size=block_size, super_size=super_size,
                                 pooled_scale=pool_scale[rows])      # [1, D] fp32
        sv, ss = quantize_fp8(mean, group_size=D)
        sup_val[last] = sv[0].view(torch.uint8)
        sup_scale[last] = ss[0]


@runs_on_device_of("k")
def paged_cache_append(kv_cache: torch.Tensor, pooled_cache: torch.Tensor | None,
                       k: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor, *,
                       k_scale: torch.Tensor | None = None,
                       block_table: torch.Tensor | None = None,
                       req_indices: torch.Tensor | None = None, block_size: int = 128,
                       ue8m0: bool = False, super_cache: torch.Tensor | None = None,
                       super_size: int | None = None, backend: str = "auto") -> None:
    """Write new indexer keys into the paged cache and pool every block (and super-block)
    they complete.

    Args:
        kv_cache: uint8 [num_pages, 64 * (D + 4)] (or [num_pages, 64, 1, D + 4]), in place.
        pooled_cache: uint8 [num_pages, D + 4] pooled rows, in place; None skips pooling (a
            flat-DSA-only cache).
        k: [T, D] new keys, bf16/fp16/fp32 (quantized here) or float8_e4m3fn with ``k_scale``.
        slot_mapping: int32/int64 [T], ``page * 64 + offset``; slots outside
            [0, num_pages * 64) (e.g. -1 padding) are skipped.
        positions: int32/int64 [T] position of each token in its request.
        k_scale: fp32 [T] when ``k`` is FP8, else None.
        block_table: int32 [R, max_pages]; req_indices: int32/int64 [T], the block-table row of
            each token. Both required when ``block_size > 64`` and pooling.
        block_size: B, a multiple of 64.
        ue8m0: round key scales up to powers of two (DeepSeek's ``scale_fmt="ue8m0"``).
        super_cache: uint8 [num_pages, D + 4] super-block rows, in place, with
            ``super_size`` (blocks per super-block, >= 2); both None (the default) keep two
            levels. Needs ``pooled_cache``, ``block_table`` and ``req_indices``.
        backend: "auto" (Triton on CUDA), "triton" or "torch". The Triton path never
            synchronises with the host and skips (never reads out of bounds for) inconsistent
            slots or block-table entries: duplicate slots resolve to the call's last token, a
            block (or super-block) it cannot read gets the unknown row
            (:mod:`hisa.cache.layout`). The torch path raises ValueError for all of these.

    Example:
        >>> paged_cache_append(kv, pooled, k_new, slots, pos, block_table=bt, req_indices=r)
    """
    pages = check_append_inputs(kv_cache, pooled_cache, k, slot_mapping, positions, k_scale,
                                block_table, req_indices, block_size, super_cache, super_size)
    if resolve_backend(backend, k.device) == "torch":
        naive_cache_append(pages, pooled_cache, k, slot_mapping, positions, k_scale=k_scale,
                           block_table=block_table, req_indices=req_indices,
                           block_size=block_size, ue8m0=ue8m0, super_cache=super_cache,
                           super_size=super_size)
    else:
        from .append import cache_append
        cache_append(pages, pooled_cache, k, slot_mapping, positions, k_scale=k_scale,
                     block_table=block_table, req_indices=req_indices, block_size=block_size,
                     ue8m0=ue8m0, super_cache=super_cache, super_size=super_size)


class PagedIndexerCache:
    """One layer's paged FP8 indexer key cache plus its pooled-block cache (and, optionally,
    its super-block cache).

    Owns (or wraps, see :meth:`from_tensors`) ``kv_cache`` uint8 [num_pages, 64 * (D + 4)],
    ``pooled_cache`` uint8 [num_pages, D + 4] (None for a flat-DSA-only cache, ``pooled=False``)
    and, with ``super_size``, ``super_cache`` uint8 [num_pages, D + 4] (None without). Page
    allocation stays with the caller (the serving engine's block manager): this object only
    writes through slot mappings and reads through block tables. Freeing a page needs no call;
    page moves need :meth:`copy_pages`.

    Query it with :meth:`hisa_index` / :meth:`dsa_index`: they pass the cache's own tensors,
    block size and super-block level, so a block size other than the one the pooled rows were
    built with cannot be passed by mistake (the raw-tensor :func:`hisa.hisa_index_paged` trusts
    its caller on that). A new cache's pooled (and super-block) rows hold the unknown sentinel
    (:mod:`hisa.cache.layout`), which ranks below every real block until an append writes the
    row.

    Example:
        >>> cache = PagedIndexerCache(num_pages=1024, head_dim=128, block_size=128)
        >>> cache.append(k_new, slot_mapping, positions, block_table=bt, req_indices=req)
        >>> idx = cache.hisa_index(q, w, seq_lens, bt, topk=2048, block_topk=64)
        >>> long = PagedIndexerCache(num_pages=1 << 16, block_size=128, super_size=2)
        >>> idx = long.hisa_index(q, w, seq_lens, bt, topk=2048, block_topk=64, super_topk=128)
    """

    def __init__(self, num_pages: int, *, head_dim: int = 128, block_size: int = 128,
                 super_size: int | None = None, ue8m0: bool = False, pooled: bool = True,
                 device: str | torch.device = "cpu") -> None:
        num_pages = check_positive_int("num_pages", num_pages)
        head_dim = check_positive_int("head_dim", head_dim)
        self.block_size = check_block_size(block_size)
        self.super_size = None if super_size is None else check_super_size(super_size)
        if self.super_size is not None and not pooled:
            raise ValueError("super_size: a super-block level is pooled from the block rows, so "
                             "it needs pooled=True, got pooled=False")
        device = check_device("device", device)
        self.head_dim = head_dim
        self.ue8m0 = ue8m0
        self.kv_cache = torch.zeros(num_pages, page_bytes(head_dim), dtype=torch.uint8,
                                    device=device)
        self.pooled_cache = None
        if pooled:
            self.pooled_cache = mark_pooled_unknown(torch.empty(
                num_pages, pooled_row_bytes(head_dim), dtype=torch.uint8, device=device))
        self.super_cache = None
        if self.super_size is not None:
            self.super_cache = mark_pooled_unknown(torch.empty_like(self.pooled_cache))

    @classmethod
    def from_tensors(cls, kv_cache: torch.Tensor, pooled_cache: torch.Tensor | None, *,
                     head_dim: int = 128, block_size: int = 128,
                     super_cache: torch.Tensor | None = None, super_size: int | None = None,
                     ue8m0: bool = False) -> "PagedIndexerCache":
        """Wrap engine-owned tensors (no copy); ``pooled_cache=None`` for a flat-only cache.

        Rows of an engine-allocated ``pooled_cache`` (and ``super_cache``) that no append of
        this block size (and super size) has written must hold the unknown sentinel
        (:func:`hisa.cache.layout.mark_pooled_unknown`), not zeros: a zero row scores 0 and can
        displace real blocks (or super-blocks).
        """
        pages = as_pages(kv_cache, head_dim)
        if pooled_cache is not None:
            check_pooled_cache(pooled_cache, head_dim, pages.shape[0])
        if (super_cache is None) != (super_size is None):
            raise ValueError(f"super_cache/super_size: expected both or neither, got "
                             f"super_cache={type(super_cache).__name__}, "
                             f"super_size={super_size!r}")
        if super_cache is not None:
            if pooled_cache is None:
                raise ValueError("super_cache: a super-block level needs the pooled_cache it is "
                                 "pooled from, got pooled_cache=None")
            check_pooled_cache(super_cache, head_dim, pages.shape[0], name="super_cache")
        self = cls.__new__(cls)
        self.block_size = check_block_size(block_size)
        self.super_size = None if super_size is None else check_super_size(super_size)
        self.head_dim, self.ue8m0 = check_positive_int("head_dim", head_dim), ue8m0
        self.kv_cache, self.pooled_cache, self.super_cache = pages, pooled_cache, super_cache
        return self

    @property
    def num_pages(self) -> int:
        return self.kv_cache.shape[0]

    @property
    def device(self) -> torch.device:
        return self.kv_cache.device

    @property
    def pooled(self) -> bool:
        """Whether this cache maintains pooled rows (HISA can query it)."""
        return self.pooled_cache is not None

    def append(self, k: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor, *,
               k_scale: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
               req_indices: torch.Tensor | None = None, backend: str = "auto") -> None:
        """:func:`paged_cache_append` with this cache's tensors, block size, super-block level
        and ue8m0 flag."""
        paged_cache_append(self.kv_cache, self.pooled_cache, k, slot_mapping, positions,
                           k_scale=k_scale, block_table=block_table, req_indices=req_indices,
                           block_size=self.block_size, ue8m0=self.ue8m0,
                           super_cache=self.super_cache, super_size=self.super_size,
                           backend=backend)

    def hisa_index(self, q: torch.Tensor, weights: torch.Tensor, seq_lens: torch.Tensor,
                   block_table: torch.Tensor, *, topk: int = 2048, block_topk: int = 64,
                   super_topk: int | None = None, return_scores: bool = False,
                   out: torch.Tensor | None = None, backend: str = "auto"):
        """:func:`hisa.hisa_index_paged` over this cache, with its block size (and, when
        ``super_topk`` is given, its super-block level).

        Raises ValueError for a cache built with ``pooled=False``, or ``super_topk`` on a cache
        without a super-block level.
        """
        if super_topk is not None and self.super_cache is None:
            raise ValueError("super_topk: this cache was built without a super-block level "
                             "(super_size=None)")
        sup = {} if super_topk is None else dict(super_cache=self.super_cache,
                                                 super_size=self.super_size,
                                                 super_topk=super_topk)
        if self.pooled_cache is None:
            raise ValueError("cache: expected a pooled cache for HISA, got one built with "
                             "pooled=False (no pooled rows are maintained); use dsa_index or "
                             "build the cache with pooled=True")
        from ..ops.indexer.decode import hisa_index_paged
        return hisa_index_paged(q, self.kv_cache, self.pooled_cache, weights, seq_lens,
                                block_table, topk=topk, block_size=self.block_size,
                                block_topk=block_topk, return_scores=return_scores, out=out,
                                backend=backend, **sup)

    def dsa_index(self, q: torch.Tensor, weights: torch.Tensor, seq_lens: torch.Tensor,
                  block_table: torch.Tensor, *, topk: int = 2048, return_scores: bool = False,
                  out: torch.Tensor | None = None, backend: str = "auto"):
        """:func:`hisa.dsa_index_paged` (the flat baseline) over this cache."""
        from ..ops.dsa.paged import dsa_index_paged
        return dsa_index_paged(q, self.kv_cache, weights, seq_lens, block_table, topk=topk,
                               return_scores=return_scores, out=out, backend=backend)

    def copy_pages(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy pages ``src`` to ``dst`` (int [n] each) with their pooled and super-block rows
        (swap/defrag)."""
        check_tensor("src", src, dtypes=INDEX_DTYPES, ndim=1)
        check_tensor("dst", dst, dtypes=INDEX_DTYPES, ndim=1)
        check_shape("dst", dst, (src.numel(),))
        s, d = src.long(), dst.long()
        self.kv_cache[d] = self.kv_cache[s]
        if self.pooled_cache is not None:
            self.pooled_cache[d] = self.pooled_cache[s]
        if self.super_cache is not None:
            self.super_cache[d] = self.super_cache[s]

    def request_keys(self, block_table_row: torch.Tensor, length: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys [0, length) of one request: (fp8 [length, D], fp32 scales [length])."""
        return gather_request_keys(self.kv_cache, block_table_row, length, self.head_dim)

    def request_pooled(self, block_table_row: torch.Tensor, num_blocks: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled rows of complete blocks [0, num_blocks) of one request (fp8 [nb, D], [nb])."""
        if self.pooled_cache is None:
            raise ValueError("cache: built with pooled=False, it has no pooled rows")
        return gather_request_pooled(self.pooled_cache, block_table_row, num_blocks,
                                     self.block_size, self.head_dim)

    def request_super(self, block_table_row: torch.Tensor, num_supers: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of complete super-blocks [0, num_supers) of one request (fp8 [ns, D], [ns])."""
        if self.super_cache is None:
            raise ValueError("super_size: this cache was built without a super-block level "
                             "(super_size=None)")
        return gather_request_pooled(self.super_cache, block_table_row, num_supers,
                                     self.block_size * self.super_size, self.head_dim)
