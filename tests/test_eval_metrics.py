"""Fidelity metrics and the eval-only selection variants on hand-made cases with known answers."""
import json
import math

import torch

import hisa
from hisa.eval.methods import (Method, adaptive_select_blocks, max_pool_blocks,
                               variant_block_scores, variant_hisa_index, window_mean_keys)
from hisa.eval.metrics import (attention_mass, attention_probs, block_occupancy, iou,
                               oracle_recall, positive_iou, positive_recall, recall)

T32 = torch.int32


def test_iou_counts_sets_not_order():
    a = torch.tensor([[0, 1, 2, 3], [5, 6, -1, -1], [-1, -1, -1, -1]], dtype=T32)
    b = torch.tensor([[3, 2, 9, 8], [6, 5, -1, -1], [-1, -1, -1, -1]], dtype=T32)
    assert torch.allclose(iou(a, b), torch.tensor([2 / 6, 1.0, 1.0]))


def test_recall_is_the_share_of_the_reference_picks_kept():
    ref = torch.tensor([[0, 1, 2, 3], [5, 6, -1, -1], [-1, -1, -1, -1]], dtype=T32)
    other = torch.tensor([[3, 2, 9, 8], [7, -1, -1, -1], [1, 2, -1, -1]], dtype=T32)
    assert torch.allclose(recall(ref, other), torch.tensor([0.5, 0.0, 0.0]))
    assert torch.allclose(recall(other, ref), torch.tensor([0.5, 0.0, 0.0]))


def test_positive_recall_ignores_zero_score_ties():
    flat = torch.tensor([[4, 7, 1, 2]], dtype=T32)
    scores = torch.tensor([[3.0, 1.0, 0.0, 0.0]])      # 1 and 2 are arbitrary zero ties
    other = torch.tensor([[4, 9, 10, 11]], dtype=T32)
    assert positive_recall(flat, scores, other).item() == 0.5
    none = positive_recall(flat, torch.zeros(1, 4), other)
    assert math.isnan(none.item())


def test_oracle_recall_keeps_forced_blocks_and_best_others():
    # B = 4, window [0, 24): 6 blocks, first (0) and last (5) forced; m = 3 -> one free slot.
    # positive picks: block 0: 1, block 2: 3, block 3: 1, block 5: 1 -> best = 1 + 1 + 3 of 6
    flat = torch.tensor([[1, 8, 9, 10, 13, 21, -1]], dtype=T32)
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 1.0, 1.0, float("-inf")]])
    ks, ke = torch.tensor([0], dtype=T32), torch.tensor([24], dtype=T32)
    got = oracle_recall(flat, scores, ks, ke, block_size=4, block_topk=3)
    assert abs(got.item() - 5 / 6) < 1e-6
    # with m >= #blocks the oracle is exact
    assert oracle_recall(flat, scores, ks, ke, block_size=4, block_topk=6).item() == 1.0
    # windows offset by ks use key-buffer blocks: ks = 2 shifts every pick by 2
    got2 = oracle_recall(flat - 0, scores, torch.tensor([2], dtype=T32),
                         torch.tensor([26], dtype=T32), block_size=4, block_topk=3)
    assert 0.0 < got2.item() <= 1.0


def test_block_occupancy():
    flat = torch.tensor([[0, 1, 5, 12, -1], [3, -1, -1, -1, -1]], dtype=T32)
    assert block_occupancy(flat, torch.tensor([0, 0], dtype=T32), 4).tolist() == [3.0, 1.0]
    # ks = 2: offsets 0, 1 -> positions 2, 3 (block 0), 5 -> 7 (block 1), 12 -> 14 (block 3)
    assert block_occupancy(flat[:1], torch.tensor([2], dtype=T32), 4).tolist() == [3.0]


def test_attention_mass_of_known_softmax():
    # one head, keys chosen so logits are [0, log 3] at scale 1 -> probs [1/4, 3/4]
    q = torch.tensor([[[1.0, 0.0]]])
    k = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [100.0, 0.0]])
    probs = attention_probs(q, k, torch.tensor([1]), scale=1.0)              # key 2 is future
    assert torch.allclose(probs[0, 0], torch.tensor([0.25, 0.75, 0.0]))
    idx = torch.tensor([[1, -1]], dtype=T32)
    assert abs(attention_mass(probs, idx, torch.tensor([0], dtype=T32)).item() - 0.75) < 1e-6


def _causal(L):
    return torch.zeros(L, dtype=T32), torch.arange(1, L + 1, dtype=T32)


def test_variants_exact_when_every_block_fits_and_valid_otherwise():
    torch.manual_seed(0)
    L, H, D = 300, 2, 8
    q, k, w = torch.randn(L, H, D), torch.randn(L, D), torch.rand(L, H)
    ks, ke = _causal(L)
    flat = hisa.dsa_index(q, k, w, ks, ke, topk=16)
    for name in ("hisa", "hisa_adaptive", "hisa_linear", "hisa_centred"):
        got = Method(name, topk=16, block_size=16, block_topk=32).select(q, k, w, ks, ke)
        assert torch.equal(torch.sort(got, 1).values, torch.sort(flat, 1).values), name
    for name in ("block_sparse", "hisa_max", "hisa_adaptive", "hisa_linear", "hisa_centred"):
        got = Method(name, topk=32, block_size=8, block_topk=8).select(q, k, w, ks, ke)
        valid = got >= 0
        assert (got[valid] < (ke - ks).unsqueeze(1).expand_as(got)[valid]).all(), name
        marked = torch.where(valid, got, -1 - torch.arange(got.shape[1]))
        s = torch.sort(marked, 1).values
        assert (s[:, 1:] != s[:, :-1]).all(), f"{name}: duplicate index"


