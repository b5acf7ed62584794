"""GPU tier of the decode path: Triton append / flat / HISA paged decode against the references
on fresh random inputs with poisoned outputs, and CUDA-graph replay with new lengths and block
tables equal to eager."""
import pytest
import torch

import hisa
from hisa.cache.factory import make_paged_inputs
from hisa.ops.dsa.naive import naive_dsa_logits
from hisa.ops.indexer.decode_kernels import hisa_decode
from hisa.testing.compare import check_index_format, selected_scores

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

H, D, TOPK = 64, 128, 2048
#: fp8 wgmma sums 128 products with a narrower accumulator than the fp32 reference, and the
#: signed head weights cancel, so errors scale with the row's score magnitude, not with the k-th
#: score: a differing entry must score within this fraction of max |score| of its row.
GPU_TIE_TOL = 2e-3
#: HISA's top-m on near-tied block scores can flip a block between the kernel and the
#: reference; the token selections must still agree on at least this fraction.
HISA_MIN_RECALL = 0.97
SENTINEL = -12345
LENGTHS = [1, 100, 2047, 2048, 2049, 4096, 8191, 8192, 8193, 20000, 0, 33000]


def full_logits(inp):
    lens = inp.row_lengths()
    n = inp.next_n
    out = torch.full((lens.numel(), max(int(lens.max()), 1)), float("-inf"), device="cuda")
    for b in range(inp.q.shape[0]):
        k, s = inp.keys[b]
        rows = slice(b * n, (b + 1) * n)
        ref = naive_dsa_logits(inp.q[b], k, inp.weights[rows],
                               torch.zeros(n, dtype=torch.int32, device="cuda"),
                               lens[rows].int(), k_scale=s)
        out[rows, :ref.shape[1]] = ref
    return out


def assert_same_up_to_ties(a, b, logits, tol=GPU_TIE_TOL):
    """Same valid count per row; entries only one side holds score within tol * max|row| of
    the row's k-th score (reference scores)."""
    a, b, logits = a.long().cpu(), b.long().cpu(), logits.cpu()
    assert torch.equal((a >= 0).sum(1), (b >= 0).sum(1)), "valid counts differ"
    z = torch.zeros(a.shape[0], dtype=torch.long)
    va, vb = selected_scores(a, z, logits), selected_scores(b, z, logits)
    for t in range(a.shape[0]):
        sa, sb = set(a[t][a[t] >= 0].tolist()), set(b[t][b[t] >= 0].tolist())
        if sa == sb:
            continue
        row = logits[t][torch.isfinite(logits[t])]
        slack = tol * float(row.abs().max())
        kth = float(min(va[t][a[t] >= 0].min(), vb[t][b[t] >= 0].min()))
        for x in sa ^ sb:
            v = float(logits[t, x])
            assert abs(v - kth) <= slack, f"row {t}: offset {x} (score {v}), k-th {kth}"


def recall(a, b):
    hit = tot = 0
    for x, y in zip(a.cpu().tolist(), b.cpu().tolist()):
        sx, sy = {v for v in x if v >= 0}, {v for v in y if v >= 0}
        hit, tot = hit + len(sx & sy), tot + len(sy)
    return hit / max(tot, 1)


@pytest.mark.parametrize("next_n,two_d", [(1, False), (2, False), (2, True)])
def test_flat_paged_decode_matches_reference(next_n, two_d):
    inp = make_paged_inputs(LENGTHS, next_n=next_n, heads=H, head_dim=D, device="cuda",
                            backend="triton", seq_lens_2d=two_d, seed=next_n + 10 * two_d)
    rows = len(LENGTHS) * next_n
    out = torch.full((rows, TOPK), SENTINEL, dtype=torch.int32, device="cuda")
    idx = hisa.dsa_index_paged(*inp.args(), topk=TOPK, out=out, backend="triton")
    ref = hisa.dsa_index_paged(*inp.args(), topk=TOPK, backend="torch")
    lens = inp.row_lengths()
    check_index_format(idx, torch.zeros_like(lens), lens, TOPK)
    assert_same_up_to_ties(idx, ref, full_logits(inp))


