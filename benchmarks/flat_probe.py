"""Probe: queries per MMA in the flat prefill logits kernel (``FLAT_QPD``), full causal, H200.

For each context and each ``queries_per_dot`` the flat indexer (logits + top-k) is checked
against the PyTorch reference on sampled rows, then timed whole and logits-only. One JSON row per
point on stdout and in ``--out``. The winner becomes ``hisa.ops.dsa.prefill.FLAT_QPD``; the
outcome is recorded in benchmarks/prefill_notes.md.

    PYTHONPATH=. python3 benchmarks/flat_probe.py --out $OUT/flat_probe.jsonl
"""
from __future__ import annotations

import argparse
import json

import torch

import hisa
from hisa.bench.models import flat_prefill_flops
from hisa.bench.prefill import CHECK_ROWS, sample_rows
from hisa.bench.rows import environment, make_row
from hisa.bench.timer import time_op
from hisa.ops.dsa import prefill as flat
from hisa.ops.dsa.naive import naive_dsa_index, naive_dsa_logits
from hisa.testing.compare import FP8_MMA_ROW_TOL, assert_same_selection, check_index_format
from hisa.testing.inputs import make_indexer_inputs


def logits_only(inp, qpd: int):
    """All logits tiles of the flat path, no top-k (the kernel the probe varies)."""
    q, k, prec = flat.prepare_operands(inp.q, inp.k)
    tiles = flat.query_tiles(inp.ks, inp.ke, flat.FLAT_LOGITS_BYTES)
    buf = torch.empty(max(n * max(W, 1) for _, n, _, W in tiles), device=q.device)

    def run():
        for t0, n, lo, W in tiles:
            flat.dsa_logits(q, k, inp.weights, inp.ks, inp.ke, k_scale=inp.k_scale, t0=t0,
                            n_rows=n, lo=lo, out=buf[:n * max(W, 1)].view(n, max(W, 1)),
                            prec=prec, queries_per_dot=qpd)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--contexts", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--qpd", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--out", default="flat_probe.jsonl")
    ap.add_argument("--commit", default=None, help="commit recorded in the rows")
    args = ap.parse_args()
    env = environment(args.commit)
    default = flat.FLAT_QPD
    with open(args.out, "a") as f:
        for L in args.contexts:
            inp = make_indexer_inputs([L], heads=64, head_dim=128, device="cuda",
                                      clustered=True, seed=L)
            rows = sample_rows(L, CHECK_ROWS, "cuda")
            q, w, ks, ke = inp.q[rows], inp.weights[rows], inp.ks[rows], inp.ke[rows]
            logits = naive_dsa_logits(q, inp.k, w, ks, ke, k_scale=inp.k_scale)
            ref, _ = naive_dsa_index(q, inp.k, w, ks, ke, k_scale=inp.k_scale,
                                     topk=args.topk)
            pairs = flat_prefill_flops(inp.ks, inp.ke, 64, 128)
            for qpd in args.qpd:
                flat.FLAT_QPD = qpd
                out = torch.full((L, args.topk), -7, dtype=torch.int32, device="cuda")
                op = lambda: hisa.dsa_index(*inp.args(), k_scale=inp.k_scale, topk=args.topk,
                                            out=out, backend="triton")
                op()
                check_index_format(out, inp.ks, inp.ke, args.topk)
                assert_same_selection(out[rows], ref, ks, logits, row_tol=FP8_MMA_ROW_TOL)
                whole = time_op(op, runs=10)
                lg = time_op(logits_only(inp, qpd), runs=10)
                row = make_row(env, op="flat", mode="prefill", context=L, queries=L, batch=1,
                               ms=whole.median_ms, tflops=pairs / whole.median_ms / 1e9,
                               logits_ms=lg.median_ms,
                               logits_tflops=pairs / lg.median_ms / 1e9,
                               queries_per_dot=qpd, topk=args.topk, heads=64, head_dim=128)
                print(json.dumps(row), flush=True)
                f.write(json.dumps(row) + "\n")
            del inp
            torch.cuda.empty_cache()
    flat.FLAT_QPD = default


if __name__ == "__main__":
    main()
