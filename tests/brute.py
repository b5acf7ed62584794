"""Independent per-query brute-force implementations (float64, Python loops) used as oracles.

They share no code with the library's references, so agreement is evidence, not tautology.
"""
from __future__ import annotations

import math

import torch


def rule_order(item):
    """Sort key of a (score, position) pair under the selection rule: larger scores first
    (+inf > finite > -inf), NaN after every number, ties to the lower position."""
    v, s = item
    return (1, 0.0, s) if math.isnan(v) else (0, -v, s)


def dequant(k, k_scale):
    kf = k.double()
    return kf if k_scale is None else kf * k_scale.double().unsqueeze(1)


def score(qt, w, key):
    """sum_h w[h] * relu(q[h] . key) in float64. qt [H, D], w [H], key [D]."""
    return float((w.double() * (qt.double() @ key).clamp_min(0)).sum())


def token_score(qt, w, k, k_scale, s):
    """The contract's I[t, s] = k_scale[s] * sum_h w[h] relu(q[h] . k[s]) (the scale applied
    after the head sum, which matters for an infinite or NaN scale)."""
    if k_scale is None:
        return score(qt, w, k[s].double())
    return score(qt, w, k[s].double()) * float(k_scale[s])


def brute_dsa(q, k, w, ks, ke, k_scale, topk):
    rows = []
    for t in range(q.shape[0]):
        a, b = int(ks[t]), int(ke[t])
        sc = [(token_score(q[t], w[t], k, k_scale, s), s) for s in range(a, b)]
        sc.sort(key=rule_order)
        rows.append([s - a for _, s in sc[:topk]])
    return rows


def brute_hisa(q, k, w, ks, ke, k_scale, topk, block_size, block_topk):
    S = k.shape[0]
    kf = dequant(k, k_scale)
    nb = math.ceil(S / block_size)
    means = [kf[b * block_size:min(S, (b + 1) * block_size)].mean(0) for b in range(nb)]
    rows = []
    for t in range(q.shape[0]):
        a, e = int(ks[t]), int(ke[t])
        if e <= a:
            rows.append([])
            continue
        if e - a <= topk:  # a window of at most topk keys comes back whole
            sc = sorted(((token_score(q[t], w[t], k, k_scale, s), s) for s in range(a, e)),
                        key=rule_order)
            rows.append([s - a for _, s in sc])
            continue
        first, last = a // block_size, math.ceil(e / block_size) - 1
        forced = sorted({first, last})
        others = [(score(q[t], w[t], means[b]), b) for b in range(first, last + 1)
                  if b not in forced]
        others.sort(key=rule_order)
        chosen = forced + [b for _, b in others[:max(0, block_topk - len(forced))]]
        cand = [s for b in chosen for s in range(b * block_size, min(S, (b + 1) * block_size))
                if a <= s < e]
        sc = [(token_score(q[t], w[t], k, k_scale, s), s) for s in cand]
        sc.sort(key=rule_order)
        rows.append([s - a for _, s in sc[:topk]])
    return rows


def as_rows(idx):
    return [[x for x in r if x >= 0] for r in idx.tolist()]


def _top_with_forced(scored, forced, budget):
    """forced ids, then the best others under the rule (NaN last, lower id on ties) up to
    budget."""
    others = sorted(((s, i) for s, i in scored if i not in forced), key=rule_order)
    return sorted(forced) + [i for _, i in others[:max(0, budget - len(forced))]]


def brute_hisa_super(q, k, w, ks, ke, k_scale, topk, block_size, block_topk, super_size,
                     super_topk):
    """Three levels: super-blocks (mean of their keys), blocks of the kept ones, tokens."""
    S = k.shape[0]
    kf = dequant(k, k_scale)
    B, span = block_size, block_size * super_size
    means = [kf[b * B:min(S, (b + 1) * B)].mean(0) for b in range(math.ceil(S / B))]
    smeans = [kf[g * span:min(S, (g + 1) * span)].mean(0) for g in range(math.ceil(S / span))]
    rows = []
    for t in range(q.shape[0]):
        a, e = int(ks[t]), int(ke[t])
        if e <= a:
            rows.append([])
            continue
        if e - a <= topk:  # a window of at most topk keys comes back whole
            sc = sorted(((token_score(q[t], w[t], k, k_scale, s), s) for s in range(a, e)),
                        key=rule_order)
            rows.append([s - a for _, s in sc])
            continue
        fs, ls = a // span, math.ceil(e / span) - 1
        kept = set(_top_with_forced([(score(q[t], w[t], smeans[g]), g) for g in range(fs, ls + 1)],
                                    {fs, ls}, super_topk))
        first, last = a // B, math.ceil(e / B) - 1
        cand = [b for b in range(first, last + 1) if b // super_size in kept]
        chosen = _top_with_forced([(score(q[t], w[t], means[b]), b) for b in cand],
                                  {first, last}, block_topk)
        toks = [s for b in chosen for s in range(b * B, min(S, (b + 1) * B)) if a <= s < e]
        sc = sorted(((token_score(q[t], w[t], k, k_scale, s), s) for s in toks),
                    key=rule_order)
        rows.append([s - a for _, s in sc[:topk]])
    return rows
