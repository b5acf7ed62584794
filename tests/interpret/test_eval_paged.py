"""The evaluation's GPU code path on the CPU: FP8 indexer operands through the real Triton
kernels (prefill selections, paged append, flat and HISA paged decode) under the interpreter,
on the tiny random Gemma-3, against the torch references."""
import pytest
import torch

from test_eval_trained import L, _ids, paged_tail_check
from tiny_gemma import tiny_gemma


@pytest.fixture(scope="module")
def setup():
    from hisa.distill.indexer import IndexerConfig, IndexerSet
    from hisa.eval.attention import attach_hooks
    from hisa.eval.models import LoadedModel
    model = tiny_gemma()
    attach_hooks(model)
    lm = LoadedModel("tiny", model, None, frozenset({1, 3}), 2048, "cpu")
    torch.manual_seed(3)
    ix = IndexerSet({ly: IndexerConfig(64, 16, 64, 32, 10000.0) for ly in (1, 3)}).eval()
    return lm, ix


def test_paged_decode_tail_on_triton_kernels(setup):
    paged_tail_check(*setup, "triton")


#: HISA's Triton pipeline pools FP8 keys into FP8 block representatives (as the paged pooled
#: cache stores them); the torch reference pools them in fp32. Near-tied block scores can then
#: pick different blocks (7 of 16 rows differ in one layer here), so HISA's metrics agree only
#: to within this much; flat top-k has no pooling and must agree exactly.
HISA_METRIC_TOL = 0.15


def test_fp8_prefill_eval_on_triton_matches_the_references(setup):
    from hisa.eval.methods import Method
    from hisa.eval.runner import evaluate_text
    lm, ix = setup
    ids = _ids(L, seed=6)
    methods = [Method("dense"), Method("flat", topk=16),
               Method("hisa", topk=16, block_size=16, block_topk=4)]
    out = {b: evaluate_text(lm, ids, L - 16, [("scaled", methods)], n_queries=6, indexers=ix,
                            precision="fp8", backend=b, chunk=64) for b in ("torch", "triton")}
    for label in ("dense", "flat k=16"):
        assert out["triton"][0][label] == pytest.approx(out["torch"][0][label], rel=1e-5)
    for a, b in zip(out["torch"][1]["scaled"][0], out["triton"][1]["scaled"][0]):
        assert a["label"] == b["label"] == "hisa B=16 m=4"
        assert abs(float(a["iou"].mean() - b["iou"].mean())) <= HISA_METRIC_TOL
        assert abs(float(a["mass"].mean() - b["mass"].mean())) <= HISA_METRIC_TOL
    for layer, q in out["torch"][1]["scaled"][1].items():      # flat: identical quality
        torch.testing.assert_close(out["triton"][1]["scaled"][1][layer], q)
