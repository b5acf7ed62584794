"""Interpreter tier of the super-block level (prefill): every new Triton kernel against its
naive twin on tiny shapes, and the three-level pipeline (packed and chunked) against the
three-level reference. fp32 and fp8 only (bf16 arithmetic other than tl.dot is still not
emulated under the interpreter)."""
from __future__ import annotations

import pytest
import torch

import hisa
from hisa.ops.dsa.naive import naive_dsa_logits
from hisa.ops.indexer import naive_super as NS
from hisa.testing.compare import assert_same_selection, canonical_rows, check_index_format
from hisa.testing.inputs import make_indexer_inputs

triton = pytest.importorskip("triton")

from hisa.ops.dsa.prefill import prepare_operands  # noqa: E402
from hisa.ops.indexer import pipeline as pipeline_mod  # noqa: E402
from hisa.ops.indexer.pipeline import hisa_index_triton, hisa_prefill_stages  # noqa: E402
from hisa.ops.indexer.pool import pool_blocks  # noqa: E402
from hisa.ops.indexer.super_blocks import (candidate_block_scores,  # noqa: E402
                                           candidate_block_select, pool_supers, super_select)

from test_prefill_kernels import _assert_close_with_inf  # noqa: E402

DTYPES = [torch.float32, torch.float8_e4m3fn]
POISON_IDX = -7
H, D = 16, 64
B, M, K = 16, 4, 24       # block_size, block_topk, topk
BS, MS = 2, 3             # super_size, super_topk: super-blocks of 32 keys, 6 candidate blocks
#: Packed sequences whose blocks and super-blocks straddle boundaries, an empty one, one shorter
#: than a block; the late queries of the long one see 4-5 super-blocks (> MS): real pruning.
#: Only the last QLENS queries of each run (chunked prefill), to keep the interpreter quick.
LENS = [150, 0, 9, 70, 1]
QLENS = [24, 0, 5, 8, 1]


def _inputs(seq_lens, dtype, seed, query_lens=None):
    return make_indexer_inputs(seq_lens, heads=H, head_dim=D, dtype=dtype, seed=seed,
                               clustered=True, query_lens=query_lens)


def _reps(inp):
    q, k, prec = prepare_operands(inp.q, inp.k)
    pooled, pscale = pool_blocks(k, inp.k_scale, block_size=B)
    sup, sscale = pool_supers(pooled, pscale, k.shape[0], block_size=B, super_size=BS)
    return q, k, prec, pooled, pscale, sup, sscale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,super_size", [(5, 2), (150, 3), (300, 4)])
