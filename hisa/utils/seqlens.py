"""Packed variable-length batches -> per-query key windows [ks, ke)."""
from __future__ import annotations

import torch

from .validate import check_tensor


def windows_from_cu_seqlens(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Key windows of a packed causal prefill.

    Sequence b owns queries ``[cu_seqlens_q[b], cu_seqlens_q[b+1])`` and keys
    ``[cu_seqlens_k[b], cu_seqlens_k[b+1])`` of the packed buffers. Its queries are the *last*
    ``q_len`` tokens of its ``k_len`` keys (chunked prefill over a cached prefix), so query i of b
    sits at sequence position ``k_len - q_len + i`` and sees keys
    ``[cu_seqlens_k[b], cu_seqlens_k[b] + k_len - q_len + i + 1)``.
    With ``cu_seqlens_k=None`` keys and queries coincide (plain prefill).

    Args:
        cu_seqlens_q: int32/int64 [B + 1], non-decreasing, starting at 0.
        cu_seqlens_k: same, with ``k_len >= q_len`` per sequence; defaults to ``cu_seqlens_q``.

    Returns:
        (ks, ke), int32 [T] each, T = cu_seqlens_q[-1].

    Example:
        >>> ks, ke = windows_from_cu_seqlens(torch.tensor([0, 3, 5]))
        >>> ks.tolist(), ke.tolist()
        ([0, 0, 0, 3, 3], [1, 2, 3, 4, 5])
    """
    check_tensor("cu_seqlens_q", cu_seqlens_q, dtypes=(torch.int32, torch.int64), ndim=1)
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    check_tensor("cu_seqlens_k", cu_seqlens_k, dtypes=(torch.int32, torch.int64), ndim=1)
    if cu_seqlens_q.numel() < 1 or cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(f"cu_seqlens_k: expected {cu_seqlens_q.numel()} entries like "
                         f"cu_seqlens_q (at least 1), got {cu_seqlens_k.numel()}")
    cq, ck = cu_seqlens_q.long(), cu_seqlens_k.long()
    for name, c in (("cu_seqlens_q", cq), ("cu_seqlens_k", ck)):
        if int(c[0]) != 0 or bool((c[1:] < c[:-1]).any()):
            raise ValueError(f"{name}: expected non-decreasing offsets starting at 0, "
                             f"got {c.tolist()[:8]}...")
    q_len, k_len = cq.diff(), ck.diff()
    if bool((k_len < q_len).any()):
        b = int((k_len < q_len).nonzero()[0, 0])
        raise ValueError(f"cu_seqlens_k: expected k_len >= q_len for every sequence, sequence {b} "
                         f"has k_len {int(k_len[b])} < q_len {int(q_len[b])}")
    T = int(cq[-1])
    seq = torch.repeat_interleave(torch.arange(q_len.numel(), device=cq.device), q_len)
    i = torch.arange(T, device=cq.device) - cq[seq]
    ks = ck[seq]
    ke = ks + (k_len - q_len)[seq] + i + 1
    return ks.to(torch.int32), ke.to(torch.int32)
