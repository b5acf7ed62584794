"""The super-block level of the paged cache and of paged decode (CPU references): lifecycle
(interleaved appends, page reuse, shared prefixes: the super rows equal re-pooling from
scratch), the three-level paged reference against the packed one, exactness, validation."""
import random

import pytest
import torch

import hisa
from hisa.cache import PagedIndexerCache
from hisa.cache.layout import mark_pooled_unknown
from hisa.cache.factory import make_paged_inputs
from hisa.ops.indexer.naive import naive_pool_blocks
from hisa.ops.indexer.naive_super import naive_hisa_index_super, naive_pool_supers
from hisa.testing.compare import check_index_format

from test_paged_cache import Allocator, Request, append_interleaved, assert_pooled_matches

D = 128


def scratch_super(k, k_scale, block_size, super_size):
    """Super rows from scratch: FP8 block rows of the complete blocks, then the FP8 of the mean
    of each complete super-block's dequantized block rows (bits, scales)."""
    span = block_size * super_size
    full = k.shape[0] // span
    mean = naive_pool_blocks(k[:full * span], k_scale[:full * span], block_size)
    bv, bs = hisa.quantize_fp8(mean, group_size=k.shape[1])
    sup = naive_pool_supers(bv, full * span, block_size=block_size, super_size=super_size,
                            pooled_scale=bs)
    v, s = hisa.quantize_fp8(sup, group_size=k.shape[1])
    return v.view(torch.uint8), s


def assert_super_matches(cache, row, k, k_scale):
    full = k.shape[0] // (cache.block_size * cache.super_size)
    want_v, want_s = scratch_super(k, k_scale, cache.block_size, cache.super_size)
    got_v, got_s = cache.request_super(row, full)
    assert torch.equal(got_v.view(torch.uint8), want_v)
    assert torch.equal(got_s, want_s)


@pytest.mark.parametrize("block_size,super_size", [(64, 2), (64, 3), (128, 2)])
def test_super_rows_after_interleaved_appends_equal_scratch(block_size, super_size):
    rng = random.Random(block_size + super_size)
    lengths = [1000, 64, 700, 385, 767, 513]
    cache = PagedIndexerCache(64, head_dim=D, block_size=block_size, super_size=super_size)
    reqs = [Request(L, seed=10 + i) for i, L in enumerate(lengths)]
    bt = torch.full((len(reqs), 20), -1, dtype=torch.int32)
    append_interleaved(cache, Allocator(64, seed=1), reqs, bt, rng)
    for i, r in enumerate(reqs):
        assert_pooled_matches(cache, bt[i], r.k, r.s)
        assert_super_matches(cache, bt[i], r.k, r.s)
    assert bool(cache.super_cache.any())


def test_page_free_and_reuse_rewrites_super_rows():
    rng = random.Random(0)
    cache = PagedIndexerCache(24, head_dim=D, block_size=64, super_size=2)
    alloc = Allocator(24, seed=3)
    bt = torch.full((2, 12), -1, dtype=torch.int32)
    a = Request(640, seed=1)
    append_interleaved(cache, alloc, [a], bt[:1], rng)
    alloc.give(a.pages)                                      # request A finishes
    bt[0] = -1
    b, c = Request(700, seed=2), Request(300, seed=3)        # reuse A's pages, new content
    append_interleaved(cache, alloc, [b, c], bt, rng)
    assert set(a.pages) & set(b.pages + c.pages), "test needs reuse"
    assert_super_matches(cache, bt[0], b.k, b.s)
    assert_super_matches(cache, bt[1], c.k, c.s)


def test_shared_prefix_keeps_both_requests_super_rows_consistent():
    """C reuses A's first five pages (super-block 0 whole, super-block 1 half, with B = 64 and
    Bs = 2) and appends its own; A keeps decoding into its own pages."""
    rng = random.Random(5)
    cache = PagedIndexerCache(40, head_dim=D, block_size=64, super_size=2)
    alloc = Allocator(40, seed=4)
    bt = torch.full((2, 14), -1, dtype=torch.int32)
    a = Request(5 * 64, seed=1)
    append_interleaved(cache, alloc, [a], bt[:1], rng)
    c = Request(700, seed=2, prefix=(a.k, a.s))
    c.pages, c.done = list(a.pages), a.k.shape[0]                  # prefix-cache hit
    a2 = Request(600, seed=1)
    a2.k[:320], a2.s[:320] = a.k, a.s
    a2.pages, a2.done = a.pages, 320
    append_interleaved(cache, alloc, [a2, c], bt, rng)
    assert bt[0, :5].tolist() == bt[1, :5].tolist() and bt[0, 5] != bt[1, 5]
    assert_super_matches(cache, bt[0], a2.k, a2.s)
    assert_super_matches(cache, bt[1], c.k, c.s)


