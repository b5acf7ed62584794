import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import hisa
from hisa.ops.dsa import naive as dsa_naive
from hisa.ops.dsa.naive import is_outside, mark_outside
from hisa.ops.indexer import naive as hn
from hisa.testing.compare import assert_same_selection, check_index_format
from hisa.testing.inputs import make_indexer_inputs

from brute import as_rows, brute_hisa


def run_hisa(inp, **kw):
    return hisa.hisa_index(*inp.args(), k_scale=inp.k_scale, backend="torch", **kw)


def logits_of(inp):
    return dsa_naive.naive_dsa_logits(*inp.args(), k_scale=inp.k_scale)


def test_pool_blocks_means_over_true_count():
    k = torch.randn(10, 8)
    pooled = hn.naive_pool_blocks(k, None, 4)
    assert pooled.shape == (3, 8)
    torch.testing.assert_close(pooled[0], k[0:4].mean(0))
    torch.testing.assert_close(pooled[2], k[8:10].mean(0))  # tail block: 2 tokens, not 4


def test_pool_blocks_dequantizes_fp8():
    inp = make_indexer_inputs([200], heads=1, dtype=torch.float8_e4m3fn)
    pooled = hn.naive_pool_blocks(inp.k, inp.k_scale, 64)
    deq = hisa.dequantize_fp8(inp.k, inp.k_scale)
    torch.testing.assert_close(pooled[3], deq[192:200].mean(0))


def test_block_scores_mask_and_force():
    q, w = torch.randn(3, 2, 8), torch.rand(3, 2)
    pooled = torch.randn(6, 8)
    ks = torch.tensor([0, 5, 9], dtype=torch.int32)
    ke = torch.tensor([17, 14, 9], dtype=torch.int32)     # last row: empty window
    j = hn.naive_block_scores(q, pooled, w, ks, ke, block_size=4)
    # row 0: eligible blocks [0, 5): 0 and 4 forced; row 1: [1, 4): 1 and 3 forced
    out = is_outside(j)
    assert j[0, 0] == float("inf") and j[0, 4] == float("inf") and out[0, 5]
    assert torch.isfinite(j[0, 1:4]).all()
    assert out[1, 0] and j[1, 1] == float("inf") and j[1, 3] == float("inf")
    assert torch.isfinite(j[1, 2]) and bool(out[1, 4:].all())
    assert bool(out[2].all())


def test_select_blocks_ascending_unique_padded():
    inf = float("inf")
    j = torch.tensor([[1.0, inf, 3.0, -inf, 2.0, 0.5], [0.0] * 6])
    mark_outside(j, torch.tensor([[True, False, False, False, False, True], [True] * 6]))
    # row 0: eligible [1, 5), blocks 1 and 4 forced, then 3.0 before -inf (selectable)
    ids = hn.naive_select_blocks(j, 3)
    assert ids.dtype == torch.int32
    assert ids[0].tolist() == [1, 2, 4] and ids[1].tolist() == [-1, -1, -1]
    ids = hn.naive_select_blocks(j, 8)
    assert ids[0].tolist() == [1, 2, 3, 4, -1, -1, -1, -1]


def test_forced_blocks_survive_infinite_scores():
    # Real +inf block scores (an infinite weight, say) tie with the forced +inf: the first
    # and last eligible block are still kept, the +inf middle blocks take the rest by position.
    inf = float("inf")
    j = torch.tensor([[0.0, inf, inf, inf, -1.0], [float("nan"), inf, 1.0, inf, float("nan")]])
    assert hn.naive_select_blocks(j, 2).tolist() == [[0, 4], [0, 4]]
    assert hn.naive_select_blocks(j, 3).tolist() == [[0, 1, 4], [0, 1, 4]]


def test_token_scores_mask_window_and_padding():
    inp = make_indexer_inputs([10], heads=2, head_dim=16, dtype=torch.float32)
    blocks = torch.tensor([[0, 2, -1]] * 10, dtype=torch.int32)
    sc, pos = hn.naive_token_scores(*inp.args(), blocks, block_size=4)
    assert pos[9].tolist() == [0, 1, 2, 3, 8, 9, -1, -1, -1, -1, -1, -1]
    assert bool(is_outside(sc[3, 4:]).all())                       # row 3 sees keys 0..3
    torch.testing.assert_close(sc[9, 5], logits_of(inp)[9, 9])


