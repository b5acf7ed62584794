"""Probe: software pipelining (``tl.range(..., num_stages=S)``) of the prefill kernels' inner
loops, S = 1 (plain loads, the setting before this probe) against 2 and 3, each output checked
equal to S = 1's before it is timed.

Prediction (written before measuring, from the sm_90 compile on the CPU with the launcher's
16-byte pointer alignment): at S >= 2 the token stage's key-block gather becomes an
asynchronous copy one block ahead of the MMA (142 -> 118 registers unfused, 42 KB of shared
memory), the block-scan and candidate kernels prefetch their pooled-row tiles, the flat
logits' q tiles are prefetched (102 -> 105 registers); the counts: `python
benchmarks/sass_count.py token_scores --warps 4 --set STAGES=1` (and `=2`, and `flat_logits`
likewise). Expected: the
unfused token scores 10-25 % faster at 64K (about 12 -> 9-11 ms), the fused token stage less
(its 255 registers leave one or two programs per SM either way), the block stages 10-20 %,
the flat logits within 5 % (five programs per SM already hide the loads).

    PYTHONPATH=. python3 benchmarks/stages_probe.py --commit C --out $OUT/stages.jsonl
"""
from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.testing

from hisa.bench.rows import append_rows, environment
from hisa.ops.dsa import prefill as flat_mod
from hisa.ops.indexer import block_scores as block_mod
from hisa.ops.indexer import super_blocks as cand_mod
from hisa.ops.indexer import token_scores as token_mod
from hisa.ops.indexer.pipeline import hisa_prefill_stages
from hisa.testing.inputs import make_indexer_inputs

B, M, K = 128, 64, 2048
SETTINGS = (1, 2, 3)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=150, return_mode="median")


def set_stages(s):
    token_mod.TOKEN_STAGES = s
    block_mod.BLOCK_STAGES = s
    cand_mod.CANDIDATE_STAGES = s
    flat_mod.FLAT_STAGES = s


def hisa_rows(L, args):
    inp = make_indexer_inputs([L], device="cuda", seed=1, clustered=True)
    rows, base = [], None
    for s in SETTINGS:
        set_stages(s)
        stages = hisa_prefill_stages(*inp.args(), k_scale=inp.k_scale, topk=K, block_size=B,
                                     block_topk=M)
        for _, fn in stages:
            state = fn()
        idx = state["idx"].clone()
        if base is None:
            base = idx
        same = bool(torch.equal(idx, base))
        st = {name: bench(fn) for name, fn in stages} if same else {}
        row = dict(probe="prefill_stages", op="hisa", context=L, stages=s, same_as_stages_1=same,
                   stage_ms=st, ms=sum(st.values()) if same else float("nan"),
                   **environment(args.commit))
        rows.append(row)
        print(json.dumps(row), flush=True)
    del inp
    torch.cuda.empty_cache()
    return rows


def flat_rows(L, args):
    inp = make_indexer_inputs([L], device="cuda", seed=1, clustered=True)
    rows, base = [], None
    out = torch.empty(L, K, dtype=torch.int32, device="cuda")
    for s in SETTINGS:
        set_stages(s)
        fn = lambda: flat_mod.dsa_index_triton(*inp.args(), k_scale=inp.k_scale, topk=K,  # noqa: E731
                                               out=out)
        fn()
        idx = out.clone()
        if base is None:
            base = idx
        same = bool(torch.equal(idx, base))
        ms = bench(fn) if same else float("nan")
        pairs = L * (L + 1) / 2
        row = dict(probe="prefill_stages", op="flat", context=L, stages=s, same_as_stages_1=same,
                   ms=ms, tflops=pairs * 2 * 64 * 128 / ms / 1e9, **environment(args.commit))
        rows.append(row)
        print(json.dumps(row), flush=True)
    del inp
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", default=None)
    ap.add_argument("--hisa", default="32768,65536,131072")
    ap.add_argument("--flat", default="32768,65536")
    args = ap.parse_args()
    default = token_mod.TOKEN_STAGES
    rows = []
    for L in (int(x) for x in args.hisa.split(",") if x):
        rows += hisa_rows(L, args)
    for L in (int(x) for x in args.flat.split(",") if x):
        rows += flat_rows(L, args)
    set_stages(default)
    if args.out:
        append_rows(args.out, rows)


if __name__ == "__main__":
    main()
