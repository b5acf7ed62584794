"""Probe: warps per program of the register selections (HISA token select, flat wide-row top-k).

Prediction (written before measuring): the selections are bound by the latency of their ~20
cross-warp reductions per row, not by bytes; 4 warps per program halve each reduction's
cross-warp stage and let twice as many rows run per SM, so select_tokens at 64K x 8,192
should drop from ~6.6 ms (8 warps) towards ~4 ms; 16 warps should be slower.
Outcome (H200): select_tokens 4 / 8 / 16 warps: 4.15 / 6.07 / 6.82 ms; topk_rows 1.82 / 2.15 /
2.43 ms; all identical outputs. Second probe: 2 warps (prediction: a little faster still, or
equal, as reductions get cheaper but each thread serialises 128 keys). Outcome: 2 warps
5.40 ms / 2.17 ms, slower than 4: four warps stay the default.
Third probe (session 7): the byte-histogram threshold search (`radix=8`: at most 4 passes of
one 256-bin `tl.histogram` instead of ~20 single-bit reductions). Prediction: select_tokens at
64K x 8,192 from ~4.1 ms to 2-3 ms at 4 warps; slower instead if the histogram serializes on
shared-memory atomics. Outcome (H200, commit 3d1d0c3): 4 warps 10.68 ms, 8 warps 9.91 ms
against radix 1's 4.32 ms, identical outputs: the histogram costs more than the passes it
saves; radix 1 stays (benchmarks/results/round3/select_probe_h200_3d1d0c3.txt).
Fourth probe (session 15, not yet run): the interpolation search (`radix=0`: regula falsi on
the score values with the Illinois rule, then bisection; `hisa.ops.indexer.topk`) against
radix 1, on the normal scores below and on real candidate scores (the token stage's buffer of a
16K clustered prefill). Prediction, from a CPU emulation of both searches
(`benchmarks/select_passes.py`, setup reductions included): reductions per row 20.2 -> 8.7
on normal scores, 21.7 -> 10.2 on the clustered candidates (22.4 -> 10.0 at 64K), 18.8 ->
18.2 on log-normal ones; a pass costs 189 instructions instead of 130 (the decode token
select's sm_90 SASS, `benchmarks/sass_count.py token_select --set RADIX=0`). So select_tokens
~40-50 % faster if its time is the passes' latency (64K x 8,192 normal: ~4.3 -> ~2.3 ms; the
16K prefill's rows: ~1.08 -> ~0.6 ms), ~30 % if it is their instructions (2,821 -> 1,928 a row).
Outcome (H200, 73a530f): normal rows 4.41 -> 4.30 ms (-2.6 %), clustered 1.047 -> 1.049: far
short of the prediction, so the passes are not where the time goes; radix 0 is the default since
(no slower anywhere, and 0.8-2.3 us faster per decode step).
Fifth probe (session 16): the select's cost without its search. Rows of the same shape with
exactly k selectable keys (the rest marked outside) take the count-first exit, so they load,
count, scan and store like a full row but search nothing. Prediction: if the ~20 passes were the
time, these rows would take a small fraction of 4.3 ms; the fourth probe says they are not, so
expect ~3-3.5 ms (load, cumsum and scattered stores of 8,192 keys a row).
Outcome: 2.98 ms, so the search is ~1.3 ms of the 4.3 and the row's fixed work the rest
(`benchmarks/prefill_notes.md` v11). The static SASS agrees (`sass_count.py prefill_select
--warps 4 [--set RADIX=1]` at aeb0aa0): 6,580 instructions outside the
pass loop with radix 1 (7,382 with radix 0) against 234 (radix 1) or 290 (radix 0) per pass,
and 236 registers a thread, so two 4-warp rows per SM.
Sixth probe (session 16): register caps (`maxnreg`) of the same select, radix 0 and 1: 168
(three rows per SM, 104 bytes spilled) and 128 (four, 256 bytes). Prediction: the fast flat
top-k gained 2-7 % from the same cap (220 -> 168 registers); here 168 ~4.30 -> ~4.0-4.1 ms;
128 spills in the fixed part only (the pass loop grows 290 -> 293 instructions), so if the
row's latency is the limit it gains more, ~3.6-3.9 ms.
Outcome (H200, aeb0aa0, whose default cap was already 168, so this run had no uncapped row: the
cap loop has one since): radix 0 4.146 ms at 168, 4.129 at 128; radix 1 4.118 / 4.069; against
the uncapped 4.30 / 4.41 of the two earlier runs (other machines, each within 0.1 % of the
other): -3.6 % for radix 0, -6.7 % for radix 1, as the flat top-k's cap did; 128 no better
than 168 within 1.5 %. In the pipeline, 12K select_tokens 0.795 ms (0.828 / 0.844 uncapped).
Since (not yet run): the mask's own count gives the number selected (`topk._select_mask_count`:
one cross-warp reduction fewer a row): static SASS (4 warps, radix 0) 7,672 -> 7,336
instructions and 236 -> 208 registers uncapped, 7,904 -> 7,456 and 104 -> 96 bytes spilled at
168. Prediction for `--caps`: 2-4 % under aeb0aa0's rows at the same cap (~4.0 ms at 168).
Seventh probe (session 18): the 1,024-query chunk. `hisa bench` at 23e48e1 timed the 128K
chunk's select_tokens at 0.259 ms against 0.096 at 64K in the same run (0.112 / 0.112 at
8bcc448), and the whole 128K chunk 0.88 ms against 0.64 (interleaved host A/B at f2c3b12
against 8bcc448: 0.87 / 1.13 against 0.70 / 1.05 ms, the host's own spread as large). Here
each chunk's own candidates (16K / 64K / 128K, the bench's inputs) go through select_tokens
with each setting (default, radix 1, uncapped, one scan per row), every output checked against
the default's, then each pipeline stage and the whole call, timed twice with do_bench (50 ms
of repetitions, CUDA events, so host time between launches shows only where the GPU starves).
Prediction: the select costs the same at 64K and 128K (same shape, same kind of scores,
~0.10 ms), so the 0.259 was the stage timer's (10 runs) noise, and the whole-call gap between
trees is host time: the stages sum to ~0.6 ms at 128K, the call costs more only when the
host is slower than the GPU.
Every variant's output is compared with the default's (identical indices required).
Run: PYTHONPATH=. python3 benchmarks/select_probe.py [--caps | --chunk]  (--caps: the sixth
probe only, uncapped rows included; --chunk: the seventh only)
"""
import torch
import triton.testing

