"""The decode path of a probe's tail: each token one step through the shipped paged ops.

With ``decode="paged"`` the evaluation feeds the questions and answers of a probe one token per
forward, as a serving engine decodes. At every global layer the indexer keys live in a
:class:`hisa.PagedIndexerCache` (FP8 pages of 64 tokens plus HISA's pooled-block rows, one
request whose block table is simply its pages in order): the prefix's keys are written once
with :func:`hisa.paged_cache_append`, each decoded token appends its own, and the selection is
:func:`hisa.hisa_index_paged` (HISA) or :func:`hisa.dsa_index_paged` (flat), the ops an engine
calls, on the backend the run asked for. Settings without a paged op (block-sparse, the eval
variants) select through the prefill path, one row at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import hisa
from hisa.cache.layout import PAGE_SIZE


def has_paged_op(method) -> bool:
    """Flat and HISA (with B a multiple of a page) have a paged decode op."""
    return method.name == "flat" or (method.name == "hisa"
                                     and method.block_size % PAGE_SIZE == 0)


@dataclass
class PagedLayer:
    """One layer's paged indexer cache for a single request."""
    cache: hisa.PagedIndexerCache
    block_table: torch.Tensor     # int32 [1, pages]
    length: int                   # keys written so far

    @classmethod
    def build(cls, keys: torch.Tensor, capacity: int, *, block_size: int, backend: str
              ) -> "PagedLayer":
        """Cache for ``capacity`` tokens holding ``keys`` fp32 [S, D]."""
        pages = -(-capacity // PAGE_SIZE)
        cache = hisa.PagedIndexerCache(pages, head_dim=keys.shape[1], block_size=block_size,
                                       device=keys.device)
        table = torch.arange(pages, dtype=torch.int32, device=keys.device).unsqueeze(0)
        state = cls(cache, table, 0)
        state.append(keys, backend=backend)
        return state

    def append(self, keys: torch.Tensor, *, backend: str) -> None:
        n = keys.shape[0]
        pos = torch.arange(self.length, self.length + n, device=keys.device)
        self.cache.append(keys.contiguous(), pos, pos, block_table=self.block_table,
                          req_indices=torch.zeros(n, dtype=torch.int64, device=keys.device),
                          backend=backend)
        self.length += n

    def select(self, method, q: torch.Tensor, w: torch.Tensor, *, backend: str
               ) -> torch.Tensor:
        """One decode row: q fp32 [1, H, D], w fp32 [1, H] -> int32 [1, K] positions."""
        from hisa.utils.quant import quantize_fp8
        q8, q_scale = quantize_fp8(q.contiguous(), group_size=q.shape[-1])   # [1, H], [1, H]
        w8 = (w * q_scale).contiguous()
        seq = torch.tensor([self.length], dtype=torch.int32, device=q.device)
        q4 = q8.unsqueeze(0)                                                   # [1, 1, H, D]
        if method.name == "flat":
            return hisa.dsa_index_paged(q4, self.cache.kv_cache, w8, seq, self.block_table,
                                        topk=method.topk, backend=backend)
        return hisa.hisa_index_paged(q4, self.cache.kv_cache, self.cache.pooled_cache, w8, seq,
                                     self.block_table, topk=method.topk,
                                     block_size=method.block_size,
                                     block_topk=method.block_topk, backend=backend)