def test_offsets_keep_padding():
    pos = torch.tensor([[12, 10, -1]])
    assert hn.naive_to_offsets(pos, torch.tensor([10], dtype=torch.int32)).tolist() == [[2, 0, -1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_equals_dsa_when_every_block_fits(dtype):
    # Contexts up to m*B: every eligible block is kept, so HISA must select DSA's set.
    inp = make_indexer_inputs([300, 77, 513], heads=4, dtype=dtype, seed=5)
    dsa = hisa.dsa_index(*inp.args(), k_scale=inp.k_scale, topk=48, backend="torch")
    his = run_hisa(inp, topk=48, block_size=16, block_topk=40)     # 40 * 16 = 640 >= 513
    check_index_format(his, inp.ks, inp.ke, 48)
    assert_same_selection(his, dsa, inp.ks, logits_of(inp))


def test_equals_dsa_exactly_with_exact_arithmetic():
    # Small-integer inputs make every score exact in fp32 and create many ties: the two
    # references then agree entry for entry, which pins the shared tie-breaking rule.
    g = torch.Generator().manual_seed(0)
    T, H, D = 200, 3, 16
    q = torch.randint(-2, 3, (T, H, D), generator=g).float()
    k = torch.randint(-2, 3, (T, D), generator=g).float()
    w = torch.randint(1, 4, (T, H), generator=g).float()
    ks, ke = hisa.windows_from_cu_seqlens(torch.tensor([0, 120, 200], dtype=torch.int32))
    a = hisa.dsa_index(q, k, w, ks, ke, topk=24, backend="torch")
    b = hisa.hisa_index(q, k, w, ks, ke, topk=24, block_size=8, block_topk=16, backend="torch")
    assert torch.equal(a, b)


@settings(max_examples=20, deadline=None)
@given(lens=st.lists(st.integers(0, 90), min_size=1, max_size=3),
       block_size=st.sampled_from([4, 8, 16]), block_topk=st.integers(2, 6),
       topk=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_matches_brute_force_with_pruning(lens, block_size, block_topk, topk, seed):
    if block_size * block_topk < topk:
        topk = block_size * block_topk
    inp = make_indexer_inputs(lens, heads=2, head_dim=16, dtype=torch.float32, seed=seed,
                              clustered=True)
    idx = run_hisa(inp, topk=topk, block_size=block_size, block_topk=block_topk)
    expect = brute_hisa(*inp.args(), None, topk, block_size, block_topk)
    got = as_rows(idx)
    # Valid count = min(topk, tokens of the kept blocks inside the window).
    for t, (g_row, e_row) in enumerate(zip(got, expect)):
        assert len(g_row) == len(e_row)
        if sorted(g_row) != sorted(e_row):
            ref = torch.full((1, topk), -1, dtype=torch.int32)
            ref[0, :len(e_row)] = torch.tensor(e_row, dtype=torch.int32)
            assert_same_selection(idx[t:t + 1], ref, inp.ks[t:t + 1], logits_of(inp)[t:t + 1])
    srt = torch.sort(idx, 1).values
    assert not bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any())


def test_forced_first_and_own_block_always_selected():
    # Make the first and the query's own block score terribly; with topk = m*B every
    # candidate is returned, so their in-window tokens must still be there.
    inp = make_indexer_inputs([256], heads=2, head_dim=16, dtype=torch.float32, seed=6)
    w = inp.weights.abs()
    k = inp.k.clone()
    k[:8] = -10 * inp.q[:, :, :].mean((0, 1))            # first block anti-aligned
    k[248:] = -10 * inp.q[:, :, :].mean((0, 1))          # the last query's own block too
    idx = hisa.hisa_index(inp.q, k, w, inp.ks, inp.ke, topk=32, block_size=8, block_topk=4,
                          backend="torch")
    last = set(idx[255].tolist())
    assert set(range(8)) <= last and set(range(248, 256)) <= last


def test_contaminated_blocks_do_not_change_selection():
    # Blocks of 16 straddle the boundary at 40 between two packed sequences, and each query's
    # own block holds future keys. Changing keys a query cannot see (the other sequence, the
    # future) must not change its selection.
    inp = make_indexer_inputs([40, 200], heads=2, head_dim=16, dtype=torch.float32, seed=7,
                              clustered=True)
    kw = dict(topk=8, block_size=16, block_topk=3)
    base = run_hisa(inp, **kw)
    k2 = inp.k.clone()
    k2[32:40] = torch.randn(8, 16) * 50                    # sequence 0's part of block 2
    alt = hisa.hisa_index(inp.q, k2, inp.weights, inp.ks, inp.ke, backend="torch", **kw)
    assert torch.equal(base[40:], alt[40:])
    k3 = inp.k.clone()
    t = 100                                                # query at buffer position 100
    k3[t + 1:112] = torch.randn(112 - t - 1, 16) * 50      # its own block's future tokens
    alt = hisa.hisa_index(inp.q, k3, inp.weights, inp.ks, inp.ke, backend="torch", **kw)
    assert torch.equal(base[t], alt[t])


def test_short_windows_and_large_topk():
    inp = make_indexer_inputs([3, 1, 20], heads=2, head_dim=16, dtype=torch.float32)
    idx = run_hisa(inp, topk=64, block_size=16, block_topk=4)
    check_index_format(idx, inp.ks, inp.ke, 64, exact_count=False)


def test_tiling_does_not_change_result(monkeypatch):
    inp = make_indexer_inputs([400], heads=2, head_dim=16, dtype=torch.float32, seed=8,
                              clustered=True)
    kw = dict(topk=16, block_size=8, block_topk=6)
    full = run_hisa(inp, **kw)
    monkeypatch.setattr(hn, "NAIVE_TILE_BYTES", 4 * 6 * 8 * 16 * 3)   # 3 queries per tile
    assert torch.equal(full, run_hisa(inp, **kw))


def test_scores_align_with_indices():
    inp = make_indexer_inputs([150], heads=2, head_dim=16, dtype=torch.float32, seed=9)
    idx, sc = run_hisa(inp, topk=10, block_size=8, block_topk=3, return_scores=True)
    full = logits_of(inp)
    pos = (idx.long() + inp.ks.long()[:, None]).clamp_min(0)
    exp = torch.gather(full, 1, pos).masked_fill(idx < 0, float("-inf"))
    torch.testing.assert_close(sc, exp)


def test_config_object():
    cfg = hisa.HisaConfig(block_size=64, block_topk=32)
    assert cfg.candidates == 2048 and cfg.kwargs()["topk"] == 2048
    with pytest.raises(ValueError, match="block_topk \\* block_size"):
        hisa.HisaConfig(block_size=16, block_topk=8)


def test_window_of_at_most_topk_keys_returns_all_even_across_m_plus_one_blocks():
    # B = 8, m = 4, k = 32: a 32-key window starting mid-block spans 5 blocks > m.
    inp = make_indexer_inputs([60], heads=2, head_dim=16, dtype=torch.float32, seed=10)
    ks = torch.full((60,), 0, dtype=torch.int32)
    ks[40:] = torch.arange(40, 60, dtype=torch.int32) - 31   # windows of 32 keys, unaligned
    idx = hisa.hisa_index(inp.q, inp.k, inp.weights, ks, inp.ke, topk=32, block_size=8,
                          block_topk=4, backend="torch")
    check_index_format(idx, ks, inp.ke, 32, exact_count=False)
    assert bool(((idx[40:] >= 0).sum(1) == 32).all())


def test_empty_key_buffer():
    q, w = torch.randn(3, 2, 16), torch.randn(3, 2)
    k = torch.empty(0, 16)
    z = torch.zeros(3, dtype=torch.int32)
    for op in (hisa.dsa_index, hisa.hisa_index):
        idx = op(q, k, w, z, z, topk=4, backend="torch")
        assert bool((idx == -1).all())