from hisa.ops.dsa.naive import mark_outside
from hisa.ops.indexer.select import SELECT_TOKENS_MAXNREG, select_tokens
from hisa.ops.indexer.topk import topk_rows


def bench(fn):
    return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median")


def run_stages(inp, K, B=128, M=64):
    """The pipeline's stages on ``inp``, all run once: (stages, state, copies of the token
    stage's candidate scores and block ids, taken before the select runs)."""
    from hisa.ops.indexer.pipeline import hisa_prefill_stages
    stages = hisa_prefill_stages(*inp.args(), k_scale=inp.k_scale, topk=K, block_size=B,
                                 block_topk=M)
    for name, fn in stages:
        state = fn()
        if name == "token_scores":
            sc, ids = state["scores"].clone(), state["ids"].clone()
    return stages, state, sc, ids


def clustered_candidates(K):
    """radix 1 against 0 on the token stage's own candidate scores (16K clustered prefill)."""
    from hisa.testing.inputs import make_indexer_inputs
    inp = make_indexer_inputs([16384], device="cuda", seed=1, clustered=True)
    _, _, sc, ids = run_stages(inp, K)
    ks = inp.ks
    ref, _ = select_tokens(sc, ids, ks, block_size=128, topk=K, radix=1)
    for r in (1, 0):
        out, _ = select_tokens(sc, ids, ks, block_size=128, topk=K, radix=r)
        same = torch.equal(out, ref)
        ms = bench(lambda: select_tokens(sc, ids, ks, block_size=128, topk=K, radix=r))
        print(f"select_tokens clustered 16K candidates radix={r}: {ms:.3f} ms same={same}",
              flush=True)


