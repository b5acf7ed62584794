"""The NaN / Inf selection rule in the torch references (README, "NaN and Inf"):

inside the window every key is selectable, ranked +inf > finite > -inf > NaN with ties to the
lower position, keys outside the window never are, and the head sum propagates NaN. Inputs are
integer-valued (hisa.testing.inputs.make_exact_indexer_inputs), so the float64 brute-force
oracle computes the very scores the references do and the sets must be identical.
"""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import hisa
from hisa.ops.dsa.naive import (OUTSIDE_BITS, is_outside, mark_outside, naive_dsa_logits,
                                naive_scores, naive_topk, selection_rank)
from hisa.testing.compare import check_index_format
from hisa.testing.inputs import make_exact_indexer_inputs

from brute import as_rows, brute_dsa, brute_hisa, brute_hisa_super
from fuzz_cases import check_topk_reference

NAN, INF = float("nan"), float("inf")


def inject(inp, where: str, value: float, seed: int = 0):
    """Put ``value`` into a few entries of q, k, k_scale or weights (in place)."""
    g = torch.Generator().manual_seed(seed)
    T, H, D = inp.q.shape
    S = inp.k.shape[0]

    def pick(n, size):
        return torch.randint(0, n, (size,), generator=g)

    if where == "q":
        q = inp.q.float()
        q[pick(T, 3), pick(H, 3), pick(D, 3)] = value
        inp.q = q.to(inp.q.dtype)
    elif where == "k":
        k = inp.k.float()
        k[pick(S, 4), pick(D, 4)] = value
        inp.k = k.to(inp.k.dtype)
    elif where == "k_scale":
        inp.k_scale[pick(S, 4)] = value
    elif where == "weights":
        inp.weights[pick(T, 4), pick(H, 4)] = value
    return inp


CASES = [("q", NAN, torch.float32), ("q", INF, torch.float32), ("q", NAN, torch.float8_e4m3fn),
         ("k", NAN, torch.float32), ("k", INF, torch.float32), ("k", -INF, torch.float32),
         ("k", NAN, torch.float8_e4m3fn), ("k_scale", NAN, torch.float8_e4m3fn),
         ("k_scale", INF, torch.float8_e4m3fn), ("k_scale", 0.0, torch.float8_e4m3fn),
         ("weights", NAN, torch.float32), ("weights", INF, torch.float32),
         ("weights", -INF, torch.float8_e4m3fn)]
IDS = [f"{w}={v}-{str(d)[6:]}" for w, v, d in CASES]


def test_selection_rank_orders_like_the_rule():
    x = torch.tensor([INF, 3.0, 0.0, -0.0, -2.5, -INF, NAN, -NAN, 1e-40, -3.4e38])
    r = selection_rank(x).tolist()
    assert r[0] > r[1] > r[8] > r[2] == r[3] > r[4] > r[9] > r[5] > r[6] == r[7] == 1
    out = x.clone()
    mark_outside(out, torch.arange(10) == 0)
    assert selection_rank(out)[0] == 0 and bool(is_outside(out)[0])
    assert out.view(torch.int32)[0] == OUTSIDE_BITS and not bool(is_outside(x).any())


def test_naive_topk_rule_ties_and_count():
    row = torch.tensor([[NAN, -INF, 2.0, NAN, 2.0, INF, -1.0, 0.0]])
    mark_outside(row, torch.tensor([[False] * 7 + [True]]))         # last column outside
    cols, vals = naive_topk(row, 10)
    assert cols[0].tolist() == [5, 2, 4, 6, 1, 0, 3, -1, -1, -1]     # 7 selectable, then -1
    assert torch.isnan(vals[0, 5:7]).all() and torch.isneginf(vals[0, 7:]).all()
    cols, _ = naive_topk(row, 4)
    assert cols[0].tolist() == [5, 2, 4, 6]
    forced = torch.zeros_like(row, dtype=torch.bool)
    forced[0, [0, 7]] = True                                          # outside: never forced in
    assert naive_topk(row, 2, forced=forced)[0][0].tolist() == [0, 5]


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(rows=st.lists(st.lists(st.sampled_from([NAN, INF, -INF, 0.0, -0.0, 1.0, -1.0, 2.5, None]),
                              min_size=0, max_size=12), min_size=1, max_size=4),
       topk=st.integers(1, 14))
