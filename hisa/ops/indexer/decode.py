"""HISA over the paged FP8 key cache (decode): block scores from the pooled-block cache.

Blocks are request-relative: block ``j`` of request ``b`` holds positions ``[j * B, (j + 1) * B)``
and its representative is the pooled row of page ``block_table[b, (j + 1) * B // 64 - 1]``
(:mod:`hisa.cache.layout`). A row seeing ``L`` keys has eligible blocks ``[0, ceil(L / B))``;
the first and the last are forced, so only complete blocks are ever scored from the pooled
cache (an incomplete tail block has no pooled row yet and needs none).
"""
from __future__ import annotations

import torch

from ...cache.layout import check_pooled_cache, gather_request_keys, gather_request_pooled
from ...cache.paged import check_block_size
from ...utils.backend import resolve_backend, runs_on_device_of
from ...utils.output import check_out_buffer, finish_output
from ...utils.validate import (FP8_DTYPE, check_hisa_params, check_same_device,
                               check_super_params)
from ..dsa.paged import check_paged_inputs, check_paged_values, per_request_reference
from .naive import naive_hisa_index
from .naive_super import naive_hisa_index_paged_super


def naive_hisa_index_paged(q: torch.Tensor, pages: torch.Tensor, pooled_cache: torch.Tensor,
                           weights: torch.Tensor, seq_lens: torch.Tensor,
                           block_table: torch.Tensor, *, topk: int = 2048, block_size: int = 128,
                           block_topk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: gather each request's keys and pooled rows, run :func:`naive_hisa_index`.

    Complete blocks take their representative from ``pooled_cache`` (never re-pooled); the
    incomplete tail block, always forced, gets a zero placeholder.

    Returns:
        (positions int32 [batch * next_n, topk], -1 padded; scores fp32, -inf padded).
    """
    next_n, D = q.shape[1], q.shape[3]
    zeros = torch.zeros(next_n, dtype=torch.int32, device=q.device)

    def select(b, length, row_lens):
        k, k_scale = gather_request_keys(pages, block_table[b], length, D)
        full, nb = length // block_size, -(-length // block_size)
        pooled, pooled_scale = gather_request_pooled(pooled_cache, block_table[b], full,
                                                     block_size, D)
        if nb > full:                                        # tail placeholder, always forced
            pooled = torch.cat([pooled, torch.zeros(1, D, device=q.device).to(FP8_DTYPE)])
            pooled_scale = torch.cat([pooled_scale, torch.ones(1, device=q.device)])
        return naive_hisa_index(q[b], k, weights[b * next_n:(b + 1) * next_n], zeros, row_lens,
                                k_scale=k_scale, topk=topk, block_size=block_size,
                                block_topk=block_topk, pooled=pooled, pooled_scale=pooled_scale)

    return per_request_reference(q, seq_lens, topk, select)


def _kernel_check(q, pages, block_table, block_size: int, block_topk: int,
                  super_size: int | None = None, super_topk: int | None = None) -> None:
    from ..dsa.decode_kernels import decode_operands
    from .decode_kernels import check_decode_params
    decode_operands(q, pages)
    check_decode_params(block_size, block_topk, block_table.shape[1],
                        block_rows=super_size is None)
    if super_size is not None:
        from .decode_super import check_decode_super_params
        check_decode_super_params(block_size, super_size, super_topk, block_table.shape[1])


@runs_on_device_of("q")
def hisa_index_paged(q: torch.Tensor, kv_cache: torch.Tensor, pooled_cache: torch.Tensor,
                     weights: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor, *,
                     topk: int = 2048, block_size: int = 128, block_topk: int = 64,
                     super_cache: torch.Tensor | None = None, super_size: int | None = None,
                     super_topk: int | None = None, return_scores: bool = False,
                     out: torch.Tensor | None = None, backend: str = "auto"):
    """HISA selection for decode over the paged FP8 key cache and its pooled-block cache
    (and, for three levels, its super-block cache).

    **The raw-tensor contract.** ``pooled_cache`` carries no record of how it was built, so this
    function trusts its caller on two things it cannot check, and a violation gives a silently
    different selection, not an error:

    * every pooled row it reads was written by appends with this same ``block_size`` (a row
      pooled for B = 128 describes 128 tokens; read with B = 256 it is taken for the mean of
      256);
    * every complete block of every request was appended with pooling on (a row never written
      holds whatever the tensor was created with; a :class:`hisa.PagedIndexerCache` starts
      with the unknown sentinel, which ranks last, but a ``torch.zeros`` engine tensor scores 0).

    :meth:`hisa.PagedIndexerCache.hisa_index` passes the cache's own tensors and block size
    and refuses a cache built without pooling: prefer it.

    Args:
        q, kv_cache, weights, seq_lens, block_table, topk, return_scores, out: as in
            :func:`hisa.dsa_index_paged`.
        pooled_cache: uint8 [num_pages, D + 4], maintained by :func:`hisa.paged_cache_append`
            (or :class:`hisa.PagedIndexerCache`) with the same ``block_size``.
        block_size: B, a multiple of 64. block_topk: m; ``block_topk * block_size >= topk``.
        super_cache: uint8 [num_pages, D + 4] super-block rows maintained by the same appends
            with the same ``super_size`` (:class:`hisa.PagedIndexerCache` with
            ``super_size``), or None for two levels.
        super_size, super_topk: Bs and ms of the super-block level, given with
            ``super_cache`` (validated as in :func:`hisa.hisa_index`).
        backend: "torch" runs the reference; "triton" runs the HISA kernels for every request;
            "auto" runs Triton on CUDA (torch elsewhere) and routes, inside the kernels and
            per request, a request whose longest row sees at most
            :data:`hisa.ops.indexer.decode_kernels.HISA_MIN_KEYS` keys to the flat paged
            indexer (exact top-k; identical to HISA whenever the request has at most
            ``block_topk`` blocks). The measured crossover on an H100 is 0 (HISA was faster at
            every measured shape from 8K keys up), so "auto" currently equals "triton". No host
            synchronisation either way.

    Returns:
        int32 [batch * next_n, topk] request-relative positions, -1 padded (and fp32 scores when
        asked).

    Example:
        >>> cache = hisa.PagedIndexerCache(4096, block_size=128)
        >>> idx = hisa.hisa_index_paged(q, cache.kv_cache, cache.pooled_cache, w, seq_lens, bt)
        >>> long = hisa.PagedIndexerCache(1 << 16, block_size=128, super_size=2)
        >>> idx = hisa.hisa_index_paged(q, long.kv_cache, long.pooled_cache, w, seq_lens, bt,
        ...                             super_cache=long.super_cache, super_size=2,
        ...                             super_topk=128)
    """
    batch, next_n, _, D, pages = check_paged_inputs(q, kv_cache, weights, seq_lens,
                                                    block_table)
    check_pooled_cache(pooled_cache, D, pages.shape[0])
    topk, block_size, block_topk = check_hisa_params(topk=topk, block_size=block_size,
                                                     block_topk=block_topk)
    check_block_size(block_size)
    sup = check_super_params(block_topk=block_topk, super_size=super_size,
                             super_topk=super_topk)
    three = bool(sup)
    if three != (super_cache is not None):
        raise ValueError(f"super_cache: expected a tensor exactly when super_size/super_topk "
                         f"are given, got super_cache={type(super_cache).__name__} with "
                         f"super_size={super_size!r}")
    if three:
        check_pooled_cache(super_cache, D, pages.shape[0], name="super_cache")
        check_same_device(q=q, super_cache=super_cache)
    check_out_buffer(out, batch * next_n, topk, q.device)
    if resolve_backend(backend, q.device, lambda: _kernel_check(q, pages, block_table,
                                                                block_size, block_topk,
                                                                **sup)) == "torch":
        check_paged_values(seq_lens, block_table, pages.shape[0])
        if three:
            idx, scores = naive_hisa_index_paged_super(
                q, pages, pooled_cache, super_cache, weights, seq_lens, block_table, topk=topk,
                block_size=block_size, block_topk=block_topk, **sup)
        else:
            idx, scores = naive_hisa_index_paged(q, pages, pooled_cache, weights, seq_lens,
                                                 block_table, topk=topk, block_size=block_size,
                                                 block_topk=block_topk)
    else:
        from .decode_kernels import hisa_decode
        idx, scores = hisa_decode(q, pages, pooled_cache, weights, seq_lens, block_table,
                                  topk=topk, block_size=block_size, block_topk=block_topk,
                                  out=out, need_scores=return_scores,
                                  route_short_to_flat=(backend == "auto"),
                                  super_cache=super_cache, **sup)
    return finish_output(idx, scores, out=out, return_scores=return_scores)
