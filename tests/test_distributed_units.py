"""hisa.distributed without spawning: layout maps against brute force, the exact merge's order,
compact page tables, validation errors, and world-size-1 runs equal to the single-process ops
(one in-process gloo group)."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import hisa
import hisa.distributed as hd
from hisa.distributed.layout import BlockMap
from hisa.distributed.merge import merge_topk
from hisa.distributed.tokens import page_table, virtual_to_global
from hisa.testing.distributed import build_cache, exact_keys, exact_packed_inputs, exact_queries

LAYOUTS = [hd.ShardLayout.contiguous(1, 1000), hd.ShardLayout.contiguous(3, 128),
           hd.ShardLayout.contiguous(4, 100), hd.ShardLayout.interleaved(2, 1),
           hd.ShardLayout.interleaved(3, 5), hd.ShardLayout.interleaved(4, 64)]


def brute_owner(layout, p):
    if layout.kind == "contiguous":
        return p // layout.unit
    return (p // layout.unit) % layout.world_size


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_layout_maps_match_brute_force(layout):
    n = min(layout.capacity or 10**9, 777)
    pos = torch.arange(n)
    owners = [brute_owner(layout, p) for p in range(n)]
    assert layout.owner(pos).tolist() == owners
    for r in range(layout.world_size):
        mine = [p for p in range(n) if owners[p] == r]
        assert layout.positions(r, n).tolist() == mine
        assert layout.local_length(r, n) == len(mine)
        cuts = torch.tensor([0, 1, 63, 64, 65, 200, n])
        assert layout.count_before(r, cuts).tolist() == [sum(p < c for p in mine) for c in cuts]
        assert layout.to_global(r, torch.arange(len(mine))).tolist() == mine


def test_interleaved_local_lengths_are_vllm_dcp_lengths():
    # vLLM's get_dcp_local_seq_lens: base = L // (I * N) * I, plus clip(L - base * N - r * I).
    for N, I in [(2, 1), (4, 1), (2, 16), (8, 64)]:
        layout = hd.ShardLayout.interleaved(N, I)
        for L in [0, 1, 7, 64, 129, 1000, 4097]:
            base = L // (I * N) * I
            want = [base + min(max(L - base * N - r * I, 0), I) for r in range(N)]
            assert [layout.local_length(r, L) for r in range(N)] == want


def test_check_hisa_accepts_whole_and_page_split_blocks_only():
    hd.ShardLayout.contiguous(4, 256).check_hisa(128)
    hd.ShardLayout.interleaved(4, 128).check_hisa(128)
    hd.ShardLayout.interleaved(2, 1).check_hisa(128)           # 64 tokens per rank per block
    hd.ShardLayout.interleaved(2, 64).check_hisa(128)
    hd.ShardLayout.interleaved(4, 16).check_hisa(256)
    with pytest.raises(ValueError, match="block_size: expected a multiple of the page size"):
        hd.ShardLayout.interleaved(2, 32).check_hisa(32)
    with pytest.raises(ValueError, match="partly on some ranks"):
        hd.ShardLayout.interleaved(4, 64).check_hisa(128)      # a block on 2 of 4 ranks
    with pytest.raises(ValueError, match="partly on some ranks"):
        hd.ShardLayout.contiguous(2, 192).check_hisa(128)      # a block across the cut
    with pytest.raises(ValueError, match="whole 64-token pages"):
        hd.ShardLayout.interleaved(4, 1).check_hisa(128)       # 32 tokens per rank per block


@pytest.mark.parametrize("layout,B", [(hd.ShardLayout.contiguous(3, 256), 128),
                                      (hd.ShardLayout.interleaved(3, 256), 128),
                                      (hd.ShardLayout.interleaved(2, 1), 128),
                                      (hd.ShardLayout.interleaved(4, 16), 256)], ids=str)
def test_block_map_matches_brute_force(layout, B):
    n = 3000 if layout.capacity is None else layout.capacity
    nb = -(-n // B)
    scored_all = []
    for r in range(layout.world_size):
        bm = BlockMap(layout, r, B)
        mine = layout.positions(r, n).tolist()
        scored = [b for b in range(nb) if (bm.split and b % layout.world_size == r)
                  or (not bm.split and brute_owner(layout, b * B) == r)]
        scored_all += scored
        assert bm.scored_global(torch.arange(len(scored))).tolist() == scored
        g = torch.arange(nb + 1)
        assert bm.scored_before(g).tolist() == [sum(b < x for b in scored) for x in range(nb + 1)]
        a, c = bm.run(torch.arange(nb), hi=torch.tensor(n))
        for b in range(nb):
            run = [j for j, p in enumerate(mine) if b * B <= p < (b + 1) * B]
            if run:
                assert (int(a[b]), int(c[b])) == (run[0], run[-1] + 1)
            else:
                assert int(a[b]) == int(c[b])
    assert sorted(scored_all) == list(range(nb))               # every block scored exactly once


def brute_merge(scores, ids, k):
    out = []
    for s, i in zip(scores.tolist(), ids.tolist()):
        cand = sorted([(-v, j) for v, j in zip(s, i) if j >= 0])[:k]
        out.append([j for _, j in cand] + [-1] * (k - len(cand)))
    return out


def test_merge_orders_by_score_then_lower_id():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(-3, 4, (50, 40), generator=g).float()        # many exact ties
    ids = torch.stack([torch.randperm(1000, generator=g)[:40] for _ in range(50)])
    ids[:, ::7] = -1                                                     # empty slots
    got, vals = merge_topk(scores, ids, 16)
    assert got.tolist() == brute_merge(scores, ids, 16)
    assert bool((vals[got < 0] == float("-inf")).all())
    for r in range(50):
        for j, v in zip(got[r].tolist(), vals[r].tolist()):
            if j >= 0:
                assert v == scores[r][ids[r] == j].item()


def test_merge_negative_zero_ties_with_zero_and_pads_short_rows():
    scores = torch.tensor([[0.0, -0.0, 1.0, -1.0]])
    ids = torch.tensor([[9, 3, 5, 1]])
    got, vals = merge_topk(scores, ids, 6)
    assert got.tolist() == [[5, 3, 9, 1, -1, -1]]          # -0.0 == 0.0: lower id first
    assert vals[0, 4:].tolist() == [float("-inf")] * 2


def test_page_table_lists_exactly_the_local_window_tokens():
    B = 128
    for layout in [hd.ShardLayout.contiguous(2, 512), hd.ShardLayout.interleaved(2, 1),
                   hd.ShardLayout.interleaved(2, 128)]:
        for r in range(2):
            bm = BlockMap(layout, r, B)
            kept = torch.tensor([[0, 2, 3, 5, -1], [1, 4, 7, -1, -1], [6, -1, -1, -1, -1]])
            ws = torch.tensor([0, 150, 770])
            we = torch.tensor([700, 1000, 800])
            logical, length, fs, fe = page_table(bm, kept, ws, we)
            for t in range(3):
                want = {p for b in kept[t].tolist() if b >= 0
                        for p in range(b * B, (b + 1) * B)
                        if ws[t] <= p < we[t] and int(layout.owner(torch.tensor(p))) == r}
                v = torch.arange(int(length[t])).unsqueeze(0)
                got = set(virtual_to_global(bm, v, logical[t:t + 1])[0].tolist())
                front = set(layout.to_global(r, torch.arange(int(fs[t]), int(fe[t]))).tolist())
                assert not (got & front) and got | front == want, (layout, r, t)


@pytest.fixture(scope="module")
def world1():
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 's')}",
                                rank=0, world_size=1)
        yield
        dist.destroy_process_group()


def test_world_of_one_equals_the_single_process_ops(world1):
    q, k, w, ks, ke, s = exact_packed_inputs([300, 45, 200], [60, 20, 50], seed=2)
    ke[5], ks[6] = ks[5], ke[6] - 1                     # an empty window, a window of one key
    layout = hd.ShardLayout.interleaved(1, 64)
    kw = dict(topk=32, block_size=64, block_topk=3, backend="torch")
    got = hd.hisa_index(q, k, w, ks, ke, layout=layout, num_keys=k.shape[0], k_scale=s, **kw)
    assert torch.equal(torch.sort(got, 1).values,
                       torch.sort(hisa.hisa_index(q, k, w, ks, ke, k_scale=s, **kw), 1).values)
    g = torch.Generator().manual_seed(4)
    reqs = [exact_keys(L, 32, 64, generator=g) for L in [0, 70, 500]]
    cache, bt = build_cache(reqs, block_size=64, head_dim=32, seed=1)
    qd, wd = exact_queries(3, 4, 32, generator=g)
    seq = torch.tensor([0, 70, 500], dtype=torch.int32)
    args = (qd.view(3, 1, 4, 32), cache.kv_cache, cache.pooled_cache, wd, seq, bt)
    got = hd.hisa_index_paged(*args, layout=layout, **kw)
    want = hisa.hisa_index_paged(*args, **kw)
    assert torch.equal(torch.sort(got, 1).values, torch.sort(want, 1).values)


def test_validation_errors_name_the_argument(world1):
    q, k, w, ks, ke, s = exact_packed_inputs([300], [10], seed=2)
    layout = hd.ShardLayout.interleaved(1, 64)
    kw = dict(layout=layout, num_keys=300, k_scale=s, topk=32, block_size=64, block_topk=3,
              backend="torch")
    with pytest.raises(TypeError, match="layout: expected a hisa.distributed.ShardLayout"):
        hd.hisa_index(q, k, w, ks, ke, **dict(kw, layout="contiguous"))
    with pytest.raises(ValueError, match="layout: expected world_size 1"):
        hd.hisa_index(q, k, w, ks, ke, **dict(kw, layout=hd.ShardLayout.interleaved(2, 64)))
    with pytest.raises(ValueError, match="k: expected 250 rows on rank 0"):
        hd.hisa_index(q, k, w, ks, ke, **dict(kw, num_keys=250))
    with pytest.raises(ValueError, match="num_keys: expected at most 128"):
        hd.hisa_index(q, k, w, ks, ke, **dict(kw, layout=hd.ShardLayout.contiguous(1, 128)))
    with pytest.raises(TypeError, match="k: expected dtype float8_e4m3fn"):
        hd.hisa_index(q, k.float(), w, ks, ke, **dict(kw, k_scale=None))
    with pytest.raises(ValueError, match="block_size: expected a multiple of the page size"):
        hd.hisa_index(q, k, w, ks, ke, **dict(kw, block_size=32, block_topk=4))
    with pytest.raises(ValueError, match="block_topk \\* block_size must be >= topk"):
        hd.hisa_index(q, k, w, ks, ke, **dict(kw, block_topk=2, topk=256))
    with pytest.raises(ValueError, match="rank: expected a value in \\[0, 2\\)"):
        hd.shard_keys(k, s, hd.ShardLayout.interleaved(2, 64), 2)


def test_decode_validation_errors(world1):
    g = torch.Generator().manual_seed(4)
    reqs = [exact_keys(L, 32, 64, generator=g) for L in [70, 500]]
    cache, bt = build_cache(reqs, block_size=64, head_dim=32, seed=1)
    q, w = exact_queries(2, 4, 32, generator=g)
    seq = torch.tensor([70, 500], dtype=torch.int32)
    args = (q.view(2, 1, 4, 32), cache.kv_cache, cache.pooled_cache, w, seq, bt)
    kw = dict(layout=hd.ShardLayout.interleaved(1, 64), topk=32, block_size=64, block_topk=3,
              backend="torch")
    with pytest.raises(ValueError, match="seq_lens: expected at most max_seq_len = 499"):
        hd.hisa_index_paged(*args, max_seq_len=499, **kw)
    with pytest.raises(ValueError, match="seq_lens: expected at most 256"):
        hd.hisa_index_paged(*args, **dict(kw, layout=hd.ShardLayout.contiguous(1, 256)))
    with pytest.raises(ValueError, match="block_table: rank 0 holds up to 600 keys"):
        hd.dsa_index_paged(q.view(2, 1, 4, 32), cache.kv_cache, w, seq + 100, bt,
                           layout=kw["layout"], topk=32, backend="torch")
    with pytest.raises(ValueError, match="positions: expected values < 256"):
        hd.cache_append(cache.kv_cache, cache.pooled_cache, reqs[0][0][:1],
                        torch.tensor([0]), torch.tensor([300]),
                        layout=hd.ShardLayout.contiguous(1, 256), block_table=bt,
                        req_indices=torch.tensor([0]), k_scale=reqs[0][1][:1], block_size=64,
                        backend="torch")
