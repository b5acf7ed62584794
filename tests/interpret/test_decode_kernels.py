"""Interpreter tier of the decode kernels: cache append + pooling, flat paged logits + top-k,
HISA paged decode and its per-request routing, each against its plain-PyTorch twin."""
import random

import pytest
import torch
import triton
import triton.language as tl

import hisa
from hisa.cache import PagedIndexerCache, pooled_views
from hisa.cache.factory import make_paged_inputs
from hisa.ops.dsa.decode_kernels import paged_logits
from hisa.ops.dsa.naive import naive_dsa_logits
from hisa.ops.dsa.naive import mark_outside
from hisa.ops.indexer.topk import _select_row
from hisa.ops.indexer.topk import _force_key, _ordered_key
from hisa.ops.indexer.decode_kernels import (block_select, block_select_tiers, hisa_decode,
                                             token_scores_paged)
from hisa.ops.indexer.naive import (candidate_positions, naive_block_scores, naive_select_blocks,
                                    naive_token_scores)
from hisa.testing.compare import assert_same_selection, check_index_format

from test_paged_cache import Allocator, Request, append_interleaved

H, D = 16, 64
TOPK = 32
LENGTHS = [0, 1, 31, 64, 65, 200, 700]
#: Pooled rows: the fp32 block sum runs in another order than the twin's, so a mean may move by
#: an ulp and its FP8 value by one e4m3 step (2**-3 relative) at a rounding boundary.
POOL_RTOL = 2.0 ** -3


@triton.jit
def _select_rows_kernel(x_ptr, o_ptr, K: tl.constexpr, N: tl.constexpr, R: tl.constexpr,
                        FORCE: tl.constexpr = False):
    r = tl.program_id(0)
    i = tl.arange(0, N)
    keys = _ordered_key(tl.load(x_ptr + r * N + i))
    if FORCE:                   # the block selections' forced first and last entries
        keys = _force_key(keys, (i == 0) | (i == N - 1))
    sel, pos, n_sel = _select_row(keys, K, R)
    tl.store(o_ptr + r * N + i, tl.where(sel, pos, -1))


def gathered(inp, b):
    k, s = inp.keys[b]
    return k, s


