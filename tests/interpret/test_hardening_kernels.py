"""Issue 8, section 2, on the real Triton kernels (interpreter): each test reproduces one defect
and fails on the code before its fix. The interpreter's memory checker (conftest) turns an
out-of-bounds access into a failure instead of a read of whatever lies there."""
import pytest
import torch

import hisa
import hisa.cache.append as append_mod
import hisa.ops.dsa.decode_kernels as dk
from hisa.cache import PAGE_SIZE, PagedIndexerCache, page_bytes, pooled_row_bytes, pooled_views
from hisa.cache.factory import make_paged_inputs
from hisa.cache.layout import mark_pooled_unknown
from hisa.testing.compare import canonical_rows, check_index_format
from hisa.testing.inputs import make_exact_indexer_inputs

#: Keys of the big-offset tests: row * 128 passes 2**31 from row 2**24 on.
BIG_KEYS = 2**24 + 1024
#: Rows of the big buffers actually written (the rest is never touched: torch.empty pages are
#: committed lazily, so the 2 GiB buffer costs only what is written).
BIG_TAIL = 1024


def big_prefill_inputs(seed=0):
    """fp8 keys [BIG_KEYS, 128] with only the last BIG_TAIL rows written, 3 queries whose
    windows lie in that tail, and the same problem on the tail alone (windows shifted by a
    multiple of every block size used, so blocks line up)."""
    small = make_exact_indexer_inputs([BIG_TAIL], heads=16, head_dim=128,
                                      dtype=torch.float8_e4m3fn, query_lens=[3], seed=seed)
    small.ks = torch.tensor([100, 700, 1000], dtype=torch.int32)
    small.ke = torch.tensor([900, 1024, 1020], dtype=torch.int32)
    k = torch.empty(BIG_KEYS, 128, dtype=torch.uint8).view(torch.float8_e4m3fn)
    k_scale = torch.empty(BIG_KEYS)
    k[-BIG_TAIL:] = small.k
    k_scale[-BIG_TAIL:] = small.k_scale
    shift = BIG_KEYS - BIG_TAIL
    assert shift % 1024 == 0
    big = (small.q, k, small.weights, small.ks + shift, small.ke + shift)
    return big, k_scale, small


def test_flat_prefill_key_offsets_past_2_31_elements():
    (q, k, w, ks, ke), k_scale, small = big_prefill_inputs()
    idx = hisa.dsa_index(q, k, w, ks, ke, k_scale=k_scale, topk=256, backend="triton")
    ref = hisa.dsa_index(*small.args(), k_scale=small.k_scale, topk=256, backend="torch")
    assert torch.equal(canonical_rows(idx), canonical_rows(ref))


def test_hisa_prefill_key_offsets_past_2_31_elements():
    # Pooling starts at min(ks) // B, so only the tail's blocks are pooled here.
    (q, k, w, ks, ke), k_scale, small = big_prefill_inputs(seed=1)
    kw = dict(topk=256, block_size=128, block_topk=3)
    idx = hisa.hisa_index(q, k, w, ks, ke, k_scale=k_scale, backend="triton", **kw)
    ref = hisa.hisa_index(*small.args(), k_scale=small.k_scale, backend="triton", **kw)
    assert torch.equal(canonical_rows(idx), canonical_rows(ref))
    exact = hisa.hisa_index(*small.args(), k_scale=small.k_scale, backend="torch", topk=256,
                            block_size=128, block_topk=8)     # every block kept: the flat set
    got = hisa.hisa_index(q, k, w, ks, ke, k_scale=k_scale, backend="triton", topk=256,
                          block_size=128, block_topk=8)
    assert torch.equal(canonical_rows(got), canonical_rows(exact))


