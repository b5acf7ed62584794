"""hisa.distill: the indexer's score is the contract's, the objective's fixed points, a tiny
end-to-end distillation on a random Gemma-3 (KL falls, the file loads and selects), and the
committed Gemma-3-270M indexers."""
import json
import math

import pytest
import torch

import hisa
from hisa.distill import TRAINED, load_trained, trained_path
from hisa.distill.indexer import (IndexerConfig, IndexerSet, LightningIndexer, load_indexers,
                                  rope_rotate, save_indexers)
from hisa.distill.objective import (attention_targets, block_kl, causal_mask, token_kl,
                                    topk_mass_ratio)

#: FP8 e4m3 keeps 3 mantissa bits: products of two quantized values are within ~2 * 2^-4
#: relative per element; summed over D and H the score error stays below this fraction of
#: the largest |score|.
FP8_SCORE_TOL = 0.08
#: The shipped file must fit the issue's budget for all layers together.
MAX_WEIGHTS_BYTES = 16 * 2**20


def _window(T, S):
    ks = torch.zeros(T, dtype=torch.int32)
    ke = torch.arange(S - T + 1, S + 1, dtype=torch.int32)
    return ks, ke


def test_indexer_score_is_the_contract_formula_and_selects_through_the_ops():
    ix = LightningIndexer(IndexerConfig(hidden_size=48, heads=16, head_dim=64, rope_dim=32))
    S, T = 300, 40
    x = torch.randn(S, 48)
    pos = torch.arange(S)
    k = ix.keys(x, pos)
    q, w = ix.queries(x[-T:], pos[-T:])
    I = ix.scores(q, k, w)
    ref = (w.unsqueeze(-1) * torch.relu(torch.einsum("thd,sd->ths", q, k))).sum(1)
    torch.testing.assert_close(I, ref)
    ks, ke = _window(T, S)
    idx, sc = hisa.dsa_index(q, k, w, ks, ke, topk=32, return_scores=True, backend="torch")
    vis = causal_mask(pos[-T:], S)
    kth = torch.topk(I.masked_fill(~vis, float("-inf")), 32, dim=1).values[:, -1]
    assert idx.dtype == torch.int32 and idx.shape == (T, 32)
    picked = torch.gather(I, 1, idx.long())
    assert (picked >= kth.unsqueeze(1) - 1e-5).all()
    assert (idx.long() < ke.long().unsqueeze(1)).all()
    q8, k8, k_scale, w8 = LightningIndexer.fp8(q, k, w)
    assert q8.dtype == torch.float8_e4m3fn and k_scale.shape == (S,) and w8.shape == (T, 16)
    i8, sc8 = hisa.dsa_index(q8, k8, w8, ks, ke, k_scale=k_scale, topk=S, return_scores=True,
                             backend="torch")
    col = torch.where(i8 >= 0, i8.long(), S)                      # -1 padding to a spare
    full8 = torch.zeros(T, S + 1).scatter_(1, col, sc8.nan_to_num(neginf=0.0))[:, :S]
    err = (full8 - I).masked_fill(~vis, 0).abs().max()
    assert err <= FP8_SCORE_TOL * I.abs().max()


def test_rope_rotates_only_the_leading_dims_and_keeps_relative_positions():
    x, y = torch.randn(1, 8), torch.randn(1, 8)
    rx = rope_rotate(x.expand(5, 8), torch.arange(5), 4, 100.0)
    assert torch.equal(rx[:, 4:], x.expand(5, 4 + 4)[:, 4:])
    ry = rope_rotate(y.expand(5, 8), torch.arange(5) + 3, 4, 100.0)
    dots = (rope_rotate(x.expand(5, 8), torch.arange(5) + 7, 4, 100.0) * ry).sum(1)
    dots_shift = (rx * rope_rotate(y.expand(5, 8), torch.arange(5) - 4, 4, 100.0)).sum(1)
    torch.testing.assert_close(dots, dots_shift)    # depends on the position difference only


def test_objective_fixed_points():
    L, R = 50, 6
    rows = torch.tensor([3, 10, 20, 30, 40, 49])
    q, k = torch.randn(4, R, 16), torch.randn(1, L, 16)
    p = attention_targets(q, k, rows, 0.25)
    torch.testing.assert_close(p.sum(1), torch.ones(R))
    assert (p[~causal_mask(rows, L)] == 0).all()
    exact = torch.log(p.clamp_min(1e-30))                    # softmax(log p) = p
    torch.testing.assert_close(token_kl(exact, p, rows), torch.zeros(R), atol=1e-5, rtol=0)
    assert (token_kl(torch.zeros(R, L), p, rows) > 0).all()
    torch.testing.assert_close(topk_mass_ratio(p, p, rows, 5), torch.ones(R))
    assert (topk_mass_ratio(-p, p, rows, 5)[1:] < 1).all()   # row 3 sees only 4 keys
    qi, ki, wi = torch.randn(R, 16, 8), torch.randn(L, 8), torch.rand(R, 16)
    bkl, has = block_kl(qi, ki, wi, p, rows, block_size=8, log_temp=torch.zeros(()))
    assert has.tolist() == [False, False, True, True, True, True]   # own block >= 2
    assert (bkl[has] >= -1e-6).all() and (bkl[~has] == 0).all()


