"""Interpreter tier of the super-block level of decode: the append's super-block pooling, the
candidate-block kernels and three-level paged decode, each against its plain-PyTorch twin."""
import random

import pytest
import torch

import hisa
from hisa.cache import PagedIndexerCache, pooled_views
from hisa.cache.factory import make_paged_inputs
from hisa.cache.layout import block_last_pages, mark_pooled_unknown
from hisa.ops.indexer.decode_kernels import block_select, hisa_decode
from hisa.ops.indexer.decode_super import candidate_scores_paged, super_block_select
from hisa.ops.indexer.naive_super import (naive_candidate_block_scores,
                                          naive_select_candidate_blocks, naive_select_supers,
                                          naive_super_scores)
from hisa.testing.compare import (assert_pooled_rows_close, assert_same_selection,
                                  canonical_rows, check_index_format)

from test_decode_kernels import POOL_RTOL, full_logits
from test_paged_cache import Allocator, Request, append_interleaved

H, D = 16, 64
TOPK = 32
LENGTHS = [0, 1, 64, 200, 700, 1000]
B, BS = 64, 2                 # super-blocks of 128 keys


def _rows(cache, bt_row, n, span):
    v, s = pooled_views(cache, D)
    ids = block_last_pages(bt_row, n, span)
    return v[ids].contiguous().view(torch.float8_e4m3fn).float() * s[ids][:, None], s[ids]


def test_append_super_pooling_matches_twin():
    caches, bts = [], []
    for backend in ("triton", "torch"):
        rng = random.Random(1)
        cache = PagedIndexerCache(40, head_dim=D, block_size=B, super_size=3)
        reqs = [Request(L, seed=10 + i) for i, L in enumerate([600, 64, 400, 130])]
        for r in reqs:                       # Request draws D = 128 keys: keep the first D dims
            r.k, r.s = hisa.quantize_fp8(r.k.float()[:, :D] * r.s[:, None], group_size=D)
        bt = torch.full((4, 12), -1, dtype=torch.int32)
        append_interleaved(cache, Allocator(40, seed=2), reqs, bt, rng, backend=backend)
        caches.append(cache), bts.append(bt)
    assert torch.equal(bts[0], bts[1])
    assert torch.equal(caches[0].kv_cache, caches[1].kv_cache)
    _, sb = pooled_views(caches[1].super_cache, D)
    assert int((sb > 0).sum()) >= 5                           # several super-blocks completed
    # The block rows feeding the super rows may already differ by one FP8 step; rows no
    # append wrote hold the unknown sentinel (NaN scale) in both caches.
    assert_pooled_rows_close(caches[0].super_cache, caches[1].super_cache, D)


