"""Context-parallel indexing on several GPUs: sharded HISA vs single-GPU HISA vs the sharded flat
indexer, NCCL, at 128K and 1M keys.

Run on a machine with two GPUs, from the repository root (one process per GPU):

    PYTHONPATH=. python3 -m torch.distributed.run --standalone --nproc-per-node 2 \\
        benchmarks/distributed_bench.py --commit $(git rev-parse --short=12 HEAD) \\
        --out benchmarks/results/distributed_h200x2.jsonl

Every point is checked before it is timed, on every rank: the sharded flat indexer must return
exactly the single-GPU flat sets (each key's score does not depend on where it lives, and the
merge breaks ties as the kernels do), and sharded HISA must agree with single-GPU HISA at IoU
>= HISA_MIN_IOU (its block scores come from the flat kernel over pooled pages instead of HISA's
own kernel, so FP8-MMA rounding may swap near-tied blocks). A failed check raises; no row is
written for it. Rows are JSON lines (:mod:`hisa.bench.rows` format plus world_size, layout, unit,
single_gpu_ms, vs_single_gpu, comm_bytes_per_rank, comm_steps); ``ms`` is the slowest rank's
median, ``speedup_vs_flat`` compares the sharded HISA and sharded flat times of the same run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import hisa
import hisa.distributed as hd
from hisa.bench.prefill import HISA_MIN_IOU
from hisa.bench.rows import append_rows, environment, make_row
from hisa.testing.distributed import build_cache, build_sharded_cache
from hisa.testing.inputs import make_indexer_inputs
from hisa.utils.quant import quantize_fp8

#: Prompt tokens written per append call while building the caches (bounds the temporaries).
BUILD_CHUNK = 1 << 16
#: "cuda"; "cpu" with --dry-run (gloo, torch backend, tiny shapes: checks the script itself).
DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def layout_for(name: str, world: int, context: int, block_size: int) -> hd.ShardLayout:
    if name == "contiguous":
        return hd.ShardLayout.contiguous_for(context, world, block_size=block_size)
    if name == "interleaved_B":
        return hd.ShardLayout.interleaved(world, block_size)
    if name == "interleaved_1":                      # vLLM DCP's default: token round robin
        return hd.ShardLayout.interleaved(world, 1)
    raise ValueError(f"layout: unknown name {name!r}")


def time_ms(fn, *, warmup: int, runs: int, graph: bool = False) -> tuple[float, bool]:
    """Slowest rank's median time of fn() in ms; every rank runs the same iterations.

    With ``graph`` the op (its NCCL all-gathers included) is captured once and replayed; if
    capture fails on any rank, every rank times eager launches instead.
    """
    for _ in range(warmup):
        fn()
    sync()
    if DEVICE == "cpu":
        samples = []
        for _ in range(runs):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        med = torch.tensor([statistics.median(samples)])
        dist.all_reduce(med, op=dist.ReduceOp.MAX)
        return float(med.item()), False
    call, graphed = fn, False
    if graph:
        ok = torch.ones(1, device="cuda")
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                fn()
                with torch.cuda.graph(g, stream=stream):
                    fn()
        except RuntimeError as err:
            print(f"[rank {dist.get_rank()}] graph capture failed: {err}", file=sys.stderr)
            ok.zero_()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if bool(ok.item()):
            call, graphed = g.replay, True
    samples = []
    for _ in range(runs):
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    med = torch.tensor([statistics.median(samples)], device="cuda")
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return float(med.item()), graphed


def comm(fn) -> tuple[int, list]:
    with hd.count_bytes() as rec:
        fn()
    sync()
    return rec.bytes, rec.steps


#: Rows compared per chunk (a [rows, 2k] int64 sort).
CHECK_ROWS = 8192


def assert_same_sets(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    n = 0
    for r0 in range(0, a.shape[0], CHECK_ROWS):
        x, y = a[r0:r0 + CHECK_ROWS], b[r0:r0 + CHECK_ROWS]
        n += int((torch.sort(x, 1).values != torch.sort(y, 1).values).any(1).sum())
    assert n == 0, f"{what}: {n} of {a.shape[0]} rows differ from the single-GPU op"


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of |a & b| / |a | b| (valid entries; a row empty on both sides counts 1)."""
    total = 0.0
    for r0 in range(0, a.shape[0], CHECK_ROWS):
        x, y = a[r0:r0 + CHECK_ROWS].long(), b[r0:r0 + CHECK_ROWS].long()
        both = torch.sort(torch.cat([x.clamp_min(-1), torch.where(y >= 0, y, -2)], 1), 1).values
        inter = ((both[:, 1:] == both[:, :-1]) & (both[:, 1:] >= 0)).sum(1)
        union = (x >= 0).sum(1) + (y >= 0).sum(1) - inter
        total += float(torch.where(union > 0, inter / union.clamp_min(1), 1.0).sum())
    return total / max(a.shape[0], 1)


