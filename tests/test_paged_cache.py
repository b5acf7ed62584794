"""The paged FP8 key cache and its pooled-block cache: layout, appends, lifecycle (CPU)."""
import pytest
import torch

import hisa
from hisa.cache import PAGE_SIZE, PagedIndexerCache, page_views
from hisa.cache.factory import random_keys
from hisa.ops.indexer.naive import naive_pool_blocks

D = 128


def scratch_pooled(k, k_scale, block_size):
    """Pooling from scratch: FP8 of the fp32 means of the complete blocks (bits, scales)."""
    full = k.shape[0] // block_size
    mean = naive_pool_blocks(k[:full * block_size], k_scale[:full * block_size], block_size)
    v, s = hisa.quantize_fp8(mean, group_size=k.shape[1])
    return v.view(torch.uint8), s


def assert_pooled_matches(cache, row, k, k_scale):
    """Every complete block of a request has its scratch pooled row at its last page."""
    full = k.shape[0] // cache.block_size
    want_v, want_s = scratch_pooled(k, k_scale, cache.block_size)
    got_v, got_s = cache.request_pooled(row, full)
    assert torch.equal(got_v.view(torch.uint8), want_v)
    assert torch.equal(got_s, want_s)


class Allocator:
    """A shuffled free list of pages, like an engine's block manager."""

    def __init__(self, num_pages, seed):
        g = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_pages, generator=g).tolist()

    def take(self):
        return self.free.pop()

    def give(self, pages):
        self.free.extend(pages)


class Request:
    def __init__(self, length, seed, prefix=None):
        g = torch.Generator().manual_seed(seed)
        k, s = hisa.quantize_fp8(random_keys(length, D, generator=g, device="cpu"),
                                 group_size=D)
        if prefix is not None:                 # shared prefix: same leading keys
            n = prefix[0].shape[0]
            k, s = torch.cat([prefix[0], k[n:]]), torch.cat([prefix[1], s[n:]])
        self.k, self.s, self.pages, self.done = k, s, [], 0


