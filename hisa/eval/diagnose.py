"""Why HISA's recall sits below the best-m-blocks bound: a stage-1 scorer study on real q/k.

HISA's stage 2 keeps every flat pick inside the kept blocks, so its recall of flat's strictly
positive picks is exactly the share of those picks that the m chosen blocks cover. This module
swaps only the block scorer (same m, same forced first and last block, the shipped tie rule:
lower block id wins) and reports that coverage, plus the statistics that explain the gap:

* ``mean`` (HISA): sum_h w ReLU(q_h . kbar_b); ``max``: element-wise max-pooled keys;
* ``linear``: sum_h w q_h . kbar_b (no ReLU: the exact block mean of the pre-ReLU score);
* ``centred``: sum_h w ReLU(q_h . (kbar_b - mu_t)), mu_t the mean key of the query's window;
* ``lowfreq``: HISA's score over the low-frequency half of the RoPE pairs only (rotate-half
  layout: pair i = dims (i, i + D/2), frequency falling with i);
* ``ideal_mean`` / ``ideal_max``: mean / max over the block of the exact token scores (costs a
  flat pass; a reference, not a candidate);
* ``oracle``: blocks ranked by their count of positive flat picks (the bound).

Run: ``python -m hisa.eval.diagnose --model smollm2 --context 4096 --block-size 64``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from hisa.ops.dsa.naive import mark_outside
from hisa.ops.indexer.naive import naive_select_blocks

from .austen import DEFAULT_CACHE
from .methods import max_pool_blocks, variant_block_scores, window_mean_keys

SCORERS = ("mean", "max", "linear", "centred", "lowfreq", "ideal_mean", "ideal_max", "oracle")


def _force(J, qpos, B):
    """Mask blocks past the query's, force the first and last eligible block (as HISA)."""
    last = qpos // B
    b = torch.arange(J.shape[1])
    J = mark_outside(J.clone(), b.unsqueeze(0) > last.unsqueeze(1))
    J[:, 0] = float("inf")
    J[torch.arange(J.shape[0]), last] = float("inf")
    return J


def head_study(q, k, qpos, *, topk: int, block_size: int, block_topk: int) -> dict:
    """q [n, G, D] (uniform weights), k [S, D] with S a multiple of B; per-scorer coverage."""
    n, G, D = q.shape
    S, B = k.shape[0], block_size
    NB = S // B
    w = torch.full((n, G), 1.0 / G)
    ks, ke = torch.zeros(n, dtype=torch.int32), (qpos + 1).to(torch.int32)
    dots = torch.einsum("ngd,sd->ngs", q, k)                                  # [n, G, S]
    causal = torch.arange(S).unsqueeze(0) <= qpos.unsqueeze(1)
    I = (dots.clamp_min(0).mean(1)).masked_fill(~causal, float("-inf"))       # flat's score
    vals, cols = torch.topk(I, topk, dim=1)
    picks = torch.zeros(n, S).scatter_(1, cols, (vals > 0).float())           # positive picks
    per_block = picks.view(n, NB, B).sum(-1)
    Iz = torch.where(causal, I, torch.zeros(()))
    pooled = k.view(NB, B, D).mean(1)
    low = torch.zeros(D, dtype=torch.bool)
    low[D // 4:D // 2] = True
    low[3 * D // 4:] = True
    J = {
        "mean": torch.einsum("ngd,bd->ngb", q, pooled).clamp_min(0).mean(1),
        "max": torch.einsum("ngd,bd->ngb", q, max_pool_blocks(k, B)).clamp_min(0).mean(1),
        "linear": variant_block_scores(q, pooled, w, ks, ke, block_size=B, stage1="linear"),
        "centred": variant_block_scores(q, pooled, w, ks, ke, block_size=B, stage1="centred",
                                        k=k),
        "lowfreq": torch.einsum("ngd,bd->ngb", q * low, pooled).clamp_min(0).mean(1),
        "ideal_mean": Iz.view(n, NB, B).mean(-1),
        "ideal_max": Iz.view(n, NB, B).amax(-1),
        "oracle": per_block,
    }
    total = per_block.sum(1).clamp_min(1)
    out = {}
    for name, score in J.items():
        score = _force(score.clone(), qpos, B)
        ids = naive_select_blocks(score, block_topk).long()                   # [n, m]
        got = torch.gather(per_block, 1, ids.clamp_min(0)) * (ids >= 0)
        zero = (torch.gather(score, 1, ids.clamp_min(0)) == 0) & (ids >= 0)
        out[name] = float((got.sum(1) / total).mean())
        out[name + "_zero_slots"] = float(zero.float().sum(1).mean())
    mu = k.mean(0)
    out["mu_share"] = float(mu.norm() ** 2 / (k.norm(dim=1) ** 2).mean())
    out["q_dot_mu_negative"] = float((torch.einsum("ngd,d->ng", q, mu) < 0).float().mean())
    out["dots_positive"] = float((dots > 0).float().mean())
    out["flat_picks_positive"] = float((vals > 0).float().mean())
    out["mu_window_share"] = float((window_mean_keys(k, ks, ke).norm(dim=1) ** 2).mean()
                                   / (k.norm(dim=1) ** 2).mean())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hisa.eval.diagnose", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--block-size", type=int, nargs="+", default=[64])
    p.add_argument("--pool-factor", type=int, default=4, help="m*B = factor * k, k = L/16")
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=None, help="JSON lines, one row per layer/head")
    args = p.parse_args(argv)

    from transformers import DynamicCache

    from .attention import Router
    from .models import load_model
    from .runner import _forward, _merge_capture, corpus_ids

    lm = load_model(args.model, cache_dir=args.cache_dir)
    L = args.context
    ids = corpus_ids(lm.tokenizer, L, args.cache_dir)
    cap = {}
    _forward(lm.model, ids, DynamicCache(config=lm.model.config),
             Router(lm.global_layers, capture=cap))
    c = _merge_capture(cap)
    topk = L // 16
    qpos = torch.linspace(L // 4, L - 1, args.queries).round().long().unique()
    rows = []
    for B in args.block_size:
        m = args.pool_factor * topk // B
        for layer in sorted(c.q):
            Q, K = c.q[layer], c.k[layer]
            G = Q.shape[0] // K.shape[0]
            for g in range(K.shape[0]):
                q = Q[g * G:(g + 1) * G, qpos].transpose(0, 1).contiguous()
                r = head_study(q, K[g], qpos, topk=topk, block_size=B, block_topk=m)
                rows.append({"model": args.model, "context": L, "block_size": B,
                             "block_topk": m, "topk": topk, "layer": layer, "head": g, **r})
        sub = [r for r in rows if r["block_size"] == B]
        avg = {key: sum(r[key] for r in sub) / len(sub) for key in sub[0]
               if isinstance(sub[0][key], float)}
        print(f"{args.model} L={L} B={B} m={m} k={topk}: recall of flat's positive picks "
              f"by stage-1 scorer (mean zero-score slots of {m})")
        for s in SCORERS:
            print(f"  {s:11s} {avg[s]:.3f}  ({avg[s + '_zero_slots']:.1f})")
        print("  |mean key|^2 / E|k|^2 %.3f, window-mean share %.3f, q.mu < 0 in %.3f of "
              "(query, head), q.k > 0 for %.3f of pairs, flat picks with score > 0: %.3f" % (
                  avg["mu_share"], avg["mu_window_share"], avg["q_dot_mu_negative"],
                  avg["dots_positive"], avg["flat_picks_positive"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
