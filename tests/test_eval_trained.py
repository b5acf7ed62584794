"""The evaluation routed through a trained indexer, on a tiny random Gemma-3 (fast, no
download): exactness when nothing is pruned, the indexer key cache kept in step through
chunked prefill and per-method tails, metrics invariants, probes, rows, table and charts."""
import math
import random

import pytest
import torch

from hisa.distill.indexer import IndexerConfig, IndexerSet
from hisa.eval.attention import Router, routed
from hisa.eval.methods import Method
from hisa.eval.runner import budget_methods, chunk_runs, evaluate_text, probe_hits

L = 192


@pytest.fixture(scope="module")
def lm():
    from tiny_gemma import tiny_gemma
    from hisa.eval.attention import attach_hooks
    from hisa.eval.models import LoadedModel
    model = tiny_gemma()
    attach_hooks(model)
    return LoadedModel("tiny", model, None, frozenset({1, 3}), 2048, "cpu")


@pytest.fixture(scope="module")
def indexers():
    torch.manual_seed(3)
    return IndexerSet({ly: IndexerConfig(64, 16, 64, 32, 10000.0) for ly in (1, 3)},
                      model="tiny").eval()


def _ids(n, seed=0):
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed))


def test_trained_routing_is_exact_when_nothing_is_pruned(lm, indexers):
    ids = _ids(96).unsqueeze(0)
    with torch.no_grad():
        plain = lm.model(ids).logits
        with routed(Router(lm.global_layers, method=Method("flat", topk=128),
                           indexers=indexers)):
            flat_all = lm.model(ids).logits
        with routed(Router(lm.global_layers, method=Method("flat", topk=8), sparse_from=64,
                           indexers=indexers)) as r:
            pruned = lm.model(ids).logits
    torch.testing.assert_close(plain, flat_all, rtol=0, atol=1e-5)
    assert torch.equal(plain[0, :64], pruned[0, :64])      # dense rows untouched
    assert not torch.allclose(plain[0, 64:], pruned[0, 64:])
    assert r.index_keys[1].shape == (96, 64) and r.index_keys[3].shape == (96, 64)


def test_chunked_prefix_and_tails_match_one_pass_and_keep_the_index_cache_in_step(lm,
                                                                                   indexers):
    ids = _ids(L, seed=1)
    with torch.no_grad():
        full = lm.model(ids.unsqueeze(0)).logits[0, -64:]
    methods = [Method("dense"), Method("flat", topk=L), Method("flat", topk=12)]
    logits, cap = chunk_runs(lm, ids, L - 64, methods, indexers=indexers, capture=True,
                             chunk=48)
    torch.testing.assert_close(logits["dense"], full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[f"flat k={L}"], full, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits["flat k=12"], full, atol=1e-3)
    for layer in (1, 3):    # the dense pass captured every position once
        assert cap.q[layer].shape == (4, L, 32) and cap.k[layer].shape == (1, L, 32)
        assert cap.hidden[layer].shape == (L, 64)


