"""Reference attention over selected keys only (the consumer of the indexer's output)."""
from __future__ import annotations

import math

import torch

from ...utils.validate import check_shape, check_tensor


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
    kg, vg = k.float()[pos], v.float()[pos]                          # [T, K, Dk], [T, K, Dv]
    logits = torch.einsum("thd,tkd->thk", q.float(), kg) * scale
    logits = logits.masked_fill(~valid.unsqueeze(1), float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)            # empty rows -> zeros
    return torch.einsum("thk,tkd->thd", probs, vg)