@pytest.mark.parametrize("block_size,next_n", [(128, 1), (128, 2), (64, 1)])
def test_hisa_paged_decode_matches_reference(block_size, next_n):
    m = 8192 // block_size
    inp = make_paged_inputs(LENGTHS, next_n=next_n, heads=H, head_dim=D, block_size=block_size,
                            device="cuda", backend="triton", seed=3 + next_n)
    rows = len(LENGTHS) * next_n
    out = torch.full((rows, TOPK), SENTINEL, dtype=torch.int32, device="cuda")
    args = dict(topk=TOPK, block_size=block_size, block_topk=m)
    idx = hisa.hisa_index_paged(*inp.hisa_args(), out=out, backend="triton", **args)
    ref = hisa.hisa_index_paged(*inp.hisa_args(), backend="torch", **args)
    lens = inp.row_lengths()
    check_index_format(idx, torch.zeros_like(lens), lens, TOPK)
    fits = lens <= m * block_size                      # every block kept: exact up to ties
    assert_same_up_to_ties(idx[fits], ref[fits], full_logits(inp)[fits])
    assert recall(idx[~fits], ref[~fits]) >= HISA_MIN_RECALL


def test_block_select_tiers_equal_the_table_width_selection_on_gpu():
    # A 1M-token engine's table (16,384 columns, 8,192 blocks of 128) over requests of 0-33K
    # keys: each row is selected at the 256 or 2,048 tier, the same ids as at the full width.
    from hisa.cache.layout import as_pages
    from hisa.ops.dsa.decode_kernels import decode_operands
    from hisa.ops.indexer import decode_kernels as dk
    B, M = 128, 64
    pages_needed = -(-max(LENGTHS) // 64)
    inp = make_paged_inputs(LENGTHS, heads=H, head_dim=D, block_size=B, device="cuda",
                            backend="triton", seed=11,
                            extra_columns=(1 << 20) // 64 - pages_needed)
    assert inp.block_table.shape[1] == (1 << 20) // 64
    q, _, _, prec = decode_operands(inp.q, as_pages(inp.cache.kv_cache, D))
    kw = dict(block_size=B, block_topk=M, prec=prec)

    def select(table, tiers):
        return dk.block_select(q, inp.cache.pooled_cache, inp.weights, inp.seq_lens, table,
                               tiers=tiers, **kw)
    wide = select(inp.block_table, ())
    for tiers in (None, (256,), (2048,)):
        assert torch.equal(select(inp.block_table, tiers), wide), tiers
    assert torch.equal(select(inp.block_table[:, :pages_needed + 1].contiguous(), ()), wide)


def test_append_kernel_matches_reference_on_gpu():
    a = make_paged_inputs([5000, 130, 64, 9000], heads=16, device="cuda", backend="triton")
    b = make_paged_inputs([5000, 130, 64, 9000], heads=16, device="cuda", backend="torch")
    assert torch.equal(a.cache.kv_cache, b.cache.kv_cache)
    pa, pb = a.cache.pooled_cache, b.cache.pooled_cache
    sa, sb = pa[:, D:].view(torch.float32), pb[:, D:].view(torch.float32)
    torch.testing.assert_close(sa, sb, rtol=1e-6, atol=0, equal_nan=True)  # NaN: never pooled
    ok = ~torch.isnan(sb[:, 0])
    fa = pa[:, :D].contiguous().view(torch.float8_e4m3fn).float() * sa
    fb = pb[:, :D].contiguous().view(torch.float8_e4m3fn).float() * sb
    torch.testing.assert_close(fa[ok], fb[ok], rtol=2 ** -3, atol=float(sb[ok].max()) * 2 ** -9)
    # raw quantization (bf16 keys) through the Triton path equals quantize_fp8
    k = torch.randn(300, D, device="cuda", dtype=torch.bfloat16)
    slots = torch.arange(300, device="cuda")
    outs = []
    for backend in ("triton", "torch"):
        cache = hisa.PagedIndexerCache(5, head_dim=D, block_size=64, device="cuda")
        cache.append(k, slots, slots, backend=backend)
        outs.append(cache)
    assert torch.equal(outs[0].kv_cache, outs[1].kv_cache)


@pytest.mark.parametrize("op", ["flat", "hisa", "auto"])
def test_cuda_graph_replay_with_new_lengths_equals_eager(op):
    batch, next_n = 6, 2
    lens_a = [3000, 17000, 0, 9000, 40000, 128]
    lens_b = [40000, 5, 20000, 8200, 1, 33333]
    a = make_paged_inputs(lens_a, next_n=next_n, heads=H, device="cuda", backend="triton",
                          seed=1, extra_pages=700, extra_columns=10)
    b = make_paged_inputs(lens_b, next_n=next_n, heads=H, device="cuda", backend="triton",
                          seed=2, extra_pages=700, extra_columns=10)
    # static buffers large enough for both inputs, captured once
    P = max(a.cache.num_pages, b.cache.num_pages)
    q, w = a.q.clone(), a.weights.clone()
    seq, bt = a.seq_lens.clone(), torch.full((batch, 700), -1, dtype=torch.int32, device="cuda")
    bt[:, :a.block_table.shape[1]] = a.block_table
    kv = torch.zeros(P, a.cache.kv_cache.shape[1], dtype=torch.uint8, device="cuda")
    pooled = torch.zeros(P, a.cache.pooled_cache.shape[1], dtype=torch.uint8, device="cuda")
    kv[:a.cache.num_pages].copy_(a.cache.kv_cache)
    pooled[:a.cache.num_pages].copy_(a.cache.pooled_cache)
    out = torch.full((batch * next_n, TOPK), SENTINEL, dtype=torch.int32, device="cuda")

    def run():
        if op == "flat":
            return hisa.dsa_index_paged(q, kv, w, seq, bt, topk=TOPK, out=out, backend="triton")
        if op == "hisa":
            return hisa.hisa_index_paged(q, kv, pooled, w, seq, bt, topk=TOPK, out=out,
                                         backend="triton")
        return hisa_decode(q, kv, pooled, w, seq, bt, topk=TOPK, block_size=128,
                           block_topk=64, out=out, route_short_to_flat=True,
                           hisa_min_keys=10000)[0]

    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    for src in (b, a):
        q.copy_(src.q), w.copy_(src.weights), seq.copy_(src.seq_lens)
        bt.fill_(-1)
        bt[:, :src.block_table.shape[1]] = src.block_table
        n = src.cache.num_pages
        kv[:n].copy_(src.cache.kv_cache[:n]), pooled[:n].copy_(src.cache.pooled_cache[:n])
        out.fill_(SENTINEL)
        g.replay()
        torch.cuda.synchronize()
        replay = out.clone()
        out.fill_(SENTINEL)
        eager = run().clone()
        assert torch.equal(replay, eager)
        lens = src.row_lengths()
        check_index_format(replay, torch.zeros_like(lens), lens, TOPK)


@pytest.mark.parametrize("variant", ["split", "fused", "routed", "super", "next_n2"])
def test_pdl_chain_equals_plain_launches(variant):
    """The PDL launches (hisa.ops.pdl) give bit-identical indices and scores to plain launches,
    eager and in CUDA-graph replays run back to back (a read racing the kernel before it would
    show up as a replay that differs)."""
    from hisa.ops.pdl import pdl_supported
    if not pdl_supported(torch.device("cuda")):
        pytest.skip("PDL needs sm_90 or later")
    next_n = 2 if variant == "next_n2" else 1
    lens = [70000, 3000, 0, 130000, 9000, 40000, 1, 20000]
    inp = make_paged_inputs(lens, next_n=next_n, heads=H, device="cuda", backend="triton",
                            super_size=8 if variant == "super" else None, seed=11)
    kw = dict(topk=TOPK, block_size=128, block_topk=64, need_scores=True)
    if variant == "fused":
        kw["fuse_block_select"] = True
    if variant == "routed":
        kw.update(route_short_to_flat=True, hisa_min_keys=10000)
    if variant == "super":
        kw.update(super_cache=inp.cache.super_cache, super_size=8, super_topk=16)
    args = (inp.q, inp.cache.kv_cache, inp.cache.pooled_cache, inp.weights, inp.seq_lens,
            inp.block_table)
    ref_idx, ref_val = hisa_decode(*args, pdl=False, **kw)
    rows = len(lens) * next_n
    out = torch.full((rows, TOPK), SENTINEL, dtype=torch.int32, device="cuda")
    idx, val = hisa_decode(*args, pdl=True, out=out, **kw)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(val.view(torch.int32), ref_val.view(torch.int32))
    lens_t = inp.row_lengths()
    check_index_format(idx, torch.zeros_like(lens_t), lens_t, TOPK)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gi, gv = hisa_decode(*args, pdl=True, out=out, **kw)
    for _ in range(3):
        out.fill_(SENTINEL)
        for _ in range(20):                  # back to back: each replay's chain follows the last
            g.replay()
        torch.cuda.synchronize()
        assert torch.equal(gi, ref_idx)
        assert torch.equal(gv.view(torch.int32), ref_val.view(torch.int32))
    # Every replay checked, not only the last of a run: the comparison is queued after each
    # replay on the same stream (no host sync between them), the mismatches summed on the GPU.
    wrong = torch.zeros((), dtype=torch.int64, device="cuda")
    for _ in range(20):
        out.fill_(SENTINEL)
        g.replay()
        wrong += (gi != ref_idx).sum() + (gv.view(torch.int32) != ref_val.view(torch.int32)).sum()
    assert int(wrong) == 0
