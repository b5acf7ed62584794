"""Shape fuzzer, GPU tier: the checks of tests/fuzz_cases.py with larger shapes, every dtype
(bf16 included), head counts and dims up to DeepSeek's, and more examples. Skipped without CUDA.

Run: PYTHONPATH=. python3 -m pytest -q tests/gpu/test_fuzz_gpu.py
"""
import dataclasses

import pytest
import torch

pytest.importorskip("hypothesis", reason="the GPU fuzzer needs hypothesis (pip install hypothesis)")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

import fuzz_cases as F  # noqa: E402
from hisa.ops.dsa.naive import is_outside, naive_dsa_logits  # noqa: E402
from hisa.ops.indexer.naive import naive_block_scores, naive_pool_blocks  # noqa: E402
from hisa.testing.inputs import make_exact_indexer_inputs  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU = F.Profile(device="cuda", max_keys=5000, max_queries=48, heads=(16, 64),
                head_dims=(64, 128),
                dtypes=(torch.float32, torch.bfloat16, torch.float8_e4m3fn), max_topk=2048,
                block_sizes=(16, 64, 128), topks=(1, 37, 256, 2048), block_topks=(2, 8, 64))
#: Examples per op; each new (topk, block_topk, H, D, dtype) draws a kernel compile.
EXAMPLES = 60
#: No shrink phase on this tier: an example costs seconds here (kernel compiles, 5,000-key
#: references), so shrinking a failure can outlast the run's time limit and lose the report
#: (an H200 run of the prefill fuzzer was cut that way, with no report). The unshrunk
#: falsifying example and its traceback are printed as soon as the generate phase ends;
#: replay it on the CPU to shrink it by hand.
PHASES = (Phase.explicit, Phase.reuse, Phase.generate)


def fuzz(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    phases=PHASES,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("dtype", GPU.dtypes, ids=str)
def test_exact_inputs_score_exactly(dtype):
    """The fuzzer's premise on this hardware: with make_exact_indexer_inputs every flat logit
    (and, fp32, every block score of the pruned path) is bit-identical to the reference, at
    the tier's largest magnitudes (H = 64, D = 128, 5,000 keys). If fp8 or bf16 MMAs rounded
    these integer sums, check_prefill's exact comparisons would fail for that reason alone;
    this test names the stage instead of a selection mismatch."""
    from hisa.ops.dsa.prefill import dsa_logits, prepare_operands
    from hisa.ops.indexer.block_scores import block_scores
    from hisa.ops.indexer.pool import pool_blocks
    inp = make_exact_indexer_inputs([5000, 700], heads=64, head_dim=128, dtype=dtype,
                                    query_lens=[48, 20], device="cuda", seed=3)
    q, k, prec = prepare_operands(inp.q, inp.k)
    T, S = q.shape[0], k.shape[0]
    ref = naive_dsa_logits(*inp.args(), k_scale=inp.k_scale)
    got = torch.full_like(ref, float("nan"))
    dsa_logits(q, k, inp.weights, inp.ks, inp.ke, k_scale=inp.k_scale, t0=0, n_rows=T, lo=0,
               out=got, prec=prec)
    inside = ~is_outside(ref)
    assert torch.equal(got[inside], ref[inside]), \
        f"flat logits not exact: max |diff| {float((got - ref)[inside].abs().max())}"
    if dtype == torch.float32:
        B = 64
        pooled, _ = pool_blocks(k, None, block_size=B)
        full = S // B              # the tail block is forced wherever it is eligible
        assert torch.equal(pooled[:full], naive_pool_blocks(inp.k, None, B)[:full])
        got_b = block_scores(q, pooled, inp.weights, inp.ks, inp.ke, block_size=B, prec=prec)
        ref_b = naive_block_scores(inp.q, pooled, inp.weights, inp.ks, inp.ke, block_size=B)
        ok = ~is_outside(ref_b)
        assert torch.equal(got_b[ok], ref_b[ok]), "fp32 block scores not exact"


def test_fuzz_prefill_ops_gpu(fuzz_examples):
    @fuzz(fuzz_examples or EXAMPLES)
    @given(F.prefill_cases(GPU))
    def run(case):
        F.check_prefill(case, GPU)
    run()


def test_fuzz_decode_ops_gpu(fuzz_examples):
    @fuzz(fuzz_examples or EXAMPLES)
    @given(F.decode_cases(GPU))
    def run(case):
        F.check_decode(case, GPU)
    run()


def test_fuzz_cache_append_gpu(fuzz_examples, fuzz_max_keys):
    profile = GPU if fuzz_max_keys is None else dataclasses.replace(GPU, max_keys=fuzz_max_keys)

    @fuzz(fuzz_examples or EXAMPLES)
    @given(F.append_cases(profile))
    def run(case):
        F.check_append(case, profile)
    run()
