"""tests/gpu/racecheck_kernels.py (the compute-sanitizer racecheck driver) under the interpreter:
a fast subset of its cases passes against the torch twins, a broken kernel fails its case, and
the coverage check names a kernel that no case launches."""
import importlib.util
import os
import sys

import pytest

from hisa.cache import slots as slots_module

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "racecheck_kernels", os.path.join(os.path.dirname(HERE), "gpu", "racecheck_kernels.py"))
R = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = R            # its dataclasses look their module up by name
_spec.loader.exec_module(R)

#: The cases run here (5-20 s on the CPU, by its load; the whole list takes 40 s to a few
#: minutes): the HISA prefill pipeline at two levels and through the FP8 pre-selection's
#: super-block kernels, the window facts, and the slots (its decode inputs' build runs the
#: appends).
FAST = ["hisa_index_fp8", "hisa_index_fp8_preselect", "window_stats", "slot_transform"]


@pytest.fixture(scope="module")
def ctx():
    """One context: the decode cases share its paged inputs (each build runs the appends)."""
    return R.Context("cpu")


@pytest.fixture(scope="module")
def results(ctx):
    return {c.name: R.run_case(c, ctx) for c in R.CASES if c.name in FAST}


def test_the_fast_cases_pass_and_launch_their_kernels(results):
    assert sorted(results) == sorted(FAST)
    for name, r in results.items():
        assert r.ok, f"{name}: {r.error}"
        assert r.kernels, name


def test_the_case_list_names_each_case_once_and_has_bf16_twins():
    names = [c.name for c in R.CASES]
    assert len(names) == len(set(names))
    assert {c.name for c in R.CASES if c.bf16} == {"hisa_index_bf16", "dsa_index_bf16"}


def test_jitted_kernels_are_the_roots_of_the_call_graph():
    kernels = R.jitted_kernels()
    # Two modules name a kernel alike: both are kernels, told apart by module.
    assert {"hisa.ops.indexer.block_scores._block_scores_kernel",
            "hisa.ops.indexer.decode_kernels._block_scores_kernel",
            "hisa.ops.indexer.token_scores._token_scores_kernel",
            "hisa.ops.indexer.decode_kernels._token_scores_kernel",
            "hisa.cache.gather._gather_kernel"} <= kernels
    # Helpers called from kernels are not (the house names kernels _<stage>_kernel).
    assert all(k.endswith("_kernel") for k in kernels), sorted(kernels)
    assert not {"hisa.ops.indexer.topk._relu", "hisa.cache.append._nan_amax",
                "hisa.ops.indexer.topk._select_row"} & kernels


def test_coverage_names_the_kernels_of_a_removed_case(results):
    kernels = R.jitted_kernels()
    assert R.uncovered(kernels, kernels) == []
    launched = set().union(*(r.kernels for r in results.values()))
    without = set().union(*(r.kernels for name, r in results.items() if name != "window_stats"))
    missing = R.uncovered(without, kernels)
    assert missing == sorted(kernels - without)
    assert "hisa.ops.window_stats._window_stats_kernel" in missing
    assert "hisa.ops.window_stats._window_stats_kernel" not in R.uncovered(launched, kernels)
    # The subset leaves out the flat and paged-flat cases: their kernels are reported too.
    assert "hisa.ops.dsa.prefill._dsa_logits_kernel" in missing


def test_a_wrong_kernel_fails_its_case(monkeypatch, ctx):
    # Slots computed with the wrong page size: the kernel runs, the comparison must catch it.
    monkeypatch.setattr(slots_module, "PAGE_SIZE", 32)
    case = next(c for c in R.CASES if c.name == "slot_transform")
    r = R.run_case(case, ctx)
    assert not r.ok and "PAGED slots differ" in r.error, r.error


def test_a_case_that_launches_nothing_fails(ctx):
    case = R.Case("torch_only", lambda ctx: "no kernel")
    r = R.run_case(case, ctx)
    assert not r.ok and "kernels not launched" in r.error
