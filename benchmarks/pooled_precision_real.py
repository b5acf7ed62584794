"""What the representatives' number format costs on a real indexer (CPU, no model run).

The shipped Gemma-3-270M indexers (hisa/distill/weights) score a cached dense capture of one
text window (``hisa distill`` stores them under ``<cache>/distill``; any capture of the three
global layers works). For each layer the indexer's own q, k and weights are quantized to the
contract's FP8 operands (what the Triton kernels receive), and HISA runs through the reference
with the block representatives exact (fp32 means) and rounded to each stored format. Reported
per layer and format: mean IoU with the exact-rep selection, and the recall of flat top-k (the
share of the flat indexer's set HISA keeps), for sampled queries of the window's second half.

    python benchmarks/pooled_precision_real.py --capture ~/.cache/hisa/distill/<file>.pt
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pooled_precision_probe import rounded  # noqa: E402

from hisa.distill import load_trained  # noqa: E402
from hisa.distill.indexer import LightningIndexer  # noqa: E402
from hisa.eval.metrics import iou, recall  # noqa: E402
from hisa.ops.dsa.naive import naive_dsa_index  # noqa: E402
from hisa.ops.indexer.naive import naive_hisa_index, naive_pool_blocks  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capture", required=True, help="a WindowCapture .pt file")
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--block-topk", type=int, default=64)
    ap.add_argument("--formats", default="fp8,bf16,tf32")
    ap.add_argument("--out", default=None, help="append JSON rows here")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    cap = torch.load(args.capture, weights_only=True)
    indexers = load_trained("gemma3")
    rows = []
    for layer in indexers.layers:
        x = cap["hidden"][layer].float()
        L = x.shape[0]
        pos = torch.arange(L)
        qpos = torch.linspace(L // 2, L - 1, args.queries).round().long().unique()
        ix = indexers[layer]
        q, w = ix.queries(x[qpos], qpos)                                   # [n, H, D], [n, H]
        q8, k8, k_scale, w8 = LightningIndexer.fp8(q, ix.keys(x, pos), w)
        ks = torch.zeros(qpos.numel(), dtype=torch.int32)
        ke = (qpos + 1).to(torch.int32)
        B, m, k = args.block_size, args.block_topk, args.topk
        flat, _ = naive_dsa_index(q8, k8, w8, ks, ke, k_scale=k_scale, topk=k)
        exact_reps = naive_pool_blocks(k8, k_scale, B)
        sel = {}
        for fmt in ["exact", *args.formats.split(",")]:
            sel[fmt], _ = naive_hisa_index(q8, k8, w8, ks, ke, k_scale=k_scale, topk=k,
                                           block_size=B, block_topk=m,
                                           pooled=rounded(exact_reps, fmt))
            rows.append(dict(capture=Path(args.capture).name, layer=layer, context=L,
                             queries=int(qpos.numel()), topk=k, block_size=B, block_topk=m,
                             rep_format=fmt,
                             iou_vs_exact_reps=round(float(iou(sel[fmt], sel["exact"]).mean()), 5),
                             recall_of_flat=round(float(recall(flat, sel[fmt]).mean()), 5)))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
