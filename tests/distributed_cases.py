"""The cases test_distributed.py runs inside one spawned gloo world per world size.

Every rank builds the same global inputs from fixed seeds, takes its shard, runs the sharded
op, and checks the result against the single-process op (backend "torch") on the unsharded
inputs. Exact inputs (:mod:`hisa.testing.distributed`) must match bit for bit, scores included;
random FP8 inputs must match up to score ties. A case returns normally or raises
AssertionError after all of its collectives, so a failing case does not desynchronise the
world.
"""
from __future__ import annotations

import torch

import hisa
import hisa.distributed as hd
from hisa.distributed import pool
from hisa.distributed.pool import POOL_CHUNK, SYNC_FREE_APPEND
from hisa.ops.dsa.naive import naive_dsa_logits
from hisa.testing.compare import assert_same_selection, check_index_format
from hisa.testing.distributed import (build_cache, build_sharded_cache, exact_keys,
                                      exact_packed_inputs, exact_queries)
from hisa.testing.inputs import make_indexer_inputs
from hisa.utils.quant import quantize_fp8

H, D, TOPK, M = 4, 32, 32, 3
B = 64


def layouts(world: int, num_keys: int | None = None) -> dict:
    """name -> (layout, block_size): whole-block layouts at B = 64, split ones at B = 64 * R."""
    split_b = 64 * world
    out = {
        "contiguous": (hd.ShardLayout.contiguous_for(num_keys, world, block_size=B)
                       if num_keys is not None else hd.ShardLayout.contiguous(world, 1024 // world),
                       B),
        "interleaved_B": (hd.ShardLayout.interleaved(world, B), B),
        "interleaved_2B": (hd.ShardLayout.interleaved(world, 2 * B), B),
        "split_token": (hd.ShardLayout.interleaved(world, 1), split_b),
        "split_unit": (hd.ShardLayout.interleaved(world, 64 // world), split_b),
    }
    return out


def assert_exact(got, got_scores, want, want_scores, what):
    """Same set per row and the same score for every selected position."""
    for t in range(want.shape[0]):
        g = dict(zip(got[t].tolist(), got_scores[t].tolist()))
        w = dict(zip(want[t].tolist(), want_scores[t].tolist()))
        g.pop(-1, None)
        w.pop(-1, None)
        assert g == w, f"{what}: row {t} differs: only sharded {sorted(set(g) - set(w))[:8]}, " \
                       f"only single-process {sorted(set(w) - set(g))[:8]}"
    valid = got >= 0
    assert bool((valid[:, 1:] <= valid[:, :-1]).all()), f"{what}: -1 before a valid entry"


def prefill_pair(q, k, w, ks, ke, s, layout, rank, group, *, block_size, block_topk=M,
                 topk=TOPK, cache=None):
    """(sharded HISA, single HISA, sharded flat, single flat), each (idx, scores).

    ``cache`` (a dict) keeps the single-process results of one input set across layouts.
    """
    S = k.shape[0]
    kr, sr = hd.shard_keys(k, s, layout, rank)
    kw = dict(topk=topk, return_scores=True, backend="torch")
    hk = dict(kw, block_size=block_size, block_topk=block_topk)
    cache = {} if cache is None else cache
    key = (block_size, block_topk, topk)
    if key not in cache:
        cache[key] = (hisa.hisa_index(q, k, w, ks, ke, k_scale=s, **hk),
                      hisa.dsa_index(q, k, w, ks, ke, k_scale=s, **kw))
    h1, f1 = cache[key]
    return (hd.hisa_index(q, kr, w, ks, ke, layout=layout, num_keys=S, k_scale=sr, group=group,
                          **hk), h1,
            hd.dsa_index(q, kr, w, ks, ke, layout=layout, num_keys=S, k_scale=sr, group=group,
                         **kw), f1)


def case_prefill_exact(rank, world, group):
    seqs, queries = [1300, 130, 333], [60, 30, 40]
    q, k, w, ks, ke, s = exact_packed_inputs(seqs, queries, heads=H, head_dim=D, seed=11)
    ref = {}
    for name, (layout, bs) in layouts(world, k.shape[0]).items():
        hs, h1, fs, f1 = prefill_pair(q, k, w, ks, ke, s, layout, rank, group,
                                      block_size=bs, cache=ref)
        check_index_format(hs[0], ks, ke, TOPK, exact_count=False)
        check_index_format(fs[0], ks, ke, TOPK)
        assert_exact(*hs, *h1, f"hisa {name}")
        assert_exact(*fs, *f1, f"flat {name}")
        pruned = sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(h1[0], f1[0]))
        assert pruned > 0, f"{name}: HISA equals flat on every row; the case prunes nothing"


def case_prefill_ties(rank, world, group):
    q, k, w, ks, ke, s = exact_packed_inputs([900, 200], [30, 20], heads=H, head_dim=D, seed=12,
                                             all_equal=True)
    ref = {}
    for name in ("contiguous", "interleaved_B", "split_token"):
        layout, bs = layouts(world, k.shape[0])[name]
        hs, h1, fs, f1 = prefill_pair(q, k, w, ks, ke, s, layout, rank, group,
                                      block_size=bs, cache=ref)
        assert_exact(*hs, *h1, f"hisa ties {name}")
        assert_exact(*fs, *f1, f"flat ties {name}")


def case_prefill_short_windows(rank, world, group):
    # m * B = k: the third sequence starts at 240, inside block 3, so its windows of 81 to 128
    # keys span blocks 3, 4, 5 (m + 1) and must still come back whole; m = 2 leaves only the
    # forced blocks (no block exchange).
    q, k, w, ks, ke, s = exact_packed_inputs([150, 90, 160], [10, 10, 160], heads=H,
                                             head_dim=D, seed=13)
    ref = {}
    for name in ("contiguous", "interleaved_B"):
        layout, _ = layouts(world, k.shape[0])[name]
        hs, h1, fs, f1 = prefill_pair(q, k, w, ks, ke, s, layout, rank, group, block_size=B,
                                      block_topk=2, topk=128, cache=ref)
        check_index_format(hs[0], ks, ke, 128, exact_count=False)
        assert_exact(*hs, *h1, f"hisa short {name}")
        assert_exact(*fs, *f1, f"flat short {name}")


def case_prefill_empty_shards(rank, world, group):
    for seqs, queries in [([50], [50]), ([100], [7]), ([100], [0])]:
        q, k, w, ks, ke, s = exact_packed_inputs(seqs, queries, heads=H, head_dim=D, seed=14)
        ref = {}
        for name in ("contiguous", "interleaved_B", "split_token"):
            layout, bs = layouts(world, k.shape[0])[name]
            hs, h1, fs, f1 = prefill_pair(q, k, w, ks, ke, s, layout, rank, group,
                                      block_size=bs, cache=ref)
            assert hs[0].shape == (sum(queries), TOPK)
            assert_exact(*hs, *h1, f"hisa empty {name} {seqs}")
            assert_exact(*fs, *f1, f"flat empty {name} {seqs}")
    layout = layouts(world, 50)["contiguous"][0]
    assert layout.local_length(world - 1, 50) == 0, "no rank without keys in this case"


def case_prefill_all_blocks_kept(rank, world, group):
    # At most m = 16 eligible blocks per query: HISA must select exactly the flat set.
    q, k, w, ks, ke, s = exact_packed_inputs([1000], [80], heads=H, head_dim=D, seed=15)
    layout, _ = layouts(world, k.shape[0])["interleaved_B"]
    hs, _, fs, f1 = prefill_pair(q, k, w, ks, ke, s, layout, rank, group, block_size=B,
                                 block_topk=16)
    assert_exact(*hs, *f1, "hisa (all blocks kept) vs flat")
    assert_exact(*fs, *f1, "flat")


def case_prefill_fp8_random(rank, world, group):
    inp = make_indexer_inputs([700, 300], query_lens=[40, 30], heads=H, head_dim=D, seed=16,
                              clustered=True)
    logits = naive_dsa_logits(inp.q, inp.k, inp.weights, inp.ks, inp.ke, k_scale=inp.k_scale)
    ref = {}
    for name in ("interleaved_B", "split_token"):
        layout, bs = layouts(world, inp.k.shape[0])[name]
        hs, h1, fs, f1 = prefill_pair(inp.q, inp.k, inp.weights, inp.ks, inp.ke, inp.k_scale,
                                      layout, rank, group,
                                      block_size=bs, cache=ref)
        assert_same_selection(hs[0], h1[0], inp.ks, logits)
        assert_same_selection(fs[0], f1[0], inp.ks, logits)


DECODE_LENGTHS = [0, 1, 50, 64, 65, 128, 300, 777, 1024]


def decode_setup(world, block_size, seed, *, all_equal=False, random_fp8=False):
    g = torch.Generator().manual_seed(seed)
    if random_fp8:
        reqs = [quantize_fp8(torch.randn(L, D, generator=g) + 2.0 * torch.randn(
            L // 128 + 1, D, generator=g).repeat_interleave(128, 0)[:L], group_size=D)
            for L in DECODE_LENGTHS]
    else:
        reqs = [exact_keys(L, D, block_size, generator=g, all_equal=all_equal)
                for L in DECODE_LENGTHS]
    cache, table = build_cache(reqs, block_size=block_size, head_dim=D, seed=seed)
    return reqs, cache, table


def decode_queries(next_n, seed, two_d=False):
    batch = len(DECODE_LENGTHS)
    q, w = exact_queries(batch * next_n, H, D, generator=torch.Generator().manual_seed(seed))
    seq = torch.tensor(DECODE_LENGTHS, dtype=torch.int32)
    if two_d:
        seq = (seq.unsqueeze(1) - next_n + 1 + torch.arange(next_n)).clamp_min(0).int()
    return q.view(batch, next_n, H, D), w, seq


def run_decode(reqs, cache, table, layout, rank, group, bs, q, w, seq, local=None,
               max_seq_len=None):
    """(sharded HISA, single HISA, sharded flat, single flat, HISA bytes, flat bytes)."""
    if local is None:
        local = build_sharded_cache(reqs, layout, rank, block_size=bs, head_dim=D, seed=21,
                                    group=group)
    local, ltable = local
    kw = dict(topk=TOPK, return_scores=True, backend="torch")
    hk = dict(kw, block_size=bs, block_topk=M)
    out = torch.full((q.shape[0] * q.shape[1], TOPK), -7, dtype=torch.int32)   # poisoned
    with hd.count_bytes() as rec_h:
        hs = hd.hisa_index_paged(q, local.kv_cache, local.pooled_cache, w, seq, ltable,
                                 layout=layout, out=out, group=group,
                                 max_seq_len=max_seq_len, **hk)
    assert hs[0] is out
    with hd.count_bytes() as rec_f:
        fs = hd.dsa_index_paged(q, local.kv_cache, w, seq, ltable, layout=layout, group=group,
                                **kw)
    h1 = hisa.hisa_index_paged(q, cache.kv_cache, cache.pooled_cache, w, seq, table, **hk)
    f1 = hisa.dsa_index_paged(q, cache.kv_cache, w, seq, table, **kw)
    return hs, h1, fs, f1, rec_h, rec_f


def case_decode_exact(rank, world, group):
    for name, (layout, bs) in layouts(world).items():
        if name == "interleaved_2B":
            continue                    # same path as interleaved_B; decode_fp8_random has it
        reqs, cache, table = decode_setup(world, bs, seed=31)
        if name == "split_unit":        # the prompt append's compaction and chunked pooling
            pool.SYNC_FREE_APPEND, pool.POOL_CHUNK = 256, 3
        try:
            local = build_sharded_cache(reqs, layout, rank, block_size=bs, head_dim=D,
                                        seed=21, group=group)
        finally:
            pool.SYNC_FREE_APPEND, pool.POOL_CHUNK = SYNC_FREE_APPEND, POOL_CHUNK
        for next_n, two_d in [(1, False), (2, True)]:
            q, w, seq = decode_queries(next_n, seed=32 + next_n, two_d=two_d)
            bound = max(DECODE_LENGTHS) if name in ("contiguous", "split_token") else None
            hs, h1, fs, f1, rec_h, rec_f = run_decode(reqs, cache, table, layout, rank, group,
                                                      bs, q, w, seq, local, bound)
            what = f"{name} next_n={next_n}{' 2-D' if two_d else ''}"
            assert_exact(*hs, *h1, f"hisa {what}")
            assert_exact(*fs, *f1, f"flat {what}")
            rows = q.shape[0] * q.shape[1]
            assert rec_h.steps == [("blocks", rows * (M - 2) * 8), ("tokens", rows * TOPK * 8)], \
                rec_h.steps
            assert rec_f.steps == [("tokens", rows * TOPK * 8)], rec_f.steps
        pruned = sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(h1[0], f1[0]))
        assert pruned > 0, f"{name}: HISA equals flat on every row; the case prunes nothing"


def case_decode_ties(rank, world, group):
    for name in ("contiguous", "interleaved_B", "split_token"):
        layout, bs = layouts(world)[name]
        reqs, cache, table = decode_setup(world, bs, seed=41, all_equal=True)
        q, w, seq = decode_queries(2, seed=42)                       # 1-D lengths, next_n 2
        hs, h1, fs, f1, _, _ = run_decode(reqs, cache, table, layout, rank, group, bs, q, w,
                                          seq)
        assert_exact(*hs, *h1, f"hisa ties {name}")
        assert_exact(*fs, *f1, f"flat ties {name}")


def case_decode_fp8_random(rank, world, group):
    # Whole blocks only: each block's pooled row is then computed from the same bytes as in
    # the single-process cache (split blocks add partial sums in another order, which can
    # move an FP8 pooled value by one step and swap near-tied blocks).
    for name in ("contiguous", "interleaved_2B"):
        layout, bs = layouts(world)[name]
        reqs, cache, table = decode_setup(world, bs, seed=51, random_fp8=True)
        q, w, seq = decode_queries(1, seed=52)
        hs, h1, fs, f1, _, _ = run_decode(reqs, cache, table, layout, rank, group, bs, q, w,
                                          seq)
        zeros = torch.zeros(seq.shape[0], dtype=torch.int32)
        for b, (k, s) in enumerate(reqs):
            if k.shape[0] == 0:
                continue
            logits = naive_dsa_logits(q[b], k, w[b:b + 1], zeros[:1], seq[b:b + 1], k_scale=s)
            assert_same_selection(hs[0][b:b + 1], h1[0][b:b + 1], zeros[:1], logits)
            assert_same_selection(fs[0][b:b + 1], f1[0][b:b + 1], zeros[:1], logits)


CASES = {name[len("case_"):]: fn for name, fn in sorted(globals().items())
         if name.startswith("case_")}


def run_cases(rank: int, world: int, group) -> dict:
    """{case name: "ok" or the assertion message}, run in a fixed order on every rank."""
    results = {}
    for name, fn in CASES.items():
        try:
            fn(rank, world, group)
            results[name] = "ok"
        except AssertionError as err:
            results[name] = f"rank {rank}: {err}"
    return results


def run_all(rank: int, world: int) -> dict:
    """Every case in the spawned world of 4, then in a world of 2 formed by ranks 2 and 3.

    The world of 2 is a subgroup whose ranks (0, 1 inside it) differ from their global ranks,
    which the ops must not confuse; ranks 0 and 1 wait meanwhile (one spawn serves both).
    Returns {world size: {case: outcome}} for the worlds this rank took part in.
    """
    import torch.distributed as dist
    assert world == 4, "run_all expects the spawned world of 4"
    out = {4: run_cases(rank, 4, None)}
    pair = dist.new_group([2, 3])
    if rank >= 2:
        out[2] = run_cases(dist.get_rank(pair), 2, pair)
    dist.barrier()
    return out
