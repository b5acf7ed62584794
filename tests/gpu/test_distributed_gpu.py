"""GPU tier of hisa.distributed: NCCL on one GPU (a world of 1, so it runs on the one-GPU
device) and, with two or more GPUs, a spawned NCCL world of 2.

Exact integer inputs (hisa.testing.distributed) keep every FP8 MMA product and sum exact, so
the sharded Triton path must select exactly the single-process Triton sets (and the torch
reference's). The decode path must raise nothing under torch.cuda.set_sync_debug_mode("error"),
and a CUDA graph of it, NCCL all-gathers included, must replay equal to eager with new lengths.
"""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import hisa
import hisa.distributed as hd
from hisa.testing.distributed import (build_cache, build_sharded_cache, exact_keys,
                                      exact_packed_inputs, exact_queries, spawn_world)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

H, D, TOPK, B, M = 16, 128, 256, 128, 8
LENGTHS = [0, 1, 100, 1024, 1025, 3000, 20000]


def same_sets(a, b):
    bad = [t for t in range(a.shape[0])
           if set(a[t].tolist()) - {-1} != set(b[t].tolist()) - {-1}]
    assert not bad, f"rows differ: {bad[:10]}"


@pytest.fixture(scope="module")
def world1():
    with tempfile.TemporaryDirectory() as tmp:
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method=f"file://{os.path.join(tmp, 's')}",
                                rank=0, world_size=1)
        yield
        dist.destroy_process_group()


def decode_inputs(next_n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    reqs = [exact_keys(L, D, B, generator=g) for L in LENGTHS]
    cache, table = build_cache(reqs, block_size=B, head_dim=D, seed=seed, device="cuda",
                               backend="triton")
    q, w = exact_queries(len(LENGTHS) * next_n, H, D, generator=g)
    q = q.view(len(LENGTHS), next_n, H, D).cuda()
    seq = torch.tensor(LENGTHS, dtype=torch.int32, device="cuda")
    return reqs, cache, table, q, w.cuda(), seq


def check_decode(rank, world, group, layout, backend="triton"):
    """Sharded decode vs the single-process ops on this GPU (exact sets)."""
    reqs, cache, table, q, w, seq = decode_inputs(next_n=2, seed=3)
    local, ltable = build_sharded_cache(reqs, layout, rank, block_size=B, head_dim=D, seed=4,
                                        group=group, device="cuda", backend=backend)
    kw = dict(topk=TOPK, backend=backend)
    got = hd.hisa_index_paged(q, local.kv_cache, local.pooled_cache, w, seq, ltable,
                              layout=layout, block_size=B, block_topk=M, group=group, **kw)
    want = hisa.hisa_index_paged(q, cache.kv_cache, cache.pooled_cache, w, seq, table,
                                 block_size=B, block_topk=M, **kw)
    ref = hisa.hisa_index_paged(q, cache.kv_cache, cache.pooled_cache, w, seq, table,
                                block_size=B, block_topk=M, topk=TOPK, backend="torch")
    same_sets(got, want)
    same_sets(got, ref)
    got_f = hd.dsa_index_paged(q, local.kv_cache, w, seq, ltable, layout=layout, group=group,
                               **kw)
    same_sets(got_f, hisa.dsa_index_paged(q, cache.kv_cache, w, seq, table, **kw))


def check_prefill(rank, world, group, layout):
    q, k, w, ks, ke, s = [x.cuda() for x in exact_packed_inputs(
        [5000, 300, 2500], [400, 100, 300], heads=H, head_dim=D, block_size=B, seed=5)]
    kr, sr = hd.shard_keys(k, s, layout, rank)
    kw = dict(topk=TOPK, block_size=B, block_topk=M, backend="auto")
    got = hd.hisa_index(q, kr, w, ks, ke, layout=layout, num_keys=k.shape[0], k_scale=sr,
                        group=group, **kw)
    same_sets(got, hisa.hisa_index(q, k, w, ks, ke, k_scale=s, **kw))
    same_sets(got, hisa.hisa_index(q, k, w, ks, ke, k_scale=s, **dict(kw, backend="torch")))
    got_f = hd.dsa_index(q, kr, w, ks, ke, layout=layout, num_keys=k.shape[0], k_scale=sr,
                         topk=TOPK, group=group)
    same_sets(got_f, hisa.dsa_index(q, k, w, ks, ke, k_scale=s, topk=TOPK))


def test_world_of_one_decode_and_prefill_exact(world1):
    layout = hd.ShardLayout.interleaved(1, B)
    check_decode(0, 1, None, layout)
    check_prefill(0, 1, None, layout)


def test_decode_takes_no_host_sync(world1):
    _, cache, table, q, w, seq = decode_inputs(next_n=2, seed=6)
    layout = hd.ShardLayout.contiguous(1, 1 << 20)
    out = torch.empty(q.shape[0] * 2, TOPK, dtype=torch.int32, device="cuda")
    args = (q, cache.kv_cache, cache.pooled_cache, w, seq, table)
    hd.hisa_index_paged(*args, layout=layout, topk=TOPK, block_size=B, block_topk=M, out=out)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        hd.hisa_index_paged(*args, layout=layout, topk=TOPK, block_size=B, block_topk=M,
                            out=out)
        hd.dsa_index_paged(q, cache.kv_cache, w, seq, table, layout=layout, topk=TOPK)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_decode_cuda_graph_replays_like_eager(world1):
    _, cache, table, q, w, seq = decode_inputs(next_n=1, seed=7)
    layout = hd.ShardLayout.interleaved(1, B)
    out = torch.empty(q.shape[0], TOPK, dtype=torch.int32, device="cuda")
    lens = seq.clone()

    def step():
        hd.hisa_index_paged(q, cache.kv_cache, cache.pooled_cache, w, lens, table,
                            layout=layout, topk=TOPK, block_size=B, block_topk=M, out=out)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()                                   # warm-up: compiles, creates the communicator
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    for shrink in (0, 17, 1000):
        lens.copy_((seq - shrink).clamp_min(0))
        graph.replay()
        torch.cuda.synchronize()
        replayed = out.clone()
        step()
        same_sets(replayed, out)


def _two_gpu_cases(rank, world):
    results = {}
    for name, layout in [("contiguous", hd.ShardLayout.contiguous(world, 16384)),
                         ("interleaved_B", hd.ShardLayout.interleaved(world, B)),
                         ("split_token", hd.ShardLayout.interleaved(world, 1))]:
        for what, fn in [("decode", lambda: check_decode(rank, world, None, layout)),
                         ("prefill", lambda: check_prefill(rank, world, None, layout))]:
            try:
                fn()
                results[f"{what} {name}"] = "ok"
            except AssertionError as err:
                results[f"{what} {name}"] = str(err)
    return results


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_nccl_exact():
    for rank, res in enumerate(spawn_world(_two_gpu_cases, 2, backend="nccl", timeout_s=300)):
        assert isinstance(res, dict), res
        bad = {k: v for k, v in res.items() if v != "ok"}
        assert not bad, f"rank {rank}: {bad}"
