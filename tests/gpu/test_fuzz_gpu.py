"""Shape fuzzer, GPU tier: the checks of tests/fuzz_cases.py with larger shapes, every dtype
(bf16 included), head counts and dims up to DeepSeek's, and more examples. Skipped without CUDA.

Run: PYTHONPATH=. python3 -m pytest -q tests/gpu/test_fuzz_gpu.py
"""
import pytest
import torch

pytest.importorskip("hypothesis", reason="the GPU fuzzer needs hypothesis (pip install hypothesis)")
from hypothesis import HealthCheck, given, settings  # noqa: E402

import fuzz_cases as F  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU = F.Profile(device="cuda", max_keys=5000, max_queries=48, heads=(16, 64),
                head_dims=(64, 128),
                dtypes=(torch.float32, torch.bfloat16, torch.float8_e4m3fn), max_topk=2048,
                block_sizes=(16, 64, 128), topks=(1, 37, 256, 2048), block_topks=(2, 8, 64))
#: Examples per op; each new (topk, block_topk, H, D, dtype) draws a kernel compile.
EXAMPLES = 60


def fuzz(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


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


def test_fuzz_cache_append_gpu(fuzz_examples):
    @fuzz(fuzz_examples or EXAMPLES)
    @given(F.append_cases(GPU))
    def run(case):
        F.check_append(case, GPU)
    run()
