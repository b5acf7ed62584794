"""Fidelity metrics of a selection against the flat indexer's, per query.

All selections are in the contract's format: int32 [T, K] offsets relative to ``ks``, -1 padded.
Every function returns a per-query fp32 tensor [T]; NaN marks a query where the metric is
undefined (for example recall when flat keeps no strictly positive score).

Ties: the flat set is computed by :func:`hisa.dsa_index`, whose torch backend breaks equal scores
towards the lower key index. ReLU makes many keys score exactly 0, and which of those fill the
last slots is arbitrary, so ``positive_recall`` only asks for flat's strictly positive picks;
IoU counts every pick and so includes the tie-breaking choice.
"""
from __future__ import annotations

import torch


def selection_mask(idx: torch.Tensor, width: int) -> torch.Tensor:
    """Boolean [T, width] membership of the selected offsets (-1 ignored)."""
    T = idx.shape[0]
    mask = torch.zeros(T, width + 1, dtype=torch.bool, device=idx.device)
    col = torch.where(idx >= 0, idx.long(), width)
    mask.scatter_(1, col, True)
    return mask[:, :width]


def _width(*idxs: torch.Tensor) -> int:
    return max(int(i.max()) for i in idxs) + 1 if all(i.numel() for i in idxs) else 1


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|A & B| / |A | B| per query (1 when both are empty)."""
    w = _width(a, b)
    ma, mb = selection_mask(a, w), selection_mask(b, w)
    inter, union = (ma & mb).sum(1).float(), (ma | mb).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def recall(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """|ref & other| / |ref| per query (every pick of ``ref`` counts; 0 when ``ref`` is empty)."""
    w = _width(ref, other)
    mr, mo = selection_mask(ref, w), selection_mask(other, w)
    return (mr & mo).sum(1).float() / mr.sum(1).clamp_min(1).float()


def positive_recall(flat_idx: torch.Tensor, flat_scores: torch.Tensor,
                    other: torch.Tensor) -> torch.Tensor:
    """Fraction of flat's strictly positive picks that ``other`` also selects (NaN if none)."""
    w = _width(flat_idx, other)
    pos = torch.where((flat_idx >= 0) & (flat_scores > 0), flat_idx, -1)
    mp, mo = selection_mask(pos, w), selection_mask(other, w)
    n = mp.sum(1).float()
    return torch.where(n > 0, (mp & mo).sum(1).float() / n.clamp_min(1),
                       torch.full_like(n, float("nan")))


def positive_iou(flat_idx: torch.Tensor, other: torch.Tensor, full_scores: torch.Tensor,
                 ks: torch.Tensor) -> torch.Tensor:
    """IoU of the two sets restricted to keys with a strictly positive exact score.

    ``full_scores`` fp32 [T, S] are the exact indexer scores (absolute key positions). On a
    ReLU proxy many picks score exactly 0 and are chosen by the tie rule alone (lowest index);
    this IoU leaves them out of both sets (NaN when neither set has a positive pick).
    """
    def pos(idx):
        a = torch.where(idx >= 0, idx.long() + ks.long().unsqueeze(1), 0)
        keep = (idx >= 0) & (torch.gather(full_scores, 1, a) > 0)
        return torch.where(keep, idx, -1)
    pa, pb = pos(flat_idx), pos(other)
    w = _width(flat_idx, other)
    ma, mb = selection_mask(pa, w), selection_mask(pb, w)
    inter, union = (ma & mb).sum(1).float(), (ma | mb).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))


def _positive_blocks(flat_idx, flat_scores, ks, block_size):
    """Block id of each strictly positive flat pick ([T, K], -1 elsewhere) and the first block."""
    abs_pos = flat_idx.long() + ks.long().unsqueeze(1)
    keep = (flat_idx >= 0) & (flat_scores > 0)
    return torch.where(keep, abs_pos // block_size, -1)


def block_occupancy(flat_idx: torch.Tensor, ks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Number of distinct B-token blocks (key-buffer coordinates) that flat's set touches."""
    blocks = torch.where(flat_idx >= 0, (flat_idx.long() + ks.long().unsqueeze(1)) // block_size,
                         -1)
    w = int(blocks.max()) + 1 if blocks.numel() else 1
    return selection_mask(blocks, max(w, 1)).sum(1).float()


def oracle_recall(flat_idx: torch.Tensor, flat_scores: torch.Tensor, ks: torch.Tensor,
                  ke: torch.Tensor, *, block_size: int, block_topk: int) -> torch.Tensor:
    """Best recall any choice of ``block_topk`` blocks can reach, the forced two included.

    The first and last eligible block are always kept; the other ``m - 2`` slots go to the
    blocks holding the most strictly positive flat picks (greedy is optimal: the count is
    additive over blocks). Within kept blocks HISA's stage 2 keeps every flat pick (a key in the
    global top-k is in the top-k of any subset containing it), so this bounds HISA's recall.
    """
    T = flat_idx.shape[0]
    blocks = _positive_blocks(flat_idx, flat_scores, ks, block_size)
    nb = int(max(int(blocks.max()) + 1, int((ke.long().max() + block_size - 1) // block_size)))
    counts = torch.zeros(T, nb + 1, device=flat_idx.device)
    counts.scatter_add_(1, torch.where(blocks >= 0, blocks, nb), torch.ones_like(counts[:, :1])
                        .expand_as(blocks).contiguous())
    counts = counts[:, :nb]
    total = counts.sum(1)
    first = ks.long() // block_size
    last = (ke.long() + block_size - 1) // block_size - 1
    rows = torch.arange(T, device=flat_idx.device)
    forced = counts[rows, first] + torch.where(last != first, counts[rows, last.clamp_min(0)], 0)
    rest = counts.clone()
    rest[rows, first] = 0
    rest[rows, last.clamp_min(0)] = 0
    m_free = max(block_topk - 2, 0)
    best = torch.topk(rest, min(m_free, nb), dim=1).values.sum(1) if m_free else 0
    got = forced + best
    return torch.where(total > 0, got / total.clamp_min(1), torch.full_like(total, float("nan")))


def attention_probs(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Causal softmax attention of real heads. q [T, G, D], k [S, D] -> fp32 [T, G, S].

    ``positions`` int [T] is each query's absolute position (it sees keys 0..pos).
    """
    logits = torch.einsum("tgd,sd->tgs", q.float(), k.float()) * scale
    s = torch.arange(k.shape[0], device=k.device)
    future = s.view(1, 1, -1) > positions.long().view(-1, 1, 1)
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)


def attention_mass(probs: torch.Tensor, idx: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """Softmax mass [T] of the selected keys, averaged over the G heads. probs [T, G, S]."""
    abs_idx = torch.where(idx >= 0, idx.long() + ks.long().unsqueeze(1), -1)
    mask = selection_mask(abs_idx, probs.shape[-1]).float()                  # [T, S]
    return torch.einsum("tgs,ts->tg", probs, mask).mean(1)
