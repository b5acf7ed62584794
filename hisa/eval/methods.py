"""Selection methods compared by the evaluation, all in the contract's output format.

``flat`` and ``hisa`` call the shipped public ops (:func:`hisa.dsa_index`,
:func:`hisa.hisa_index`, backend "auto"), so the evaluation measures the code users run. The
variants the library does not ship are assembled here from its stage references
(:mod:`hisa.ops.indexer.naive`):

* ``block_sparse``: stage 1 only; the top ``topk // B`` blocks (forced two included) and every
  in-window token of them, so the token budget equals flat's.
* ``hisa_max``: HISA with element-wise max-pooled block keys instead of means (the fix the
  paper suggests for blocks whose mean hides one salient token).
* ``hisa_linear``: HISA whose stage 1 drops the ReLU, J[t, b] = (sum_h w[t, h] q[t, h]) . kbar[b],
  the exact block mean of the pre-ReLU indexer score (one dot product per block instead of H).
  On raw-attention proxies most q . kbar are negative (queries point away from the keys' shared
  mean direction), so the ReLU'd J is exactly 0 for most blocks and HISA's slots fall to the
  tie-break (lowest block ids); the linear score ranks those blocks instead.
* ``hisa_centred``: HISA with the keys centred before stage 1, J[t, b] = sum_h w[t, h]
  ReLU(q[t, h] . (kbar[b] - mu[t])), mu[t] the mean key of the query's window [ks, ke) (in a
  library kernel: the count-weighted mean of the pooled blocks, no extra pass over keys).
* ``hisa_adaptive``: HISA with a per-query block budget (this project's idea): the
  ``sum_t m`` block slots of a batch of queries go to the (query, block) pairs with the highest
  stage-1 score relative to the query's best non-forced block, each query keeping its two
  forced blocks and at least ``m // 4`` others, at most ``2 m`` blocks. Average cost equals
  HISA's at the same ``m``; a single query (decode) gets exactly ``m``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import hisa
from hisa.ops.dsa.naive import (NAIVE_TILE_BYTES, is_outside, mark_outside, naive_scores,
                                window_mask)
from hisa.ops.indexer.naive import (candidate_positions, eligible_blocks, naive_block_scores,
                                    naive_pool_blocks, naive_select_blocks, naive_select_tokens,
                                    naive_to_offsets)

METHODS = ("dense", "flat", "hisa", "hisa3", "block_sparse", "hisa_max", "hisa_adaptive",
           "hisa_linear", "hisa_centred")
_STAGE1 = {"hisa_max": "relu", "hisa_adaptive": "relu", "hisa_linear": "linear",
           "hisa_centred": "centred"}


@dataclass(frozen=True)
class Method:
    """One selection setting. ``dense`` selects nothing (full causal attention)."""
    name: str
    topk: int = 0
    block_size: int = 0
    block_topk: int = 0
    super_size: int = 0          # hisa3 only: blocks per super-block (Bs) and super-blocks kept
    super_topk: int = 0

    def __post_init__(self):
        if self.name not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.name!r}")
        if (self.name == "hisa3") != (self.super_size > 0 and self.super_topk > 0):
            raise ValueError(f"super_size / super_topk: expected both > 0 exactly for hisa3, got "
                             f"{self.super_size} / {self.super_topk} for {self.name!r}")

    @property
    def label(self) -> str:
        if self.name in ("dense", "flat"):
            return self.name if self.name == "dense" else f"flat k={self.topk}"
        if self.name == "block_sparse":
            return f"block_sparse B={self.block_size} m={self.topk // self.block_size}"
        if self.name == "hisa3":
            return (f"hisa3 B={self.block_size} m={self.block_topk} Bs={self.super_size} "
                    f"ms={self.super_topk}")
        return f"{self.name} B={self.block_size} m={self.block_topk}"

    def select(self, q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor,
               ks: torch.Tensor, ke: torch.Tensor, *, k_scale: torch.Tensor | None = None,
               backend: str = "auto",
               full_scores: torch.Tensor | None = None) -> torch.Tensor | None:
        """int32 [T, K] key offsets relative to ks (-1 padded); None for dense.

        q, k, weights, ks, ke, k_scale and backend are those of :func:`hisa.dsa_index` (FP8
        q and k with ``k_scale`` run the Triton kernels when ``backend`` picks them); the
        eval-only variants run on the dequantized values. ``full_scores`` (fp32 [T, S], the
        exact indexer scores of every key, for example computed once per layer and head by the
        caller) lets the variants gather their stage-2 scores instead of recomputing them;
        flat and HISA always run the shipped ops.
        """
        if self.name == "dense":
            return None
        if self.name == "flat":
            return hisa.dsa_index(q, k, weights, ks, ke, k_scale=k_scale, topk=self.topk,
                                  backend=backend)
        if self.name in ("hisa", "hisa3"):
            sup = dict(super_size=self.super_size, super_topk=self.super_topk) \
                if self.name == "hisa3" else {}
            return hisa.hisa_index(q, k, weights, ks, ke, k_scale=k_scale, topk=self.topk,
                                   block_size=self.block_size, block_topk=self.block_topk,
                                   backend=backend, **sup)
        if k_scale is not None:
            q, k = q.float(), k.float() * k_scale.float().unsqueeze(1)
        if self.name == "block_sparse":
            return block_sparse_index(q, k, weights, ks, ke, topk=self.topk,
                                      block_size=self.block_size)
        pool = "max" if self.name == "hisa_max" else "mean"
        return variant_hisa_index(q, k, weights, ks, ke, topk=self.topk,
                                  block_size=self.block_size, block_topk=self.block_topk,
                                  pool=pool, adaptive=self.name == "hisa_adaptive",
                                  stage1=_STAGE1[self.name], full_scores=full_scores)


def max_pool_blocks(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Element-wise max of each block's keys, fp32 [NB, D] (the tail block over its tokens)."""
    S, D = k.shape
    nb = (S + block_size - 1) // block_size
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, nb * block_size - S), value=float("-inf"))
    return kf.view(nb, block_size, D).amax(dim=1)


