"""What the pooled keys' number format costs HISA's selection, on the CPU.

The Triton prefill path scores blocks (and super-blocks) against representatives stored in some
format: FP8 re-quantized means (one scale per row) or plain bf16 means. The reference scores the
exact fp32 means. This probe runs the reference twice on the same sampled queries, once with the
exact means and once with the means rounded to the format, and reports the mean IoU of the two
selections: the fidelity the format alone can reach, before any kernel arithmetic. It uses the
bench's input distribution (``make_indexer_inputs(clustered=True)``: FP8 keys with per-token
scales and a component drifting every 256 tokens, random queries), drawn only for the sampled
rows, so 1M-token contexts fit on a CPU. ``--iid`` drops the drift: every block mean is then
nearly the same, the hardest case for any rounding of them.

Run: ``python benchmarks/pooled_precision_probe.py --out rows.jsonl`` (about 10 minutes on 2 cores
for the default shapes).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from hisa.eval.metrics import iou
from hisa.ops.indexer.naive import naive_hisa_index, naive_pool_blocks
from hisa.ops.indexer.naive_super import naive_hisa_index_super, naive_pool_supers
from hisa.utils.quant import dequantize_fp8, quantize_fp8

FORMATS = ("fp8", "bf16", "tf32")
#: (name, context, queries or None for full causal, B, m, super (Bs, ms) or None)
SHAPES = (
    ("prefill 64K", 65536, None, 128, 64, None),
    ("prefill 128K", 131072, None, 128, 64, None),
    ("chunk 16K", 16384, 1024, 128, 64, None),
    ("chunk 128K", 131072, 1024, 128, 64, None),
    ("chunk 128K B64 m32", 131072, 1024, 64, 32, None),
    ("chunk 1M", 1048576, 1024, 128, 64, None),
    ("chunk 1M B64 m32", 1048576, 1024, 64, 32, None),
    ("chunk 1M 3L 2x128", 1048576, 1024, 128, 64, (2, 128)),
    ("chunk 1M 3L 16x64", 1048576, 1024, 128, 64, (16, 64)),
)


def rounded(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """fp32 values of ``x`` [N, D] after storing them in ``fmt`` (fp8: one scale per row).
    ``fp8+rescoreN`` (in :func:`probe`): FP8 pre-selection of m + N blocks, fp32 re-score."""
    if fmt == "exact":
        return x
    if fmt == "bf16":
        return x.bfloat16().float()
    if fmt in ("tf32", "tf32trunc"):  # fp32 reps in a tf32 MMA: 10 mantissa bits kept
        bits = x.contiguous().view(torch.int32)
        if fmt == "tf32":    # rounded to nearest even (cvt.rn); "tf32trunc": the low bits dropped
            bits = bits + 0x0FFF + ((bits >> 13) & 1)
        return (bits & ~0x1FFF).view(torch.float32)
    values, scale = quantize_fp8(x, group_size=x.shape[1])
    return dequantize_fp8(values, scale.unsqueeze(1))


def sampled_inputs(context: int, queries: int | None, rows: int, *, clustered: bool,
                   heads=64, head_dim=128, seed=0):
    """FP8 keys of one sequence and ``rows`` sampled queries of it (bench distribution)."""
    g = torch.Generator().manual_seed(seed)
    kf = torch.randn(context, head_dim, generator=g)
    if clustered:                         # as make_indexer_inputs(clustered=True)
        drift = torch.randn(context // 256 + 1, head_dim, generator=g) * 2.0
        kf += drift.repeat_interleave(256, dim=0)[:context]
    k, k_scale = quantize_fp8(kf, group_size=head_dim)
    del kf
    first = 0 if queries is None else context - queries
    pos = torch.randint(first, context, (rows,), generator=g).sort().values
    pos[-1] = context - 1                      # always the longest window
    q, q_scale = quantize_fp8(torch.randn(rows, heads, head_dim, generator=g),
                              group_size=head_dim)
    w = torch.randn(rows, heads, generator=g) * heads ** -0.5 * q_scale
    ks = torch.zeros(rows, dtype=torch.int32)
    return q, k, k_scale, w, ks, (pos + 1).to(torch.int32)


def probe(name, context, queries, B, m, sup, *, rows, topk, clustered, formats=FORMATS):
    q, k, k_scale, w, ks, ke = sampled_inputs(context, queries, rows, clustered=clustered)
    exact = naive_pool_blocks(k, k_scale, B)
    kw = dict(k_scale=k_scale, topk=topk, block_size=B, block_topk=m)

    def select(fmt):
        if fmt.startswith("fp8+rescore"):
            # Two levels as three with super-blocks of one block: the top m + margin blocks by
            # FP8 reps, then the best m of those by their tf32-rounded fp32 reps.
            margin = int(fmt[len("fp8+rescore"):])
            return naive_hisa_index_super(q, k, w, ks, ke, super_size=1, super_topk=m + margin,
                                          pooled=rounded(exact, "tf32"),
                                          super_pooled=rounded(exact, "fp8"), **kw)[0]
        pooled = rounded(exact, fmt)
        if sup is None:
            return naive_hisa_index(q, k, w, ks, ke, pooled=pooled, **kw)[0]
        Bs, ms = sup
        # The kernels pool super-blocks from the stored block reps, then store them again.
        supers = rounded(naive_pool_supers(pooled, context, block_size=B, super_size=Bs), fmt)
        return naive_hisa_index_super(q, k, w, ks, ke, super_size=Bs, super_topk=ms,
                                      pooled=pooled, super_pooled=supers, **kw)[0]

    want = select("exact")
    out = []
    for fmt in formats:
        if fmt.startswith("fp8+rescore") and sup is not None:
            continue                                    # a two-level variant
        t0 = time.time()
        got = select(fmt)
        per_row = iou(got, want).tolist()
        out.append(dict(shape=name, context=context, queries=queries, block_size=B,
                        block_topk=m, super=sup, topk=topk, pooled_format=fmt, rows=rows,
                        keys="clustered" if clustered else "iid",
                        iou_vs_exact=round(sum(per_row) / rows, 5),
                        min_row_iou=round(min(per_row), 5), seconds=round(time.time() - t0, 1)))
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=48, help="sampled queries per shape")
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--iid", action="store_true", help="i.i.d. keys (no drift)")
    ap.add_argument("--only", default=None, help="run the shapes whose name contains this")
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated formats")
    ap.add_argument("--out", default=None, help="append JSON rows here")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    rows = []
    for shape in SHAPES:
        if args.only is None or args.only in shape[0]:
            rows += probe(*shape, rows=args.rows, topk=args.topk,
                          clustered=not args.iid, formats=args.formats.split(","))
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