def test_naive_topk_fuzz_against_a_python_sort(rows, topk):
    """None: a position outside the window."""
    width = max(len(r) for r in rows)
    x = torch.zeros(len(rows), width)
    outside = torch.ones(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        for j, v in enumerate(r):
            if v is not None:
                x[i, j], outside[i, j] = v, False
    check_topk_reference(mark_outside(x, outside), topk)


def test_head_sum_propagates_nan_and_inf():
    q = torch.tensor([[[1.0, 0.0], [NAN, 1.0]], [[INF, 0.0], [-1.0, 0.0]]])   # [2, 2, 2]
    k = torch.tensor([[1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    w = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    s = naive_scores(q, k, w)
    assert torch.isnan(s[0]).all()                    # ReLU(NaN) = NaN in every key's sum
    # inf * 0 = NaN; ReLU(-inf) = 0
    assert s[1, 0] == INF and torch.isnan(s[1, 1]) and s[1, 2] == 0.0


@pytest.mark.parametrize("where,value,dtype", CASES, ids=IDS)
def test_dsa_reference_follows_the_rule(where, value, dtype):
    inp = inject(make_exact_indexer_inputs([40, 13, 70], heads=4, head_dim=16, dtype=dtype,
                                           seed=1), where, value, seed=2)
    topk = 24
    idx, sc = hisa.dsa_index(*inp.args(), k_scale=inp.k_scale, topk=topk, return_scores=True,
                             backend="torch")
    check_index_format(idx, inp.ks, inp.ke, topk)           # the count rule holds
    expect = brute_dsa(*inp.args(), inp.k_scale, topk)
    assert [sorted(r) for r in as_rows(idx)] == [sorted(r) for r in expect]
    logits = naive_dsa_logits(*inp.args(), k_scale=inp.k_scale)
    got = torch.gather(logits, 1, (idx.long() + inp.ks.long()[:, None]).clamp_min(0))
    valid = idx >= 0
    torch.testing.assert_close(sc[valid], got[valid], equal_nan=True)
    if value != 0.0:
        assert bool((~torch.isfinite(sc[valid])).any()), "the injection had no effect"


@pytest.mark.parametrize("where,value,dtype", CASES, ids=IDS)
def test_hisa_reference_follows_the_rule(where, value, dtype):
    inp = inject(make_exact_indexer_inputs([40, 13, 70], heads=4, head_dim=16, dtype=dtype,
                                           seed=3), where, value, seed=4)
    kw = dict(k_scale=inp.k_scale, topk=24, backend="torch")
    # Every block kept (m * B >= any window): HISA equals DSA exactly, non-finite keys included.
    exact = hisa.hisa_index(*inp.args(), block_size=16, block_topk=8, **kw)
    assert torch.equal(exact, hisa.dsa_index(*inp.args(), **kw))
    # Real pruning: the float64 oracle ranks NaN block means last among the non-forced blocks.
    pruned = hisa.hisa_index(*inp.args(), block_size=8, block_topk=3, **kw)
    check_index_format(pruned, inp.ks, inp.ke, 24, exact_count=False)
    expect = brute_hisa(*inp.args(), inp.k_scale, 24, 8, 3)
    assert [sorted(r) for r in as_rows(pruned)] == [sorted(r) for r in expect]


def bits(x: torch.Tensor) -> torch.Tensor:
    """fp32 bit patterns (NaN-aware equality of score tensors)."""
    return x.contiguous().view(torch.int32)


@pytest.mark.parametrize("where,value,dtype", CASES, ids=IDS)
def test_three_level_reference_follows_the_rule(where, value, dtype):
    inp = inject(make_exact_indexer_inputs([40, 13, 70], heads=4, head_dim=16, dtype=dtype,
                                           seed=5), where, value, seed=6)
    kw = dict(k_scale=inp.k_scale, topk=24, return_scores=True, backend="torch")
    # Every super-block kept (a window of <= 70 keys spans <= 6 super-blocks of 16): three
    # levels equal two entry for entry, indices and scores, non-finite ones included.
    two, s2 = hisa.hisa_index(*inp.args(), block_size=8, block_topk=3, **kw)
    three, s3 = hisa.hisa_index(*inp.args(), block_size=8, block_topk=3, super_size=2,
                                super_topk=6, **kw)
    assert torch.equal(two, three) and torch.equal(bits(s2), bits(s3))
    # Pruning at both levels: the float64 oracle (NaN super-block and block means rank last
    # among the non-forced ones).
    pruned, _ = hisa.hisa_index(*inp.args(), block_size=4, block_topk=6, super_size=2,
                                super_topk=3, **kw)
    check_index_format(pruned, inp.ks, inp.ke, 24, exact_count=False)
    expect = brute_hisa_super(*inp.args(), inp.k_scale, 24, 4, 6, 2, 3)
    assert [sorted(r) for r in as_rows(pruned)] == [sorted(r) for r in expect]


@pytest.mark.parametrize("levels", [2, 3])
def test_forced_blocks_win_over_infinite_scores(levels):
    """A block (and its super-block) whose mean scores +inf never displaces the forced first
    and last: forcing is by position, not by a +inf score that another block can tie."""
    inp = make_exact_indexer_inputs([64], heads=2, head_dim=8, seed=7)
    inp.q = inp.q.abs() + 1                                      # q > 0 in every dimension
    inp.weights = inp.weights.abs()
    inp.k[20, 0] = INF                                           # block 5, super-block 2
    # three levels: super-blocks 0, 7 forced, 2 (+inf) kept, so block 5 is a candidate
    sup = dict(super_size=2, super_topk=3) if levels == 3 else {}
    kw = dict(block_size=4, backend="torch", **sup)
    idx = hisa.hisa_index(*inp.args(), topk=8, block_topk=2, **kw)
    assert sorted((idx[63] // 4).tolist()) == [0] * 4 + [15] * 4   # the sink and its own block
    idx = hisa.hisa_index(*inp.args(), topk=12, block_topk=3, **kw)
    assert sorted(set((idx[63] // 4).tolist())) == [0, 5, 15]


def test_window_of_nan_scores_comes_back_whole():
    inp = make_exact_indexer_inputs([30], heads=2, head_dim=8, seed=5)
    inp.weights[:] = NAN
    for op in (hisa.dsa_index, lambda *a, **k: hisa.hisa_index(*a, block_size=8, block_topk=4,
                                                                 **k),
               lambda *a, **k: hisa.hisa_index(*a, block_size=4, block_topk=8, super_size=2,
                                               super_topk=4, **k)):
        idx = op(*inp.args(), topk=16, backend="torch")
        check_index_format(idx, inp.ks, inp.ke, 16)
        for t in range(30):                         # all ties: the lowest positions win
            assert sorted(idx[t][idx[t] >= 0].tolist()) == list(range(min(t + 1, 16)))


def test_decode_reference_follows_the_rule():
    from hisa.cache.factory import make_paged_inputs
    inp = make_paged_inputs([50, 200], next_n=2, heads=4, head_dim=16, block_size=64,
                            q_dtype=torch.float32, exact=True)
    inp.weights[1, 2] = NAN                                 # request 0, row 1: all NaN
    q = inp.q.clone()
    q[1, 0, 0, 3] = INF
    idx = hisa.dsa_index_paged(q, inp.cache.kv_cache, inp.weights, inp.seq_lens,
                               inp.block_table, topk=64, backend="torch")
    lens = inp.row_lengths()
    check_index_format(idx, torch.zeros_like(lens), lens, 64)
    assert sorted(idx[1][idx[1] >= 0].tolist()) == list(range(50))
    k, s = inp.keys[1]
    sc = naive_scores(q[1, :1], k, inp.weights[2:3], s)[0]            # [200]
    expect = sorted(range(199), key=lambda p: (1, 0.0, p) if math.isnan(sc[p]) else
                    (0, -float(sc[p]), p))[:64]
    assert sorted(idx[2][idx[2] >= 0].tolist()) == sorted(expect)


def test_three_level_decode_reference_follows_the_rule():
    from hisa.cache.factory import make_paged_inputs
    inp = make_paged_inputs([700, 200], next_n=2, heads=4, head_dim=16, block_size=64,
                            super_size=2, q_dtype=torch.float32, exact=True)
    inp.weights[1] = NAN                      # request 0, row 1 (700 keys): every score NaN
    inp.q[1, 0, 0, 3] = INF
    kw = dict(topk=192, block_size=64, block_topk=3, return_scores=True, backend="torch")
    lens = inp.row_lengths()
    two, s2 = hisa.hisa_index_paged(*inp.hisa_args(), **kw)
    # 700 keys are 6 super-blocks of 128: with super_topk = 6 all are kept, exactly two levels
    three, s3 = hisa.hisa_index_paged(*inp.hisa_args(), **inp.super_kwargs(6), **kw)
    assert torch.equal(two, three) and torch.equal(bits(s2), bits(s3))
    pruned, _ = hisa.hisa_index_paged(*inp.hisa_args(), **inp.super_kwargs(3), **kw)
    check_index_format(pruned, torch.zeros_like(lens), lens, 192, exact_count=False)
    # The all-NaN row: super-blocks 0 and 5 forced, NaN ties to the lowest (1); blocks 0 and 10
    # (the last eligible) forced, then the lowest NaN block of the candidates (1); all 188 of
    # their tokens fit the budget.
    assert sorted(pruned[1][pruned[1] >= 0].tolist()) == list(range(128)) + list(range(640, 700))