def test_copy_pages_moves_super_rows():
    cache = PagedIndexerCache(4, head_dim=D, block_size=64, super_size=2)
    bt = torch.tensor([[2, 1]], dtype=torch.int32)
    pos = torch.arange(128)
    cache.append(torch.randn(128, D), bt[0, pos // 64].long() * 64 + pos % 64, pos,
                 block_table=bt, req_indices=torch.zeros(128, dtype=torch.int32),
                 backend="torch")
    unknown = mark_pooled_unknown(torch.zeros_like(cache.super_cache[:1]))[0]
    # page 1 completed the super-block; page 2's row was never written: still unknown
    assert not torch.equal(cache.super_cache[1], unknown)
    assert torch.equal(cache.super_cache[2], unknown)
    cache.copy_pages(torch.tensor([1]), torch.tensor([3]))
    assert torch.equal(cache.super_cache[3], cache.super_cache[1])


def _packed_reference(inp, b, rows, lens, **kw):
    """The packed three-level reference on request b's keys, pooled from scratch."""
    k, s = inp.keys[b]
    B, Bs = kw["block_size"], kw["super_size"]
    pv, ps = hisa.quantize_fp8(naive_pool_blocks(k, s, B), group_size=k.shape[1])
    full = k.shape[0] // (B * Bs)
    sv, ss = scratch_super(k, s, B, Bs)
    ns = -(-k.shape[0] // (B * Bs))
    sv = torch.cat([sv.view(torch.float8_e4m3fn), torch.zeros(ns - full, k.shape[1]).to(
        torch.float8_e4m3fn)])
    ss = torch.cat([ss, torch.ones(ns - full)])
    nn = rows.stop - rows.start
    return naive_hisa_index_super(inp.q[b], k, inp.weights[rows], torch.zeros(
        nn, dtype=torch.int32), lens[rows].to(torch.int32), k_scale=s, pooled=pv,
        pooled_scale=ps, super_pooled=sv, super_scale=ss, **kw)


LENGTHS = [0, 1, 50, 64, 129, 256, 300, 777, 1024, 1500]


@pytest.mark.parametrize("block_size,super_size,next_n", [(64, 2, 1), (64, 3, 2), (128, 2, 1)])
def test_paged_three_levels_match_packed_reference(block_size, super_size, next_n):
    kw = dict(topk=64, block_size=block_size, block_topk=4, super_size=super_size,
              super_topk=2)
    inp = make_paged_inputs(LENGTHS, next_n=next_n, heads=8, block_size=block_size,
                            super_size=super_size)
    idx, sc = hisa.hisa_index_paged(*inp.hisa_args(), return_scores=True, backend="torch",
                                    **inp.super_kwargs(2), topk=64, block_size=block_size,
                                    block_topk=4)
    lens = inp.row_lengths()
    check_index_format(idx, torch.zeros_like(lens), lens, 64, exact_count=False)
    for b, L in enumerate(LENGTHS):
        rows = slice(b * next_n, (b + 1) * next_n)
        if L == 0:
            assert bool((idx[rows] == -1).all())
            continue
        ref, ref_sc = _packed_reference(inp, b, rows, lens, **kw)
        assert torch.equal(idx[rows], ref), f"request {b} (length {L})"
        assert torch.equal(sc[rows], ref_sc)


def test_paged_three_levels_equal_two_levels_when_every_super_block_fits():
    # ms * Bs * B = 8 * 2 * 64 = 1024 keys >= every request but the last: exactly two levels.
    inp = make_paged_inputs(LENGTHS, next_n=2, heads=8, block_size=64, super_size=2)
    kw = dict(topk=64, block_size=64, block_topk=4)
    two = hisa.hisa_index_paged(*inp.hisa_args(), backend="torch", **kw)
    three = hisa.hisa_index_paged(*inp.hisa_args(), backend="torch", **inp.super_kwargs(8),
                                  **kw)
    assert torch.equal(two[:-2], three[:-2])            # the 1500-key request has 12 > 8


def test_paged_three_levels_read_the_super_cache():
    """A poisoned super row that aligns with the query makes its super-block win: the op uses
    the cache rather than re-pooling."""
    inp = make_paged_inputs([1024], heads=8, block_size=64, super_size=2, seed=3)
    # ms = 3 super-blocks of 2 blocks, m = 6 keeps all their blocks, topk = m * B returns all
    # their tokens: the kept super-blocks are visible in the output.
    kw = dict(topk=384, block_size=64, block_topk=6, backend="torch")
    before = hisa.hisa_index_paged(*inp.hisa_args(), **inp.super_kwargs(3), **kw)
    chosen = set((before[before >= 0] // 128).tolist())
    target = next(g for g in range(1, 7) if g not in chosen)
    page = int(inp.block_table[0, target * 2 + 1])                       # its last page
    direction = (inp.weights[0].unsqueeze(1) * inp.q[0, 0].float()).sum(0)
    v, s = hisa.quantize_fp8(1e3 * direction.unsqueeze(0), group_size=128)
    inp.cache.super_cache[page, :128] = v[0].view(torch.uint8)
    inp.cache.super_cache[page, 128:] = s.view(torch.uint8)
    after = hisa.hisa_index_paged(*inp.hisa_args(), **inp.super_kwargs(3), **kw)
    assert target in set((after[after >= 0] // 128).tolist())


@pytest.mark.parametrize("change,exc,match", [
    (dict(super_cache=None), ValueError, "super_cache"),
    (dict(super_size=None, super_topk=None), ValueError, "super_cache"),
    (dict(super_topk=1), ValueError, "super_topk"),
    (dict(super_size=1), ValueError, "super_size"),
    (dict(super_cache=torch.zeros(3, D + 4, dtype=torch.uint8)), ValueError, "super_cache"),
    (dict(super_cache=torch.zeros(20, D + 4)), TypeError, "super_cache"),
])
def test_paged_super_validation(change, exc, match):
    inp = make_paged_inputs([300], heads=8, block_size=64, super_size=2)
    kw = dict(inp.super_kwargs(2), topk=64, block_size=64, block_topk=4, backend="torch")
    kw.update(change)
    with pytest.raises(exc, match=match):
        hisa.hisa_index_paged(*inp.hisa_args(), **kw)


@pytest.mark.parametrize("change,match", [
    (dict(super_size=None), "super_cache/super_size"),
    (dict(super_cache=None), "super_cache/super_size"),
    (dict(super_size=1), "super_size"),
    (dict(pooled_cache=None), "pooled_cache"),
    (dict(block_table=None), "block_table"),
    (dict(super_cache=torch.zeros(5, D + 4, dtype=torch.uint8)), "super_cache"),
])
def test_append_super_validation(change, match):
    cache = PagedIndexerCache(4, head_dim=D, block_size=64, super_size=2)
    args = dict(kv_cache=cache.kv_cache, pooled_cache=cache.pooled_cache, k=torch.randn(3, D),
                slot_mapping=torch.arange(3), positions=torch.arange(3),
                block_table=torch.tensor([[0, 1, 2, 3]], dtype=torch.int32),
                req_indices=torch.zeros(3, dtype=torch.int32), block_size=64,
                super_cache=cache.super_cache, super_size=2, backend="torch")
    args.update(change)
    with pytest.raises(ValueError, match=match):
        hisa.paged_cache_append(args.pop("kv_cache"), args.pop("pooled_cache"), args.pop("k"),
                                args.pop("slot_mapping"), args.pop("positions"), **args)


def test_build_super_cache_pools_what_the_appends_pooled():
    from hisa.cache.factory import build_super_cache
    inp = make_paged_inputs([1000, 300, 0, 513], heads=8, block_size=64, super_size=3)
    assert torch.equal(build_super_cache(inp, 3), inp.cache.super_cache)
    other = build_super_cache(inp, 2)                   # another size from the same block rows
    for b, (k, s) in enumerate(inp.keys):
        full = k.shape[0] // 128
        got_v, got_s = hisa.cache.gather_request_pooled(other, inp.block_table[b], full, 128, D)
        want_v, want_s = scratch_super(k, s, 64, 2)
        assert torch.equal(got_v.view(torch.uint8), want_v) and torch.equal(got_s, want_s)


def _unknown_row():
    return mark_pooled_unknown(torch.zeros(1, D + 4, dtype=torch.uint8))[0]


def test_super_row_is_unknown_when_a_block_row_is():
    """A block row with a non-finite scale (a NaN key's block, or a row an engine marked
    unknown) gives its super-block the unknown sentinel, not a mean of NaNs."""
    cache = PagedIndexerCache(6, head_dim=D, block_size=64, super_size=2)
    bt = torch.tensor([[4, 2, 0, 5, 1, 3]], dtype=torch.int32)
    k = torch.randn(384, D)
    k[70, 5] = float("nan")                                  # block 1: super-block 0
    pos = torch.arange(384)
    slots = bt[0, pos // 64].long() * 64 + pos % 64
    req = torch.zeros(384, dtype=torch.int32)
    cache.append(k[:320], slots[:320], pos[:320], block_table=bt, req_indices=req[:320],
                 backend="torch")
    assert torch.isnan(cache.request_pooled(bt[0], 2)[1][1])  # the NaN key's block row
    assert torch.equal(cache.super_cache[2], _unknown_row())  # super-block 0: page 2
    assert torch.isfinite(cache.request_super(bt[0], 2)[1][1])  # super-block 1 is real
    # An engine marks block 4's row (page 1) unknown before super-block 2 completes.
    mark_pooled_unknown(cache.pooled_cache, bt[0, 4:5])
    cache.append(k[320:], slots[320:], pos[320:], block_table=bt, req_indices=req[320:],
                 backend="torch")
    assert torch.equal(cache.super_cache[3], _unknown_row())  # super-block 2: page 3


def test_torch_append_refuses_a_super_block_it_cannot_read():
    cache = PagedIndexerCache(4, head_dim=D, block_size=64, super_size=2)
    right = torch.tensor([[2, 1]], dtype=torch.int32)
    pos = torch.arange(128)
    slots = right[0, pos // 64].long() * 64 + pos % 64
    req = torch.zeros(128, dtype=torch.int32)
    for col, page, match in ((0, -1, "outside"), (1, 3, "holds page")):
        wrong = right.clone()
        wrong[0, col] = page
        with pytest.raises(ValueError, match=match):
            cache.append(torch.randn(128, D), slots, pos, block_table=wrong, req_indices=req,
                         backend="torch")