def test_pool_supers_matches_naive(dtype, S, super_size):
    inp = _inputs([S], dtype, seed=1)
    _, k, _ = prepare_operands(inp.q, inp.k)
    # fp32 block means in, fp32 super means out: the weighted mean, tail counts included.
    means, _ = pool_blocks(k, inp.k_scale, block_size=B, out_dtype=torch.float32)
    got, no_scale = pool_supers(means, None, S, block_size=B, super_size=super_size)
    ref = NS.naive_pool_supers(means, S, block_size=B, super_size=super_size)
    assert no_scale is None and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    if dtype == torch.float8_e4m3fn:
        # FP8 block reps with scales in; fp32 out, then the re-quantization: its scale, and
        # its values within one e4m3 step (the fp32 sums may differ from torch's by an ulp).
        pooled, pscale = pool_blocks(k, inp.k_scale, block_size=B)
        got, _ = pool_supers(pooled, pscale, S, block_size=B, super_size=super_size,
                             out_dtype=torch.float32)
        ref = NS.naive_pool_supers(pooled, S, block_size=B, super_size=super_size,
                                   pooled_scale=pscale)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        values, sscale = pool_supers(pooled, pscale, S, block_size=B, super_size=super_size)
        want_v, want_s = hisa.quantize_fp8(ref, group_size=D)
        torch.testing.assert_close(sscale, want_s)
        torch.testing.assert_close(values.float(), want_v.float(), rtol=2.0 ** -3, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_super_select_matches_naive(dtype):
    inp = _inputs(LENS, dtype, seed=2, query_lens=QLENS)
    q, _, prec, _, _, sup, sscale = _reps(inp)
    out = torch.full((inp.num_queries, MS), POISON_IDX, dtype=torch.int32)
    super_select(q, sup, inp.weights, inp.ks, inp.ke, block_size=B, super_size=BS,
                 super_topk=MS, super_scale=sscale, prec=prec, out=out)
    js = NS.naive_super_scores(inp.q, sup.float(), inp.weights, inp.ks, inp.ke, block_size=B,
                               super_size=BS, super_scale=sscale)
    assert torch.equal(out, NS.naive_select_supers(js, MS))


@pytest.mark.parametrize("dtype", DTYPES)
def test_candidate_blocks_match_naive(dtype):
    inp = _inputs(LENS, dtype, seed=3, query_lens=QLENS)
    q, _, prec, pooled, pscale, sup, sscale = _reps(inp)
    sids = NS.naive_select_supers(
        NS.naive_super_scores(inp.q, sup.float(), inp.weights, inp.ks, inp.ke, block_size=B,
                              super_size=BS, super_scale=sscale), MS)
    got = candidate_block_scores(q, pooled, inp.weights, inp.ks, inp.ke, sids, block_size=B,
                                 super_size=BS, pooled_scale=pscale, prec=prec)
    ref, blk = NS.naive_candidate_block_scores(inp.q, pooled.float(), inp.weights, inp.ks,
                                               inp.ke, sids, block_size=B, super_size=BS,
                                               pooled_scale=pscale)
    _assert_close_with_inf(got, ref)
    assert bool(torch.isposinf(ref).any()) and bool(torch.isfinite(ref).any())
    # The fused selection picks the twin's ids from the same scores (same tie rule).
    fused = torch.full((inp.num_queries, M), POISON_IDX, dtype=torch.int32)
    candidate_block_select(q, pooled, inp.weights, inp.ks, inp.ke, sids, block_size=B,
                           super_size=BS, block_topk=M, pooled_scale=pscale, prec=prec,
                           out=fused)
    assert torch.equal(fused, NS.naive_select_candidate_blocks(got, blk, M))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_lens,query_lens", [(LENS, QLENS), ([40, 9, 300], [20, 9, 16])])
def test_three_level_pipeline_matches_reference(dtype, seq_lens, query_lens):
    # Packed full prefill, then chunked prefill (the last queries of long cached contexts).
    inp = _inputs(seq_lens, dtype, seed=4, query_lens=query_lens)
    kw = dict(topk=K, block_size=B, block_topk=M, super_size=BS, super_topk=MS)
    out = torch.full((inp.num_queries, K), POISON_IDX, dtype=torch.int32)
    idx, vals = hisa_index_triton(*inp.args(), k_scale=inp.k_scale, out=out, need_scores=True,
                                  **kw)
    assert idx.data_ptr() == out.data_ptr()
    check_index_format(idx, inp.ks, inp.ke, K, exact_count=False)
    # The pipeline's reps are fp32 means for every key dtype (hisa.ops.indexer.reps): the
    # reference's own default.
    ref, ref_vals = NS.naive_hisa_index_super(*inp.args(), k_scale=inp.k_scale, **kw)
    logits = naive_dsa_logits(*inp.args(), k_scale=inp.k_scale)
    assert_same_selection(idx, ref, inp.ks, logits)
    _assert_close_with_inf(torch.sort(vals, dim=1, descending=True).values, ref_vals)
    if query_lens is QLENS:
        # The super level really prunes here: two levels select differently on some row.
        two = hisa_index_triton(*inp.args(), k_scale=inp.k_scale, topk=K, block_size=B,
                                block_topk=M)[0]
        assert not torch.equal(canonical_rows(two), canonical_rows(idx))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn])
