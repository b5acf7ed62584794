"""DeepSeek-V3.2's dense warm-up objective, and this project's block-level term.

For sampled query rows t of a window (absolute positions ``rows``):

* target p[t, :]: the layer's real attention probabilities summed over its query heads and
  L1-normalised over the causal window (the mean over heads of each head's softmax);
* token term: KL(p[t, :] || softmax(I[t, :])) over the causal window, I the indexer score;
* block term (optional): KL(P[t, :] || softmax(tau * J[t, :])) over the blocks HISA's stage 1
  chooses among, P[t, b] the target mass of block b and J[t, b] = sum_h w[t, h]
  ReLU(q[t, h] . kbar[b]) HISA's own block score with mean-pooled indexer keys. The first block
  and the query's own block are forced in HISA, so they are left out (P renormalised over the
  rest); tau = exp(``block_log_temp``) is learnt, since only the order of J matters to HISA.
"""
from __future__ import annotations

import torch


def causal_mask(rows: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean [R, L]: key s is visible to row t (s <= t)."""
    return torch.arange(length, device=rows.device).unsqueeze(0) <= rows.unsqueeze(1)


def attention_targets(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """p fp32 [R, L]: q [Hq, R, Dh] (the rows' queries), k [Hkv, L, Dh]; zero past each row."""
    Hq, Hkv = q.shape[0], k.shape[0]
    G = Hq // Hkv
    kk = k.float().repeat_interleave(G, dim=0)                                # [Hq, L, Dh]
    logits = torch.einsum("hrd,hsd->hrs", q.float(), kk) * scale              # [Hq, R, L]
    vis = causal_mask(rows, k.shape[1])
    probs = torch.softmax(logits.masked_fill(~vis, float("-inf")), dim=-1)
    return probs.mean(0)


def _kl(p: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || softmax(logits)) over ``valid`` entries. [R]"""
    logq = torch.log_softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
    plogp = torch.xlogy(p, p)
    term = torch.where(p > 0, plogp - p * logq.masked_fill(~valid, 0.0), torch.zeros_like(p))
    return term.sum(-1)


def token_kl(scores: torch.Tensor, p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(I)) per row [R]; scores I [R, L] (unmasked), p [R, L]."""
    return _kl(p, scores, causal_mask(rows, scores.shape[1]))


def block_kl(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, p: torch.Tensor,
             rows: torch.Tensor, *, block_size: int, log_temp: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block term per row and which rows have one: q [R, H, D], k [L, D], w [R, H], p [R, L].

    Rows whose query sees fewer than three blocks have no free block to rank (value 0,
    excluded by the returned mask [R]).
    """
    L, D = k.shape
    B = block_size
    nb = -(-L // B)
    pad = nb * B - L
    kb = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(nb, B, D)
    counts = torch.full((nb,), float(B), device=k.device)
    counts[-1] = B - pad
    kbar = kb.sum(1) / counts.unsqueeze(1)                                    # [NB, D]
    J = torch.einsum("rhb,rh->rb", torch.relu(torch.einsum("rhd,bd->rhb", q, kbar)), w)
    P = torch.nn.functional.pad(p, (0, pad)).view(p.shape[0], nb, B).sum(-1)  # [R, NB]
    own = rows // B
    b = torch.arange(nb, device=k.device).unsqueeze(0)
    free = (b >= 1) & (b < own.unsqueeze(1))
    P = P * free
    mass = P.sum(-1)
    has = (own >= 2) & (mass > 0)
    P = P / mass.clamp_min(1e-30).unsqueeze(1)
    kl = _kl(P, J * log_temp.exp(), free)
    return torch.where(has, kl, torch.zeros_like(kl)), has


def topk_mass_ratio(scores: torch.Tensor, p: torch.Tensor, rows: torch.Tensor,
                    topk: int) -> torch.Tensor:
    """Per row [R]: target mass of the indexer's top-k keys over the target's own top-k mass
    (1.0 = the indexer keeps as much attention as the best possible k keys)."""
    vis = causal_mask(rows, p.shape[1])
    k = min(topk, p.shape[1])
    pick = torch.topk(scores.masked_fill(~vis, float("-inf")), k, dim=-1).indices
    got = torch.gather(p, 1, pick).sum(-1)
    best = torch.topk(p, k, dim=-1).values.sum(-1)
    return got / best.clamp_min(1e-30)
