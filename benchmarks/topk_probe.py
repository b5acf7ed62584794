"""Probe: the flat wide-row top-k (`topk_rows`), the fast kernel's settings against the general
kernel alone (the path every row took before the split), each checked before it is timed.

Prediction (written before measuring, H200): the general kernel holds 8,192 keys and columns
in registers and the 4,096-bin histogram, 255 registers a thread (spilling 872 bytes at 4
warps): two rows per SM. The fast kernel (4,096-wide selection, no histogram) fits 167
registers at 4 warps without a spill: three rows per SM, and its final selection has half
the keys. Expected: 4,096 rows of 32K-64K keys from ~1.8 ms to ~0.9-1.1 ms; the flat 64K
prefill's top-k from ~21 ms to ~11 ms (flat 65 -> ~55 ms, ~640 TF/s). (The register counts
were from a compile without the launcher's pointer alignment; `benchmarks/sass_count.py
topk_fast` / `topk_general` give the aligned ones: the fast kernel spills 120 bytes at the cap.)

Outcome 1 (H200, 734124f): 8K / 32K / 64K / 128K rows, general 0.34 / 1.21 / 2.03 / 3.77 ms,
fast (4 warps, 168 registers) 0.49 / 0.98 / 1.67 / 5.04 ms (1,450 of the 128K rows listed,
then run by a general launch of one program per SM); 8 warps, 255 registers, 2,048 samples or
4,096-key chunks were slower. The prediction (about 2x) held only as 1.2x: the pass over the
row, not the final selection, is most of a row's time. Second version (prediction): rows of
at most 8,192 keys go to the general kernel's one-shot selection (8K rows back to ~0.34 ms),
the general launch keeps 8 programs per SM, the rule lists rows expected to keep more than
13/16 of the cap (128K rows stay fast), and the pass compares floats instead of building
each score's key (about a third of its instructions), and it loads the next chunk before
scanning the current one (the chunks of a row no longer each wait a memory latency; the
sm_90 compile at the launcher's alignment spills 136 bytes at the 168-register cap with or
without it: `benchmarks/sass_count.py topk_fast --warps 4 --maxnreg 168 --set CHUNK=2048`): 32K / 64K / 128K rows ~0.7 / 1.2 / 2.5 ms.
Outcome 2 (H200, c09a9f2): 32K / 64K / 128K rows 0.88 / 1.40 / 2.66 ms (4 of the 128K rows
listed), without the prefetch 0.90 / 1.47 / 2.84, at 255 registers 0.93 / 1.43 / 2.74, with
1,024-key chunks 0.69 / 1.04 / 2.08 (1.75-1.94x the general kernel's 1.21 / 2.02 / 3.74);
8K rows, all listed for the general kernel, 0.45-0.57 against its 0.34 alone. So: a chunk
of its own for the fast kernel (1,024), and no fast pass over a tile no wider than the
general kernel's register row. Third run (prediction): 8K back to 0.34; 512-key chunks
within 5 % of 1,024.

Rows are random (no ties), so each row's top-k set is unique: every variant must return
torch.topk's set on every row. Rows: R = 4,096 windows [0, ke) with ke uniform in [W/2, W]
(a causal tile's mix) for W = 8K / 32K / 64K / 128K.

    PYTHONPATH=. python3 benchmarks/topk_probe.py --commit C --out $OUT/topk_probe.jsonl
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.testing

from hisa.bench.rows import append_rows, environment
from hisa.ops.indexer import topk as T

K = 2048
R = 4096
WIDTHS = (8192, 32768, 65536, 131072)
#: (name, module settings) of the fast kernel; "general" runs the general kernel on every row.
VARIANTS = [
    ("general", None),
    ("fast", {}),
    ("fast_chunk512", dict(TOPK_FAST_CHUNK=512)),
    ("fast_chunk2048", dict(TOPK_FAST_CHUNK=2048)),
    ("fast_chunk1024_noprefetch", dict(TOPK_FAST_PREFETCH=False)),
]


def general_only(x, ks, ke, out, scratch, warps=4):
    """Every row through the general kernel (no fast pass, no list)."""
    T.general_topk_launch(x, ks, ke, t0=0, lo=0, topk=K, out_idx=out, vals=out,
                          write_vals=False, scratch=scratch,
                          grid=T.persistent_programs(x.shape[0], x.device, 8), left=None,
                          num_warps=warps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = "cuda"
    defaults = {k: getattr(T, k) for k in ("TOPK_FAST_WARPS", "TOPK_FAST_MAXNREG",
                                           "TOPK_FAST_PREFETCH", "TOPK_FAST_CHUNK", "TOPK_SAMPLE",
                                           "TOPK_CHUNK")}
    rows = []
    for W in WIDTHS:
        g = torch.Generator(device=dev).manual_seed(W)
        x = torch.randn(R, W, device=dev, generator=g)
        ks = torch.zeros(R, dtype=torch.int32, device=dev)
        ke = torch.randint(W // 2, W + 1, (R,), device=dev, generator=g, dtype=torch.int32)
        col = torch.arange(W, device=dev)
        ref = torch.topk(x.masked_fill(col[None] >= ke[:, None], float("-inf")), K,
                         dim=1).indices.int().sort(1).values
        keys = torch.empty(T.persistent_programs(R, x.device, 8), T.TOPK_SCRATCH,
                           dtype=torch.int32, device=dev)
        scratch = (keys, torch.empty_like(keys))
        left = torch.zeros(R + 1, dtype=torch.int32, device=dev)
        out = torch.empty(R, K, dtype=torch.int32, device=dev)
        for name, settings in VARIANTS:
            for k, v in defaults.items():
                setattr(T, k, v)
            for k, v in (settings or {}).items():
                setattr(T, k, v)
            if settings is None:
                fn = lambda: general_only(x, ks, ke, out, scratch)  # noqa: E731
            else:
                def fn():
                    left[:1].zero_()          # on the device: no host write per call
                    T.topk_rows(x, ks, ke, t0=0, lo=0, topk=K, out_idx=out, out_val=None,
                                scratch=scratch, left=(left[1:], left[:1]), num_warps=4)
            out.fill_(-7)
            fn()
            torch.cuda.synchronize()
            same = bool(torch.equal(out.sort(1).values, ref))
            listed = int(left[0]) if settings is not None else R
            ms = triton.testing.do_bench(fn, warmup=5, rep=60, return_mode="median") \
                if same else float("nan")
            row = {"probe": "topk_rows", "variant": name, "rows": R, "width": W,
                   "ke": "uniform [W/2, W]", "topk": K, "ms": ms, "same_as_torch_topk": same,
                   "listed_rows": listed, "settings": settings, **environment(args.commit)}
            rows.append(row)
            print(f"W={W:>6} {name:<24} {ms:8.3f} ms same={same} listed={listed}", flush=True)
        for k, v in defaults.items():
            setattr(T, k, v)
        del x, ref
        torch.cuda.empty_cache()
    if args.out:
        append_rows(args.out, rows)


if __name__ == "__main__":
    main()