def test_three_levels_equal_two_when_every_super_block_fits(dtype):
    # ms = 8 super-blocks of 32 keys cover every window (<= 150 keys): the kept candidates are
    # all eligible blocks, scored by the same MMA per row, so the ids and outputs are equal.
    inp = _inputs(LENS, dtype, seed=5, query_lens=QLENS)
    kw = dict(topk=K, block_size=B, block_topk=M)
    # two levels scoring every block on the reps (not the default FP8 pre-selection)
    two, v2 = hisa_index_triton(*inp.args(), k_scale=inp.k_scale, need_scores=True,
                                rescore_margin=None, **kw)
    three, v3 = hisa_index_triton(*inp.args(), k_scale=inp.k_scale, need_scores=True,
                                  super_size=BS, super_topk=8, **kw)
    assert torch.equal(canonical_rows(two), canonical_rows(three))
    assert torch.equal(torch.sort(v2, 1).values, torch.sort(v3, 1).values)


def test_prefill_stages_compute_the_three_level_result():
    inp = _inputs(LENS, torch.float8_e4m3fn, seed=6, query_lens=QLENS)
    kw = dict(topk=K, block_size=B, block_topk=M, super_size=BS, super_topk=MS)
    idx, _ = hisa_index_triton(*inp.args(), k_scale=inp.k_scale, **kw)
    stages = hisa_prefill_stages(*inp.args(), k_scale=inp.k_scale, **kw)
    assert [n for n, _ in stages] == ["pool", "pool_supers", "super_select", "block_select",
                                      "token_scores", "select_tokens"]
    state = None
    for _, fn in stages:
        state = fn()
    assert torch.equal(state["idx"], idx)


def test_public_op_on_the_kernels_keeps_short_windows_whole():
    # B = 16, m = 4, Bs = 2, ms = 2, k = 64: a window of 60 keys from offset 20 spans 4 blocks
    # (all kept) but 3 super-blocks of 32 keys (> ms): returned whole by the flat fallback.
    inp = _inputs([100], torch.float32, seed=7, query_lens=[20])
    ks = torch.full((20,), 20, dtype=torch.int32)
    ke = torch.arange(61, 81, dtype=torch.int32)             # row 19: [20, 80), 60 keys
    kw = dict(topk=64, block_size=16, block_topk=4, super_size=2, super_topk=2)
    raw, _ = hisa_index_triton(inp.q, inp.k, inp.weights, ks, ke, k_scale=None, **kw)
    assert int((raw[19] >= 0).sum()) < 60, "the test needs a row the super stage truncates"
    idx = hisa.hisa_index(inp.q, inp.k, inp.weights, ks, ke, backend="triton", **kw)
    check_index_format(idx, ks, ke, 64, exact_count=False)
    assert bool(((idx >= 0).sum(1) == (ke - ks)).all())


def test_kernel_limits_raise_value_errors():
    inp = _inputs([40], torch.float32, seed=8)
    with pytest.raises(ValueError, match="super_topk \\* super_size"):
        hisa.hisa_index(*inp.args(), topk=16, block_size=16, block_topk=4, super_size=2048,
                        super_topk=32, backend="triton")


def _recorded_allocations(monkeypatch):
    """Bytes of every torch.empty / torch.zeros the code under test allocates (a list filled
    as it runs)."""
    sizes = []

    def recording(real):
        def alloc(*args, **kwargs):
            t = real(*args, **kwargs)
            sizes.append(t.numel() * t.element_size())
            return t
        return alloc

    monkeypatch.setattr(torch, "empty", recording(torch.empty))
    monkeypatch.setattr(torch, "zeros", recording(torch.zeros))
    return sizes