def _tile(rows_per_query: int, D: int) -> int:
    return max(1, NAIVE_TILE_BYTES // (4 * max(rows_per_query, 1) * D))


def block_sparse_index(q, k, weights, ks, ke, *, topk: int, block_size: int) -> torch.Tensor:
    """Stage 1 only: every in-window token of the top ``topk // B`` blocks. int32 [T, topk]."""
    T = q.shape[0]
    nblk = max(2, topk // block_size)
    pooled = naive_pool_blocks(k, None, block_size)
    out = torch.full((T, nblk * block_size), -1, dtype=torch.int32, device=q.device)
    for s in range(0, T, _tile(nblk * block_size, 1)):
        sl = slice(s, min(T, s + _tile(nblk * block_size, 1)))
        J = naive_block_scores(q[sl], pooled, weights[sl], ks[sl], ke[sl], block_size=block_size)
        blocks = naive_select_blocks(J, nblk)
        pos = candidate_positions(blocks, block_size, k.shape[0])            # [t, nblk*B]
        inwin = (pos >= ks[sl].long().unsqueeze(1)) & (pos < ke[sl].long().unsqueeze(1))
        pos = torch.where(inwin, pos, -1)
        key = torch.where(pos >= 0, pos, torch.iinfo(torch.int64).max)
        pos = torch.sort(key, dim=1).values                                  # valid first
        pos = torch.where(pos == torch.iinfo(torch.int64).max, -1, pos)
        out[sl] = naive_to_offsets(pos, ks[sl])
    return out[:, :topk] if out.shape[1] > topk else out


def adaptive_select_blocks(J: torch.Tensor, ks, ke, *, block_size: int, block_topk: int
                           ) -> torch.Tensor:
    """Per-query block budget with the batch's total equal to HISA's. int32 [T, 2m] ids."""
    T, NB = J.shape
    m, cap = block_topk, 2 * block_topk
    first, end = eligible_blocks(ks, ke, block_size)
    n_elig = (end - first).clamp_min(0)
    forced = torch.isposinf(J)
    free = J.masked_fill(forced | is_outside(J), float("-inf"))              # non-forced
    n_free = (n_elig - forced.sum(1)).clamp_min(0)
    base = (torch.minimum(n_elig, torch.full_like(n_elig, m)) - forced.sum(1)).clamp_min(0)
    width = min(cap - 2, NB)
    vals, cols = torch.topk(free, width, dim=1)                              # sorted desc
    best = vals[:, :1].clamp_min(1e-30)
    rel = torch.where(torch.isfinite(vals), vals / best, torch.full_like(vals, -1.0))
    floor = torch.minimum(n_free, torch.full_like(n_free, m // 4))
    rank = torch.arange(width, device=J.device).unsqueeze(0)
    take = rank < floor.unsqueeze(1)                                        # the floor first
    spare = int((base - floor).clamp_min(0).sum())
    pool = torch.where(~take & (rank < n_free.unsqueeze(1)), rel, torch.full_like(rel, -2.0))
    # Queries that keep every block (n_elig <= m) are exact already: give them all, no pool.
    exact = n_elig <= m
    take |= exact.unsqueeze(1) & (rank < n_free.unsqueeze(1))
    pool[exact] = -2.0
    spare -= int((base - floor).clamp_min(0)[exact].sum())
    if spare > 0:
        flat = pool.flatten()
        top = torch.topk(flat, min(spare, flat.numel())).indices
        top = top[flat[top] > -2.0]
        take.view(-1)[top] = True
    ids = torch.where(take, cols, -1)
    forced_ids = torch.where(forced.any(1, keepdim=True), torch.topk(
        forced.int() * torch.arange(1, NB + 1, device=J.device), 2, dim=1).indices, -1)
    forced_ids = torch.where(torch.gather(forced, 1, forced_ids.clamp_min(0)), forced_ids, -1)
    ids = torch.cat([forced_ids, ids], dim=1)[:, :cap]
    key = torch.where(ids >= 0, ids, torch.iinfo(torch.int64).max)
    ids = torch.sort(key, dim=1).values
    return torch.where(ids == torch.iinfo(torch.int64).max, -1, ids).to(torch.int32)


def full_index_scores(q, k, weights) -> torch.Tensor:
    """Exact indexer scores of every key, fp32 [T, S] (no window mask; stage 2 applies it)."""
    return naive_scores(q, k, weights)


def window_mean_keys(k: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor) -> torch.Tensor:
    """Mean key of each query's window [ks, ke), fp32 [T, D] (zeros for an empty window)."""
    csum = torch.nn.functional.pad(k.float().cumsum(0), (0, 0, 1, 0))        # [S + 1, D]
    n = (ke.long() - ks.long()).clamp_min(1).unsqueeze(1).float()
    return (csum[ke.long()] - csum[ks.long()]) / n


def variant_block_scores(q, pooled, weights, ks, ke, *, block_size: int, stage1: str,
                         k: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 1 of the variants, masked like :func:`naive_block_scores`. fp32 [T, NB]."""
    if stage1 == "relu":
        return naive_block_scores(q, pooled, weights, ks, ke, block_size=block_size)
    if stage1 == "linear":
        qw = (q.float() * weights.float().unsqueeze(-1)).sum(1)                 # [T, D]
        J = qw @ pooled.float().T                                                # [T, NB]
    elif stage1 == "centred":
        mu = window_mean_keys(k, ks, ke)                                         # [T, D]
        dots = torch.einsum("thd,bd->thb", q.float(), pooled.float())
        dots = dots - torch.einsum("thd,td->th", q.float(), mu).unsqueeze(-1)
        J = (dots.clamp_min(0) * weights.float().unsqueeze(-1)).sum(1)
    else:
        raise ValueError(f"stage1 must be relu, linear or centred, got {stage1!r}")
    first, end = eligible_blocks(ks, ke, block_size)
    b = torch.arange(pooled.shape[0], device=q.device)
    mark_outside(J, ~window_mask(first, end, b))
    rows = torch.nonzero(end > first).squeeze(1)
    J[rows, first[rows]] = float("inf")
    J[rows, end[rows] - 1] = float("inf")
    return J


def variant_hisa_index(q, k, weights, ks, ke, *, topk: int, block_size: int, block_topk: int,
                       pool: str = "mean", adaptive: bool = False, stage1: str = "relu",
                       full_scores: torch.Tensor | None = None) -> torch.Tensor:
    """HISA assembled from the stage references, with other pooling, stage-1 scores or block
    budgets. Stage 2 gathers the exact scores of the candidates from ``full_scores`` [T, S]
    (computed here when not given): 2.4x faster than the reference's gather of candidate keys
    at T = 256, S = 8K, m*B = 2K on CPU; the same sets (ties: lower position wins, as in the
    reference), though fp32 rounding of another matmul order can swap near-equal scores' order.

    The adaptive budget is shared by the whole batch of queries passed in (one prefill chunk).
    """
    T, _, D = q.shape
    pooled = max_pool_blocks(k, block_size) if pool == "max" else naive_pool_blocks(
        k, None, block_size)
    J = variant_block_scores(q, pooled, weights, ks, ke, block_size=block_size,
                             stage1=stage1, k=k)                                 # [T, NB]
    if adaptive:
        blocks = adaptive_select_blocks(J, ks, ke, block_size=block_size, block_topk=block_topk)
    else:
        blocks = naive_select_blocks(J, block_topk)
    if full_scores is None:
        full_scores = full_index_scores(q, k, weights)                           # [T, S]
    pos = candidate_positions(blocks, block_size, k.shape[0])                   # [T, m*B]
    scores = torch.gather(full_scores, 1, pos.clamp_min(0))
    valid = (pos >= 0) & window_mask(ks, ke, pos)
    sel, _ = naive_select_tokens(mark_outside(scores, ~valid), pos, topk)
    return naive_to_offsets(sel, ks)