def test_pool_blocks_past_2_31_elements():
    from hisa.ops.indexer.pool import pool_blocks
    (_, k, _, _, _), k_scale, small = big_prefill_inputs(seed=2)
    nb = BIG_KEYS // 128
    pooled, scale = pool_blocks(k, k_scale, block_size=128, first_block=nb - 8)
    want, want_scale = pool_blocks(small.k, small.k_scale, block_size=128)
    assert torch.equal(pooled[-8:].view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(scale[-8:], want_scale)


def test_paged_cache_offsets_past_2_31_bytes():
    """Pages whose byte offset passes 2**31 (page ids >= 254,201 at D = 128): append, flat and
    HISA decode against the torch paths on the same bytes."""
    D, nbytes = 128, page_bytes(128)
    P = 2**31 // nbytes + 16
    caches = []
    for _ in range(2):
        kv = torch.empty(P, nbytes, dtype=torch.uint8)           # lazily committed
        pooled = mark_pooled_unknown(torch.empty(P, pooled_row_bytes(D), dtype=torch.uint8))
        caches.append(PagedIndexerCache.from_tensors(kv, pooled, head_dim=D, block_size=128))
    src = make_paged_inputs([300, 200], heads=16, head_dim=D, block_size=128, exact=True,
                            q_dtype=torch.float32)
    table = torch.tensor([[P - 1, P - 3, P - 5, P - 7, P - 9], [P - 2, P - 4, P - 6, P - 8, -1]],
                         dtype=torch.int32)
    for cache, backend in zip(caches, ("triton", "torch")):
        for b, L in enumerate([300, 200]):
            k, s = src.keys[b]
            pos = torch.arange(L)
            slots = table[b, pos // PAGE_SIZE].long() * PAGE_SIZE + pos % PAGE_SIZE
            cache.append(k, slots, pos, k_scale=s, block_table=table,
                         req_indices=torch.full((L,), b, dtype=torch.int32), backend=backend)
    used = table[table >= 0].long()
    assert torch.equal(caches[0].kv_cache[used], caches[1].kv_cache[used])
    # exact keys: the block sums do not round, so the pooled bytes agree too
    assert torch.equal(caches[0].pooled_cache[used], caches[1].pooled_cache[used])
    cache = caches[0]
    args = (src.q, src.weights, src.seq_lens, table)
    for fn in (lambda be: cache.dsa_index(*args, topk=64, backend=be),
               lambda be: cache.hisa_index(*args, topk=64, block_topk=3, backend=be)):
        assert torch.equal(canonical_rows(fn("triton")), canonical_rows(fn("torch")))


def test_strided_prefill_inputs_are_read_by_stride():
    inp = make_exact_indexer_inputs([70, 30], heads=16, head_dim=64, dtype=torch.float8_e4m3fn,
                                    query_lens=[8, 5], seed=3)
    T, H = inp.weights.shape
    scale_s = torch.stack([inp.k_scale, torch.full_like(inp.k_scale, 1e6)], 1)[:, 0]
    w_s = torch.cat([inp.weights, torch.full_like(inp.weights, -1e6)], 1)[:, :H]
    ks_s = torch.stack([inp.ks, inp.ks * 0], 1)[:, 0]
    assert scale_s.stride() == (2,) and w_s.stride() == (2 * H, 1) and ks_s.stride() == (2,)
    for op, kw in ((hisa.dsa_index, {}), (hisa.hisa_index, dict(block_size=16, block_topk=2))):
        want = op(*inp.args(), k_scale=inp.k_scale, topk=16, backend="triton", **kw)
        got = op(inp.q, inp.k, w_s, ks_s, inp.ke, k_scale=scale_s, topk=16, backend="triton",
                 **kw)
        assert torch.equal(got, want), op.__name__


def test_strided_decode_and_append_inputs_are_read_by_stride():
    inp = make_paged_inputs([300, 65], next_n=2, heads=16, head_dim=64, block_size=128,
                            exact=True, q_dtype=torch.float32)
    rows, H = inp.weights.shape
    w_s = torch.cat([inp.weights, torch.full_like(inp.weights, 1e6)], 1)[:, :H]
    lens_s = torch.stack([inp.seq_lens, inp.seq_lens * 0 + 10**6], 1)[:, 0]
    bt = inp.block_table
    bt_s = torch.stack([bt, torch.full_like(bt, 10**6)], 2).flatten(1)[:, ::2]
    assert bt_s.stride(1) == 2 and torch.equal(bt_s, bt)
    kv, pooled = inp.cache.kv_cache, inp.cache.pooled_cache
    for backend in ("triton", "torch"):
        want = hisa.dsa_index_paged(inp.q, kv, inp.weights, inp.seq_lens, bt, topk=32,
                                    backend="torch")
        got = hisa.dsa_index_paged(inp.q, kv, w_s, lens_s, bt_s, topk=32, backend=backend)
        assert torch.equal(canonical_rows(got), canonical_rows(want)), backend
        want = hisa.hisa_index_paged(inp.q, kv, pooled, inp.weights, inp.seq_lens, bt, topk=32,
                                     block_size=128, block_topk=2, backend="torch")
        got = hisa.hisa_index_paged(inp.q, kv, pooled, w_s, lens_s, bt_s, topk=32,
                                    block_size=128, block_topk=2, backend=backend)
        assert torch.equal(canonical_rows(got), canonical_rows(want)), backend
    # append: a strided k_scale and block-table columns
    k, s = inp.keys[0]
    s_s = torch.stack([s, torch.full_like(s, 1e6)], 1)[:, 0]
    out = []
    for scale, table in ((s, bt), (s_s, bt_s)):
        cache = PagedIndexerCache(inp.cache.num_pages, head_dim=64, block_size=128)
        pos = torch.arange(300)
        slots = bt[0, pos // PAGE_SIZE].long() * PAGE_SIZE + pos % PAGE_SIZE
        cache.append(k, slots, pos, k_scale=scale, block_table=table,
                     req_indices=torch.zeros(300, dtype=torch.int32), backend="triton")
        out.append(cache)
    assert torch.equal(out[0].kv_cache, out[1].kv_cache)
    assert torch.equal(out[0].pooled_cache, out[1].pooled_cache)


def test_stale_pooled_row_after_page_reuse():
    """A reused page whose block the append cannot read (stale table): the Triton append writes
    the unknown sentinel, so the previous owner's pooled row never ranks the block; the torch
    append refuses the table."""
    D, B = 64, 128
    H = 16
    cache = PagedIndexerCache(12, head_dim=D, block_size=B)
    # Request A fills pages (2, 3) with large keys aligned with the query: page 3's pooled row
    # then scores far above anything else.
    a = torch.full((B, D), 4.0)
    bt_a = torch.tensor([[2, 3]], dtype=torch.int32)
    pos = torch.arange(B)
    cache.append(a, bt_a[0, pos // 64].long() * 64 + pos % 64, pos, block_table=bt_a,
                 req_indices=torch.zeros(B, dtype=torch.int32), backend="triton")
    stale = cache.pooled_cache[3].clone()
    # A is freed. Request B: 4 blocks on pages (0, 1 | 4, 3 | 5, 6 | 7, 8); page 3 is reused
    # as the second page of block 1, but the table given to the append misses page 4.
    g = torch.Generator().manual_seed(0)
    kb = torch.randint(-2, 3, (4 * B, D), generator=g).float()
    right = torch.tensor([[0, 1, 4, 3, 5, 6, 7, 8]], dtype=torch.int32)
    wrong = right.clone()
    wrong[0, 2] = -1
    pos = torch.arange(4 * B)
    slots = right[0, pos // 64].long() * 64 + pos % 64
    args = (kb, slots, pos)
    kw = dict(block_table=wrong, req_indices=torch.zeros(4 * B, dtype=torch.int32))
    torch_cache = PagedIndexerCache(12, head_dim=D, block_size=B)
    with pytest.raises(ValueError, match="block_table"):
        torch_cache.append(*args, backend="torch", **kw)
    cache.append(*args, backend="triton", **kw)
    v, s = pooled_views(cache.pooled_cache, D)
    assert not torch.equal(cache.pooled_cache[3], stale)
    assert not bool(v[3].any()) and bool(torch.isnan(s[3]))          # the unknown sentinel
    # Decode with the right table: blocks 0 and 3 forced, one free slot; block 1's row must
    # never win it (the stale row would), block 2 takes it. Both backends read the same rows.
    q = torch.ones(1, 1, H, D)
    w = torch.ones(1, H)
    lens = torch.tensor([4 * B], dtype=torch.int32)
    for backend in ("triton", "torch"):
        idx = cache.hisa_index(q, w, lens, right, topk=3 * B, block_topk=3, backend=backend)
        blocks = set((idx[idx >= 0] // B).tolist())
        assert blocks == {0, 2, 3}, (backend, blocks)


def test_hisa_decode_reads_no_block_table_column_past_the_row():
    """max_pages = 3 with B = 128 (2 pages a block): the tail block's second column would be
    column 3 of a 3-column table (memcheck: one past the last row)."""
    inp = make_paged_inputs([192], heads=16, head_dim=64, block_size=128, exact=True,
                            q_dtype=torch.float32, extra_columns=0)
    assert inp.block_table.shape == (1, 3)
    kw = dict(topk=64, block_size=128, block_topk=2)
    got = hisa.hisa_index_paged(*inp.hisa_args(), backend="triton", **kw)
    ref = hisa.hisa_index_paged(*inp.hisa_args(), backend="torch", **kw)
    assert torch.equal(canonical_rows(got), canonical_rows(ref))


def test_int32_min_seq_len_is_an_empty_row():
    inp = make_paged_inputs([300, 100], next_n=2, heads=16, head_dim=64, block_size=64,
                            exact=True, q_dtype=torch.float32)
    bt = inp.block_table.clone()
    bt[1] = bt[0]                                       # valid pages: a wrap would read them
    lens = torch.tensor([300, -2**31], dtype=torch.int32)
    zero = torch.tensor([300, 0], dtype=torch.int32)
    kv, pooled = inp.cache.kv_cache, inp.cache.pooled_cache
    got = hisa.dsa_index_paged(inp.q, kv, inp.weights, lens, bt, topk=32, backend="triton")
    assert bool((got[2:] == -1).all())
    ref = hisa.dsa_index_paged(inp.q, kv, inp.weights, zero, bt, topk=32, backend="torch")
    assert torch.equal(canonical_rows(got), canonical_rows(ref))
    got = hisa.hisa_index_paged(inp.q, kv, pooled, inp.weights, lens, bt, topk=32,
                                block_size=64, block_topk=2, backend="triton")
    assert bool((got[2:] == -1).all())


def test_flat_decode_logits_buffer_is_capped(monkeypatch):
    inp = make_paged_inputs([700, 300, 0, 650, 64, 129], next_n=2, heads=16, head_dim=64,
                            block_size=64, exact=True, q_dtype=torch.float32)
    width = inp.block_table.shape[1] * PAGE_SIZE
    cap = 2 * (2 * width * 4) + 64                          # two requests of two rows
    ref = hisa.dsa_index_paged(*inp.args(), topk=32, backend="torch")
    monkeypatch.setattr(dk, "DECODE_LOGITS_BYTES", cap, raising=False)
    sizes = []
    empty = torch.empty

    def spy(*shape, **kw):
        t = empty(*shape, **kw)
        if t.dtype == torch.float32:
            sizes.append(t.numel() * 4)
        return t

    monkeypatch.setattr(torch, "empty", spy)
    got = hisa.dsa_index_paged(*inp.args(), topk=32, backend="triton")
    monkeypatch.undo()
    assert max(sizes) <= cap, sizes
    assert torch.equal(canonical_rows(got), canonical_rows(ref))


def test_zero_page_block_table_gives_empty_rows():
    inp = make_paged_inputs([0, 0], next_n=2, heads=16, head_dim=64, block_size=128,
                            exact=True, q_dtype=torch.float32)
    bt = torch.empty(2, 0, dtype=torch.int32)
    lens = torch.zeros(2, dtype=torch.int32)
    kv, pooled = inp.cache.kv_cache, inp.cache.pooled_cache
    for backend in ("triton", "torch"):
        idx, sc = hisa.dsa_index_paged(inp.q, kv, inp.weights, lens, bt, topk=8,
                                       return_scores=True, backend=backend)
        assert bool((idx == -1).all()) and bool(torch.isneginf(sc).all()), backend
        idx = hisa.hisa_index_paged(inp.q, kv, pooled, inp.weights, lens, bt, topk=8,
                                    block_size=128, block_topk=2, backend=backend)
        assert bool((idx == -1).all()), backend


def test_duplicate_slots_last_writer_wins_and_loser_never_pools(monkeypatch):
    """Token 0 (request 0, position 127) completes block 0 on pages (0, 1); token 1 (request 1,
    position 63) names the same slot. The Triton append keeps token 1's key and pools nothing
    from the mixed page; the torch append refuses the call."""
    D = 64
    g = torch.Generator().manual_seed(4)
    k = torch.randint(-4, 5, (129, D), generator=g).float()
    slots = torch.cat([torch.tensor([127, 127]), torch.arange(127)])
    pos = torch.cat([torch.tensor([127, 63]), torch.arange(127)])
    req = torch.cat([torch.tensor([0, 1]), torch.zeros(127, dtype=torch.long)]).to(torch.int32)
    bt = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)
    kw = dict(block_table=bt)
    cache = PagedIndexerCache(3, head_dim=D, block_size=128)
    cache.append(k, slots, pos, req_indices=req, backend="triton", **kw)
    with pytest.raises(ValueError, match="slot_mapping: expected distinct slots"):
        PagedIndexerCache(3, head_dim=D, block_size=128).append(k, slots, pos, req_indices=req,
                                                                backend="torch", **kw)
    want = PagedIndexerCache(3, head_dim=D, block_size=128)
    want.append(k[1:], slots[1:], pos[1:], req_indices=req[1:], backend="torch", **kw)
    assert torch.equal(cache.kv_cache, want.kv_cache)
    assert torch.equal(cache.pooled_cache, want.pooled_cache)
    assert torch.isnan(pooled_views(cache.pooled_cache, D)[1][1])    # page 1: never pooled
    # Duplicates inside one program and across programs (16 tokens a program): last wins,
    # both when the kernel scans for them and when a long call sorts the slots first.
    k2 = torch.randint(-4, 5, (40, D), generator=g).float()
    s2 = torch.arange(40) % 7 + 128
    last = {int(s): i for i, s in enumerate(s2.tolist())}
    keep = torch.tensor(sorted(last.values()))
    w2 = PagedIndexerCache(3, head_dim=D, block_size=64)
    w2.append(k2[keep], s2[keep], s2[keep] % 64, backend="torch")
    for scan_max in (2048, 8):
        monkeypatch.setattr(append_mod, "APPEND_SCAN_MAX_TOKENS", scan_max)
        c2 = PagedIndexerCache(3, head_dim=D, block_size=64)
        c2.append(k2, s2, s2 % 64, backend="triton")
        assert torch.equal(c2.kv_cache, w2.kv_cache), scan_max


def test_auto_falls_back_end_to_end_past_the_block_limit(monkeypatch):
    """``backend="auto"`` on a window of more than 32,768 blocks, as on a CUDA tensor (the
    backend choice is told the device is CUDA): the call runs the reference, selects what
    ``backend="torch"`` selects, and pools nothing on the way (it once pooled, then raised)."""
    import hisa.ops.indexer.pipeline as pipeline
    import hisa.ops.indexer.prefill as prefill
    from hisa.utils import backend as backend_module
    S = 32768 * 16 + 16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 16, 64, generator=g).to(torch.float8_e4m3fn)
    k = torch.randn(S, 64, generator=g).to(torch.float8_e4m3fn)
    w = torch.rand(2, 16, generator=g)
    ks = torch.tensor([0, S - 10], dtype=torch.int32)
    ke = torch.tensor([S, S], dtype=torch.int32)
    scale = torch.ones(S)
    args = (q, k, w, ks, ke)
    kw = dict(k_scale=scale, topk=32, block_size=16, block_topk=4)
    want = hisa.hisa_index(*args, **kw, backend="torch")
    chosen = []

    def as_if_cuda(backend, device, kernel_check=None):
        chosen.append(backend_module.resolve_backend(backend, torch.device("cuda"),
                                                     kernel_check))
        return chosen[-1]

    def no_pool(*a, **kw):
        raise AssertionError("pooled before the limit check")

    monkeypatch.setattr(backend_module, "triton_installed", lambda: True)
    monkeypatch.setattr(prefill, "resolve_backend", as_if_cuda)
    monkeypatch.setattr(pipeline, "pool_blocks", no_pool)
    got = hisa.hisa_index(*args, **kw, backend="auto")
    assert chosen == ["torch"]
    assert torch.equal(got, want)


def test_prefill_block_limit_is_checked_before_pooling(monkeypatch):
    """A window of more than 32,768 blocks (B = 16: 524,288 keys) exceeds the register block
    selection: the Triton pipeline raises before any launch, and the check used by "auto"
    sees it (so "auto" falls back to the reference)."""
    import hisa.ops.indexer.pipeline as pipeline
    from hisa.ops.indexer.prefill import _kernel_check
    S = 32768 * 16 + 16
    q = torch.zeros(2, 16, 64, dtype=torch.float8_e4m3fn)
    k = torch.zeros(S, 64, dtype=torch.float8_e4m3fn)
    w = torch.ones(2, 16)
    ks = torch.tensor([0, S - 10], dtype=torch.int32)
    ke = torch.tensor([S, S], dtype=torch.int32)
    scale = torch.ones(S)

    def no_pool(*a, **kw):
        raise AssertionError("pooled before the limit check")

    monkeypatch.setattr(pipeline, "pool_blocks", no_pool)
    with pytest.raises(ValueError, match="ks/ke: expected windows of at most 32768 blocks"):
        _kernel_check(q, k, ks, ke, 16, 4)
    with pytest.raises(ValueError, match="ks/ke: expected windows of at most 32768 blocks"):
        hisa.hisa_index(q, k, w, ks, ke, k_scale=scale, topk=32, block_size=16, block_topk=4,
                        backend="triton")
    # Many short windows over the same long buffer are fine: the limit is per window.
    _kernel_check(q, k, torch.tensor([S - 2000, S - 10], dtype=torch.int32), ke, 16, 4)
    check_index_format(hisa.hisa_index(q, k, w, ks, ke, k_scale=scale, topk=32, block_size=16,
                                       block_topk=4, backend="torch"), ks, ke, 32,
                       exact_count=False)
