"""Exact merge of candidate lists: top-k by (score descending, global id ascending).

The single-process references break score ties to the lower position (and HISA's block stage
to the lower block id). Merging per-rank top-k lists under the same total order gives exactly
the single-process selection: every member of the global top-k is in the top-k of the rank
that holds it, and the order decides equal scores the same way on every rank.

The order is one int64 key per candidate, so one ``torch.topk`` does the merge on any device
without a host sync: the high 32 bits are the fp32 score mapped to an order-preserving int32
(-0.0 folded into +0.0, since they compare equal), the low 32 bits are ``2**32 - 1 - id``.
"""
from __future__ import annotations

import torch

_LOW_MASK = (1 << 32) - 1
_INVALID_KEY = torch.iinfo(torch.int64).min


def order_keys(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys whose descending order is (score desc, id asc); id < 0 sorts last."""
    bits = (scores.float() + 0.0).view(torch.int32)        # + 0.0 turns -0.0 into +0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)           # float order as signed int order
    low = _LOW_MASK - ids.long()
    key = (ordered.long() << 32) | low
    return torch.where(ids >= 0, key, _INVALID_KEY)


def merge_topk(scores: torch.Tensor, ids: torch.Tensor, topk: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``topk`` best candidates of each row, best first.

    Args:
        scores: fp32 [rows, n] candidate scores (ignored where ``ids < 0``).
        ids: int [rows, n] global ids (positions or block ids, unique within a row among the
            valid entries), -1 for an empty slot.
        topk: entries kept per row.

    Returns:
        (ids int64 [rows, topk], -1 padded; scores fp32 [rows, topk], -inf padded), ordered by
        score descending, ties to the lower id.
    """
    rows, n = ids.shape
    keys = order_keys(scores, ids)
    if n < topk:
        keys = torch.cat([keys, keys.new_full((rows, topk - n), _INVALID_KEY)], dim=1)
        scores = torch.cat([scores.float(), scores.new_full((rows, topk - n), float("-inf"))],
                           dim=1)
        ids = torch.cat([ids.long(), ids.new_full((rows, topk - n), -1).long()], dim=1)
    best, col = torch.topk(keys, topk, dim=1)
    valid = best != _INVALID_KEY
    out_ids = torch.where(valid, torch.gather(ids.long(), 1, col), -1)
    out_scores = torch.where(valid, torch.gather(scores.float(), 1, col), float("-inf"))
    return out_ids, out_scores