def test_save_load_round_trip_and_bad_files(tmp_path):
    ix = IndexerSet({2: IndexerConfig(32, 16, 64, 16), 5: IndexerConfig(32, 16, 64, 16)},
                    model="toy")
    w, card = save_indexers(ix, tmp_path / "toy", {"steps": 3})
    back = load_indexers(w)
    assert back.layers == [2, 5] and back.model == "toy"
    x = torch.randn(20, 32)
    for layer in (2, 5):
        for name, p in ix[layer].state_dict().items():
            torch.testing.assert_close(back[layer].state_dict()[name], p.bfloat16().float())
    meta = json.loads(card.read_text())
    assert meta["steps"] == 3 and meta["layers"] == [2, 5]
    assert back[2].keys(x, torch.arange(20)).shape == (20, 64)
    with pytest.raises(FileNotFoundError):
        load_indexers(tmp_path / "missing")
    with pytest.raises(ValueError, match="rope_dim"):
        IndexerConfig(32, 16, 64, 65)


@pytest.fixture(scope="module")
def tiny_gemma():
    from tiny_gemma import tiny_gemma as make
    return make()


#: Fraction of the first ten steps' training KL the last ten must at least remove (measured:
#: 1.81 -> 1.28, about 30 %, at lr 1e-2); a run that does not learn keeps all of it. Held-out
#: KL is not asserted: 576 random tokens through a random model teach nothing that transfers.
MIN_KL_DROP = 0.15


def test_tiny_distill_lowers_kl_and_its_file_selects(tiny_gemma, tmp_path):
    from hisa.distill.api import distill
    from hisa.distill.train import DistillConfig
    ids = torch.randint(0, 96, (1400,), generator=torch.Generator().manual_seed(1))
    cfg = DistillConfig(heads=16, head_dim=64, rope_dim=32, steps=30, pairs_per_step=256 * 48,
                        lr=1e-2, warmup=2, eval_every=10, mass_topk=16, heldout_rows=48)
    ix, card = distill(tiny_gemma, ids, layers=[1, 3], windows=[256, 320], heldout=[256],
                       config=cfg, model_name="tiny", chunk=128, out=tmp_path / "tiny",
                       cache_dir=tmp_path / "cache", log=lambda s: None)
    curve = card["loss_curve"]
    assert [c["step"] for c in curve] == [0, 10, 20, 30]
    for layer in ("1", "3"):
        first, last = curve[1]["train_kl"][layer], curve[-1]["train_kl"][layer]
        assert last < (1 - MIN_KL_DROP) * first, (layer, first, last)
        assert math.isfinite(card["heldout_kl"][int(layer)])
    assert card["windows"] == [{"start": 0, "length": 256}, {"start": 256, "length": 320}]
    assert card["heldout_windows"] == [{"start": 1144, "length": 256}]
    assert card["steps"] == 30
    assert list((tmp_path / "cache" / "distill").glob("*.pt"))      # captures were stored
    back = load_indexers(tmp_path / "tiny.safetensors")
    assert back.layers == [1, 3]
    x = torch.randn(64, 64)
    pos = torch.arange(64)
    k = back[3].keys(x, pos)
    q, w = back[3].queries(x[-8:], pos[-8:])
    ks, ke = _window(8, 64)
    for sel in (hisa.dsa_index(q, k, w, ks, ke, topk=16, backend="torch"),
                hisa.hisa_index(q, k, w, ks, ke, topk=16, block_size=8, block_topk=4,
                                backend="torch")):
        assert sel.dtype == torch.int32 and sel.shape == (8, 16)
        valid = sel >= 0
        assert (sel[valid].long() < ke.long().repeat_interleave(valid.sum(1))).all()
        for row in sel:
            r = row[row >= 0]
            assert r.unique().numel() == r.numel()


def test_committed_gemma3_indexers_load_and_their_card_matches():
    path = trained_path("gemma3")
    assert path.stat().st_size <= MAX_WEIGHTS_BYTES
    ix = load_trained("gemma3")
    assert ix.layers == [5, 11, 17] and ix.model == "gemma3"
    for layer in ix.layers:
        c = ix[layer].config
        assert (c.hidden_size, c.heads, c.head_dim) == (640, 16, 128)
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["layers"] == [5, 11, 17] and card["model"] == "gemma3"
    for key in ("text", "steps", "tokens_captured", "seed", "loss_curve", "heldout_kl",
                "wall_seconds", "machine"):
        assert key in card, key
    assert all(math.isfinite(v) for v in card["heldout_kl"].values())
    assert all(card["heldout_kl"][str(ly)] < card["heldout_kl_initial"][str(ly)]
               for ly in ix.layers)
    x = torch.randn(10, 640)
    q, w = ix[11].queries(x, torch.arange(10))
    assert q.shape == (10, 16, 128) and w.shape == (10, 16)
    with pytest.raises(ValueError, match="trained indexers ship for"):
        trained_path("nope")
    assert set(TRAINED) == {"gemma3"}