def test_append_kernel_matches_twin_bytes_and_pools():
    rng_t, rng_r = random.Random(1), random.Random(1)
    caches, bts = [], []
    for backend, rng in (("triton", rng_t), ("torch", rng_r)):
        cache = PagedIndexerCache(40, head_dim=D, block_size=128)
        reqs = [Request(L, seed=10 + i) for i, L in enumerate([300, 64, 513, 130])]
        for r in reqs:                       # Request draws D = 128 keys: keep the first D dims
            r.k, r.s = hisa.quantize_fp8(r.k.float()[:, :D] * r.s[:, None], group_size=D)
        bt = torch.full((4, 12), -1, dtype=torch.int32)
        append_interleaved(cache, Allocator(40, seed=2), reqs, bt, rng, backend=backend)
        caches.append(cache), bts.append(bt)
    assert torch.equal(bts[0], bts[1])
    assert torch.equal(caches[0].kv_cache, caches[1].kv_cache)
    (va, sa), (vb, sb) = (pooled_views(c.pooled_cache, D) for c in caches)
    fa = va.contiguous().view(torch.float8_e4m3fn).float() * sa[:, None]
    fb = vb.contiguous().view(torch.float8_e4m3fn).float() * sb[:, None]
    written = ~torch.isnan(sb)                                     # the rest: unknown sentinel
    assert bool(written.any()) and torch.equal(written, ~torch.isnan(sa))
    torch.testing.assert_close(sa, sb, rtol=1e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(fa[written], fb[written], rtol=POOL_RTOL,
                               atol=float(sb[written].max()) * 2 ** -9)


@pytest.mark.parametrize("ue8m0", [False, True])
def test_append_kernel_quantizes_like_quantize_fp8(ue8m0):
    k = torch.randn(37, D) * 5
    k[3] = 0.0                                                     # amax floor
    slots = torch.randperm(3 * 64)[:37]
    pos = slots % 64                                               # consistent offsets
    out = []
    for backend in ("triton", "torch"):
        cache = PagedIndexerCache(3, head_dim=D, block_size=64, ue8m0=ue8m0)
        cache.append(k, slots, pos, backend=backend)
        out.append(cache.kv_cache)
    assert torch.equal(out[0], out[1])


def test_append_kernel_skips_padding_and_out_of_range_slots():
    cache = PagedIndexerCache(2, head_dim=D, block_size=64)
    k = torch.randn(3, D)
    cache.append(k, torch.tensor([-1, 2 * 64 + 5, 7]), torch.tensor([0, 5, 7]), backend="triton")
    got, _ = cache.request_keys(torch.tensor([0], dtype=torch.int32), 8)
    want, _ = hisa.quantize_fp8(k[2:], group_size=D)
    assert torch.equal(got[7].view(torch.uint8), want[0].view(torch.uint8))
    assert int(cache.kv_cache.count_nonzero()) == D + 4            # only token 7 was written


@pytest.mark.parametrize("next_n,two_d,q_dtype", [(1, False, torch.float32),
                                                  (2, False, torch.float8_e4m3fn),
                                                  (2, True, torch.float32)])
def test_paged_logits_match_twin(next_n, two_d, q_dtype):
    inp = make_paged_inputs(LENGTHS, next_n=next_n, heads=H, head_dim=D, block_size=64,
                            q_dtype=q_dtype, seq_lens_2d=two_d)
    logits, ks, ke = paged_logits(inp.q, inp.cache.kv_cache, inp.weights, inp.seq_lens,
                                  inp.block_table)
    lens = inp.row_lengths()
    assert torch.equal(ks, torch.zeros_like(ks)) and torch.equal(ke.long(), lens)
    for b in range(len(LENGTHS)):
        k, s = gathered(inp, b)
        rows = slice(b * next_n, (b + 1) * next_n)
        z = torch.zeros(next_n, dtype=torch.int32)
        ref = naive_dsa_logits(inp.q[b], k, inp.weights[rows], z, lens[rows].int(), k_scale=s)
        for i in range(next_n):
            n = int(lens[b * next_n + i])
            torch.testing.assert_close(logits[b * next_n + i, :n], ref[i, :n], rtol=1e-5,
                                       atol=1e-5)


@pytest.mark.parametrize("next_n,two_d,q_dtype", [(1, False, torch.float32),
                                                  (2, False, torch.float8_e4m3fn),
                                                  (2, True, torch.float32)])
def test_dsa_paged_triton_matches_reference(next_n, two_d, q_dtype):
    inp = make_paged_inputs(LENGTHS, next_n=next_n, heads=H, head_dim=D, block_size=64,
                            q_dtype=q_dtype, seq_lens_2d=two_d)
    out = torch.full((len(LENGTHS) * next_n, TOPK), 12345, dtype=torch.int32)   # poisoned
    idx, sc = hisa.dsa_index_paged(*inp.args(), topk=TOPK, out=out, return_scores=True,
                                   backend="triton")
    ref = hisa.dsa_index_paged(*inp.args(), topk=TOPK, backend="torch")
    lens = inp.row_lengths()
    check_index_format(idx, torch.zeros_like(lens), lens, TOPK)
    assert idx.data_ptr() == out.data_ptr()
    logits = full_logits(inp)
    assert_same_selection(idx, ref, torch.zeros_like(lens), logits, rtol=1e-5)
    valid = idx >= 0
    torch.testing.assert_close(sc[valid], torch.gather(logits, 1, idx.long().clamp_min(0))[valid],
                               rtol=1e-5, atol=1e-5)


def test_decode_topk_over_several_chunks(monkeypatch):
    import hisa.ops.dsa.decode_kernels as dk
    monkeypatch.setattr(dk, "TOPK_CHUNK", 128)          # 700 keys: 6 chunks, merge of 6 * k
    inp = make_paged_inputs(LENGTHS, next_n=2, heads=H, head_dim=D, block_size=64,
                            q_dtype=torch.float32, seed=9)
    idx, sc = hisa.dsa_index_paged(*inp.args(), topk=TOPK, return_scores=True, backend="triton")
    ref, ref_sc = hisa.dsa_index_paged(*inp.args(), topk=TOPK, return_scores=True,
                                       backend="torch")
    lens = inp.row_lengths()
    check_index_format(idx, torch.zeros_like(lens), lens, TOPK)
    assert_same_selection(idx, ref, torch.zeros_like(lens), full_logits(inp), rtol=1e-5)
    torch.testing.assert_close(sc.sort(1).values, ref_sc.sort(1).values, rtol=1e-5, atol=1e-5)


def full_logits(inp):
    """Reference logits [rows, max_len] of every row (-inf beyond its length)."""
    lens = inp.row_lengths()
    n = inp.next_n
    width = max(int(lens.max()), 1)
    out = torch.full((lens.numel(), width), float("-inf"))
    for b in range(inp.q.shape[0]):
        k, s = gathered(inp, b)
        rows = slice(b * n, (b + 1) * n)
        ref = naive_dsa_logits(inp.q[b], k, inp.weights[rows], torch.zeros(n, dtype=torch.int32),
                               lens[rows].int(), k_scale=s)
        out[rows, :ref.shape[1]] = ref
    return out


def reference_block_ids(inp, b, L, B, M):
    """The twins' top-M block ids of request b's rows (its L keys, pooled rows from the cache)."""
    n = inp.next_n
    rows = slice(b * n, (b + 1) * n)
    full = L // B
    pv, ps = inp.cache.request_pooled(inp.block_table[b], full)
    pooled = torch.cat([pv.float() * ps[:, None], torch.zeros(-(-L // B) - full, D)])
    js = naive_block_scores(inp.q[b], pooled, inp.weights[rows], torch.zeros(n, dtype=torch.int32),
                            inp.row_lengths()[rows].int(), block_size=B)
    return naive_select_blocks(js, M)


def test_block_select_and_token_scores_match_twins():
    B, M = 64, 4
    inp = make_paged_inputs(LENGTHS, next_n=2, heads=H, head_dim=D, block_size=B,
                            q_dtype=torch.float32)
    ids = block_select(inp.q, inp.cache.pooled_cache, inp.weights, inp.seq_lens,
                       inp.block_table, block_size=B, block_topk=M, prec="ieee")
    cand = token_scores_paged(inp.q, inp.cache.kv_cache, inp.weights, inp.seq_lens,
                              inp.block_table, ids, block_size=B, prec="ieee")
    lens = inp.row_lengths()
    for b, L in enumerate(LENGTHS):
        rows = slice(b * 2, b * 2 + 2)
        z = torch.zeros(2, dtype=torch.int32)
        assert torch.equal(ids[rows], reference_block_ids(inp, b, L, B, M)), f"request {b}"
        if L == 0:
            continue
        k, s = gathered(inp, b)
        ref, pos = naive_token_scores(inp.q[b], k, inp.weights[rows], z, lens[rows].int(),
                                      ids[rows], block_size=B, k_scale=s)
        assert torch.equal(pos, candidate_positions(ids[rows], B, L))
        fin = torch.isfinite(ref)
        assert torch.equal(fin, torch.isfinite(cand[rows]))
        torch.testing.assert_close(cand[rows][fin], ref[fin], rtol=1e-5, atol=1e-5)


def test_block_select_tiers_select_what_the_table_width_selects():
    # An engine's block table is as wide as its longest allowed request: rows of 0-141 blocks
    # in a 256-block-wide table, selected at the narrowest tier that holds each row.
    B, M = 64, 4
    lengths = [0, 200, 700, 3000, 9000]                   # 0, 4, 11, 47, 141 blocks
    inp = make_paged_inputs(lengths, heads=H, head_dim=D, block_size=B, q_dtype=torch.float32,
                            extra_columns=100)
    assert -(-inp.block_table.shape[1] * 64 // B) == 241
    assert block_select_tiers(256, (16, 64)) == {"TIER1": 16, "TIER2": 64}
    assert block_select_tiers(256, (32, 4096)) == {"TIER1": 0, "TIER2": 32}
    assert block_select_tiers(256, (256, 1024)) == {"TIER1": 0, "TIER2": 0}
    args = (inp.q, inp.cache.pooled_cache, inp.weights, inp.seq_lens, inp.block_table)
    kw = dict(block_size=B, block_topk=M, prec="ieee")
    table_wide = block_select(*args, tiers=(), **kw)
    for b, L in enumerate(lengths):
        assert torch.equal(table_wide[b:b + 1], reference_block_ids(inp, b, L, B, M)), b
    for tiers in ((16, 64), (32,)):
        assert torch.equal(block_select(*args, tiers=tiers, **kw), table_wide), tiers
    for bad in ((16, 32, 64), (48,), (8,)):
        with pytest.raises(ValueError, match="tiers"):
            block_select_tiers(256, bad)


@pytest.mark.parametrize("block_size,next_n,q_dtype", [(64, 1, torch.float32),
                                                       (128, 2, torch.float32),
                                                       (64, 2, torch.float8_e4m3fn)])
def test_hisa_paged_triton_matches_reference(block_size, next_n, q_dtype):
    m = 256 // block_size
    inp = make_paged_inputs(LENGTHS, next_n=next_n, heads=H, head_dim=D, block_size=block_size,
                            q_dtype=q_dtype)
    lens = inp.row_lengths()
    # poison: garbage in unused block-table columns and in the tail blocks' pooled rows
    for b, L in enumerate(LENGTHS):
        if L % block_size:
            inp.cache.pooled_cache[int(inp.block_table[b, (L - 1) // 64])] = 255
        inp.block_table[b, -(-L // 64):] = 10**6
    args = dict(topk=TOPK, block_size=block_size, block_topk=m)
    idx, sc = hisa.hisa_index_paged(*inp.hisa_args(), backend="triton", return_scores=True,
                                    **args)
    inp.block_table[inp.block_table == 10**6] = -1
    ref = hisa.hisa_index_paged(*inp.hisa_args(), backend="torch", **args)
    check_index_format(idx, torch.zeros_like(lens), lens, TOPK)
    logits = full_logits(inp)
    assert_same_selection(idx, ref, torch.zeros_like(lens), logits, rtol=1e-5)
    assert bool((sc[idx < 0] == float("-inf")).all())
    # Each returned score sits beside its own position (the token select writes both slots).
    valid = idx >= 0
    want = logits.gather(1, idx.long().clamp(min=0))
    torch.testing.assert_close(sc[valid], want[valid], rtol=1e-5, atol=1e-5)


def test_auto_routing_sends_short_requests_to_flat():
    """With a crossover of 100 keys, short requests equal the flat result and long ones the
    HISA result (where HISA prunes, the two differ)."""
    B, M = 64, 2
    inp = make_paged_inputs([50, 700, 0, 90, 650], next_n=2, heads=H, head_dim=D, block_size=B,
                            q_dtype=torch.float32, seed=4)
    pages = inp.cache.kv_cache
    out = torch.full((10, TOPK), 777, dtype=torch.int32)
    got, _ = hisa_decode(inp.q, pages, inp.cache.pooled_cache, inp.weights, inp.seq_lens,
                         inp.block_table, topk=TOPK, block_size=B, block_topk=M, out=out,
                         route_short_to_flat=True, hisa_min_keys=100)
    flat = hisa.dsa_index_paged(*inp.args(), topk=TOPK, backend="torch")
    hs = hisa.hisa_index_paged(*inp.hisa_args(), topk=TOPK, block_size=B, block_topk=M,
                               backend="torch")
    logits = full_logits(inp)
    lens = inp.row_lengths()
    z = torch.zeros_like(lens)
    # rows of requests 0 (50 keys), 2 (0) and 3 (90) are short; 1 (700) and 4 (650) long
    short = torch.tensor([1, 1, 0, 0, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    assert not torch.equal(flat[~short], hs[~short])         # HISA prunes there: they differ
    assert_same_selection(got[short], flat[short], z[short], logits[short])
    assert_same_selection(got[~short], hs[~short], z[~short], logits[~short])
    check_index_format(got, z, lens, TOPK)


def test_triton_decode_is_deterministic():
    inp = make_paged_inputs([700, 300], next_n=2, heads=H, head_dim=D, block_size=64)
    a = hisa.hisa_index_paged(*inp.hisa_args(), topk=TOPK, block_size=64, block_topk=4,
                              backend="triton")
    b = hisa.hisa_index_paged(*inp.hisa_args(), topk=TOPK, block_size=64, block_topk=4,
                              backend="triton")
    assert torch.equal(a, b)


@pytest.mark.parametrize("fuse,radix,programs,slots", [
    (False, 1, None, None), (False, 2, 1, None), (True, 1, 3, None), (True, 2, None, None),
    (False, 8, 2, None), (True, 8, None, None), (False, 0, None, True),
    (False, 0, None, False)])
def test_hisa_decode_variants_match_reference(fuse, radix, programs, slots):
    """Every kernel variant (block selection fused or not, 1- or 2-bit or byte-histogram
    selection passes or the interpolation search, any token programs per row, the token
    select's slots per block or by one scan) selects the reference's set."""
    B, M = 64, 4
    inp = make_paged_inputs(LENGTHS, next_n=2, heads=H, head_dim=D, block_size=B,
                            q_dtype=torch.float32, seed=11)
    out = torch.full((len(LENGTHS) * 2, TOPK), 4242, dtype=torch.int32)          # poisoned
    got, _ = hisa_decode(inp.q, inp.cache.kv_cache, inp.cache.pooled_cache, inp.weights,
                         inp.seq_lens, inp.block_table, topk=TOPK, block_size=B, block_topk=M,
                         out=out, fuse_block_select=fuse, radix=radix, programs=programs,
                         block_slots=slots)
    ref = hisa.hisa_index_paged(*inp.hisa_args(), topk=TOPK, block_size=B, block_topk=M,
                                backend="torch")
    lens = inp.row_lengths()
    check_index_format(got, torch.zeros_like(lens), lens, TOPK)
    assert_same_selection(got, ref, torch.zeros_like(lens), full_logits(inp), rtol=1e-5)


@pytest.mark.parametrize("K", [1, 7, 300, 1023])
def test_byte_histogram_selection_equals_the_bit_passes(K):
    """RADIX = 8 (a 256-bin histogram per byte) selects exactly RADIX = 1's entries, in the
    same output slots, on rows whose keys tie in their high bytes (a few distinct values),
    share all but the last byte, hold NaN / +-inf / outside markers, or have fewer selectable
    keys than K."""
    N = 1024
    g = torch.Generator().manual_seed(K)
    x = torch.randn(6, N, generator=g)
    x[0] = torch.randint(0, 4, (N,), generator=g).float()             # 4 values: ties
    x[1] = 1.0 + torch.randint(0, 200, (N,), generator=g).float() * 2 ** -23   # last byte
    x[2, ::3] = float("nan")
    x[2, 1::7] = float("inf")
    x[2, 2::11] = float("-inf")
    mark_outside(x[3], torch.arange(N) % 5 != 0)                       # 205 selectable
    mark_outside(x[4], torch.arange(N) >= 3)                           # 3 selectable
    x[5] = -x[5].abs()                                                 # negatives only
    outs = []
    for radix in (1, 8, 0):     # 0: the interpolation search, held to the same rows
        out = torch.empty(6, N, dtype=torch.int32)
        _select_rows_kernel[(6,)](x, out, K=K, N=N, R=radix)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert int((outs[1][4] >= 0).sum()) == min(K, 3)


@pytest.mark.parametrize("K", [1, 2, 100, 511, 1000])
def test_interpolation_search_selection_equals_the_bit_passes(K):
    """RADIX = 0 (regula falsi on the score values, then bisection) selects RADIX = 1's
    entries slot for slot on rows built to defeat interpolation: a dynamic range of 1e-30 to
    1e30 of both signs, denormals, signed zeros, an exponential tail, one outlier far above a
    tight cluster, two clusters either side of the k-th score, and plain normal scores; each
    also with its first and last entry forced (above every score, as block rows have)."""
    N = 1024
    g = torch.Generator().manual_seed(1000 + K)
    x = torch.randn(8, N, generator=g)
    sign = torch.where(torch.rand(N, generator=g) < 0.5, -1.0, 1.0)
    x[0] = sign * 10.0 ** (torch.rand(N, generator=g) * 60 - 30)
    x[1] = torch.rand(N, generator=g) * 1e-40                          # denormals (and 0)
    x[2] = torch.where(torch.arange(N) % 2 == 0, 0.0, -0.0)            # signed zeros only
    x[3] = torch.empty(N).exponential_(1.0, generator=g) ** 4
    x[4] = 1.0 + torch.randn(N, generator=g) * 1e-6
    x[4, 17] = 1e30
    x[5] = torch.where(torch.arange(N) < N // 2, 5.0, -5.0) + torch.randn(N, generator=g) * 1e-3
    x[6, ::4] = float("inf")
    x[6, 1::4] = float("nan")
    mark_outside(x[7], torch.rand(N, generator=g) < 0.3)
    for force in (False, True):     # forced ends: the bracket starts at the finite keys
        outs = []
        for radix in (1, 0):
            out = torch.empty(8, N, dtype=torch.int32)
            _select_rows_kernel[(8,)](x, out, K=K, N=N, R=radix, FORCE=force)
            outs.append(out)
        assert torch.equal(outs[0], outs[1]), force
        if force and K >= 2:    # (row 7's ends may be outside: never forced)
            assert bool((outs[0][:7, [0, N - 1]] >= 0).all())


@pytest.mark.parametrize("radix", [0, 1, 2, 8])
def test_decode_select_ties_and_short_rows(radix):
    """Massive ties (early exit never fires), fewer selectable keys than k, distinct keys, and
    non-finite scores: the selection keeps the k largest, ties to the lower index,
    +inf > finite > -inf > NaN."""
    N, K = 64, 10
    x = torch.randn(4, N)
    x[0] = 1.0                                                  # all tied
    mark_outside(x[1], torch.arange(N) >= 5)                    # 5 selectable keys < K
    x[3, :] = float("nan")
    x[3, 7] = float("-inf")
    x[3, 9] = float("inf")
    x[3, 11] = 2.0
    out = torch.empty(4, N, dtype=torch.int32)
    _select_rows_kernel[(4,)](x, out, K=K, N=N, R=radix)
    assert (out[0] >= 0).nonzero().flatten().tolist() == list(range(K))
    assert (out[1] >= 0).nonzero().flatten().tolist() == list(range(5))
    want = set(torch.topk(x[2], K).indices.tolist())
    assert set((out[2] >= 0).nonzero().flatten().tolist()) == want
    assert set((out[3] >= 0).nonzero().flatten().tolist()) == {7, 9, 11} | set(range(7))
