"""Interpreter tier: a tiny transformers DSA model with HISA on the Triton backend (fp32, the
kernels run under TRITON_INTERPRET=1): prefill equal to the stock model when every block is
kept, and prefill plus decode steps equal to the PyTorch reference on the captured operands
when HISA prunes."""
import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("transformers")

import hisa  # noqa: E402
from hisa.integrations import _transformers_models as specs  # noqa: E402
from hisa.integrations.transformers import enable_hisa  # noqa: E402

from hf_models import (capture_indexers, check_model_format, tiny_model, visible_sets,  # noqa: E402
                       windows)

# One layer and index_topk 16 keep the interpreter's work small.
TOPK, CONTEXT = 16, 64
COVER = dict(block_size=16, block_topk=4)      # m * B = 64 covers the context
PRUNE = dict(block_size=16, block_topk=3)      # m * B = 48 < 64; (3 - 2) * 16 + 2 >= 16


@pytest.fixture(scope="module")
def m():
    try:
        specs.check_model_code(specs.MODELS[0])
    except specs.UnsupportedTransformersError as e:
        pytest.skip(str(e))
    return tiny_model("deepseek_v32", num_hidden_layers=1, index_topk=TOPK)


def test_triton_backend_in_a_model(m):
    x = torch.randint(1, 256, (1, CONTEXT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(input_ids=x).logits
        with enable_hisa(m, backend="triton", **COVER):
            assert torch.equal(m(input_ids=x).logits, ref)
        cache = __import__("transformers").DynamicCache(config=m.config)
        with enable_hisa(m, backend="triton", **PRUNE), capture_indexers(m) as cap:
            m(input_ids=x, cache=cache, use_cache=True)
            for t in range(2):
                m(input_ids=x[:, t:t + 1], cache=cache, use_cache=True)
    assert len(cap.calls) == 3
    for call in cap.calls:
        check_model_format(call, TOPK)
        q, w = call.operands()
        _, ks, ke = windows(call.mask)
        want = hisa.hisa_index(q[0], call.keys[0], w[0], ks[0].int(), ke[0].int(), topk=TOPK,
                               backend="torch", **PRUNE)
        assert [set(s) for s in visible_sets(call)[0]] == \
            [set(r[r >= 0].tolist()) for r in want]
