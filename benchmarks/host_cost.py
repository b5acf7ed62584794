"""The host cost of one hisa_index call with the kernels left out: Python checks, planning and
launch wrappers, on a CPU, under Triton's interpreter with every kernel launch replaced by a
no-op (so the time is ours, not the kernels'; the GPU's own launcher, ~10-20 us a launch,
comes on top). A 1,024-query chunk's kernels take 0.29-0.37 ms on an H200 (select_probe.py
--chunk), so host work beyond that leaves the GPU waiting.

    TRITON_INTERPRET=1 python benchmarks/host_cost.py [--context 131072] [--queries 1024]
        [--profile]

Prints the launches of one call and the median host time of planned (``plan=``) and unplanned
calls; --profile adds the top functions of the planned call by own time (cProfile).
Session 18, 2-core CPU, three interleaved rounds of 400 calls against the tree before
triton.next_power_of_2 -> hisa.utils.sizes.next_pow2 (`bash benchmarks/make_ab_base.sh
613ec2a^`, then `PYTHONPATH=ab_base` against `PYTHONPATH=.`): the smallest per-round minimum
of the planned 128K chunk call 0.264 -> 0.217 ms, unplanned 0.412 -> 0.376; the medians move
1.5x between rounds of the same tree (benchmarks/results/round3/host_cost_cpu_613ec2a.txt).
"""
import argparse
import cProfile
import os
import pstats
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--queries", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run under TRITON_INTERPRET=1 (the launches are replaced, not run)")
    import triton.runtime.interpreter as interp
    launches = []

    def no_launch(self, *a, grid=None, warmup=False, **kw):
        launches.append(self.fn.__name__)
    interp.InterpretedFunction.run = no_launch

    import hisa
    from hisa.testing.inputs import make_indexer_inputs
    inp = make_indexer_inputs([args.context], query_lens=[args.queries], clustered=True, seed=1)
    K, B, M = 2048, 128, 64
    plan = hisa.plan_windows(inp.ks, inp.ke, inp.k.shape[0], topk=K, block_size=B,
                             block_topk=M)
    out = torch.empty(args.queries, K, dtype=torch.int32)
    kw = dict(k_scale=inp.k_scale, topk=K, block_size=B, block_topk=M, backend="triton",
              out=out)
    calls = {"planned": lambda: hisa.hisa_index(*inp.args(), plan=plan, **kw),
             "unplanned": lambda: hisa.hisa_index(*inp.args(), **kw)}
    for fn in calls.values():
        for _ in range(5):
            fn()
    launches.clear()
    calls["planned"]()
    print(f"hisa from {os.path.dirname(hisa.__file__)}; {args.context} keys, {args.queries} "
          f"queries: launches {launches}")
    for name, fn in calls.items():
        ts = []
        for _ in range(args.runs):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        # The minimum too: a shared CPU's noise only adds, and moves the median by 2x.
        print(f"{name}: host {statistics.median(ts) * 1e3:.3f} ms a call (median of "
              f"{args.runs}; min {min(ts) * 1e3:.3f}; kernels left out)")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.runs):
            calls["planned"]()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
