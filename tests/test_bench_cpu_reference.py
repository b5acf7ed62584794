"""The CPU reference benchmark's correctness gate passes on real outputs and catches wrong ones."""
import pytest
import torch

import hisa
from hisa.bench import cpu_reference as cr
from hisa.bench.rows import read_rows
from hisa.testing.inputs import make_indexer_inputs


def outputs(inp, topk, block_topk):
    common = dict(k_scale=inp.k_scale, topk=topk, return_scores=True, backend="torch")
    return {"flat": hisa.dsa_index(*inp.args(), **common),
            "hisa": hisa.hisa_index(*inp.args(), block_size=cr.BLOCK_SIZE,
                                    block_topk=block_topk, **common)}


def swap_one(out, t):
    """Replace the lowest-scored selected key of row t by an unselected one of its window."""
    idx, sc = out[0].clone(), out[1].clone()
    valid = idx[t] >= 0
    last = int(valid.sum()) - 1
    taken = set(idx[t, :last + 1].tolist())
    idx[t, last] = next(x for x in range(t + 1) if x not in taken)
    return idx, sc


@pytest.mark.parametrize("context,topk,block_topk", [(512, 64, 2), (256, 32, 2)])
def test_gate_passes_then_catches_a_swapped_key(context, topk, block_topk):
    inp = make_indexer_inputs([context], heads=4, head_dim=32, seed=1)
    out = outputs(inp, topk, block_topk)
    summary = cr.verify(inp, out, topk=topk, block_topk=block_topk)
    assert summary["oracle_rows"] >= 8
    assert ("equal_to_flat_rows" in summary) == (block_topk * cr.BLOCK_SIZE >= context)
    for name in ("flat", "hisa"):
        bad = dict(out, **{name: swap_one(out[name], context - 1)})
        with pytest.raises(AssertionError):
            cr.verify(inp, bad, topk=topk, block_topk=block_topk)


def test_settings_prune_only_where_the_defaults_keep_every_block():
    assert cr.settings_for(4096) == [(2048, 64), (256, 8)]
    assert cr.settings_for(8192) == [(2048, 64), (512, 16)]
    assert cr.settings_for(16384) == [(2048, 64)]
    assert cr.settings_for(512) == [(2048, 64)]          # m = L / 4 / B would be below 2


def test_rows_carry_the_environment(tmp_path):
    path = tmp_path / "r.jsonl"
    assert cr.main(["--contexts", "256", "--repeats", "1", "--out", str(path)]) == 0
    rows = read_rows(path)
    assert [r["op"] for r in rows] == ["flat", "hisa"]
    for r in rows:
        assert r["cpu"] and r["torch"] == torch.__version__ and r["commit"] and r["command"]
        assert r["context"] == 256 and r["ms"] > 0 and r["check"]["oracle_rows"] >= 8
    assert rows[1]["speedup_vs_flat"] > 0
