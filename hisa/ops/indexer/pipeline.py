"""HISA packed prefill end to end in Triton, and the same pipeline split into timed stages.

=============  ==============================================  ============================
stage          kernel                                          output
=============  ==============================================  ============================
pool           ``pool.pool_blocks``                            pooled [NB, D] (+ fp8 scale)
block_select   ``block_scores.block_select`` (scores + top-m)  int32 [T, m] ascending ids
token_select   ``token_scores.token_select`` (scores + top-k)  int32 [T, k] offsets
=============  ==============================================  ============================

Temporaries: the pooled keys, the [T, m] block ids, and one scratch row per persistent program
(NB and m*B fp32): O(T * m + programs * (NB + m*B)), far under the O(T * m * B) the contract
allows; nothing depends on T beyond the ids.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..dsa.prefill import check_kernel_shapes, prepare_operands
from .block_scores import block_select
from .pool import check_block_size, pool_blocks
from .token_scores import token_select


def _prepare(q, k, weights, ks, ke, k_scale, block_size):
    check_kernel_shapes(q, k)
    check_block_size(block_size)
    q, k, prec = prepare_operands(q, k)
    return q, k, weights.contiguous(), ks.contiguous(), ke.contiguous(), k_scale, prec


def hisa_prefill_stages(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor,
                        ks: torch.Tensor, ke: torch.Tensor, *, k_scale: torch.Tensor | None,
                        topk: int, block_size: int, block_topk: int
                        ) -> list[tuple[str, Callable[[], object]]]:
    """The pipeline as [(stage name, zero-argument callable)], run in order.

    Each callable runs one stage on the intermediates of the previous ones (kept in the
    closure), so a benchmark can time the stages one by one; running them all in order gives
    the result of :func:`hisa_index_triton` in ``state["idx"]`` of the last callable's return.

    Example:
        >>> for name, fn in hisa_prefill_stages(q, k, w, ks, ke, k_scale=ksc, topk=2048,
        ...                                     block_size=128, block_topk=64):
        ...     fn()
    """
    q, k, weights, ks, ke, k_scale, prec = _prepare(q, k, weights, ks, ke, k_scale, block_size)
    T = q.shape[0]
    state: dict = {
        "ids": torch.empty(T, block_topk, dtype=torch.int32, device=q.device),
        "idx": torch.empty(T, topk, dtype=torch.int32, device=q.device),
    }

    def pool():
        state["pooled"], state["pooled_scale"] = pool_blocks(k, k_scale, block_size=block_size)
        return state

    def blocks():
        block_select(q, state["pooled"], weights, ks, ke, block_size=block_size,
                     block_topk=block_topk, pooled_scale=state["pooled_scale"], prec=prec,
                     out=state["ids"])
        return state

    def tokens():
        token_select(q, k, weights, ks, ke, state["ids"], block_size=block_size, topk=topk,
                     k_scale=k_scale, prec=prec, out=state["idx"])
        return state

    return [("pool", pool), ("block_select", blocks), ("token_select", tokens)]


def hisa_index_triton(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, ks: torch.Tensor,
                      ke: torch.Tensor, *, k_scale: torch.Tensor | None, topk: int,
                      block_size: int, block_topk: int, out: torch.Tensor | None = None,
                      need_scores: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HISA selection with Triton kernels (inputs validated by :func:`hisa.hisa_index`).

    Returns:
        (int32 [T, topk] offsets relative to ks, -1 padded — ``out`` itself when given;
         fp32 [T, topk] aligned scores, -inf padded, or None unless ``need_scores``).
    """
    q, k, weights, ks, ke, k_scale, prec = _prepare(q, k, weights, ks, ke, k_scale, block_size)
    pooled, pooled_scale = pool_blocks(k, k_scale, block_size=block_size)
    ids = block_select(q, pooled, weights, ks, ke, block_size=block_size,
                       block_topk=block_topk, pooled_scale=pooled_scale, prec=prec)
    return token_select(q, k, weights, ks, ke, ids, block_size=block_size, topk=topk,
                        k_scale=k_scale, prec=prec, out=out, need_scores=need_scores)