def test_candidate_kernels_match_twins():
    M, MS = 3, 3
    inp = make_paged_inputs(LENGTHS, next_n=2, heads=H, head_dim=D, block_size=B,
                            super_size=BS, q_dtype=torch.float32)
    sids = block_select(
        inp.q, inp.cache.super_cache, inp.weights, inp.seq_lens, inp.block_table,
        block_size=B * BS, block_topk=MS, prec="ieee")
    scores = candidate_scores_paged(inp.q, inp.cache.pooled_cache, inp.weights, inp.seq_lens,
                                    inp.block_table, sids, block_size=B, super_size=BS,
                                    prec="ieee")
    ids = super_block_select(inp.q, inp.cache.pooled_cache, inp.cache.super_cache, inp.weights,
                             inp.seq_lens, inp.block_table, block_size=B, block_topk=M,
                             super_size=BS, super_topk=MS, prec="ieee")
    lens = inp.row_lengths()
    z = torch.zeros(2, dtype=torch.int32)
    for b, L in enumerate(LENGTHS):
        rows = slice(2 * b, 2 * b + 2)
        nb, ns = -(-L // B), -(-L // (B * BS))
        pooled, _ = _rows(inp.cache.pooled_cache, inp.block_table[b], L // B, B)
        pooled = torch.cat([pooled, torch.zeros(nb - L // B, D)])
        sup, _ = _rows(inp.cache.super_cache, inp.block_table[b], L // (B * BS), B * BS)
        sup = torch.cat([sup, torch.zeros(ns - L // (B * BS), D)])
        js = naive_super_scores(inp.q[b], sup, inp.weights[rows], z, lens[rows].int(),
                                block_size=B, super_size=BS)
        assert torch.equal(sids[rows], naive_select_supers(js, MS)), f"request {b}"
        ref, blk = naive_candidate_block_scores(inp.q[b], pooled, inp.weights[rows], z,
                                                lens[rows].int(), sids[rows], block_size=B,
                                                super_size=BS)
        got = scores[rows, :MS * BS]
        assert torch.equal(torch.isposinf(got), torch.isposinf(ref))
        assert torch.equal(torch.isneginf(got), torch.isneginf(ref))
        fin = torch.isfinite(ref)
        torch.testing.assert_close(got[fin], ref[fin], rtol=1e-5, atol=1e-5)
        assert torch.equal(ids[rows], naive_select_candidate_blocks(got, blk, M))


@pytest.mark.parametrize("next_n,q_dtype", [(1, torch.float32), (2, torch.float8_e4m3fn)])
def test_three_level_decode_matches_reference(next_n, q_dtype):
    M, MS = 3, 2                     # the forced super-blocks only: certain to prune
    inp = make_paged_inputs(LENGTHS, next_n=next_n, heads=H, head_dim=D, block_size=B,
                            super_size=BS, q_dtype=q_dtype, seed=2)
    # poison: garbage in unused block-table columns and in the tail rows of both caches
    for b, L in enumerate(LENGTHS):
        if L:
            inp.cache.pooled_cache[int(inp.block_table[b, (L - 1) // 64])] = 255
            inp.cache.super_cache[int(inp.block_table[b, (L - 1) // 64])] = 255
        inp.block_table[b, -(-L // 64):] = 10**6
    kw = dict(inp.super_kwargs(MS), topk=TOPK, block_size=B, block_topk=M)
    out = torch.full((len(LENGTHS) * next_n, TOPK), 4242, dtype=torch.int32)
    idx, sc = hisa.hisa_index_paged(*inp.hisa_args(), backend="triton", return_scores=True,
                                    out=out, **kw)
    assert idx.data_ptr() == out.data_ptr()
    inp.block_table[inp.block_table == 10**6] = -1
    ref = hisa.hisa_index_paged(*inp.hisa_args(), backend="torch", **kw)
    lens = inp.row_lengths()
    z = torch.zeros_like(lens)
    check_index_format(idx, z, lens, TOPK, exact_count=False)
    assert_same_selection(idx, ref, z, full_logits(inp), rtol=1e-5)
    assert bool((sc[idx < 0] == float("-inf")).all())
    # The super level prunes the long requests here: two levels differ on some row.
    two = hisa.hisa_index_paged(*inp.hisa_args(), backend="torch", topk=TOPK, block_size=B,
                                block_topk=M)
    assert not torch.equal(two, ref)


def test_three_level_decode_equals_two_when_every_super_block_fits_and_routes():
    inp = make_paged_inputs(LENGTHS, next_n=2, heads=H, head_dim=D, block_size=B,
                            super_size=BS, q_dtype=torch.float32, seed=3)
    kw = dict(topk=TOPK, block_size=B, block_topk=3)
    two = hisa.hisa_index_paged(*inp.hisa_args(), backend="triton", **kw)
    three = hisa.hisa_index_paged(*inp.hisa_args(), backend="triton", **inp.super_kwargs(8),
                                  **kw)
    assert torch.equal(two, three)                       # 8 super-blocks of 128 >= 1000 keys
    # The per-request flat routing of backend="auto" composes with the super level.
    routed, _ = hisa_decode(inp.q, inp.cache.kv_cache, inp.cache.pooled_cache, inp.weights,
                            inp.seq_lens, inp.block_table, route_short_to_flat=True,
                            hisa_min_keys=300, super_cache=inp.cache.super_cache,
                            super_size=BS, super_topk=2, **kw)
    ref = hisa.hisa_index_paged(*inp.hisa_args(), backend="torch", **inp.super_kwargs(2), **kw)
    flat = hisa.dsa_index_paged(*inp.args(), topk=TOPK, backend="torch")
    lens = inp.row_lengths()
    z = torch.zeros_like(lens)
    short = torch.tensor([L <= 300 for L in LENGTHS]).repeat_interleave(2)
    logits = full_logits(inp)
    assert_same_selection(routed[short], flat[short], z[short], logits[short])
    assert_same_selection(routed[~short], ref[~short], z[~short], logits[~short])


def test_build_super_cache_on_the_kernel_matches_the_appends():
    from hisa.cache.factory import build_super_cache
    inp = make_paged_inputs([700, 0, 300], heads=H, head_dim=D, block_size=B, super_size=BS)
    got = build_super_cache(inp, BS, backend="triton")
    (va, sa), (vb, sb) = pooled_views(got, D), pooled_views(inp.cache.super_cache, D)
    assert torch.equal(torch.isnan(sa), torch.isnan(sb)) and int((sb > 0).sum()) == 5 + 2
    torch.testing.assert_close(sa, sb, rtol=1e-6, atol=0, equal_nan=True)
    fa = va.contiguous().view(torch.float8_e4m3fn).float() * sa[:, None]
    fb = vb.contiguous().view(torch.float8_e4m3fn).float() * sb[:, None]
    ok = ~torch.isnan(sb)
    torch.testing.assert_close(fa[ok], fb[ok], rtol=POOL_RTOL, atol=float(sb[ok].max()) * 2 ** -9)


def _sentinel(d):
    return mark_pooled_unknown(torch.zeros(1, d + 4, dtype=torch.uint8))[0]


def test_triton_super_rows_of_nan_key_blocks_equal_the_twin():
    """A NaN key's block row has a NaN scale, so its super row is the unknown sentinel, in
    both backends byte for byte (ue8m0 keys: exact block sums, identical block rows)."""
    bt = torch.tensor([[4, 2, 0, 5, 1, 3]], dtype=torch.int32)
    k = torch.randint(-4, 5, (384, D)).float()
    k[70, 5] = float("nan")                                  # block 1: super-block 0
    pos = torch.arange(384)
    slots = bt[0, pos // 64].long() * 64 + pos % 64
    caches = []
    for backend in ("triton", "torch"):
        cache = PagedIndexerCache(6, head_dim=D, block_size=B, super_size=BS, ue8m0=True)
        cache.append(k, slots, pos, block_table=bt,
                     req_indices=torch.zeros(384, dtype=torch.int32), backend=backend)
        caches.append(cache)
    a, b = caches
    assert torch.equal(a.kv_cache, b.kv_cache) and torch.equal(a.pooled_cache, b.pooled_cache)
    assert torch.equal(a.super_cache, b.super_cache)
    assert torch.equal(a.super_cache[2], _sentinel(D))       # super-block 0
    assert bool(torch.isfinite(pooled_views(a.super_cache, D)[1][[5, 3]]).all())


def test_triton_super_row_never_keeps_a_previous_owner_row():
    """Page 1 held a previous request's super row. The new owner's super-block 0 (pages 2, 1)
    is appended with a table the append cannot read consistently: its row becomes the unknown
    sentinel, never the stale row (the torch append refuses such tables)."""
    def fresh():
        cache = PagedIndexerCache(4, head_dim=D, block_size=B, super_size=BS)
        cache.super_cache[1] = torch.arange(D + 4, dtype=torch.uint8)   # the previous owner's
        return cache

    right = torch.tensor([[2, 1]], dtype=torch.int32)
    pos = torch.arange(128)
    slots = right[0, pos // 64].long() * 64 + pos % 64
    req = torch.zeros(128, dtype=torch.int32)
    k = torch.randn(128, D)
    for col, page in ((0, -1), (0, 7), (1, 3)):   # missing, outside the cache, stale last page
        wrong = right.clone()
        wrong[0, col] = page
        cache = fresh()
        cache.append(k, slots, pos, block_table=wrong, req_indices=req, backend="triton")
        assert torch.equal(cache.super_cache[1], _sentinel(D)), (col, page)
    # A block row made unknown by an earlier append (a stale table when block 0 completed):
    # the super-block completed later, with the right table, is unknown too.
    wrong = right.clone()
    wrong[0, 0] = 3
    cache = fresh()
    cache.append(k[:64], slots[:64], pos[:64], block_table=wrong, req_indices=req[:64],
                 backend="triton")
    assert bool(torch.isnan(pooled_views(cache.pooled_cache, D)[1][2]))
    cache.append(k[64:], slots[64:], pos[64:], block_table=right, req_indices=req[64:],
                 backend="triton")
    assert torch.isfinite(pooled_views(cache.pooled_cache, D)[1][1])
    assert torch.equal(cache.super_cache[1], _sentinel(D))
    # The same appends with the right table give a real super row.
    cache = fresh()
    cache.append(k, slots, pos, block_table=right, req_indices=req, backend="triton")
    assert torch.isfinite(pooled_views(cache.super_cache, D)[1][1])


def test_triton_super_pooling_follows_the_duplicate_slot_rule():
    """Token 0 (request 0, position 127) would complete super-block 0 on pages (0, 1); token 1
    (request 1, position 63) names the same slot later in the call and wins: token 0 neither
    writes its key nor pools a block or a super-block row. Equal to the torch append of the
    call without the loser."""
    g = torch.Generator().manual_seed(4)
    k = torch.randint(-4, 5, (129, D), generator=g).float()
    slots = torch.cat([torch.tensor([127, 127]), torch.arange(127)])
    pos = torch.cat([torch.tensor([127, 63]), torch.arange(127)])
    req = torch.cat([torch.tensor([0, 1]), torch.zeros(127, dtype=torch.long)]).to(torch.int32)
    bt = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)

    def cache():
        return PagedIndexerCache(3, head_dim=D, block_size=B, super_size=BS, ue8m0=True)

    got = cache()
    got.append(k, slots, pos, block_table=bt, req_indices=req, backend="triton")
    want = cache()
    want.append(k[1:], slots[1:], pos[1:], block_table=bt, req_indices=req[1:],
                backend="torch")
    assert torch.equal(got.kv_cache, want.kv_cache)
    assert torch.equal(got.pooled_cache, want.pooled_cache)
    assert torch.equal(got.super_cache, want.super_cache)
    assert torch.equal(got.super_cache[1], _sentinel(D))     # never pooled


def test_three_level_decode_has_no_per_request_block_limit():
    """The two-level block selection holds at most 32,768 blocks a request (the table's width
    decides); three levels score only the candidates of the kept super-blocks, so only the
    super-block count is limited. Both are checked before any launch."""
    inp = make_paged_inputs([600, 130], heads=H, head_dim=D, block_size=B, super_size=BS,
                            q_dtype=torch.float32, exact=True, seed=6)
    pad = torch.full((2, 32769 - inp.block_table.shape[1]), -1, dtype=torch.int32)
    inp.block_table = torch.cat([inp.block_table, pad], 1)     # 32,769 blocks of 64 a row
    kw = dict(topk=TOPK, block_size=B, block_topk=3)
    with pytest.raises(ValueError, match="block_table: at most 32768 blocks"):
        hisa.hisa_index_paged(*inp.hisa_args(), backend="triton", **kw)
    got = hisa.hisa_index_paged(*inp.hisa_args(), backend="triton", **inp.super_kwargs(2),
                                **kw)
    want = hisa.hisa_index_paged(*inp.hisa_args(), backend="torch", **inp.super_kwargs(2),
                                 **kw)
    assert torch.equal(canonical_rows(got), canonical_rows(want))
    pad = torch.full((2, 32768), -1, dtype=torch.int32)
    inp.block_table = torch.cat([inp.block_table, pad], 1)     # 32,769 super-blocks of 128
    with pytest.raises(ValueError, match="block_table: at most 32768 super-blocks"):
        hisa.hisa_index_paged(*inp.hisa_args(), backend="triton", **inp.super_kwargs(2), **kw)
