"""Fidelity of the super-block level on synthetic keys at 1M tokens: three levels against two
(mean IoU and recall of the two-level selection), both against flat, and the super-block
oracle bound (:func:`hisa.eval.levels.super_oracle_recall`); one JSON row per (keys, setting).

Two key generators: "clustered" (a drift every 256 tokens, the library's test inputs: no
structure above the block scale, the adversarial case for a super-block level) and
"multiscale" (drifts every 256, 4,096 and 32,768 tokens). Queries: the last ``--queries``
tokens of the context, each seeing about ``--context`` keys. Selections run through the public
ops (``--backend``: triton on a GPU measures the shipped kernels).

    PYTHONPATH=. python3 benchmarks/long_context_fidelity.py --out results/fidelity.jsonl
    # CPU smoke run, reduced: --context 131072 --queries 8 --heads 8 --device cpu --backend torch
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import hisa
from hisa.bench.rows import environment
from hisa.eval.levels import multiscale_keys, super_oracle_recall
from hisa.eval.metrics import iou, recall
from hisa.testing.inputs import IndexerInputs, make_indexer_inputs
from hisa.utils.quant import quantize_fp8

#: The issue's fidelity target on synthetic clustered keys at 1M: mean IoU vs two levels.
TARGET_IOU_VS_TWO_LEVEL = 0.98


def _ints(text):
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        out.append(int(part[:-1]) * 1024 if part.endswith("k") else
                   int(part[:-1]) * 1024 * 1024 if part.endswith("m") else int(part))
    return out


def make_inputs(kind: str, context: int, queries: int, heads: int, device: str, seed: int
                ) -> IndexerInputs:
    inp = make_indexer_inputs([context], query_lens=[queries], heads=heads, device=device,
                              clustered=kind == "clustered", seed=seed)
    if kind == "multiscale":
        g = torch.Generator(device=device).manual_seed(seed + 1)
        k, k_scale = quantize_fp8(multiscale_keys(context, inp.k.shape[1], generator=g,
                                                  device=device), group_size=inp.k.shape[1])
        inp = IndexerInputs(inp.q, k, inp.weights, inp.ks, inp.ke, k_scale)
    return inp


def pairs_per_query(context: int, *, block_size: int, block_topk: int, topk: int = 0,
                    super_size=None, super_topk=None) -> int:
    """Scores per query at the end of the context (the README's cost model)."""
    nb = -(-context // block_size)
    if super_size is None:
        return nb + block_topk * block_size
    return -(-nb // super_size) + super_topk * super_size + block_topk * block_size


def study(args) -> list[dict]:
    env = environment(args.commit)
    base = dict(topk=args.topk, block_size=args.block_size, block_topk=args.block_topk)
    rows = []
    for kind in args.keys:
        t0 = time.perf_counter()
        inp = make_inputs(kind, args.context, args.queries, args.heads, args.device, args.seed)
        common = dict(k_scale=inp.k_scale, backend=args.backend)
        flat = hisa.dsa_index(*inp.args(), topk=args.topk, **common)
        two = hisa.hisa_index(*inp.args(), **base, **common)
        two_vs_flat = float(iou(two, flat).mean())
        print(f"{kind}: inputs + flat + two levels {time.perf_counter() - t0:.1f} s; two-level "
              f"IoU vs flat {two_vs_flat:.4f}")
        for super_size, super_topk in args.configs:
            sup = dict(super_size=super_size, super_topk=super_topk)
            three = hisa.hisa_index(*inp.args(), **base, **sup, **common)
            bound = dict(ks=inp.ks, ke=inp.ke, block_size=args.block_size, **sup)
            row = dict(env, model=f"synthetic-{kind}", context=args.context, method="hisa3",
                       queries=args.queries, heads=args.heads, backend=args.backend, **base,
                       **sup,
                       iou_vs_two_level=round(float(iou(three, two).mean()), 5),
                       recall_of_two_level=round(float(recall(two, three).mean()), 5),
                       oracle_bound_vs_two_level=round(float(super_oracle_recall(
                           two, **bound).nanmean()), 5),
                       iou_mean=round(float(iou(three, flat).mean()), 5),
                       two_level_iou_vs_flat=round(two_vs_flat, 5),
                       recall=round(float(recall(flat, three).mean()), 5),
                       oracle_recall=round(float(super_oracle_recall(flat, **bound).nanmean()),
                                           5),
                       pairs_per_query=pairs_per_query(args.context, **base, **sup),
                       two_level_pairs_per_query=pairs_per_query(args.context, **base),
                       target_iou_vs_two_level=TARGET_IOU_VS_TWO_LEVEL,
                       mass_kept=None, occupancy=None, ppl=None, needle_acc=None)
            rows.append(row)
            print(f"  Bs={super_size:<3} ms={super_topk:<3} IoU vs 2L {row['iou_vs_two_level']:.4f}"
                  f" (oracle {row['oracle_bound_vs_two_level']:.4f})  IoU vs flat "
                  f"{row['iou_mean']:.4f} (2L {two_vs_flat:.4f}, oracle recall "
                  f"{row['oracle_recall']:.4f})  pairs/query {row['pairs_per_query']:,} vs "
                  f"{row['two_level_pairs_per_query']:,}", flush=True)
        del inp, flat, two
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=lambda s: _ints(s)[0], default=1 << 20)
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--block-topk", type=int, default=64)
    p.add_argument("--configs", default="2:128,2:256,4:256,4:512,8:128,16:64,16:128",
                   type=lambda s: [tuple(int(x) for x in c.split(":")) for c in s.split(",")],
                   help="super_size:super_topk pairs")
    p.add_argument("--keys", default="clustered,multiscale", type=lambda s: s.split(","))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default="docs/results/long_context_fidelity.jsonl")
    args = p.parse_args(argv)
    rows = study(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"rows: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
