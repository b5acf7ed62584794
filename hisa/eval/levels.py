"""Fidelity of the super-block level: how much of a selection a budget of super-blocks can hold.

``super_oracle_recall`` is the upper bound of any super-block stage: the fraction of a reference
selection (two-level HISA's, or flat's) that the best possible choice of ``super_topk``
super-blocks (the forced first and the query's own among them) contains. A three-level
selection can recover at most that fraction of the two-level one, whatever its scores, so the
gap between the measured recall and this bound is what better super-block scores could win,
and the bound itself is what a larger ``super_topk`` (or smaller ``super_size``) would.

``multiscale_keys`` draws synthetic keys with structure at several scales (drifts every 256,
4,096 and 32,768 tokens), the regime where a level above blocks has something to rank; the
single-scale generator of :func:`hisa.testing.inputs.make_indexer_inputs` (drift every 256
tokens only) is the adversarial case, where super-block means average unrelated blocks.
"""
from __future__ import annotations

import torch

from ..ops.indexer.naive_super import eligible_supers


def super_oracle_recall(idx: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, *,
                        block_size: int, super_size: int, super_topk: int) -> torch.Tensor:
    """Per query: the largest fraction of the selected keys ``idx`` (int32 [T, K] offsets from
    ks, -1 padded) that ``super_topk`` super-blocks can hold, the first and last eligible
    super-blocks always among them. fp32 [T]; NaN for a query with no selected key."""
    span = block_size * super_size
    first, end = eligible_supers(ks, ke, block_size, super_size)
    n = int((end - first).max()) if idx.shape[0] else 1
    pos = idx.long() + ks.long().unsqueeze(1)
    rel = torch.where(idx >= 0, pos // span - first.unsqueeze(1), n)            # [T, K]
    counts = torch.zeros(idx.shape[0], n + 1, device=idx.device)
    counts.scatter_add_(1, rel, torch.ones_like(rel, dtype=torch.float32))
    counts = counts[:, :n]                                                      # [T, n]
    total = counts.sum(1)
    col = torch.arange(n, device=idx.device)
    last = (end - first - 1).unsqueeze(1)
    forced = (col == 0) | (col == last)
    # Forced super-blocks first (any count), then the fullest others.
    rank = torch.where(forced, counts + float(idx.shape[1] + 1), counts)
    rank = torch.where(col <= last, rank, -1.0)
    top = torch.topk(rank, min(super_topk, n), dim=1).indices
    held = torch.gather(counts, 1, top).sum(1)
    return torch.where(total > 0, held / total.clamp_min(1), torch.full_like(total, float("nan")))


def multiscale_keys(length: int, head_dim: int, *, generator: torch.Generator, device,
                    scales: tuple[tuple[int, float], ...] = ((256, 2.0), (4096, 1.5),
                                                             (32768, 1.0))) -> torch.Tensor:
    """fp32 [length, D] keys: unit noise plus, per (period, amplitude), a direction redrawn
    every ``period`` tokens."""
    k = torch.randn(length, head_dim, generator=generator, device=device)
    for period, amp in scales:
        drift = torch.randn(length // period + 1, head_dim, generator=generator, device=device)
        k += amp * drift.repeat_interleave(period, dim=0)[:length]
    return k
