"""Decode probe: flat vs HISA paged decode (Triton), CUDA-graph replay timings on one GPU.

    PYTHONPATH=. python3 benchmarks/decode_probe.py [--quick] [--variants] [--select] [--pdl]
                                                    [--table] [--out DIR]

Builds one paged cache per context (random clustered keys written through the Triton append,
pooled rows included), checks the kernels against the references on a small shape first, then
times flat / HISA / auto for batch x context (next_n = 1, plus a next_n = 2 subset), printing a
compact table and writing JSON rows (:mod:`hisa.bench.rows` format) to ``DIR/decode.jsonl``.
``--variants`` instead times the HISA kernel variants (fused block selection on/off, select
radix 1/2/8, and 0: the interpolation search) and cumulative stage prefixes at a few shapes;
``--select`` times each of the four launches alone and the two selection kernels at several
warp counts (every variant's output compared with the default's; see
benchmarks/decode_notes.md); ``--pdl`` times the HISA
step with and without programmatic dependent launch (:mod:`hisa.ops.pdl`), two and three
levels, in alternating rounds, outputs compared bit for bit; ``--table`` times flat and HISA
at a few contexts with block tables of the request's own width and of a 128K- and a 1M-token
engine's width (an engine's table is as wide as its longest allowed request), outputs compared
across widths.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import time

import torch
import triton

import hisa
from hisa.cache import PAGE_SIZE, PagedIndexerCache
from hisa.cache.layout import as_pages
from hisa.cache.factory import make_paged_inputs, random_keys
from hisa.ops.dsa.decode_kernels import paged_logits
from hisa.utils.quant import quantize_fp8

H, D, TOPK, B, M = 64, 128, 2048, 128, 64
ROW_BYTES = D + 4


def graph_time_us(fn, reps=30):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / reps)
    del g
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gbs():
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        y.copy_(x)
    e.record()
    e.synchronize()
    return 2 * x.numel() * 10 / (s.elapsed_time(e) * 1e-3) / 1e9


def build(batch, ctx, seed=0, super_size=None):
    """A cache holding `batch` requests of `ctx` keys (shuffled pages), block table, seq_lens
    (super-block rows too with ``super_size``)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    per = ctx // PAGE_SIZE
    num_pages = batch * per
    cache = PagedIndexerCache(num_pages, head_dim=D, block_size=B, super_size=super_size,
                              device="cuda")
    bt = torch.randperm(num_pages, generator=g, device="cuda").to(torch.int32).view(batch, per)
    pos = torch.arange(ctx, device="cuda")
    for b in range(batch):
        k, s = quantize_fp8(random_keys(ctx, D, generator=g, device="cuda"), group_size=D)
        slots = bt[b, pos // PAGE_SIZE].long() * PAGE_SIZE + pos % PAGE_SIZE
        cache.append(k, slots, pos, k_scale=s, block_table=bt,
                     req_indices=torch.full((ctx,), b, dtype=torch.int32, device="cuda"),
                     backend="triton")
    return cache, bt


def queries(batch, next_n, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qf = torch.randn(batch, next_n, H, D, generator=g, device="cuda")
    q, qs = quantize_fp8(qf, group_size=D)
    w = torch.randn(batch * next_n, H, generator=g, device="cuda") * H ** -0.5
    return q, (w * qs.reshape(batch * next_n, H)).contiguous()


def recall(a, b):
    a, b = a.cpu().tolist(), b.cpu().tolist()
    hit = sum(len({x for x in ra if x >= 0} & {y for y in rb if y >= 0}) for ra, rb in zip(a, b))
    return hit / max(1, sum(len([y for y in rb if y >= 0]) for rb in b))


def gate():
    """Correctness before numbers: Triton vs the torch references on a small paged batch."""
    inp = make_paged_inputs([9000, 20000, 3000], heads=H, device="cuda", backend="triton")
    f = hisa.dsa_index_paged(*inp.args(), topk=TOPK, backend="triton")
    fr = hisa.dsa_index_paged(*inp.args(), topk=TOPK, backend="torch")
    h = hisa.hisa_index_paged(*inp.hisa_args(), topk=TOPK, backend="triton")
    hr = hisa.hisa_index_paged(*inp.hisa_args(), topk=TOPK, backend="torch")
    rf, rh = recall(f, fr), recall(h, hr)
    print(f"gate: flat recall vs reference {rf:.4f}, hisa recall vs reference {rh:.4f}")
    assert rf > 0.999 and rh > 0.98, "correctness gate failed: no numbers"


def variants(out_dir):
    """HISA variants and stage prefixes at a few shapes, each checked against the default."""
    from hisa.ops.dsa.decode_kernels import decode_operands
    from hisa.ops.indexer import decode_kernels as dk
    var = {"split": dict(fuse_block_select=False, radix=1),
           "split_r2": dict(fuse_block_select=False, radix=2),
           "fused_r1": dict(fuse_block_select=True, radix=1),
           "fused_r2": dict(fuse_block_select=True, radix=2),
           "split_r8": dict(fuse_block_select=False, radix=8),
           "fused_r8": dict(fuse_block_select=True, radix=8),
           "split_r0": dict(fuse_block_select=False, radix=0),
           "fused_r0": dict(fuse_block_select=True, radix=0),
           # The token select's per-block slots on / off, with PDL and without (the 64 KB
           # of shared memory the slots take against the overlap PDL gives the launches);
           # each names its setting, so none changes meaning when a default does.
           "split_r0_slots": dict(fuse_block_select=False, radix=0, block_slots=True),
           "split_r0_1d": dict(fuse_block_select=False, radix=0, block_slots=False),
           "r0_slots_nopdl": dict(fuse_block_select=False, radix=0, block_slots=True,
                                  pdl=False),
           "r0_1d_nopdl": dict(fuse_block_select=False, radix=0, block_slots=False,
                               pdl=False)}
    # A base tree's hisa_decode (benchmarks/kernel_ab.sh) may predate a variant's keyword.
    takes = inspect.signature(dk.hisa_decode).parameters
    left_out = [k for k, kw in var.items() if not all(a in takes for a in kw)]
    var = {k: kw for k, kw in var.items() if k not in left_out}
    if left_out:
        print(f"left out (this tree's hisa_decode has no keyword for them): {left_out}")
    print(f"{'ctx':>7} {'b':>4} {'flat':>7} " + " ".join(f"{k:>9}" for k in var)
          + f" {'blk':>6} {'+tok':>6} {'same':>5}")
    lines = []
    for ctx, batches in ((131072, (1, 8, 32)), (8192, (8,))):
        cache, bt_all = build(max(batches), ctx)
        for batch in batches:
            q, w = queries(batch, 1)
            bt = bt_all[:batch].contiguous()
            lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
            pages = as_pages(cache.kv_cache, D)
            out_f = torch.empty(batch, TOPK, dtype=torch.int32, device="cuda")
            outs = {k: torch.empty_like(out_f) for k in var}
            t = {"flat": graph_time_us(lambda: hisa.dsa_index_paged(
                q, cache.kv_cache, w, lens, bt, topk=TOPK, out=out_f, backend="triton"))}
            for k, kw in var.items():
                t[k] = graph_time_us(lambda kw=kw, o=outs[k]: dk.hisa_decode(
                    q, pages, cache.pooled_cache, w, lens, bt, topk=TOPK, block_size=B,
                    block_topk=M, out=o, **kw))
            same = all(torch.equal(outs[k], outs["split"]) for k in var)
            qq, _, _, prec = decode_operands(q, pages)
            ids = torch.empty(batch, M, dtype=torch.int32, device="cuda")
            js = dk.block_scores_paged(qq, cache.pooled_cache, w, lens, bt, block_size=B,
                                       prec=prec, num_pages=pages.shape[0])
            t["blk"] = graph_time_us(lambda: dk.block_scores_paged(
                qq, cache.pooled_cache, w, lens, bt, block_size=B, prec=prec,
                num_pages=pages.shape[0], out=js))
            t["+tok"] = graph_time_us(lambda: dk.token_scores_paged(
                qq, pages, w, lens, bt, ids, block_size=B, prec=prec,
                block_scores=dk.block_scores_paged(qq, cache.pooled_cache, w, lens, bt,
                                                   block_size=B, prec=prec,
                                                   num_pages=pages.shape[0], out=js)))
            line = (f"{ctx:>7} {batch:>4} {t['flat']:>7.1f} "
                    + " ".join(f"{t[k]:>9.1f}" for k in var)
                    + f" {t['blk']:>6.1f} {t['+tok']:>6.1f} {str(same):>5}")
            print(line, flush=True)
            lines.append(line)
        del cache, bt_all
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "variants.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def select_stages(out_dir):
    """Each HISA launch alone (CUDA graphs), then the block and token selections at several
    warp counts, at 128K keys, batch 1 / 8 / 32 (next_n = 1); outputs compared with the
    default launch's."""
    from hisa.ops.dsa.decode_kernels import decode_operands
    from hisa.ops.indexer import decode_kernels as dk
    from hisa.ops.indexer.select import select_warps
    ctx, lines = 131072, []
    cache, bt_all = build(32, ctx)
    pages = as_pages(cache.kv_cache, D)
    for batch in (1, 8, 32):
        q, w = queries(batch, 1)
        bt = bt_all[:batch].contiguous()
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        qq, _, _, prec = decode_operands(q, pages)
        common = dict(block_size=B, prec=prec, hisa_min_keys=-1)
        js = dk.block_scores_paged(qq, cache.pooled_cache, w, lens, bt, num_pages=pages.shape[0],
                                   **common)
        ids = dk.block_select(qq, cache.pooled_cache, w, lens, bt, block_topk=M,
                              num_pages=pages.shape[0], **common)
        cand = dk.token_scores_paged(qq, pages, w, lens, bt, ids, **common)
        nb_pad, mb_pad = js.shape[1], triton.next_power_of_2(M * B)
        idx = torch.empty(batch, TOPK, dtype=torch.int32, device="cuda")

        def block_sel(o, warps):
            dk._block_select_kernel[(batch,)](
                js, lens, o, bt.shape[1], -1, NEXT_N=1, B=B, SEQ_2D=False, M=M, M_PAD=M,
                NB_PAD=nb_pad, PAGE=PAGE_SIZE, RADIX=dk.SELECT_RADIX, num_warps=warps)

        def token_sel(o, warps, slots=dk.SELECT_BLOCK_SLOTS):
            dk._token_select_kernel[(batch,)](
                cand, ids, lens, o, cand, bt.shape[1], -1, NEXT_N=1, SEQ_2D=False, B=B, M=M,
                MB_PAD=mb_pad, K=TOPK, K_PAD=TOPK, PAGE=PAGE_SIZE, WRITE_VALS=False,
                RADIX=dk.SELECT_RADIX, BLOCK_SLOTS=slots,
                num_warps=warps)

        t = {"block_scores": graph_time_us(lambda: dk.block_scores_paged(
                 qq, cache.pooled_cache, w, lens, bt, num_pages=pages.shape[0], out=js,
                 **common)),
             "token_scores": graph_time_us(lambda: dk.token_scores_paged(
                 qq, pages, w, lens, bt, ids, **common)),
             "all4": graph_time_us(lambda: dk.hisa_decode(
                 q, pages, cache.pooled_cache, w, lens, bt, topk=TOPK, block_size=B,
                 block_topk=M, out=idx))}
        ref_ids, ref_idx = torch.empty_like(ids), torch.empty_like(idx)
        block_sel(ref_ids, select_warps(nb_pad))
        token_sel(ref_idx, select_warps(mb_pad))
        same = torch.equal(ref_ids, ids)
        for warps in (2, 4, 8, 16):
            o = torch.empty_like(ids)
            t[f"block_select w{warps}"] = graph_time_us(lambda: block_sel(o, warps))
            same &= torch.equal(o, ref_ids)
        for warps in (4, 8, 16, 32):
            o = torch.empty_like(idx)
            t[f"token_select w{warps}"] = graph_time_us(lambda: token_sel(o, warps))
            same &= torch.equal(o, ref_idx)
        o = torch.empty_like(idx)
        t[f"token_select slots={not dk.SELECT_BLOCK_SLOTS}"] = graph_time_us(
            lambda: token_sel(o, select_warps(mb_pad), not dk.SELECT_BLOCK_SLOTS))
        same &= torch.equal(o, ref_idx)
        same &= torch.equal(idx, ref_idx)
        line = (f"128K x {batch} (default warps: block {select_warps(nb_pad)}, token "
                f"{select_warps(mb_pad)}), us: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items())
                + f"; same={same}")
        print(line, flush=True)
        lines.append(line)
    if os.environ.get("HISA_NCU_LAUNCH"):            # one eager launch for ncu to catch
        token_sel(torch.empty_like(idx), select_warps(mb_pad))
        torch.cuda.synchronize()
    with open(os.path.join(out_dir, "select_stages.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def pdl_ab(out_dir, rounds=3):
    """HISA decode with PDL off / on, alternating per round (median of the rounds' medians),
    at the shapes of the decode targets; indices and scores compared bit for bit first."""
    from hisa.ops.indexer import decode_kernels as dk
    from hisa.ops.pdl import pdl_supported
    assert pdl_supported(torch.device("cuda")), "PDL needs sm_90 or later"
    # (context, batches, super-block level (size, kept) or None)
    shapes = ((8192, (8,), None), (65536, (1, 8), None),
              (131072, (1, 8, 32, 48, 64, 96, 128), None),
              (1 << 20, (1, 8), (16, 64)))
    lines = []
    for ctx, batches, sup in shapes:
        cache, bt_all = build(max(batches), ctx, super_size=sup and sup[0])
        pages = as_pages(cache.kv_cache, D)
        extra = {} if sup is None else dict(super_cache=cache.super_cache, super_size=sup[0],
                                            super_topk=sup[1])
        for batch in batches:
            q, w = queries(batch, 1)
            bt = bt_all[:batch].contiguous()
            lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")

            def step(pdl, out=None):
                return dk.hisa_decode(q, pages, cache.pooled_cache, w, lens, bt, topk=TOPK,
                                      block_size=B, block_topk=M, out=out, need_scores=True,
                                      pdl=pdl, **extra)
            (i0, v0), (i1, v1) = step(False), step(True)
            same = torch.equal(i0, i1) and torch.equal(v0.view(torch.int32),
                                                       v1.view(torch.int32))
            assert same, f"PDL changed the output at {ctx} x {batch}"
            t = {False: [], True: []}
            for _ in range(rounds):
                for pdl in (False, True):
                    o = torch.empty_like(i0)
                    t[pdl].append(graph_time_us(lambda pdl=pdl, o=o: step(pdl, o)))
            off, on = (sorted(t[k])[rounds // 2] for k in (False, True))
            row = dict(context=ctx, batch=batch, levels=2 if sup is None else 3,
                       super=sup, plain_us=round(off, 2), pdl_us=round(on, 2),
                       saved_us=round(off - on, 2), same=same)
            print(json.dumps(row), flush=True)
            lines.append(row)
        del cache, bt_all, pages
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "pdl_ab.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in lines))


def table_width(out_dir, commit):
    """Flat and HISA decode (two levels, CUDA graphs) with the block table as wide as the
    requests need, as a 128K-token engine's and as a 1M-token engine's (unused columns -1);
    HISA with the block selection's narrower tiers off (``tiers: []``) and on (the default,
    :data:`~hisa.ops.indexer.decode_kernels.BLOCK_SELECT_TIERS`). A row is written only after
    its indices equal those of the request's own table."""
    from hisa.ops.indexer import decode_kernels as dk
    widths = {"own": None, "128K": 131072 // PAGE_SIZE, "1M": (1 << 20) // PAGE_SIZE}
    variants = (("flat", None), ("hisa", ()), ("hisa", dk.BLOCK_SELECT_TIERS))
    rows = []
    for ctx in (4096, 32768, 131072):
        cache, bt_all = build(8, ctx)
        pages = as_pages(cache.kv_cache, D)
        for batch in (1, 8):
            q, w = queries(batch, 1)
            lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
            ref = {}
            for name, cols in widths.items():
                bt = bt_all[:batch].contiguous()
                if cols is not None:
                    wide = torch.full((batch, cols), -1, dtype=torch.int32, device="cuda")
                    wide[:, :bt.shape[1]] = bt
                    bt = wide
                for op, tiers in variants:
                    o = torch.empty(batch, TOPK, dtype=torch.int32, device="cuda")
                    def fn(op=op, bt=bt, o=o, tiers=tiers):
                        if op == "flat":
                            return hisa.dsa_index_paged(q, cache.kv_cache, w, lens, bt,
                                                        topk=TOPK, out=o, backend="triton")
                        return dk.hisa_decode(q, pages, cache.pooled_cache, w, lens, bt,
                                              topk=TOPK, block_size=B, block_topk=M, out=o,
                                              tiers=tiers)
                    fn()
                    got = torch.sort(o, dim=1).values
                    ref.setdefault(op, got)
                    assert torch.equal(got, ref[op]), f"{op} at {ctx} x {batch}: table {name} " \
                        f"(tiers {tiers}) changed the selection"
                    row = dict(probe="table_width", op=op, context=ctx, batch=batch, table=name,
                               table_columns=bt.shape[1], us=round(graph_time_us(fn), 2),
                               tiers=None if tiers is None else list(tiers),
                               gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                               triton=triton.__version__, commit=commit,
                               command="benchmarks/decode_probe.py --table")
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        del cache, bt_all, pages
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "table_width.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--select", action="store_true")
    ap.add_argument("--pdl", action="store_true")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    gate()
    if args.variants:
        variants(args.out)
        return
    if args.select:
        select_stages(args.out)
        return
    if args.pdl:
        pdl_ab(args.out)
        return
    if args.table:
        table_width(args.out, args.commit or commit)
        return
    bw = copy_bandwidth_gbs()
    print(f"{gpu}: copy bandwidth {bw:.0f} GB/s")
    batches = [1, 8, 32, 64, 128]
    ctxs = [8192, 16384, 32768, 65536, 131072]
    rows_out = []
    print(f"{'batch':>5} {'ctx':>7} {'nn':>2} {'flat_us':>8} {'flat_GB/s':>9} {'hisa_us':>8} "
          f"{'auto_us':>8} {'speedup':>7} {'auto/best':>9} {'recall':>6} {'logit_us':>8} "
          f"{'logit_GB/s':>10}")
    for ctx in ctxs:
        bmax = max(b for b in batches if b * ctx <= 128 * 131072)
        t0 = time.time()
        cache, bt_all = build(bmax, ctx)
        build_s = time.time() - t0
        for batch in batches:
            for next_n in (1, 2):
                if next_n == 2 and (batch not in (8, 64) or ctx not in (32768, 131072)):
                    continue
                if args.quick and batch not in (1, 64):
                    continue
                q, w = queries(batch, next_n)
                bt = bt_all[:batch].contiguous()
                lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
                out_f = torch.empty(batch * next_n, TOPK, dtype=torch.int32, device="cuda")
                out_h, out_a = torch.empty_like(out_f), torch.empty_like(out_f)
                flat = lambda: hisa.dsa_index_paged(q, cache.kv_cache, w, lens, bt, topk=TOPK,
                                                    out=out_f, backend="triton")
                hs = lambda: hisa.hisa_index_paged(q, cache.kv_cache, cache.pooled_cache, w,
                                                   lens, bt, topk=TOPK, out=out_h,
                                                   backend="triton")
                auto = lambda: hisa.hisa_index_paged(q, cache.kv_cache, cache.pooled_cache, w,
                                                     lens, bt, topk=TOPK, out=out_a,
                                                     backend="auto")
                lg = lambda: paged_logits(q, cache.kv_cache, w, lens, bt)
                tf, th, ta = graph_time_us(flat), graph_time_us(hs), graph_time_us(auto)
                tl_ = graph_time_us(lg)
                lgbs = batch * ctx * ROW_BYTES / (tl_ * 1e-6) / 1e9
                rec = recall(out_h[:8], out_f[:8])
                gbs = batch * ctx * ROW_BYTES / (tf * 1e-6) / 1e9
                print(f"{batch:>5} {ctx:>7} {next_n:>2} {tf:>8.1f} {gbs:>9.0f} {th:>8.1f} "
                      f"{ta:>8.1f} {tf / th:>7.2f} {ta / min(tf, th):>9.2f} {rec:>6.3f} "
                      f"{tl_:>8.1f} {lgbs:>10.0f}",
                      flush=True)
                base = {"mode": "decode", "context": ctx, "queries": batch * next_n,
                        "batch": batch, "next_n": next_n, "tflops": None, "gpu": gpu,
                        "torch": torch.__version__, "triton": triton.__version__,
                        "commit": commit, "command": "PYTHONPATH=. python3 "
                        "benchmarks/decode_probe.py", "block_size": B, "block_topk": M,
                        "topk": TOPK, "copy_gbps": round(bw, 1)}
                rows_out += [dict(base, op="flat", ms=tf / 1e3, gbps=gbs,
                                  speedup_vs_flat=None, logits_ms=tl_ / 1e3,
                                  logits_gbps=lgbs),
                             dict(base, op="hisa", ms=th / 1e3, gbps=None,
                                  speedup_vs_flat=tf / th, recall_vs_flat=rec),
                             dict(base, op="hisa_auto", ms=ta / 1e3, gbps=None,
                                  speedup_vs_flat=tf / ta)]
        del cache, bt_all
        torch.cuda.empty_cache()
        print(f"  (ctx {ctx}: cache build {build_s:.1f}s)", flush=True)
    with open(os.path.join(args.out, "decode.jsonl"), "a") as f:
        for r in rows_out:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
