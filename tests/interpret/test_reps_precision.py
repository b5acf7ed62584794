"""The ``reps_prec`` knob of the prefill pipeline (``pooled_format_cost.py --precision``): the
dots against fp32 block / super-block reps get the asked precision, the FP8 pre-selection's
FP8 copies and non-fp32 reps keep theirs, the staged pipeline routes it the same way, and the
selection under the interpreter (exact dots) equals the default's."""
import pytest
import torch

from hisa.ops.indexer import pipeline, super_blocks
from hisa.ops.indexer.pipeline import hisa_index_triton, hisa_prefill_stages
from hisa.testing.inputs import make_indexer_inputs

B, M, K = 16, 4, 24
CASES = {   # name: (keywords, precisions expected at (block or super, candidate) dots)
    "two_levels_full_scan": (dict(rescore_margin=None), ("block", None)),
    "two_levels_preselect": (dict(rescore_margin=2), ("super:fp8", "candidate")),
    "three_levels": (dict(super_size=2, super_topk=3), ("super", "candidate")),
}


def _spy(monkeypatch):
    seen = []
    # three_level_block_ids calls through super_blocks, the staged pipeline through its own
    # imports: both namespaces are spied.
    for mod, name, tag in ((pipeline, "block_select", "block"),
                           (super_blocks, "super_select", "super"),
                           (pipeline, "super_select", "super"),
                           (super_blocks, "candidate_block_select", "candidate"),
                           (pipeline, "candidate_block_select", "candidate")):
        real = getattr(mod, name)

        def wrapped(*a, _real=real, _tag=tag, **k):
            seen.append((_tag, k["prec"]))
            return _real(*a, **k)
        monkeypatch.setattr(mod, name, wrapped)
    return seen


@pytest.mark.parametrize("case,reps_prec", [(c, "tf32x3") for c in CASES] +
                         [("three_levels", "ieee")])
def test_reps_prec_reaches_the_rep_dots_only(monkeypatch, case, reps_prec):
    inp = make_indexer_inputs([150, 70], query_lens=[24, 8], heads=16, head_dim=64,
                              dtype=torch.float8_e4m3fn, seed=3)
    extra, expected = CASES[case]
    kw = dict(k_scale=inp.k_scale, topk=K, block_size=B, block_topk=M, **extra)
    default = hisa_index_triton(*inp.args(), **kw)[0]
    seen = _spy(monkeypatch)
    got = hisa_index_triton(*inp.args(), reps_prec=reps_prec, **kw)[0]
    want = []
    for tag in filter(None, expected):
        name, _, fp8 = tag.partition(":")
        want.append((name, "tf32" if fp8 else reps_prec))
    assert seen == want
    assert torch.equal(got, default)                  # the interpreter's dots are exact
    seen.clear()
    state = None
    for _, fn in hisa_prefill_stages(*inp.args(), reps_prec=reps_prec, **kw):
        state = fn()
    assert seen == want and torch.equal(state["idx"], default)


def test_reps_prec_leaves_bf16_reps_and_refuses_unknown(monkeypatch):
    inp = make_indexer_inputs([150], query_lens=[24], heads=16, head_dim=64,
                              dtype=torch.float8_e4m3fn, seed=4)
    kw = dict(k_scale=inp.k_scale, topk=K, block_size=B, block_topk=M, rescore_margin=None)
    seen = _spy(monkeypatch)
    hisa_index_triton(*inp.args(), reps_dtype=torch.bfloat16, reps_prec="tf32x3", **kw)
    assert seen == [("block", "tf32")]
    with pytest.raises(ValueError, match="reps_prec: expected one of"):
        hisa_index_triton(*inp.args(), reps_prec="fp64", **kw)
