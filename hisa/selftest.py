"""`hisa selftest`: quick end-to-end checks of the installed library on this machine.

On CPU it checks the references against the output contract and HISA's exactness rule; with a
CUDA GPU it also checks the Triton kernels against the references.
"""
from __future__ import annotations

import time
import traceback
from typing import Callable

import torch

import hisa

from .testing.compare import FP8_MMA_ROW_TOL, assert_same_selection, check_index_format
from .testing.inputs import make_indexer_inputs
from .ops.dsa.naive import naive_dsa_logits


def _packed(device: str, dtype=torch.float8_e4m3fn, seed: int = 0):
    return make_indexer_inputs([700, 33, 1200], heads=16, head_dim=128, dtype=dtype,
                               device=device, seed=seed, clustered=True)


def check_contract(device: str, backend: str) -> None:
    inp = _packed(device)
    for op, extra in ((hisa.dsa_index, {}), (hisa.hisa_index, dict(block_size=64, block_topk=4))):
        idx = op(*inp.args(), k_scale=inp.k_scale, topk=128, backend=backend, **extra)
        check_index_format(idx, inp.ks, inp.ke, 128, exact_count=op is hisa.dsa_index)


def check_exact_when_blocks_fit(device: str, backend: str) -> None:
    inp = _packed(device, seed=1)
    logits = naive_dsa_logits(*inp.args(), k_scale=inp.k_scale)
    flat = hisa.dsa_index(*inp.args(), k_scale=inp.k_scale, topk=96, backend=backend)
    his = hisa.hisa_index(*inp.args(), k_scale=inp.k_scale, topk=96, block_size=64,
                          block_topk=20, backend=backend)                # 20 * 64 >= 1200
    assert_same_selection(his, flat, inp.ks, logits, row_tol=FP8_MMA_ROW_TOL)


def check_three_levels_equal_two(device: str, backend: str) -> None:
    """Every query sees at most 6 super-blocks of 4 * 64 keys (the 1,200-key sequence starts
    at key 733, mid super-block): with super_topk = 6 all are kept and the three-level
    selection is the two-level one."""
    inp = _packed(device, seed=3)
    logits = naive_dsa_logits(*inp.args(), k_scale=inp.k_scale)
    kw = dict(k_scale=inp.k_scale, topk=96, block_size=64, block_topk=4, backend=backend)
    two = hisa.hisa_index(*inp.args(), **kw)
    three = hisa.hisa_index(*inp.args(), super_size=4, super_topk=6, **kw)
    assert_same_selection(three, two, inp.ks, logits, row_tol=FP8_MMA_ROW_TOL)
    pruned = hisa.hisa_index(*inp.args(), super_size=2, super_topk=2, **kw)
    check_index_format(pruned, inp.ks, inp.ke, 96, exact_count=False)


def check_backends_agree(device: str) -> None:
    for dtype in (torch.float8_e4m3fn, torch.bfloat16):
        inp = _packed(device, dtype=dtype, seed=2)
        logits = naive_dsa_logits(*inp.args(), k_scale=inp.k_scale)
        for op, extra in ((hisa.dsa_index, {}),
                          (hisa.hisa_index, dict(block_size=64, block_topk=20))):
            a = op(*inp.args(), k_scale=inp.k_scale, topk=128, backend="torch", **extra)
            b = op(*inp.args(), k_scale=inp.k_scale, topk=128, backend="triton", **extra)
            # Tensor-core scores differ from the fp32 reference by rounding: near-ties may swap.
            assert_same_selection(b, a, inp.ks, logits, row_tol=FP8_MMA_ROW_TOL)


def run_selftest() -> int:
    checks: list[tuple[str, Callable[[], None]]] = [
        ("contract format, torch backend, cpu", lambda: check_contract("cpu", "torch")),
        ("HISA == DSA when every block fits, cpu", lambda: check_exact_when_blocks_fit("cpu", "torch")),
        ("three levels == two when every super-block fits, cpu",
         lambda: check_three_levels_equal_two("cpu", "torch")),
    ]
    if torch.cuda.is_available():
        checks += [
            ("contract format, triton backend, cuda", lambda: check_contract("cuda", "triton")),
            ("HISA == DSA when every block fits, triton", lambda: check_exact_when_blocks_fit("cuda", "triton")),
            ("triton agrees with torch (fp8, bf16)", lambda: check_backends_agree("cuda")),
            ("three levels == two when every super-block fits, triton",
             lambda: check_three_levels_equal_two("cuda", "triton")),
        ]
    failed = 0
    for name, fn in checks:
        t0 = time.perf_counter()
        try:
            fn()
            print(f"PASS  {name}  ({time.perf_counter() - t0:.1f} s)")
        except Exception:  # report every failure, then exit non-zero
            failed += 1
            print(f"FAIL  {name}\n{traceback.format_exc()}")
    if not torch.cuda.is_available():
        print("(no CUDA device: the Triton kernels were not exercised)")
    print(f"{len(checks) - failed} passed, {failed} failed")
    return 1 if failed else 0
