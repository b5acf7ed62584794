"""GPU tier of the transformers integration: tiny DSA models on CUDA with the Triton backend.

Skipped without CUDA, and skipped (with the reason) when the installed transformers' DSA code
is not the pinned version's: the adapter refuses to patch other code, so there is nothing to
test there (the CPU tier's test_pinned_code is the one that fails loudly in CI).
"""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

transformers = pytest.importorskip("transformers")

import hisa  # noqa: E402
from hisa.integrations import _transformers_models as specs  # noqa: E402
from hisa.integrations.transformers import enable_hisa  # noqa: E402
from hisa.testing.compare import assert_same_selection  # noqa: E402

from hf_models import (PRIMARY, capture_indexers, check_model_format, tiny_model,  # noqa: E402
                       visible_sets, windows)

TOPK = 64
COVER = dict(block_size=64, block_topk=16)     # m * B = 1024 covers the contexts below
PRUNE = dict(block_size=64, block_topk=4)      # m * B = 256: prunes; (4 - 2) * 64 + 2 >= 64
#: bf16 operands: Triton's bf16 MMA and the stock fp32 matmul of the upcast values sum the
#: same exact products in different orders; differing picks must tie within this fraction of
#: the row's largest |score|.
BF16_ROW_TOL = 1e-5


def pinned(model_type):
    spec = next(s for s in specs.MODELS if s.model_type == model_type)
    try:
        specs.check_model_code(spec)
    except specs.UnsupportedTransformersError as e:
        pytest.skip(f"transformers {transformers.__version__} is not the pinned "
                    f"{specs.PINNED_TRANSFORMERS}: {e}")


def ids(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (batch, length), generator=g).cuda()


def row_scores(call, b):
    q, w = call.operands()
    dots = torch.einsum("shd,td->sht", q[b].float(), call.keys[b].float()).clamp_min(0)
    return torch.einsum("sh,sht->st", w[b], dots)                           # fp32 [S, T]


@pytest.mark.parametrize("model_type", PRIMARY)
def test_fp32_prefill_and_generate_equal_stock(model_type):
    """fp32 on the Triton backend (IEEE fp32 dots): every block kept, the logits of a padded
    prefill and of 32+ greedy steps equal the stock model's."""
    pinned(model_type)
    m = tiny_model(model_type).cuda()
    x = ids(2, 512, 0)
    mask = torch.ones_like(x)
    mask[1, :100] = 0
    with torch.no_grad():
        ref = m(input_ids=x, attention_mask=mask).logits
        with enable_hisa(m, backend="triton", **COVER):
            assert torch.equal(m(input_ids=x, attention_mask=mask).logits, ref)
    kw = dict(attention_mask=mask, max_new_tokens=36, min_new_tokens=36, do_sample=False,
              output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = m.generate(x, **kw)
        with enable_hisa(m, backend="triton", **COVER):
            got = m.generate(x, **kw)
    assert torch.equal(ref.sequences, got.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ref.logits, got.logits))


@pytest.mark.parametrize("model_type", PRIMARY)
def test_bf16_pruned_generation_matches_the_reference(model_type):
    """bf16, ~1K context, HISA pruning: every call keeps the stock format and selects what the
    PyTorch reference selects on the captured operands (up to bf16 MMA ties)."""
    pinned(model_type)
    m = tiny_model(model_type, dtype=torch.bfloat16).cuda()
    x = ids(2, 960, 1)
    mask = torch.ones_like(x)
    mask[0, :200] = 0
    with torch.no_grad(), enable_hisa(m, backend="triton", **PRUNE), capture_indexers(m) as cap:
        m.generate(x, attention_mask=mask, max_new_tokens=36, min_new_tokens=36,
                   do_sample=False)
    assert len(cap.calls) > 36
    for call in cap.calls:
        check_model_format(call, TOPK)
        q, w = call.operands()
        _, ks, ke = windows(call.mask.cpu())
        for b, sets in enumerate(visible_sets(call)):
            seen = ke[b] > ks[b]
            base = int(ks[b][seen].min())
            rks = torch.where(seen, ks[b] - base, 0).int().cuda()
            rke = torch.where(seen, ke[b] - base, 0).int().cuda()
            want = hisa.hisa_index(q[b], call.keys[b, base:], w[b], rks, rke, topk=TOPK,
                                   backend="torch", **PRUNE)
            got = torch.full_like(want, -1)
            for s, sel in enumerate(sets):
                vals = sorted(p - base for p in sel)
                got[s, :len(vals)] = torch.tensor(vals, dtype=torch.int32)
            logits = row_scores(call, b)[:, base:]
            pos = torch.arange(logits.shape[1], device=logits.device)
            logits = logits.masked_fill((pos < rks[:, None]) | (pos >= rke[:, None]),
                                        float("-inf"))
            assert_same_selection(got, want, rks, logits, row_tol=BF16_ROW_TOL)