def chunk_candidates(K, B=128, M=64, queries=1024):
    """The seventh probe: select_tokens settings, the stages and the call, on chunks."""
    import hisa
    from hisa.testing.inputs import make_indexer_inputs
    for ctx in (16384, 65536, 131072):
        inp = make_indexer_inputs([ctx], query_lens=[queries], device="cuda", clustered=True,
                                  seed=ctx)
        stages, state, sc, ids = run_stages(inp, K, B, M)
        ks = inp.ks
        finite = torch.isfinite(sc).sum(1).float()
        print(f"chunk {ctx}: {queries} queries, finite candidates a row mean {finite.mean():.0f}"
              f" min {finite.min():.0f}", flush=True)
        ref, _ = select_tokens(sc, ids, ks, block_size=B, topk=K)
        for label, kw in (("default", {}), ("radix=1", dict(radix=1)),
                          ("maxnreg=0", dict(maxnreg=0)), ("block_slots=False",
                                                           dict(block_slots=False))):
            out, _ = select_tokens(sc, ids, ks, block_size=B, topk=K, **kw)
            same = torch.equal(out, ref)
            ms = [bench(lambda kw=kw: select_tokens(sc, ids, ks, block_size=B, topk=K, **kw))
                  for _ in range(2)]
            print(f"chunk {ctx} select_tokens {label}: {ms[0]:.4f} / {ms[1]:.4f} ms "
                  f"same={same}", flush=True)
        for name, fn in stages:
            ms = [bench(fn) for _ in range(2)]
            print(f"chunk {ctx} stage {name}: {ms[0]:.4f} / {ms[1]:.4f} ms", flush=True)
        out = torch.empty(queries, K, dtype=torch.int32, device="cuda")
        call = dict(k_scale=inp.k_scale, topk=K, block_size=B, block_topk=M, backend="triton",
                    out=out)
        hisa.hisa_index(*inp.args(), **call)
        same = torch.equal(torch.sort(out, 1).values, torch.sort(state["idx"], 1).values)
        ms = [bench(lambda: hisa.hisa_index(*inp.args(), **call)) for _ in range(2)]
        print(f"chunk {ctx} hisa_index: {ms[0]:.4f} / {ms[1]:.4f} ms same_as_stages={same}",
              flush=True)
        # With the windows planned once (what an engine does for all layers of a step): no
        # host read in the call, so the GPU is not left idle behind the host's launches.
        plan = hisa.plan_windows(inp.ks, inp.ke, inp.k.shape[0], topk=K, block_size=B,
                                 block_topk=M)
        planned = torch.empty_like(out)
        hisa.hisa_index(*inp.args(), **dict(call, out=planned), plan=plan)
        same = torch.equal(planned, out)
        ms = [bench(lambda: hisa.hisa_index(*inp.args(), **dict(call, out=planned), plan=plan))
              for _ in range(2)]
        print(f"chunk {ctx} hisa_index plan=: {ms[0]:.4f} / {ms[1]:.4f} ms same={same}",
              flush=True)
        # The planned call captured once and replayed: no host work at all, the GPU's floor.
        graphed = torch.full_like(out, -7)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            hisa.hisa_index(*inp.args(), **dict(call, out=graphed), plan=plan)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            hisa.hisa_index(*inp.args(), **dict(call, out=graphed), plan=plan)
        graphed.fill_(-7)
        graph.replay()
        same = torch.equal(graphed, out)
        ms = [bench(graph.replay) for _ in range(2)]
        print(f"chunk {ctx} hisa_index plan= CUDA graph: {ms[0]:.4f} / {ms[1]:.4f} ms "
              f"same={same}", flush=True)
        del graph
        del inp, sc, ids, state, stages
        torch.cuda.empty_cache()


