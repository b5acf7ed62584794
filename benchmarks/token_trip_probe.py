"""Probe: the prefill overheads that keep HISA behind flat at 16K, each variant checked before
it is timed (H200, one call).

1. The token stage's MMA loop over every one of the m block ids (``TOKEN_TRIP = "all"``, the
   loop before 2026-12) against the loop to the last kept block (``"live"``, the default):
   queries with fewer than m eligible blocks carry -1 padding, a quarter of the ids of a 16K
   causal prefill. Same outputs (checked bit for bit on the selected offsets).
2. The block stage with the FP8 pre-selection (``rescore_margin="auto"``) against the plain
   scan of every block on the fp32 reps (None), at contexts where the window has 128 to
   1,024 blocks: the pre-selection costs two extra launches, which a short window cannot earn
   back. Both selections are compared (mean IoU of the final offsets; the pre-selection equals
   the scan whenever the true top m lie in the FP8 top m + m/2).
3. End to end, each setting against the flat indexer in the same run; the exact-regime rows
   (queries with at most m * B keys, whose HISA set is the flat set) checked equal to flat's.

    PYTHONPATH=. python3 benchmarks/token_trip_probe.py --commit C --out $OUT/trip.jsonl

Prediction (written before measuring, from the 16K stage times at dba146a: token scores
3.03 ms, pre-selection 0.30 + candidate select 0.60, token select 1.15, flat 4.33): the live
trip saves the padding's share of the MMAs, ~25 % of the token scores at 16K (3.03 -> ~2.3 ms),
~12 % at 32K, ~6 % at 64K, ~3 % at 128K; the count before the token select's threshold search
skips the search for the eighth of the 16K rows with at most k keys (~0.1 ms). The plain scan
beats the pre-selection at 16K-32K (expected 0.94 -> ~0.5 ms at 16K) and loses at 128K
(40.3 vs 44.1 ms end to end at 68ad042). HISA 16K ~3.9-4.2 ms against flat ~4.3.
"""
from __future__ import annotations

import argparse
import json

import torch
import triton.testing

from hisa.bench.prefill import iou
from hisa.bench.rows import append_rows, environment
from hisa.ops.dsa.prefill import dsa_index_triton
from hisa.ops.indexer import token_scores as token_mod
from hisa.ops.indexer.pipeline import hisa_index_triton, hisa_prefill_stages
from hisa.testing.compare import canonical_rows
from hisa.testing.inputs import make_indexer_inputs

B, M, K = 128, 64, 2048


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=150, return_mode="median")


def staged(inp, margin):
    stages = hisa_prefill_stages(*inp.args(), k_scale=inp.k_scale, topk=K, block_size=B,
                                 block_topk=M, rescore_margin=margin)
    for _, fn in stages:
        state = fn()
    return stages, state["idx"].clone()


def rows_for(L, args):
    inp = make_indexer_inputs([L], device="cuda", seed=1, clustered=True)
    env = environment(args.commit)
    rows = []

    def emit(**fields):
        row = dict(probe="token_trip", context=L, **fields, **env)
        rows.append(row)
        print(json.dumps(row), flush=True)

    # 1. Trip count of the token stage (default margin).
    base = None
    for trip in ("all", "live"):
        token_mod.TOKEN_TRIP = trip
        stages, idx = staged(inp, "auto")
        base = idx if base is None else base
        same = bool(torch.equal(idx, base))
        st = {name: round(bench(fn), 4) for name, fn in stages} if same else {}
        emit(variant=f"trip_{trip}", same_as_trip_all=same, stage_ms=st,
             ms=round(sum(st.values()), 4) if same else float("nan"))
    token_mod.TOKEN_TRIP = "live"

    # 2. + 3. Block stage setting, end to end against flat.
    out = torch.empty(L, K, dtype=torch.int32, device="cuda")
    flat = lambda: dsa_index_triton(*inp.args(), k_scale=inp.k_scale, topk=K, out=out)  # noqa: E731
    flat()
    flat_idx = out.clone()
    flat_ms = bench(flat)
    emit(variant="flat", ms=round(flat_ms, 4))
    exact_rows = torch.arange(L, device="cuda") < M * B    # windows of at most m blocks
    sel = {}
    for margin in ("auto", None):
        stages, idx = staged(inp, margin)
        sel[margin] = idx
        st = {name: round(bench(fn), 4) for name, fn in stages}
        fn = lambda: hisa_index_triton(*inp.args(), k_scale=inp.k_scale, topk=K,  # noqa: E731
                                       block_size=B, block_topk=M, rescore_margin=margin)
        end = fn()[0]
        same_as_stages = bool(torch.equal(canonical_rows(end), canonical_rows(idx)))
        exact_ok = bool(torch.equal(canonical_rows(idx[exact_rows]),
                                    canonical_rows(flat_idx[exact_rows])))
        ms = bench(fn) if same_as_stages and exact_ok else float("nan")
        emit(variant=f"margin_{margin}", stage_ms=st, ms=round(ms, 4),
             same_as_stages=same_as_stages, exact_rows_equal_flat=exact_ok,
             speedup_vs_flat=round(flat_ms / ms, 4))
    pick = torch.unique(torch.linspace(0, L - 1, 2048, device="cuda").long())
    emit(variant="margin_agreement",
         iou_auto_vs_none=round(iou(sel["auto"][pick], sel[None][pick]), 5),
         rows_compared=int(pick.numel()))
    del inp
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", default=None)
    ap.add_argument("--contexts", default="16384,32768,65536,131072")
    args = ap.parse_args()
    rows = []
    for L in (int(x) for x in args.contexts.split(",") if x):
        rows += rows_for(L, args)
    if args.out:
        append_rows(args.out, rows)


if __name__ == "__main__":
    main()
