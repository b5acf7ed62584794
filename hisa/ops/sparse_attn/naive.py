"""Reference attention over selected keys only (the consumer of the indexer's output)."""
from __future__ import annotations

import math

import torch

from ...utils.validate import check_shape, check_tensor
from ..dsa.naive import NAIVE_TILE_BYTES


def sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               indices: torch.Tensor, ks: torch.Tensor, *,
                               scale: float | None = None) -> torch.Tensor:
    """Softmax attention of each query over its selected keys (MQA: one shared K/V head).

    Args:
        q: [T, Hq, Dk] queries (any float dtype; computed in fp32).
        k: [S, Dk] keys, v: [S, Dv] values of the packed key buffer.
        indices: int32 [T, K] offsets relative to ks (the indexer's output); -1 entries ignored.
        ks: int32 [T] window starts.
        scale: softmax scale, default 1/sqrt(Dk).

    Returns:
        fp32 [T, Hq, Dv]; a row with no valid index gives zeros (never NaN).

    Queries are processed in tiles whose gathered keys and values, fp32 [tile, K, Dk + Dv],
    and logits [tile, Hq, K] stay within :data:`hisa.ops.dsa.naive.NAIVE_TILE_BYTES`.

    Example:
        >>> o = hisa.sparse_attention_reference(q, k, v, hisa.dsa_index(qi, ki, w, ks, ke), ks)
    """
    check_tensor("q", q, ndim=3)
    check_tensor("k", k, ndim=2)
    check_tensor("v", v, ndim=2)
    check_tensor("indices", indices, dtypes=(torch.int32, torch.int64), ndim=2)
    check_tensor("ks", ks, dtypes=(torch.int32, torch.int64), ndim=1)
    T, _, Dk = q.shape
    check_shape("k", k, (None, Dk))
    check_shape("v", v, (k.shape[0], None))
    check_shape("indices", indices, (T, None))
    check_shape("ks", ks, (T,))
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    valid = indices >= 0
    pos = (indices.long() + ks.long().unsqueeze(1)).masked_fill(~valid, 0)
    if bool(((pos >= k.shape[0]) & valid).any()) or bool((pos < 0).any()):
        raise ValueError("indices: expected offsets that land inside k once ks is added")
    Hq, K, Dv = q.shape[1], indices.shape[1], v.shape[1]
    out = torch.empty(T, Hq, Dv, dtype=torch.float32, device=q.device)
    tile = max(1, NAIVE_TILE_BYTES // (4 * max(K, 1) * (Dk + Dv + Hq)))
    for t0 in range(0, T, tile):
        sl = slice(t0, min(T, t0 + tile))
        out[sl] = _attend_tile(q[sl], k, v, pos[sl], valid[sl], scale)
    return out


def _attend_tile(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                 valid: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of a query tile over its gathered keys: fp32 [tile, Hq, Dv]."""
    kg, vg = k.float()[pos], v.float()[pos]                    # [tile, K, Dk], [tile, K, Dv]
    logits = torch.einsum("thd,tkd->thk", q.float(), kg) * scale
    logits = logits.masked_fill(~valid.unsqueeze(1), float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)      # empty rows -> zeros
    return torch.einsum("thk,tkd->thd", probs, vg)
