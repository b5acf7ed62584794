"""`hisa bench`: check, then time, flat DSA vs HISA; print a table, write JSON rows + a plot."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..utils.validate import check_hisa_params, check_super_params
from .rows import append_rows, environment

#: 12K: just past the exact regime (windows of at most m * B = 8K keys), where pruning saves
#: least; the grid covers it for issue 12's "never slower than flat" target.
CONTEXTS = {"prefill": [8192, 12288, 16384, 32768, 65536, 131072],
            "prefill_chunk": [16384, 65536, 131072],
            "decode": [8192, 32768, 65536, 131072]}
CHUNK_QUERIES = 1024
DECODE_BATCHES = [1, 8, 32, 64, 128]


def _ints(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        out.append(int(part[:-1]) * 1024 if part.endswith("k") else int(part))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``hisa bench``; every help text states its default (use
    :class:`hisa.utils.cli_format.DefaultsHelpFormatter` for the parser, which appends the
    non-None ones)."""
    p.add_argument("--mode", default="all", choices=["all", "prefill", "prefill_chunk", "decode"],
                   help="what to time: full causal prefill, a chunk of "
                        f"{CHUNK_QUERIES} queries over a long prefix, paged decode, or all three")
    p.add_argument("--contexts", type=_ints, default=None,
                   help="comma list of context lengths, e.g. 8k,32k (default: per mode, "
                        + "; ".join(f"{m} {','.join(f'{c // 1024}k' for c in cs)}"
                                    for m, cs in CONTEXTS.items()) + ")")
    p.add_argument("--batches", type=_ints, default=None,
                   help="comma list of decode batch sizes (default: "
                        + ",".join(map(str, DECODE_BATCHES)) + ")")
    p.add_argument("--next-n", type=_ints, default=[1, 2], metavar="NEXT_N",
                   help="comma list of decode query rows per request, 1 and/or 2 (default: 1,2)")
    p.add_argument("--topk", type=int, default=2048, help="k: keys selected per query")
    p.add_argument("--block-size", type=int, default=128, help="B: keys per HISA block")
    p.add_argument("--block-topk", type=int, default=64, help="m: blocks HISA keeps per query")
    p.add_argument("--super-size", type=_ints, default=[],
                   help="also measure three levels (op hisa3): blocks per super-block, a comma "
                        "list of settings paired with --super-topk (default: none, two levels "
                        "only)")
    p.add_argument("--super-topk", type=_ints, default=[],
                   help="super-blocks kept per query, one per --super-size (default: none)")
    p.add_argument("--queries", type=_ints, default=None,
                   help="prefill_chunk: queries per chunk, comma list (default: 1024)")
    p.add_argument("--no-auto", action="store_true",
                   help="decode: skip timing backend='auto' (default: off, auto is timed)")
    p.add_argument("--check-reps", default="exact", choices=["exact", "kernel"],
                   help="prefill HISA check against the reference on fp32 block means "
                        "(exact) or on the kernels' own stored representatives (kernel) "
                        "(default: exact)")
    p.add_argument("--timing-runs", type=int, default=20,
                   help="prefill: timed runs per op (default: 20)")
    p.add_argument("--no-stages", action="store_true",
                   help="skip the per-stage breakdown of the prefill timings")
    p.add_argument("--out", default="benchmarks/results/bench.jsonl",
                   help="JSON Lines file the result rows are appended to")
    p.add_argument("--plot", default=None,
                   help="PNG path of the plot (default: --out with the suffix .png)")
    p.add_argument("--commit", default=None,
                   help="commit id recorded in each row (default: the checkout's git HEAD)")
    p.add_argument("--report", nargs="+", default=None, metavar="ROWS",
                   help="print markdown tables from existing JSON Lines files and exit, "
                        "timing nothing (no GPU needed) (default: off, the kernels are timed)")


def _table(rows: list[dict]) -> str:
    head = f"{'mode':<14}{'ctx':>8}{'q':>7}{'b':>5}{'nn':>4}{'op':>6}{'ms':>10}{'TFLOP/s':>9}{'GB/s':>8}{'speedup':>9}  stages (ms)"
    lines = [head, "-" * len(head)]
    for r in rows:
        st = " ".join(f"{k}={v:.3g}" for k, v in (r.get("stage_ms") or {}).items())
        if r.get("auto_ms") is not None:
            st = f"auto={r['auto_ms']:.4f} ms ({r['auto_vs_best']:.2f}x the better)"
        if r.get("speedup_vs_two_level") is not None:
            st = f"{r['speedup_vs_two_level']:.2f}x two-level  " + st
        fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-"
        lines.append(f"{r['mode']:<14}{r['context']:>8}{r['queries']:>7}{fmt(r.get('batch'), 'd'):>5}"
                     f"{fmt(r.get('next_n'), 'd'):>4}{r['op']:>6}{r['ms']:>10.4f}"
                     f"{fmt(r.get('tflops'), '.0f'):>9}{fmt(r.get('gbps'), '.0f'):>8}"
                     f"{fmt(r.get('speedup_vs_flat'), '.2f'):>9}  {st}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.report:
        from .report import markdown_report
        from .rows import read_rows
        print(markdown_report([r for path in args.report for r in read_rows(path)]))
        return 0
    if not torch.cuda.is_available():
        print("hisa bench times the Triton kernels and needs a CUDA GPU; none is visible.\n"
              "On CPU, `hisa selftest` checks the references and `hisa eval` measures fidelity.")
        return 2
    check_hisa_params(topk=args.topk, block_size=args.block_size, block_topk=args.block_topk)
    if len(args.super_size) != len(args.super_topk):
        raise SystemExit(f"--super-size and --super-topk: expected lists of one length, got "
                         f"{args.super_size} and {args.super_topk}")
    supers = tuple(zip(args.super_size, args.super_topk))
    for bs, ms in supers:
        check_super_params(block_topk=args.block_topk, super_size=bs, super_topk=ms)
    env = environment(args.commit)
    modes = ["prefill", "prefill_chunk", "decode"] if args.mode == "all" else [args.mode]
    params = dict(topk=args.topk, block_size=args.block_size, block_topk=args.block_topk,
                  super_configs=supers)
    all_rows: list[dict] = []
    for mode in modes:
        contexts = args.contexts or CONTEXTS[mode]
        for ctx in contexts:
            if mode == "decode":
                from .decode import bench_decode_point
                for batch in args.batches or DECODE_BATCHES:
                    for nn in args.next_n:
                        rows = bench_decode_point(ctx, batch=batch, next_n=nn, env=env,
                                                  auto=not args.no_auto, **params)
                        append_rows(args.out, rows)
                        all_rows += rows
                        print("\n".join(_table(rows).splitlines()[2:]), flush=True)
                continue
            from .prefill import bench_prefill_point
            chunks = (args.queries or [CHUNK_QUERIES]) if mode == "prefill_chunk" else [None]
            for queries in chunks:
                rows = bench_prefill_point(ctx, queries=queries, env=env,
                                           stages=not args.no_stages,
                                           check_reps=args.check_reps,
                                           timing_runs=args.timing_runs, **params)
                append_rows(args.out, rows)
                all_rows += rows
                print("\n".join(_table(rows).splitlines()[2:]), flush=True)
    print()
    print(f"GPU: {env['gpu']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}")
    print(_table(all_rows))
    from .plot import plot_rows
    plot = plot_rows(all_rows, args.plot or Path(args.out).with_suffix(".png"))
    print(f"rows: {args.out}" + (f"  plot: {plot}" if plot else ""))
    return 0
