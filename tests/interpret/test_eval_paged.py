"""The evaluation's decode path with the real Triton kernels (paged append, flat and HISA paged
selection) under the interpreter, on the tiny random Gemma-3: the same logits as the FP8
prefill references."""
import torch

from test_eval_trained import paged_tail_check
from tiny_gemma import tiny_gemma


def test_paged_decode_tail_on_triton_kernels():
    from hisa.distill.indexer import IndexerConfig, IndexerSet
    from hisa.eval.attention import attach_hooks
    from hisa.eval.models import LoadedModel
    model = tiny_gemma()
    attach_hooks(model)
    lm = LoadedModel("tiny", model, None, frozenset({1, 3}), 2048, "cpu")
    torch.manual_seed(3)
    ix = IndexerSet({ly: IndexerConfig(64, 16, 64, 32, 10000.0) for ly in (1, 3)}).eval()
    paged_tail_check(lm, ix, "triton")