def test_trained_fidelity_records_obey_the_invariants(lm, indexers):
    ids = _ids(L, seed=2)
    k = 12
    exact = Method("hisa", topk=k, block_size=16, block_topk=L // 16)      # m*B = L: exact
    methods = [Method("dense"), Method("flat", topk=k),
               Method("hisa", topk=k, block_size=16, block_topk=3), exact,
               Method("block_sparse", topk=k, block_size=16),
               Method("hisa_linear", topk=k, block_size=16, block_topk=3)]
    ppl, fid, _ = evaluate_text(lm, ids, L - 32, [("scaled", methods)], n_queries=12,
                                indexers=indexers, chunk=64)
    assert all(math.isfinite(v) and v > 1 for v in ppl.values())
    recs, quality = fid["scaled"]
    assert set(quality) == {1, 3}
    for q in quality.values():     # flat top-k mass can never beat the best k keys' mass
        assert ((q > 0) & (q <= 1 + 1e-5)).all()
    for r in recs:
        ok = ~torch.isnan(r["recall"])
        assert ((r["iou"] >= 0) & (r["iou"] <= 1)).all()
        if r["method"].name == "hisa":
            assert (r["recall"][ok] <= r["oracle"][ok] + 1e-6).all()
        if r["method"] == exact:
            assert torch.all(r["iou"] == 1.0) and torch.all(r["mass"] == 1.0)
        assert r["head"] == 0          # one shared selection per layer (DSA's MQA shape)


def test_probes_rows_table_and_charts(lm, indexers, tmp_path):
    from hisa.eval.documents import Probe, Question
    from hisa.eval.plots import plot_all
    from hisa.eval.report import conclusion, fidelity_rows, format_table
    ids = _ids(L, seed=4)
    probe = Probe("needle", ids, L - 16, [Question(0.5, L - 8, 3)])
    methods = budget_methods(L, block_sizes=(16,), extras=True, variants=False)
    ppl, fid, lg = evaluate_text(lm, probe.ids, probe.n_prefix, [("scaled", methods)],
                                 n_queries=8, indexers=indexers, chunk=64)
    hits = probe_hits(lg, probe)
    assert set(hits) == {(m.label, 0.5) for m in methods}
    target = ids[L - 8:L - 5]
    pred = lg["dense"][-9:-6].argmax(-1)
    assert hits[("dense", 0.5)] == [bool(torch.equal(pred, target))]
    recs, quality = fid["scaled"]
    rows, detail = fidelity_rows("tiny", L, methods, recs, ppl, hits, budget="scaled",
                                 document="austen", indexer="trained", quality=quality)
    flat = next(r for r in rows if r["method"] == "flat")
    assert 0 < flat["indexer_quality"] <= 1 + 1e-6
    assert all(r["needle_total"] == 1 for r in rows)
    assert {r["backend"] for r in rows} >= {"none", "torch-fp32"}
    text = format_table(rows)
    for col in ("IoU", "recall", "oracle", "mass", "idx-q", "ppl", "dppl%", "needles"):
        assert f"\n  {col} " in text, col          # every column has its legend line
    assert conclusion(rows).startswith("Conclusion: hisa B=16")
    made = plot_all(rows, tmp_path)
    assert {p.name for p in made} == {f"{w}_austen_L{L}_scaled.png"
                                      for w in ("fidelity", "ppl", "needles")}


def test_documents_and_probes_are_well_formed():
    from hisa.eval.documents import stdlib_text
    text = stdlib_text()
    assert text.startswith("# module: ") and "\n# module: json" in text
    assert "# module: test." not in text and "idlelib" not in text.split("\n", 1)[0]


class _CharTokenizer:
    """One token per character, enough to check the probes' bookkeeping."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        class Out:
            input_ids = torch.tensor([[ord(c) % 5000 for c in text]])
        return Out()


def test_needle_and_rag_probes_place_answers_where_they_say(monkeypatch):
    from hisa.eval import documents
    monkeypatch.setattr(documents, "austen_text", lambda cache_dir=None: (
        "It is a truth universally acknowledged. " * 200_000))
    tok = _CharTokenizer()
    for make in (documents.needle_probe, documents.rag_probe):
        p = make(tok, 6000, [0.25, 0.5, 0.75], random.Random(0))
        assert p.ids.numel() <= 6000 and len(p.questions) == 3
        decoded = "".join(chr(int(i)) for i in p.ids)
        for q in p.questions:
            answer = decoded[q.answer_at:q.answer_at + q.answer_len]
            assert answer.endswith(".") and answer.startswith(" ")
            assert answer[1:-1] in decoded[:p.n_prefix]        # the fact is in the context
        depths = [q.depth for q in p.questions]
        assert depths == sorted(depths) and all(0.15 < d < 0.85 for d in depths)


PAGED_L = 320      # 5 blocks of 64: HISA with m = 3 has blocks to choose from


def paged_tail_check(lm, indexers, backend):
    """Each tail token decoded through PagedIndexerCache + dsa/hisa_index_paged on
    ``backend``: flat selects what the FP8 prefill op selects for that row (same logits);
    HISA (whose paged stage 1 reads FP8 pooled rows) matches the paged torch reference."""
    ids = _ids(PAGED_L, seed=5)
    n = PAGED_L - 4
    flat = Method("flat", topk=24)
    hisa_m = Method("hisa", topk=24, block_size=64, block_topk=3)
    chunked, _ = chunk_runs(lm, ids, n, [flat], indexers=indexers, capture=False,
                            precision="fp8", backend="torch", chunk=128)
    paged, _ = chunk_runs(lm, ids, n, [flat, hisa_m], indexers=indexers, capture=False,
                          precision="fp8", backend=backend, chunk=128, decode="paged")
    ref, _ = chunk_runs(lm, ids, n, [hisa_m], indexers=indexers, capture=False,
                        precision="fp8", backend="torch", chunk=128, decode="paged")
    dense, _ = chunk_runs(lm, ids, n, [Method("dense")], capture=False, chunk=128)
    assert paged[flat.label].shape == (4, 96)
    torch.testing.assert_close(paged[flat.label], chunked[flat.label], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(paged[hisa_m.label], ref[hisa_m.label], rtol=1e-4, atol=1e-4)
    for m in (flat, hisa_m):
        assert not torch.allclose(paged[m.label], dense["dense"], atol=1e-3)   # it pruned


def test_paged_decode_tail_matches_the_fp8_prefill_chunk(lm, indexers):
    paged_tail_check(lm, indexers, "torch")
    with pytest.raises(ValueError, match="decode"):
        chunk_runs(lm, _ids(L), L - 6, [Method("flat", topk=8)], indexers=None, capture=False,
                   decode="paged")