def test_max_pool_blocks_and_tail():
    k = torch.tensor([[1.0, -5.0], [3.0, -1.0], [2.0, 7.0]])
    assert max_pool_blocks(k, 2).tolist() == [[3.0, -1.0], [2.0, 7.0]]


def test_adaptive_budget_moves_blocks_to_spread_queries():
    # 2 queries x 12 blocks, m = 4: query 0 is peaked (one strong block), query 1 is flat.
    J = torch.zeros(2, 12)
    J[0, 1:11] = torch.tensor([100.0] + [1.0] * 9)
    J[1, 1:11] = torch.linspace(10.0, 9.0, 10)
    J[:, 0] = J[:, 11] = float("inf")
    ks, ke = torch.zeros(2, dtype=T32), torch.full((2,), 12, dtype=T32)
    ids = adaptive_select_blocks(J, ks, ke, block_size=1, block_topk=4)
    counts = (ids >= 0).sum(1).tolist()
    assert sum(counts) == 8 and counts[1] > counts[0] >= 3    # forced two + floor m // 4
    assert {0, 11} <= set(ids[0].tolist()) and {0, 11} <= set(ids[1].tolist())


def test_variant_with_relu_stage1_is_the_shipped_hisa():
    # The eval's stage-2 gather from full scores must reproduce the shipped op exactly.
    torch.manual_seed(1)
    L, H, D = 333, 3, 8
    q, k, w = torch.randn(L, H, D), torch.randn(L, D) + 0.5, torch.full((L, H), 1 / 3)
    ks, ke = _causal(L)
    ref = hisa.hisa_index(q, k, w, ks, ke, topk=24, block_size=16, block_topk=4)
    got = variant_hisa_index(q, k, w, ks, ke, topk=24, block_size=16, block_topk=4)
    assert torch.equal(torch.sort(got, 1).values, torch.sort(ref, 1).values)   # set metrics


def test_linear_stage1_is_the_block_mean_of_prerelu_scores():
    torch.manual_seed(2)
    L, H, D, B = 64, 2, 4, 8
    q, k, w = torch.randn(5, H, D), torch.randn(L, D), torch.rand(5, H)
    ks, ke = torch.zeros(5, dtype=T32), torch.full((5,), L, dtype=T32)
    pooled = k.view(L // B, B, D).mean(1)
    J = variant_block_scores(q, pooled, w, ks, ke, block_size=B, stage1="linear")
    pre = torch.einsum("thd,sd,th->ts", q, k, w).view(5, L // B, B).mean(-1)
    assert torch.allclose(J[:, 1:-1], pre[:, 1:-1], atol=1e-5)
    assert torch.isposinf(J[:, 0]).all() and torch.isposinf(J[:, -1]).all()


def test_window_mean_keys():
    k = torch.arange(12.0).view(6, 2)
    mu = window_mean_keys(k, torch.tensor([0, 2], dtype=T32), torch.tensor([3, 4], dtype=T32))
    assert mu.tolist() == [[2.0, 3.0], [5.0, 6.0]]


def test_diagnose_linear_stage1_finds_the_block_relu_hides():
    # Keys share a direction the query points away from (q . mu = -5); block 3 holds 4 spiky
    # tokens (q . k = +3 each) whose block mean is still negative (-1): ReLU'd stage 1 scores
    # every block 0 and the free slot falls to the tie rule (block 1); linear picks block 3.
    from hisa.eval.diagnose import head_study
    k = torch.zeros(64, 4)
    k[:, 0] = -5.0
    k[24:28, 1] = 8.0
    q = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    r = head_study(q, k, torch.tensor([63]), topk=4, block_size=8, block_topk=3)
    assert r["oracle"] == 1.0 and r["linear"] == 1.0 and r["centred"] == 1.0
    assert r["mean"] == 0.0 and r["mean_zero_slots"] == 1.0


def test_speed_table_joins_bench_rows_at_the_same_setting(tmp_path):
    from hisa.eval.report import load_bench_rows, series_label, speed_table
    row = {"model": "gemma3", "context": 16384, "method": "hisa", "block_size": 128,
           "block_topk": 64, "topk": 2048, "iou_mean": 0.9, "recall": 0.8,
           "oracle_recall": 0.95, "mass_kept": 0.97}
    other = dict(row, context=8192, block_size=64, block_topk=32, topk=512)
    bench = tmp_path / "b.jsonl"
    bench.write_text("\n".join(json.dumps(r) for r in (
        {"op": "hisa", "mode": "decode", "context": 16384, "block_size": 128, "block_topk": 64,
         "topk": 2048, "speedup_vs_flat": 1.5, "gpu": "NVIDIA H100"},
        {"op": "flat", "mode": "decode", "context": 16384, "block_size": 128, "block_topk": 64,
         "topk": 2048, "speedup_vs_flat": None})) + "\n")
    table = speed_table([row, other], load_bench_rows([bench])).splitlines()
    assert "1.50-1.50x (decode, 1 rows, H100)" in table[3] and "pending" in table[2]
    assert table[0].count("|") == table[3].count("|")
    assert series_label(other) == "hisa B=64 m=L/256"


def test_positive_iou_ignores_zero_score_picks():
    full = torch.tensor([[5.0, 0.0, 0.0, 3.0, 0.0, 1.0]])
    ks = torch.zeros(1, dtype=T32)
    flat = torch.tensor([[0, 3, 1, 2]], dtype=T32)         # two positive, two zero ties
    other = torch.tensor([[0, 3, 4, 5]], dtype=T32)        # same positives + one more positive
    assert math.isclose(float(positive_iou(flat, other, full, ks)), 2 / 3, rel_tol=1e-6)
    assert math.isclose(float(iou(flat, other)), 2 / 6, rel_tol=1e-6)