def decode_requests(context: int, batch: int, head_dim: int, seed: int):
    """Random FP8 keys per request (drifting every 256 tokens, so blocks differ), on the GPU."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    reqs = []
    for _ in range(batch):
        kf = torch.randn(context, head_dim, generator=g, device=DEVICE)
        drift = torch.randn(context // 256 + 1, head_dim, generator=g, device=DEVICE)
        kf += 2.0 * drift.repeat_interleave(256, dim=0)[:context]
        reqs.append(quantize_fp8(kf, group_size=head_dim))
    return reqs


def decode_queries(batch, next_n, heads, head_dim, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    qf = torch.randn(batch, next_n, heads, head_dim, generator=g, device=DEVICE)
    w = torch.randn(batch * next_n, heads, generator=g, device=DEVICE) * heads ** -0.5
    q, q_scale = quantize_fp8(qf, group_size=head_dim)
    return q, (w * q_scale.reshape(batch * next_n, heads)).contiguous()


def bench_decode(args, env, rank, world, context, batch, next_n) -> list[dict]:
    B, m, k = args.block_size, args.block_topk, args.topk
    reqs = decode_requests(context, batch, args.head_dim, seed=context + batch)
    cache, table = build_cache(reqs, block_size=B, head_dim=args.head_dim, seed=1,
                               device=DEVICE, backend="auto")
    q, w = decode_queries(batch, next_n, args.heads, args.head_dim, seed=batch)
    seq = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    rows = batch * next_n
    out = {n: torch.full((rows, k), -7, dtype=torch.int32, device=DEVICE)
           for n in ("hisa1", "flat1", "hisa", "flat")}
    hk = dict(topk=k, block_size=B, block_topk=m, backend="auto")
    single = {
        "hisa1": lambda: hisa.hisa_index_paged(q, cache.kv_cache, cache.pooled_cache, w, seq,
                                               table, out=out["hisa1"], **hk),
        "flat1": lambda: hisa.dsa_index_paged(q, cache.kv_cache, w, seq, table, topk=k,
                                              out=out["flat1"]),
    }
    t_single = {n: time_ms(f, warmup=3, runs=args.runs, graph=True)[0]
                for n, f in single.items()}
    result = []
    for name in args.layouts:
        layout = layout_for(name, world, context, B)
        local, ltable = build_sharded_cache(reqs, layout, rank, block_size=B,
                                            head_dim=args.head_dim, seed=2, decode_steps=1,
                                            device=DEVICE, backend="auto",
                                            prompt_chunk=BUILD_CHUNK)
        ops = {
            "hisa": lambda: hd.hisa_index_paged(q, local.kv_cache, local.pooled_cache, w, seq,
                                                ltable, layout=layout, out=out["hisa"], **hk),
            "flat": lambda: hd.dsa_index_paged(q, local.kv_cache, w, seq, ltable,
                                               layout=layout, topk=k, out=out["flat"]),
        }
        for f in list(single.values()) + list(ops.values()):
            f()
        sync()
        assert_same_sets(out["flat"], out["flat1"], f"decode flat {name}")
        quality = iou(out["hisa"], out["hisa1"])
        assert quality >= HISA_MIN_IOU, f"decode HISA {name}: IoU {quality:.4f} vs single GPU"
        bytes_h, steps_h = comm(ops["hisa"])
        bytes_f, steps_f = comm(ops["flat"])
        t = {n: time_ms(f, warmup=3, runs=args.runs, graph=True) for n, f in ops.items()}
        common = dict(mode="decode", context=context, queries=rows, batch=batch, next_n=next_n,
                      topk=k, heads=args.heads, head_dim=args.head_dim, dtype="float8_e4m3fn",
                      world_size=world, layout=layout.kind, unit=layout.unit,
                      layout_name=name)
        result.append(make_row(env, op="flat", ms=t["flat"][0], cuda_graph=t["flat"][1],
                               single_gpu_ms=t_single["flat1"],
                               vs_single_gpu=t_single["flat1"] / t["flat"][0],
                               comm_bytes_per_rank=bytes_f, comm_steps=steps_f, **common))
        result.append(make_row(env, op="hisa", ms=t["hisa"][0], cuda_graph=t["hisa"][1],
                               single_gpu_ms=t_single["hisa1"],
                               vs_single_gpu=t_single["hisa1"] / t["hisa"][0],
                               speedup_vs_flat=t["flat"][0] / t["hisa"][0],
                               iou_vs_single_gpu=round(quality, 5), block_size=B,
                               block_topk=m, comm_bytes_per_rank=bytes_h, comm_steps=steps_h,
                               **common))
        del local, ltable
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return result


def bench_prefill(args, env, rank, world, context, queries) -> list[dict]:
    B, m, k = args.block_size, args.block_topk, args.topk
    inp = make_indexer_inputs([context], query_lens=None if queries is None else [queries],
                              heads=args.heads, head_dim=args.head_dim, device=DEVICE,
                              clustered=True, seed=context)
    S, T = inp.k.shape[0], inp.num_queries
    hk = dict(k_scale=inp.k_scale, topk=k, block_size=B, block_topk=m)
    single = {
        "hisa1": lambda: hisa.hisa_index(*inp.args(), **hk),
        "flat1": lambda: hisa.dsa_index(*inp.args(), k_scale=inp.k_scale, topk=k),
    }
    ref = {n: f() for n, f in single.items()}
    runs = max(3, args.runs // 10)
    t_single = {n: time_ms(f, warmup=1, runs=runs)[0] for n, f in single.items()}
    result = []
    for name in args.layouts:
        layout = layout_for(name, world, S, B)
        kr, sr = hd.shard_keys(inp.k, inp.k_scale, layout, rank)
        kw = dict(layout=layout, num_keys=S, k_scale=sr, topk=k)
        ops = {
            "hisa": lambda: hd.hisa_index(inp.q, kr, inp.weights, inp.ks, inp.ke, block_size=B,
                                          block_topk=m, **kw),
            "flat": lambda: hd.dsa_index(inp.q, kr, inp.weights, inp.ks, inp.ke, **kw),
        }
        got = {n: f() for n, f in ops.items()}
        assert_same_sets(got["flat"], ref["flat1"], f"prefill flat {name}")
        quality = iou(got["hisa"], ref["hisa1"])
        assert quality >= HISA_MIN_IOU, f"prefill HISA {name}: IoU {quality:.4f} vs single GPU"
        bytes_h, steps_h = comm(ops["hisa"])
        bytes_f, steps_f = comm(ops["flat"])
        t = {n: time_ms(f, warmup=1, runs=runs)[0] for n, f in ops.items()}
        mode = "prefill" if queries is None else "prefill_chunk"
        common = dict(mode=mode, context=context, queries=T, batch=1, next_n=None, topk=k,
                      heads=args.heads, head_dim=args.head_dim, dtype="float8_e4m3fn",
                      world_size=world, layout=layout.kind, unit=layout.unit,
                      layout_name=name)
        result.append(make_row(env, op="flat", ms=t["flat"], single_gpu_ms=t_single["flat1"],
                               vs_single_gpu=t_single["flat1"] / t["flat"],
                               comm_bytes_per_rank=bytes_f, comm_steps=_merge_steps(steps_f),
                               **common))
        result.append(make_row(env, op="hisa", ms=t["hisa"], single_gpu_ms=t_single["hisa1"],
                               vs_single_gpu=t_single["hisa1"] / t["hisa"],
                               speedup_vs_flat=t["flat"] / t["hisa"],
                               iou_vs_single_gpu=round(quality, 5), block_size=B,
                               block_topk=m, comm_bytes_per_rank=bytes_h,
                               comm_steps=_merge_steps(steps_h), **common))
        del kr, sr, got
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return result


def _merge_steps(steps: list) -> list:
    """Per-tile steps of a prefill summed by name (one entry per kind of exchange)."""
    total: dict = {}
    for name, b in steps:
        total[name] = total.get(name, 0) + b
    return sorted(total.items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[131072, 1048576])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--next-n", type=int, nargs="+", default=[1])
    p.add_argument("--chunk-queries", type=int, default=1024)
    p.add_argument("--full-prefill", type=int, nargs="*", default=[131072],
                   help="contexts of full causal prefill points (none: skip)")
    p.add_argument("--layouts", nargs="+",
                   default=["contiguous", "interleaved_B", "interleaved_1"])
    p.add_argument("--modes", nargs="+", default=["decode", "prefill_chunk", "prefill"])
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--block-topk", type=int, default=64)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default="benchmarks/results/distributed.jsonl")
    p.add_argument("--dry-run", action="store_true",
                   help="gloo on CPU with the torch backend: checks the script, times nothing "
                        "meaningful (use tiny shapes)")
    args = p.parse_args(argv)

    global DEVICE
    if args.dry_run:
        DEVICE = "cpu"
        dist.init_process_group("gloo")
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    env = environment(args.commit)
    env["command"] = "python3 -m torch.distributed.run --standalone --nproc-per-node " \
                     f"{world} " + " ".join(sys.argv)
    env["gpu"] = f"{world}x {env['gpu']}"
    points = []
    if "decode" in args.modes:
        points += [("decode", c, b, n) for c in args.contexts for b in args.batches
                   for n in args.next_n]
    if "prefill_chunk" in args.modes:
        points += [("prefill_chunk", c, args.chunk_queries, None) for c in args.contexts]
    if "prefill" in args.modes:
        points += [("prefill", c, None, None) for c in args.full_prefill]
    for mode, context, x, next_n in points:
        if mode == "decode":
            rows = bench_decode(args, env, rank, world, context, x, next_n)
        else:
            rows = bench_prefill(args, env, rank, world, context, x)
        if rank == 0:
            append_rows(args.out, rows)
            for r in rows:
                print(f"{r['mode']:>13} {r['op']:>4} ctx={r['context']:>8} rows={r['queries']:>6}"
                      f" {r['layout_name']:>13}: {r['ms']:8.3f} ms (1 GPU {r['single_gpu_ms']:8.3f}"
                      f" ms, x{r['vs_single_gpu']:.2f}) comm {r['comm_bytes_per_rank'] / 2**20:.2f}"
                      f" MiB/rank", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
