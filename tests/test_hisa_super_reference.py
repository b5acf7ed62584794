"""The three-level references (super-blocks -> blocks -> tokens) on CPU: stage semantics,
exact equality with two levels when every super-block is kept, brute-force agreement with
pruning at both levels, contamination, short windows and validation."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import hisa
from hisa.ops.dsa import naive as dsa_naive
from hisa.ops.indexer import naive as hn
from hisa.ops.indexer import naive_super as hs
from hisa.testing.compare import assert_same_selection, check_index_format
from hisa.testing.inputs import make_indexer_inputs

from brute import as_rows, brute_hisa_super


def run(inp, **kw):
    return hisa.hisa_index(*inp.args(), k_scale=inp.k_scale, backend="torch", **kw)


def logits_of(inp):
    return dsa_naive.naive_dsa_logits(*inp.args(), k_scale=inp.k_scale)


def test_pool_supers_is_the_key_mean_with_true_counts():
    k = torch.randn(45, 8, dtype=torch.float64).float()
    pooled = hn.naive_pool_blocks(k, None, 4)                   # 12 blocks, the last holds 1
    sup = hs.naive_pool_supers(pooled, 45, block_size=4, super_size=5)
    assert sup.shape == (3, 8)
    torch.testing.assert_close(sup, hn.naive_pool_blocks(k, None, 20))  # tail: 5 tokens
    # FP8 block reps with scales: the mean of the dequantized reps, weighted by counts.
    v, s = hisa.quantize_fp8(pooled, group_size=8)
    got = hs.naive_pool_supers(v, 45, block_size=4, super_size=5, pooled_scale=s)
    deq = v.float() * s[:, None]
    torch.testing.assert_close(got[2], (deq[10] * 4 + deq[11] * 1) / 5)


def test_super_scores_mask_and_force():
    q, w = torch.randn(3, 2, 8), torch.rand(3, 2)
    sup = torch.randn(4, 8)
    ks = torch.tensor([0, 9, 30], dtype=torch.int32)
    ke = torch.tensor([31, 25, 30], dtype=torch.int32)     # B = 2, Bs = 4: spans of 8 tokens
    j = hs.naive_super_scores(q, sup, w, ks, ke, block_size=2, super_size=4)
    outside = dsa_naive.is_outside(j)
    assert j[0, 0] == float("inf") and j[0, 3] == float("inf") and torch.isfinite(j[0, 1:3]).all()
    assert bool(outside[1, 0]) and j[1, 1] == float("inf") and j[1, 3] == float("inf")
    assert torch.isfinite(j[1, 2])
    assert bool(outside[2].all())                            # empty window
    assert outside.sum() == 1 + 4                            # nothing else is marked outside
    assert hs.naive_select_supers(j, 2).tolist() == [[0, 3], [1, 3], [-1, -1]]


def test_candidate_blocks_score_as_in_two_levels():
    inp = make_indexer_inputs([90], heads=2, head_dim=16, dtype=torch.float32, seed=1,
                              clustered=True)
    pooled = hn.naive_pool_blocks(inp.k, None, 4)                        # 23 blocks
    sup = torch.tensor([[0, 2, 5, -1]] * 90, dtype=torch.int32)          # Bs = 4
    sc, blk = hs.naive_candidate_block_scores(inp.q, pooled, inp.weights, inp.ks, inp.ke, sup,
                                              block_size=4, super_size=4)
    assert blk[0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 20, 21, 22, 23, -1, -1, -1, -1]
    two = hn.naive_block_scores(inp.q, pooled, inp.weights, inp.ks, inp.ke, block_size=4)
    inside = (blk >= 0) & (blk < 23)
    gathered = torch.gather(two, 1, blk.clamp(0, 22))
    assert torch.equal(sc[inside].view(torch.int32), gathered[inside].view(torch.int32))
    assert bool(dsa_naive.is_outside(sc[~inside]).all())
    assert sc[89, 8 + 2] == float("inf")        # query 89 (key 89) sits in block 22, its own
    ids = hs.naive_select_candidate_blocks(sc, blk, 3)
    assert ids[89].tolist()[0] == 0 and 22 in ids[89].tolist()
    valid = ids >= 0
    assert bool((valid[:, 1:] <= valid[:, :-1]).all())                  # -1 only after ids
    assert bool((ids[:, 1:] > ids[:, :-1])[valid[:, 1:]].all())         # ascending, unique


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_equals_two_levels_entry_for_entry_when_every_super_block_fits(dtype):
    # B = 8, m = 6: contexts up to 500 keys prune blocks (63 > 6); Bs = 16, ms = 4: at most
    # 4 super-blocks of 128 keys per query (<= 512 keys), so every one is kept.
    inp = make_indexer_inputs([500, 77, 300], heads=4, dtype=dtype, seed=5, clustered=True)
    kw = dict(topk=24, block_size=8, block_topk=6)
    two = run(inp, **kw)
    three = run(inp, super_size=16, super_topk=4, **kw)
    first, end = hn.eligible_blocks(inp.ks, inp.ke, 8)
    assert int((end - first).max()) > 6, "the test needs block-level pruning"
    assert torch.equal(two, three)
    _, v2 = run(inp, return_scores=True, **kw)
    _, v3 = run(inp, super_size=16, super_topk=4, return_scores=True, **kw)
    assert torch.equal(v2, v3)


def test_super_level_prunes_beyond_super_topk_super_blocks():
    inp = make_indexer_inputs([2000], heads=4, head_dim=16, dtype=torch.float32, seed=3,
                              clustered=True)
    kw = dict(topk=64, block_size=8, block_topk=8)
    three = run(inp, super_size=4, super_topk=3, **kw)       # 3 super-blocks of 32 keys
    two = run(inp, **kw)
    assert not torch.equal(two, three)
    last = three[1999][three[1999] >= 0]
    supers = set((last // 32).tolist())
    assert len(supers) <= 3 and {0, 62} <= supers                       # two of them forced


@settings(max_examples=25, deadline=None)
@given(lens=st.lists(st.integers(0, 160), min_size=1, max_size=3),
       block_size=st.sampled_from([2, 4, 8]), block_topk=st.integers(2, 6),
       super_size=st.integers(2, 4), super_topk=st.integers(2, 4), topk=st.integers(1, 30),
       seed=st.integers(0, 10_000))
def test_matches_brute_force_with_pruning_at_both_levels(lens, block_size, block_topk,
                                                         super_size, super_topk, topk, seed):
    block_topk = min(block_topk, super_size * super_topk)
    topk = min(topk, block_size * block_topk)
    inp = make_indexer_inputs(lens, heads=2, head_dim=16, dtype=torch.float32, seed=seed,
                              clustered=True)
    kw = dict(topk=topk, block_size=block_size, block_topk=block_topk, super_size=super_size,
              super_topk=super_topk)
    idx = run(inp, **kw)
    check_index_format(idx, inp.ks, inp.ke, topk, exact_count=False)
    expect = brute_hisa_super(*inp.args(), None, topk, block_size, block_topk, super_size,
                              super_topk)
    got = as_rows(idx)
    logits = logits_of(inp)
    for t, (g_row, e_row) in enumerate(zip(got, expect)):
        assert len(g_row) == len(e_row), t
        if sorted(g_row) != sorted(e_row):
            ref = torch.full((1, topk), -1, dtype=torch.int32)
            ref[0, :len(e_row)] = torch.tensor(e_row, dtype=torch.int32)
            assert_same_selection(idx[t:t + 1], ref, inp.ks[t:t + 1], logits[t:t + 1])
    # Rows with at most super_topk eligible super-blocks equal the two-level rows exactly.
    two = run(inp, topk=topk, block_size=block_size, block_topk=block_topk)
    fs, es = hs.eligible_supers(inp.ks, inp.ke, block_size, super_size)
    fits = (es - fs) <= super_topk
    assert torch.equal(idx[fits], two[fits])


def test_contaminated_super_blocks_do_not_change_selection():
    # Super-blocks of 4 * 8 = 32 keys straddle the boundary at 50 between two packed sequences,
    # and each query's own super-block holds future keys. Changing keys a query cannot see
    # must not change its selection, at any level.
    inp = make_indexer_inputs([50, 400], heads=2, head_dim=16, dtype=torch.float32, seed=7,
                              clustered=True)
    kw = dict(topk=8, block_size=8, block_topk=3, super_size=4, super_topk=3)
    base = run(inp, **kw)
    k2 = inp.k.clone()
    k2[32:50] = torch.randn(18, 16) * 50                   # sequence 0's part of super-block 1
    alt = hisa.hisa_index(inp.q, k2, inp.weights, inp.ks, inp.ke, backend="torch", **kw)
    assert torch.equal(base[50:], alt[50:])
    k3 = inp.k.clone()
    k3[50:] = torch.randn(400, 16) * 50                    # sequence 1, super-block 1 included
    alt = hisa.hisa_index(inp.q, k3, inp.weights, inp.ks, inp.ke, backend="torch", **kw)
    assert torch.equal(base[:50], alt[:50])
    t = 200                                                # query at buffer position 200
    k4 = inp.k.clone()
    k4[t + 1:224] = torch.randn(224 - t - 1, 16) * 50      # its own super-block's future keys
    alt = hisa.hisa_index(inp.q, k4, inp.weights, inp.ks, inp.ke, backend="torch", **kw)
    assert torch.equal(base[t], alt[t])
    # The edit does move the selection of queries that see those keys (the test can fail).
    assert not torch.equal(base[224:], alt[224:])


def test_forced_first_and_own_super_blocks_always_selected():
    inp = make_indexer_inputs([512], heads=2, head_dim=16, dtype=torch.float32, seed=6)
    w = inp.weights.abs()
    k = inp.k.clone()
    anti = -10 * inp.q.mean((0, 1))
    k[:32], k[480:] = anti, anti                 # first and the last query's own super-block
    kw = dict(topk=24, block_size=8, block_topk=3, super_size=4, super_topk=2)
    idx = hisa.hisa_index(inp.q, k, w, inp.ks, inp.ke, backend="torch", **kw)
    got = set(idx[511].tolist())
    assert set(range(8)) <= got and set(range(504, 512)) <= got   # forced blocks inside them


def test_window_of_at_most_topk_keys_returns_all_across_super_topk_plus_one_supers():
    # B = 4, m = 8, Bs = 2, ms = 4, k = 32: the window [7, 33) holds 26 keys in 8 blocks (all
    # kept by the block stage) but 5 super-blocks of 8 keys (> ms): the super stage alone would
    # drop one; the contract returns the whole window.
    inp = make_indexer_inputs([40], heads=2, head_dim=16, dtype=torch.float32, seed=10,
                              clustered=True)
    ks = torch.full((40,), 7, dtype=torch.int32)
    ke = torch.arange(1, 41, dtype=torch.int32).clamp_min(8)
    kw = dict(topk=32, block_size=4, block_topk=8, super_size=2, super_topk=4)
    raw, _ = hs.naive_hisa_index_super(inp.q, inp.k, inp.weights, ks, ke, **kw)
    assert int((raw[32] >= 0).sum()) < 26, "the test needs a row the super stage truncates"
    idx = hisa.hisa_index(inp.q, inp.k, inp.weights, ks, ke, backend="torch", **kw)
    check_index_format(idx, ks, ke, 32, exact_count=False)
    assert int((idx[32] >= 0).sum()) == 26


def test_tiling_and_scores(monkeypatch):
    inp = make_indexer_inputs([600], heads=2, head_dim=16, dtype=torch.float32, seed=8,
                              clustered=True)
    kw = dict(topk=16, block_size=8, block_topk=6, super_size=4, super_topk=3)
    idx, sc = run(inp, return_scores=True, **kw)
    full = logits_of(inp)
    pos = (idx.long() + inp.ks.long()[:, None]).clamp_min(0)
    torch.testing.assert_close(sc, torch.gather(full, 1, pos).masked_fill(idx < 0,
                                                                          float("-inf")))
    monkeypatch.setattr(hs, "NAIVE_TILE_BYTES", 3 * 4 * (6 * 8 * 16 + 75))  # 3 queries a tile
    assert torch.equal(idx, run(inp, **kw))


def test_config_carries_the_super_level():
    cfg = hisa.HisaConfig(super_size=16, super_topk=64)
    assert cfg.levels == 3 and cfg.kwargs()["super_topk"] == 64
    assert "super_size" not in hisa.HisaConfig().kwargs() and hisa.HisaConfig().levels == 2
    with pytest.raises(ValueError, match="super_topk \\* super_size"):
        hisa.HisaConfig(block_topk=64, super_size=4, super_topk=8)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(super_size=16), ValueError, "super_size/super_topk"),
    (dict(super_topk=16), ValueError, "super_size/super_topk"),
    (dict(super_size=1, super_topk=64), ValueError, "super_size"),
    (dict(super_size=16, super_topk=1), ValueError, "super_topk"),
    (dict(super_size=2, super_topk=8), ValueError, "super_topk \\* super_size"),
    (dict(super_size=16.0, super_topk=8), TypeError, "super_size"),
    (dict(super_size=16, super_topk=True), TypeError, "super_topk"),
])
def test_validation_names_the_argument(kw, exc, match):
    inp = make_indexer_inputs([40], heads=2, head_dim=16, dtype=torch.float32)
    with pytest.raises(exc, match=match):
        run(inp, topk=16, block_size=4, block_topk=32, **kw)


def test_routing_rule_follows_the_cost_model():
    from hisa.config import SUPER_LEVEL_OVERHEAD_PAIRS
    cfg = hisa.HisaConfig(super_size=4, super_topk=256)
    # Up to ms * Bs * B = 128K keys every super-block is kept: three levels only add cost.
    assert not cfg.super_level_pays(128 * 1024)
    assert cfg.for_context(128 * 1024) == hisa.HisaConfig()
    one_m = 1 << 20
    assert cfg.pairs_per_query(one_m) == 2048 + 1024 + 8192
    assert hisa.HisaConfig().pairs_per_query(one_m) == 8192 + 8192
    assert cfg.super_level_pays(one_m) and cfg.for_context(one_m) is cfg
    # The crossover: NS + ms * Bs + overhead < NB, NB = L / B.
    nb = next(n for n in range(1, 1 << 16) if -(-n // 4) + min(n, 1024)
              + SUPER_LEVEL_OVERHEAD_PAIRS < n)
    assert not cfg.super_level_pays((nb - 1) * 128) and cfg.super_level_pays(nb * 128)
    assert not hisa.HisaConfig().super_level_pays(one_m)


@pytest.mark.parametrize("setting,pays_from", [((2, 128), 1024), ((16, 64), 512)])
def test_routing_rule_matches_the_h200_crossovers(setting, pays_from):
    """The rule's decisions at the contexts the H200 sweep measured (config.py cites the rows):
    2 x 128 paid only at 1M keys, 16 x 64 from 512K (decode); neither at 256K."""
    cfg = hisa.HisaConfig(super_size=setting[0], super_topk=setting[1])
    for k in (256, 512, 1024):
        assert cfg.super_level_pays(k * 1024) == (k >= pays_from), (setting, k)


def test_empty_key_buffer_and_empty_windows():
    q, w = torch.randn(3, 2, 16), torch.randn(3, 2)
    z = torch.zeros(3, dtype=torch.int32)
    kw = dict(topk=4, block_size=4, block_topk=2, super_size=2, super_topk=2, backend="torch")
    assert bool((hisa.hisa_index(q, torch.empty(0, 16), w, z, z, **kw) == -1).all())
    k = torch.randn(40, 16)
    ks = torch.tensor([0, 10, 39], dtype=torch.int32)
    ke = torch.tensor([0, 10, 40], dtype=torch.int32)                  # two empty, one 1-key
    idx = hisa.hisa_index(q, k, w, ks, ke, **kw)
    assert idx.tolist() == [[-1] * 4, [-1] * 4, [0, -1, -1, -1]]
