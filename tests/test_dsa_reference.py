import pytest
import torch
from hypothesis import given, settings, strategies as st

import hisa
from hisa.ops.dsa import naive as dsa_naive
from hisa.testing.compare import assert_same_selection, check_index_format
from hisa.testing.inputs import make_indexer_inputs

from brute import as_rows, brute_dsa


def logits_of(inp):
    return dsa_naive.naive_dsa_logits(*inp.args(), k_scale=inp.k_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn, torch.bfloat16])
def test_matches_brute_force(dtype):
    inp = make_indexer_inputs([37, 5, 70], heads=4, head_dim=128, dtype=dtype, seed=1)
    idx = hisa.dsa_index(*inp.args(), k_scale=inp.k_scale, topk=16, backend="torch")
    check_index_format(idx, inp.ks, inp.ke, 16)
    expect = brute_dsa(*inp.args(), inp.k_scale, 16)
    ref = torch.full_like(idx, -1)
    for t, r in enumerate(expect):
        ref[t, :len(r)] = torch.tensor(r, dtype=torch.int32)
    assert_same_selection(idx, ref, inp.ks, logits_of(inp))


def test_scores_match_float64():
    inp = make_indexer_inputs([50], heads=8, dtype=torch.float8_e4m3fn, seed=2)
    logits = logits_of(inp)
    q, k, w = inp.q.double(), inp.k.double(), inp.weights.double()
    dots = torch.einsum("thd,sd->ths", q, k).clamp_min(0)
    ref = torch.einsum("th,ths->ts", w, dots) * inp.k_scale.double()
    mask = torch.arange(50)[None, :] >= inp.ke[:, None]
    assert torch.equal(dsa_naive.is_outside(logits), mask)    # outside markers exactly
    finite = ~mask
    torch.testing.assert_close(logits[finite].double(), ref[finite], rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(lens=st.lists(st.integers(0, 40), min_size=1, max_size=4), topk=st.integers(1, 50),
       seed=st.integers(0, 1000))
def test_random_packed_invariants(lens, topk, seed):
    inp = make_indexer_inputs(lens, heads=2, head_dim=16, dtype=torch.float32, seed=seed)
    idx, scores = hisa.dsa_index(*inp.args(), topk=topk, return_scores=True, backend="torch")
    check_index_format(idx, inp.ks, inp.ke, topk)
    assert torch.equal(scores == float("-inf"), idx < 0)
    expect = brute_dsa(*inp.args(), None, topk)
    got = as_rows(idx)
    logits = logits_of(inp)
    for t in range(len(expect)):
        if sorted(got[t]) != sorted(expect[t]):  # only near-ties may differ
            ref = torch.full((1, topk), -1, dtype=torch.int32)
            ref[0, :len(expect[t])] = torch.tensor(expect[t], dtype=torch.int32)
            assert_same_selection(idx[t:t + 1], ref, inp.ks[t:t + 1], logits[t:t + 1])


def test_window_smaller_than_topk_returns_all_keys():
    inp = make_indexer_inputs([10], heads=2, head_dim=32, dtype=torch.float32)
    idx = hisa.dsa_index(*inp.args(), topk=64, backend="torch")
    for t in range(10):
        assert sorted(idx[t][idx[t] >= 0].tolist()) == list(range(t + 1))
        assert bool((idx[t, t + 1:] == -1).all())


def test_empty_windows_give_only_padding():
    inp = make_indexer_inputs([8], heads=2, head_dim=32, dtype=torch.float32)
    ks = torch.tensor([0, 3, 5, 8, 0, 0, 0, 0], dtype=torch.int32)
    ke = torch.tensor([0, 3, 6, 8, 1, 2, 3, 4], dtype=torch.int32)
    idx = hisa.dsa_index(inp.q, inp.k, inp.weights, ks, ke, topk=4, backend="torch")
    assert bool((idx[[0, 1, 3]] == -1).all())
    assert idx[2].tolist() == [0, -1, -1, -1]
    check_index_format(idx, ks, ke, 4)


def test_tiling_does_not_change_result(monkeypatch):
    inp = make_indexer_inputs([300, 200], heads=4, head_dim=32, dtype=torch.float32, seed=3)
    full = hisa.dsa_index(*inp.args(), topk=32, backend="torch")
    monkeypatch.setattr(dsa_naive, "NAIVE_TILE_BYTES", 4 * 64 * 7)  # tiles of a few queries
    tiled = hisa.dsa_index(*inp.args(), topk=32, backend="torch")
    assert torch.equal(full, tiled)


def test_out_buffer_written_in_place_and_deterministic():
    inp = make_indexer_inputs([64], heads=4, head_dim=32, dtype=torch.float32)
    out = torch.full((64, 8), 12345, dtype=torch.int32)
    res = hisa.dsa_index(*inp.args(), topk=8, out=out, backend="torch")
    assert res is out
    again = hisa.dsa_index(*inp.args(), topk=8, backend="torch")
    assert torch.equal(out, again)


def test_negative_weights_are_kept_signed():
    # All heads gated negatively: every score <= 0 and the least-negative keys win.
    inp = make_indexer_inputs([20], heads=2, head_dim=16, dtype=torch.float32, seed=4)
    w = -inp.weights.abs()
    idx, sc = hisa.dsa_index(inp.q, inp.k, w, inp.ks, inp.ke, topk=3, return_scores=True,
                             backend="torch")
    assert bool((sc[sc > float("-inf")] <= 0).all())
    logits = dsa_naive.naive_dsa_logits(inp.q, inp.k, w, inp.ks, inp.ke)
    best = logits[19].topk(3).values
    torch.testing.assert_close(sc[19], best)
