"""Shape fuzzer, CPU tier: every public op under the interpreter on small random shapes
(tests/fuzz_cases.py). Fixed example counts, derandomized, no deadline: reproducible runs whose
cost stays near a minute on 2 cores. The GPU tier (tests/gpu/test_fuzz_gpu.py) runs the same
checks larger and longer."""
import torch
from hypothesis import HealthCheck, given, settings

import fuzz_cases as F

CPU = F.Profile(device="cpu", max_keys=150, max_queries=6, heads=(16,), head_dims=(64,),
                dtypes=(torch.float32, torch.float8_e4m3fn), max_topk=40,
                block_sizes=(16, 32, 64))


def fuzz(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_fuzz_prefill_ops(fuzz_examples):
    @fuzz(fuzz_examples or 8)
    @given(F.prefill_cases(CPU))
    def run(case):
        F.check_prefill(case, CPU)
    run()


def test_fuzz_decode_ops(fuzz_examples):
    @fuzz(fuzz_examples or 8)
    @given(F.decode_cases(CPU))
    def run(case):
        F.check_decode(case, CPU)
    run()


def test_fuzz_cache_append(fuzz_examples):
    @fuzz(fuzz_examples or 8)
    @given(F.append_cases(CPU))
    def run(case):
        F.check_append(case, CPU)
    run()


def test_fuzz_quantize_fp8(fuzz_examples):
    @fuzz(fuzz_examples or 40)
    @given(F.quant_cases())
    def run(case):
        F.check_quant(case)
    run()


def test_fuzz_windows_from_cu_seqlens(fuzz_examples):
    @fuzz(fuzz_examples or 40)
    @given(F.window_cases())
    def run(case):
        F.check_windows(case)
    run()


def test_fuzz_sparse_attention_reference(fuzz_examples):
    @fuzz(fuzz_examples or 25)
    @given(F.sparse_cases())
    def run(case):
        F.check_sparse(case)
    run()
