"""Exact-regime routing of the public HISA op on the Triton backend: a call in which no query
prunes a block (or super-block) runs the flat kernels, whose set is HISA's there; a call in
which one query prunes runs the HISA pipeline. Under the interpreter; fp32 inputs."""
from __future__ import annotations

import pytest
import torch

import hisa
from hisa.ops.indexer import prefill as P
from hisa.testing.inputs import make_indexer_inputs

triton = pytest.importorskip("triton")

from hisa.ops.indexer import pipeline  # noqa: E402

H, D, B, M, K = 16, 64, 16, 4, 24


def _spy(monkeypatch):
    """Count calls of the HISA pipeline as the public op sees it."""
    calls = []
    real = pipeline.hisa_index_triton

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(pipeline, "hisa_index_triton", spy)
    return calls


def _run(seq_lens, **kw):
    inp = make_indexer_inputs(seq_lens, heads=H, head_dim=D, dtype=torch.float32, seed=3)
    args = dict(k_scale=inp.k_scale, topk=K, backend="triton")
    got = hisa.hisa_index(*inp.args(), block_size=B, block_topk=M, **args, **kw)
    flat = hisa.dsa_index(*inp.args(), **args)
    ref = hisa.hisa_index(*inp.args(), block_size=B, block_topk=M, **dict(args, backend="torch"),
                          **kw)
    return got, flat, ref


def test_no_query_prunes_runs_the_flat_kernels(monkeypatch):
    calls = _spy(monkeypatch)
    got, flat, ref = _run([M * B, 20, 3])          # every window spans <= M blocks
    assert calls == []
    assert torch.equal(got, flat)
    assert torch.equal(got.sort(1).values, ref.sort(1).values)


def test_one_pruning_query_runs_the_pipeline(monkeypatch):
    calls = _spy(monkeypatch)
    got, flat, ref = _run([M * B + 1, 20])         # the last query of the first sequence prunes
    assert calls == [1]
    assert got.shape == flat.shape


def test_three_levels_route_only_when_no_super_block_is_dropped(monkeypatch):
    calls = _spy(monkeypatch)
    # Windows of M blocks that straddle super-blocks of 2 blocks: 3 super-blocks > super_topk
    # = 2 for an unaligned window, so the super stage may drop one and the pipeline must run.
    plan = dict(topk=K, block_size=B, block_topk=M, super_size=2, super_topk=2)
    i32 = dict(dtype=torch.int32)
    assert not P.plan_windows(torch.tensor([B], **i32), torch.tensor([B + M * B], **i32),
                              B + M * B, **plan).nothing_pruned
    assert P.plan_windows(torch.tensor([0], **i32), torch.tensor([M * B], **i32), M * B,
                          **plan).nothing_pruned
    got, flat, _ = _run([M * B, 20], super_size=2, super_topk=2)
    assert calls == []
    assert torch.equal(got, flat)
