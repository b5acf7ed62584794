"""Sharded HISA and flat selection in real multi-process gloo worlds of 4 and 2 ranks.

One world of 4 is spawned for the module (file store, no port); it runs every case of
distributed_cases.py, then ranks 2 and 3 run them again as a world of 2 (a subgroup, so group
ranks differ from global ranks). Each test reports one case of one world. Cases cover both
layouts (contiguous, interleaved) with whole and split blocks, packed prefill with blocks
straddling sequences, short windows, ranks holding no keys, decode with next_n 1 and 2 (1-D and
2-D lengths) over caches written by the sharded append, exact score ties across ranks, random
FP8 inputs, and the bytes each exchange moves.
"""
import pytest

from distributed_cases import CASES, run_all
from hisa.testing.distributed import spawn_world

_OUTCOMES: list = []


def outcomes() -> list:
    if not _OUTCOMES:
        _OUTCOMES.extend(spawn_world(run_all, 4))
    return _OUTCOMES


@pytest.mark.parametrize("world", (4, 2))
@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_case(world, case):
    ranks = [(r, res) for r, res in enumerate(outcomes()) if world == 4 or r >= 2]
    for rank, result in ranks:
        if isinstance(result, Exception):
            pytest.fail(f"rank {rank} aborted: {result}")
        assert result[world][case] == "ok", result[world][case]