def append_interleaved(cache, alloc, reqs, block_table, rng, max_chunk=150, backend="torch"):
    """Append every request's keys in random chunks, several requests per call."""
    while any(r.done < r.k.shape[0] for r in reqs):
        ks, ss, slots, pos, rows = [], [], [], [], []
        for i, r in enumerate(reqs):
            left = r.k.shape[0] - r.done
            if left == 0 or rng.random() < 0.3:
                continue
            n = min(left, 1 if rng.random() < 0.4 else rng.randint(1, max_chunk))
            p = torch.arange(r.done, r.done + n)
            while len(r.pages) * PAGE_SIZE < r.done + n:
                r.pages.append(alloc.take())
            block_table[i, :len(r.pages)] = torch.tensor(r.pages, dtype=torch.int32)
            page_ids = torch.tensor(r.pages)[p // PAGE_SIZE]
            ks.append(r.k[p]), ss.append(r.s[p]), pos.append(p)
            slots.append(page_ids * PAGE_SIZE + p % PAGE_SIZE)
            rows.append(torch.full((n,), i, dtype=torch.int32))
            r.done += n
        if ks:
            # one padding token (slot -1) per call, as a CUDA-graph-padded batch carries
            cache.append(torch.cat(ks + [ks[0][:1]]), torch.cat(slots + [torch.tensor([-1])]),
                         torch.cat(pos + [torch.tensor([0])]),
                         k_scale=torch.cat(ss + [ss[0][:1]]), block_table=block_table,
                         req_indices=torch.cat(rows + [torch.tensor([0], dtype=torch.int32)]),
                         backend=backend)


@pytest.mark.parametrize("block_size", [64, 128, 256])
def test_pooled_cache_after_interleaved_appends_equals_scratch(block_size):
    import random
    rng = random.Random(block_size)
    lengths = [1000, 64, 700, 129, 255, 513]
    cache = PagedIndexerCache(64, head_dim=D, block_size=block_size)
    alloc = Allocator(64, seed=1)
    reqs = [Request(L, seed=10 + i) for i, L in enumerate(lengths)]
    bt = torch.full((len(reqs), 20), -1, dtype=torch.int32)
    append_interleaved(cache, alloc, reqs, bt, rng)
    for i, r in enumerate(reqs):
        k, s = cache.request_keys(bt[i], r.k.shape[0])
        assert torch.equal(k.view(torch.uint8), r.k.view(torch.uint8))
        assert torch.equal(s, r.s)
        assert_pooled_matches(cache, bt[i], r.k, r.s)


def test_page_layout_is_deepgemm_soa():
    cache = PagedIndexerCache(4, head_dim=D, block_size=64)
    k = torch.randn(70, D)
    kq, ks = hisa.quantize_fp8(k, group_size=D)
    slots = torch.cat([torch.arange(64) + 2 * 64, torch.arange(6) + 0 * 64])
    cache.append(k, slots, torch.arange(70), backend="torch")
    raw = cache.kv_cache[2]
    assert cache.kv_cache.shape == (4, 64 * (D + 4)) and cache.kv_cache.dtype == torch.uint8
    assert torch.equal(raw[5 * D:6 * D], kq[5].view(torch.uint8))     # token-major values
    assert torch.equal(raw[64 * D + 4 * 5:64 * D + 4 * 6].view(torch.float32), ks[5:6])
    # pooled row of the completed page 2 (B = 64): D fp8 values, then the fp32 scale
    v, s = scratch_pooled(kq[:64], ks[:64], 64)
    assert torch.equal(cache.pooled_cache[2, :D], v[0])
    assert torch.equal(cache.pooled_cache[2, D:].view(torch.float32), s)
    # page 0 incomplete: its row still holds the unknown sentinel (zero values, NaN scale)
    assert not bool(cache.pooled_cache[0, :D].any())
    assert torch.isnan(cache.pooled_cache[0, D:].view(torch.float32)).all()


def test_ue8m0_scales_are_powers_of_two():
    cache = PagedIndexerCache(2, head_dim=D, block_size=64, ue8m0=True)
    cache.append(torch.randn(64, D) * 3, torch.arange(64), torch.arange(64), backend="torch")
    _, scales = page_views(cache.kv_cache, D)
    assert bool((torch.log2(scales[0]) == torch.round(torch.log2(scales[0]))).all())


def test_page_free_and_reuse_rewrites_pooled_rows():
    import random
    rng = random.Random(0)
    cache = PagedIndexerCache(24, head_dim=D, block_size=128)
    alloc = Allocator(24, seed=3)
    bt = torch.full((2, 12), -1, dtype=torch.int32)
    a = Request(640, seed=1)
    append_interleaved(cache, alloc, [a], bt[:1], rng)
    alloc.give(a.pages)                                      # request A finishes
    bt[0] = -1
    b, c = Request(700, seed=2), Request(300, seed=3)        # reuse A's pages, new content
    append_interleaved(cache, alloc, [b, c], bt, rng)
    assert set(a.pages) & set(b.pages + c.pages), "test needs reuse"
    assert_pooled_matches(cache, bt[0], b.k, b.s)
    assert_pooled_matches(cache, bt[1], c.k, c.s)


def test_shared_prefix_keeps_both_requests_consistent():
    """C reuses A's first three pages (block 0 whole, block 1 half) and appends its own."""
    import random
    rng = random.Random(5)
    cache = PagedIndexerCache(32, head_dim=D, block_size=128)
    alloc = Allocator(32, seed=4)
    bt = torch.full((2, 12), -1, dtype=torch.int32)
    a = Request(3 * 64, seed=1)
    append_interleaved(cache, alloc, [a], bt[:1], rng)
    c = Request(600, seed=2, prefix=(a.k, a.s))
    c.pages, c.done = list(a.pages), a.k.shape[0]                  # prefix-cache hit
    a2 = Request(500, seed=1)                                      # A keeps decoding
    a2.k[:192], a2.s[:192] = a.k, a.s
    a2.pages, a2.done = a.pages, 192
    append_interleaved(cache, alloc, [a2, c], bt, rng)
    assert bt[0, :3].tolist() == bt[1, :3].tolist() and bt[0, 3] != bt[1, 3]
    assert_pooled_matches(cache, bt[0], a2.k, a2.s)
    assert_pooled_matches(cache, bt[1], c.k, c.s)


def test_copy_pages_moves_pooled_rows():
    cache = PagedIndexerCache(4, head_dim=D, block_size=64)
    cache.append(torch.randn(64, D), torch.arange(64) + 64, torch.arange(64), backend="torch")
    cache.copy_pages(torch.tensor([1]), torch.tensor([3]))
    assert torch.equal(cache.kv_cache[3], cache.kv_cache[1])
    assert torch.equal(cache.pooled_cache[3], cache.pooled_cache[1])
    assert cache.pooled_cache[3].any()


def test_fp32_keys_are_quantized_like_quantize_fp8():
    cache = PagedIndexerCache(2, head_dim=D, block_size=64)
    k = torch.randn(10, D)
    cache.append(k, torch.arange(10), torch.arange(10), backend="torch")
    kq, ks = hisa.quantize_fp8(k, group_size=D)
    got_k, got_s = cache.request_keys(torch.tensor([0], dtype=torch.int32), 10)
    assert torch.equal(got_k.view(torch.uint8), kq.view(torch.uint8))
    assert torch.equal(got_s, ks)


def test_from_tensors_wraps_deepgemm_4d_view():
    kv = torch.zeros(3, 64, 1, D + 4, dtype=torch.uint8)
    pooled = torch.zeros(3, D + 4, dtype=torch.uint8)
    cache = PagedIndexerCache.from_tensors(kv, pooled, block_size=64)
    cache.append(torch.randn(64, D), torch.arange(64) + 128, torch.arange(64), backend="torch")
    assert kv[2].any() and pooled[2].any() and not kv[0].any()


# --- validation ---------------------------------------------------------------------------

def _append_args():
    cache = PagedIndexerCache(4, head_dim=D, block_size=128)
    bt = torch.tensor([[0, 1, 2, 3]], dtype=torch.int32)
    return dict(kv_cache=cache.kv_cache, pooled_cache=cache.pooled_cache, k=torch.randn(3, D),
                slot_mapping=torch.arange(3), positions=torch.arange(3), block_table=bt,
                req_indices=torch.zeros(3, dtype=torch.int32), block_size=128, backend="torch")


@pytest.mark.parametrize("change,exc,name", [
    (dict(k=torch.randn(3, D).to(torch.int32)), TypeError, "k"),
    (dict(k=torch.randn(3, 64)), ValueError, "kv_cache"),
    (dict(kv_cache=torch.zeros(4, 100, dtype=torch.uint8)), ValueError, "kv_cache"),
    (dict(kv_cache=torch.zeros(4, 64 * (D + 4))), TypeError, "kv_cache"),
    (dict(pooled_cache=torch.zeros(5, D + 4, dtype=torch.uint8)), ValueError, "pooled_cache"),
    (dict(slot_mapping=torch.arange(4)), ValueError, "slot_mapping"),
    (dict(slot_mapping=torch.arange(3).float()), TypeError, "slot_mapping"),
    (dict(positions=torch.arange(2)), ValueError, "positions"),
    (dict(block_size=96), ValueError, "block_size"),
    (dict(block_size=0), ValueError, "block_size"),
    (dict(block_table=None), ValueError, "block_table"),
    (dict(req_indices=torch.zeros(2, dtype=torch.int32)), ValueError, "req_indices"),
    (dict(block_table=torch.zeros(1, 4, dtype=torch.int64)), TypeError, "block_table"),
    (dict(k=hisa.quantize_fp8(torch.randn(3, D))[0]), ValueError, "k_scale"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_append_validation(change, exc, name):
    args = _append_args()
    args.update(change)
    with pytest.raises(exc, match=name):
        hisa.paged_cache_append(args.pop("kv_cache"), args.pop("pooled_cache"), args.pop("k"),
                                args.pop("slot_mapping"), args.pop("positions"), **args)


def test_append_rejects_inconsistent_slot_and_block_table():
    args = _append_args()
    with pytest.raises(ValueError, match="slot_mapping"):       # offset != position % 64
        hisa.paged_cache_append(args["kv_cache"], args["pooled_cache"], args["k"],
                                torch.arange(3) + 1, args["positions"],
                                block_table=args["block_table"], req_indices=args["req_indices"])
    k = torch.randn(128, D)
    bt = torch.tensor([[0, 2]], dtype=torch.int32)              # block 0 ends in page 2...
    slots = torch.arange(128)                                   # ...but keys go to pages 0, 1
    with pytest.raises(ValueError, match="block_table"):
        hisa.paged_cache_append(args["kv_cache"], args["pooled_cache"], k, slots,
                                torch.arange(128), block_table=bt,
                                req_indices=torch.zeros(128, dtype=torch.int32),
                                block_size=128, backend="torch")