@pytest.mark.parametrize("levels", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])  # FP8: the pre-selection
@pytest.mark.parametrize("edge", [1, None], ids=["preselect", "scan"])
def test_workspace_model_is_what_the_pipeline_allocates(monkeypatch, levels, dtype, edge):
    import hisa.ops.indexer.pipeline as pl
    from hisa.ops.indexer.topk import persistent_programs
    monkeypatch.setattr(pl, "TOKEN_TILE_BYTES", 4 * M * B * 5)     # 5 queries per token tile
    if edge is not None:        # these windows (<= 10 blocks) stand in for ones past 8 m
        monkeypatch.setattr(pl, "RESCORE_MIN_BLOCKS_PER_M", edge)
    inp = _inputs(LENS, dtype, seed=9, query_lens=QLENS)
    sup = dict(super_size=BS, super_topk=MS) if levels == 3 else {}
    sizes = _recorded_allocations(monkeypatch)
    hisa_index_triton(*inp.args(), k_scale=inp.k_scale, topk=K, block_size=B, block_topk=M,
                      **sup)
    T = inp.num_queries
    model = pl.prefill_workspace_bytes(T, inp.k.shape[0], head_dim=D,
                                       key_bytes=inp.k.element_size(),
                                       block_size=B, block_topk=M,
                                       programs=persistent_programs(T, inp.q.device, 4),
                                       windows=(inp.ks, inp.ke), **sup)
    assert sorted(sizes) == sorted(list(model.values()) + [4 * T * K])   # + the output


def test_flat_tiling_under_a_small_cap_is_exact_and_allocates_the_model(monkeypatch):
    import hisa.ops.dsa.prefill as fp
    from hisa.ops.indexer.topk import persistent_programs
    inp = _inputs([150, 70], torch.float32, seed=10, query_lens=[40, 30])
    full, _ = fp.dsa_index_triton(*inp.args(), k_scale=None, topk=K)
    monkeypatch.setattr(fp, "FLAT_LOGITS_BYTES", 4 * 150 * 6)      # tiles of <= 6 rows
    assert len(fp.query_tiles(inp.ks, inp.ke, fp.FLAT_LOGITS_BYTES)) >= 10
    sizes = _recorded_allocations(monkeypatch)
    tiled, _ = fp.dsa_index_triton(*inp.args(), k_scale=None, topk=K)
    assert torch.equal(tiled, full)
    model = fp.flat_workspace_bytes(inp.ks, inp.ke, programs=persistent_programs(70, inp.q.device, 8))
    assert model["logits"] <= fp.FLAT_LOGITS_BYTES
    half = model["topk_scratch"] // 2                     # keys and columns, one buffer each
    assert sorted(sizes) == sorted([model["logits"], half, half, model["topk_left"],
                                    4 * 70 * K])                            # + the output


def test_three_level_pipeline_pools_super_blocks_only_from_pooled_rows(monkeypatch):
    """Pooling starts at min(ks) // B = 9, aligned down to the first eligible super-block's
    first block (8); the super pooling starts at that super-block (4) and so reads only rows
    the block pooling wrote (rows before are poisoned here)."""
    import hisa.ops.indexer.pipeline as pl
    import hisa.ops.indexer.super_blocks as sb
    calls = {}
    real_pool, real_sup = pl.pool_blocks, sb.pool_supers

    def pool(k, k_scale, *, block_size, first_block=0, **kw):
        pooled, scale = real_pool(k, k_scale, block_size=block_size, first_block=first_block,
                                  **kw)
        pooled[:first_block] = float("nan")            # rows no query can see: never pooled
        calls["first_block"] = first_block
        return pooled, scale

    def pool_supers(pooled, scale, num_keys, *, first_super=0, **kw):
        calls["first_super"] = first_super
        sup, sscale = real_sup(pooled, scale, num_keys, first_super=first_super, **kw)
        assert bool(torch.isfinite(sup[first_super:]).all()), "read a row that was not pooled"
        return sup, sscale

    monkeypatch.setattr(pl, "pool_blocks", pool)
    monkeypatch.setattr(sb, "pool_supers", pool_supers)
    inp = _inputs([150, 120], torch.float32, seed=11, query_lens=[0, 12])   # ks = 150
    kw = dict(topk=K, block_size=B, block_topk=M, super_size=BS, super_topk=MS)
    idx, _ = hisa_index_triton(*inp.args(), k_scale=None, **kw)
    assert calls == {"first_block": 8, "first_super": 4}
    ref, _ = NS.naive_hisa_index_super(*inp.args(), **kw)
    assert_same_selection(idx, ref, inp.ks, naive_dsa_logits(*inp.args()))