def no_search(scores, ids, ks, B, K):
    """The same rows with exactly K selectable keys: the count-first exit skips the search."""
    T, MB = scores.shape
    live = MB - B // 2                                     # the columns main() left selectable
    keep = torch.rand(T, live, device=scores.device).argsort(1)[:, :K]
    short = torch.full_like(scores, 0.0)
    mark_outside(short, torch.ones_like(scores, dtype=torch.bool))
    short.scatter_(1, keep, scores.gather(1, keep))
    out, _ = select_tokens(short, ids, ks, block_size=B, topk=K)
    want = keep.to(torch.int32)              # ids are 0..M-1 and ks 0: offset = column
    same = torch.equal(torch.sort(out, 1).values, torch.sort(want, 1).values)
    ms = bench(lambda: select_tokens(short, ids, ks, block_size=B, topk=K))
    print(f"select_tokens T={T} MB={MB} exactly K selectable (no search): {ms:.3f} ms "
          f"same={same}", flush=True)


def main(only_caps=False):
    torch.manual_seed(0)
    dev = "cuda"
    T, M, B, K = 65536, 64, 128, 2048
    scores = torch.randn(T, M * B, device=dev)
    col = torch.arange(M * B, device=dev)
    mark_outside(scores, (col >= M * B - B // 2).expand_as(scores))   # half the own block: future
    ids = torch.arange(M, device=dev, dtype=torch.int32).repeat(T, 1)
    ks = torch.zeros(T, dtype=torch.int32, device=dev)
    ref, _ = select_tokens(scores, ids, ks, block_size=B, topk=K, radix=1, maxnreg=0)

    def row(warps=4, radix=1, maxnreg=None):
        """Times one setting of the select, its indices checked against ref first."""
        kw = dict(block_size=B, topk=K, num_warps=warps, radix=radix, maxnreg=maxnreg)
        out, _ = select_tokens(scores, ids, ks, **kw)
        same = torch.equal(torch.sort(out, 1).values, torch.sort(ref, 1).values)
        ms = bench(lambda: select_tokens(scores, ids, ks, **kw))
        cap = (SELECT_TOKENS_MAXNREG or 0) if maxnreg is None else maxnreg
        print(f"select_tokens T={T} MB={M * B} warps={warps} radix={radix} maxnreg={cap}: "
              f"{ms:.3f} ms same={same}", flush=True)

    for w, r in () if only_caps else ((2, 1), (4, 1), (8, 1), (4, 8), (8, 8), (4, 0), (8, 0)):
        row(w, r)                                   # at the module's cap
    for r in (0, 1):
        for cap in (0, 168, 128):                  # 0: uncapped, the control in the same run
            row(4, r, cap)
    if only_caps:
        return
    no_search(scores, ids, ks, B, K)
    del scores
    clustered_candidates(K)
    R, W = 4096, 65536
    x = torch.randn(R, W, device=dev)
    ks = torch.zeros(R, dtype=torch.int32, device=dev)
    ke = torch.full((R,), W, dtype=torch.int32, device=dev)
    ke[::2] = W // 2                                    # causal-like mix of widths
    base = torch.empty(R, K, dtype=torch.int32, device=dev)
    topk_rows(x, ks, ke, t0=0, lo=0, topk=K, out_idx=base, out_val=None)
    for w in (2, 4, 8):
        o = torch.empty_like(base)
        topk_rows(x, ks, ke, t0=0, lo=0, topk=K, out_idx=o, out_val=None, num_warps=w)
        same = torch.equal(torch.sort(o, 1).values, torch.sort(base, 1).values)
        ms = bench(lambda: topk_rows(x, ks, ke, t0=0, lo=0, topk=K, out_idx=o, out_val=None,
                                     num_warps=w))
        print(f"topk_rows R={R} W={W} (half rows W/2) warps={w}: {ms:.3f} ms same={same}",
              flush=True)


if __name__ == "__main__":
    import sys
    if "--chunk" in sys.argv[1:]:
        chunk_candidates(2048)
    else:
        main(only_caps="--caps" in sys.argv[1:])