def test_three_level_limits_are_per_window(monkeypatch):
    """The three-level path has no per-window block limit (its block stage scores the ms * Bs
    candidates), and its super-block limit counts a window's super-blocks, not the buffer's."""
    import hisa.ops.indexer.super_blocks as sb
    from hisa.ops.indexer.prefill import _kernel_check
    S = 32768 * 16 + 16                       # one window of 32,769 blocks of 16
    q = torch.zeros(2, H, D)
    k = torch.zeros(S, D)
    ks = torch.tensor([0, S - 10], dtype=torch.int32)
    ke = torch.tensor([S, S], dtype=torch.int32)
    with pytest.raises(ValueError, match="ks/ke: expected windows of at most 32768 blocks"):
        _kernel_check(q, k, ks, ke, 16, 4)
    _kernel_check(q, k, ks, ke, 16, 4, super_size=2, super_topk=4)
    monkeypatch.setattr(sb, "SELECT_MAX_ROW", 64)            # 64 super-blocks of 32 keys
    with pytest.raises(ValueError, match="ks/ke: expected windows of at most 64 super-blocks"):
        _kernel_check(q, k, ks, ke, 16, 4, super_size=2, super_topk=4)
    short = torch.tensor([S - 62 * 32, S - 10], dtype=torch.int32)   # 63 super-blocks at most
    _kernel_check(q, k, short, ke, 16, 4, super_size=2, super_topk=4)


def test_fp8_preselect_then_fp32_rescore_matches_its_twin(monkeypatch):
    # Two levels run as three with super-blocks of one block: FP8 reps pick M + margin blocks,
    # the fp32 reps keep M of them. The twin is the three-level reference given the same reps.
    # (Seed 15: margin 1 changes 5 rows against the fp32-only selection.)
    inp = _inputs(LENS, torch.float8_e4m3fn, seed=15, query_lens=QLENS)
    _, k, _ = prepare_operands(inp.q, inp.k)
    S = k.shape[0]
    means, _ = pool_blocks(k, inp.k_scale, block_size=B, out_dtype=torch.float32)
    fp8, scale = pool_supers(means, None, S, block_size=B, super_size=1,
                             out_dtype=torch.float8_e4m3fn)
    kw = dict(topk=K, block_size=B, block_topk=M)
    logits = naive_dsa_logits(*inp.args(), k_scale=inp.k_scale)
    for margin in (1, 3):
        got = hisa_index_triton(*inp.args(), k_scale=inp.k_scale, rescore_margin=margin, **kw)[0]
        check_index_format(got, inp.ks, inp.ke, K, exact_count=False)
        want, _ = NS.naive_hisa_index_super(*inp.args(), k_scale=inp.k_scale, super_size=1,
                                            super_topk=M + margin, pooled=means,
                                            super_pooled=fp8, super_scale=scale, **kw)
        assert_same_selection(got, want, inp.ks, logits)
        if margin == 1:   # the FP8 pre-selection really matters on these inputs
            plain = hisa_index_triton(*inp.args(), k_scale=inp.k_scale, rescore_margin=None,
                                      **kw)[0]
            assert not torch.equal(canonical_rows(want), canonical_rows(plain))
    # A margin past every window's block count re-scores every block: the fp32-rep selection.
    every = hisa_index_triton(*inp.args(), k_scale=inp.k_scale, rescore_margin=-(-S // B), **kw)[0]
    assert_same_selection(every, hisa_index_triton(*inp.args(), k_scale=inp.k_scale,
                                                   rescore_margin=None, **kw)[0],
                          inp.ks, logits)
    # The default for FP8 keys at two levels is the margin M // 2 (on windows past 8 M
    # blocks; these short ones stand in for them).
    monkeypatch.setattr(pipeline_mod, "RESCORE_MIN_BLOCKS_PER_M", 1)
    assert torch.equal(hisa_index_triton(*inp.args(), k_scale=inp.k_scale, **kw)[0],
                       hisa_index_triton(*inp.args(), k_scale=inp.k_scale,
                                         rescore_margin=M // 2, **kw)[0])
    with pytest.raises(ValueError, match="rescore_margin"):
        hisa_index_triton(*inp.args(), k_scale=inp.k_scale, rescore_margin=2, super_size=BS,
                          super_topk=MS, **kw)
