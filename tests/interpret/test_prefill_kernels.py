"""Interpreter tier: every Triton prefill kernel against its naive twin on tiny shapes.

Runs on the CPU under ``TRITON_INTERPRET=1`` (set by this folder's conftest). Inputs are fp32
and fp8 only (bf16 ``tl.dot`` is unreliable in the interpreter; the GPU tier covers bf16).
Outputs are poisoned before each run so an unwritten entry fails.
"""
from __future__ import annotations

import pytest
import torch

from hisa.ops.dsa.naive import (is_outside, mark_outside, naive_dsa_index, naive_dsa_logits,
                                naive_topk)
from hisa.ops.indexer import naive as N
from hisa.testing.compare import assert_same_selection, canonical_rows, check_index_format
from hisa.testing.inputs import make_indexer_inputs
from hisa.utils.quant import quantize_fp8

triton = pytest.importorskip("triton")

from hisa.ops.dsa.prefill import dsa_index_triton, dsa_logits, prepare_operands  # noqa: E402
from hisa.ops.indexer import topk as topk_mod  # noqa: E402
from hisa.ops.indexer.block_scores import block_scores, block_select  # noqa: E402
from hisa.ops.indexer.pipeline import hisa_index_triton, hisa_prefill_stages  # noqa: E402
from hisa.ops.indexer.pool import pool_blocks  # noqa: E402
from hisa.ops.indexer.reps import rep_dtype  # noqa: E402
from hisa.ops.indexer.select import select_blocks, select_tokens  # noqa: E402
from hisa.ops.indexer.token_scores import token_scores, token_select  # noqa: E402

#: Relative slack between kernel scores and the fp32 reference: both accumulate exact products
#: of fp8/fp32 inputs in fp32, in different orders (a few ulps of the row's largest terms).
SCORE_RTOL = 1e-5
SCORE_ATOL = 1e-5
DTYPES = [torch.float32, torch.float8_e4m3fn]
POISON_IDX = -7
H, D = 16, 64           # tiny heads / dim keep the interpreter fast; D=128 is covered once
B, M, K = 16, 4, 24     # block_size, block_topk, topk: m*B = 64 candidates


def _inputs(seq_lens, dtype, seed, **kw):
    return make_indexer_inputs(seq_lens, heads=kw.pop("heads", H), head_dim=kw.pop("dim", D),
                               dtype=dtype, seed=seed, clustered=True, **kw)


def _assert_close_with_inf(a, b):
    """Same outside-marker / -inf / +inf / NaN patterns exactly, finite values close."""
    patterns = {"outside": is_outside, "-inf": torch.isneginf, "+inf": torch.isposinf,
                "NaN": lambda x: torch.isnan(x) & ~is_outside(x)}
    for name, pattern in patterns.items():
        assert torch.equal(pattern(a), pattern(b)), f"{name} masks differ"
    fin = torch.isfinite(b)
    torch.testing.assert_close(a[fin], b[fin], rtol=SCORE_RTOL, atol=SCORE_ATOL)


def test_topk_rows_matches_naive_and_handles_ties(monkeypatch):
    g = torch.Generator().manual_seed(3)
    R, W, k = 8, 700, 32
    x = torch.randn(R, W, generator=g)
    x[1] = 0.25                                    # one giant tie: the overflow fallback
    mark_outside(x[2], torch.arange(W) >= 50)      # fewer selectable scores than k
    x[4, 3:5] = float("nan")                       # NaN ranks below -inf, both selectable
    x[5, 2:9] = float("-inf")
    x[3, ::2] = x[3, 1::2]                         # pairwise ties inside the threshold bin
    x[7, 100:200] = 0.5                            # ties at the threshold of the sampled path
    # Paths (scratch 128, sample 64): rows <= 128 wide are selected directly; 300-wide rows
    # through the sampled threshold; 700-wide rows overflow it into the histogram path.
    ks = torch.tensor([0, 3, 0, 10, 7, 0, 100, 0], dtype=torch.int32)
    ke = torch.tensor([700, 690, 700, 600, 7, 20, 400, 300], dtype=torch.int32)
    monkeypatch.setattr(topk_mod, "TOPK_CHUNK", 256)
    monkeypatch.setattr(topk_mod, "TOPK_SCRATCH", 128)   # row 1 overflows the scratch
    monkeypatch.setattr(topk_mod, "TOPK_SAMPLE", 64)
    idx = torch.full((R, k), POISON_IDX, dtype=torch.int32)
    val = torch.full((R, k), float("nan"))
    topk_mod.topk_rows(x, ks, ke, t0=0, lo=0, topk=k, out_idx=idx, out_val=val)
    for r in range(R):
        row = x[r, ks[r]:ke[r]]
        ref_cols, ref_vals = naive_topk(row[None], k)
        n_valid = int((ref_cols >= 0).sum())
        assert int((idx[r] >= 0).sum()) == n_valid
        assert bool((idx[r, n_valid:] == -1).all())
        got = idx[r, :n_valid].long()
        assert len(set(got.tolist())) == n_valid
        # Ties go to the lower index, as in the reference: the sets are equal.
        assert set(got.tolist()) == set(ref_cols[0, :n_valid].tolist()), r
        torch.testing.assert_close(val[r, :n_valid], row[got], equal_nan=True)
        assert bool(torch.isneginf(val[r, n_valid:]).all())


def test_topk_rows_fast_kernel_lists_exactly_the_rows_it_cannot_select(monkeypatch):
    """The fast kernel selects narrow rows and wide rows whose sampled candidates fit; it
    lists, unwritten, the rows of the general kernel's one-shot width, the rows expected to
    keep too many, the ones whose sample kept too many (ties) or whose threshold is no number
    (mostly outside entries), and the general kernel selects those."""
    g = torch.Generator().manual_seed(11)
    R, W, k = 8, 8000, 16
    x = torch.randn(R, W, generator=g)
    x[2] = 0.5                                     # all tied: the sample keeps the whole row
    mark_outside(x[4], torch.arange(W) % 200 != 0)  # 10 selectable scores < k
    x[5] = torch.round(x[5] * 2) / 2               # ties at the threshold, fast path
    x[3] = -torch.arange(W).float()                # its sample would keep 188: listed by rule
    x[7, ::7] = float("nan")                       # NaN and -inf below the threshold: fast
    x[7, 3::7] = float("-inf")
    # Fast cap 256, general register row 512, sample 256: row 0 (200 keys) direct; row 6
    # (400 keys) left to the general kernel's one-shot selection; rows 1, 2, 4, 5, 7 (2,000
    # keys) sampled, about 2000 * 11 / 256 = 86 kept; row 3 (8,000 keys) is expected to keep
    # 219 > 208 (13/16 of the cap) and is listed unread.
    ke = torch.tensor([200, 2000, 2000, 8000, 2000, 2000, 400, 2000], dtype=torch.int32)
    ks = torch.zeros(R, dtype=torch.int32)
    monkeypatch.setattr(topk_mod, "TOPK_CHUNK", 128)
    monkeypatch.setattr(topk_mod, "TOPK_FAST_CHUNK", 64)     # many chunks: the prefetch chain
    monkeypatch.setattr(topk_mod, "TOPK_SCRATCH", 512)
    monkeypatch.setattr(topk_mod, "TOPK_FAST_CAP", 256)
    monkeypatch.setattr(topk_mod, "TOPK_SAMPLE", 256)
    idx = torch.full((R, k), POISON_IDX, dtype=torch.int32)
    val = torch.full((R, k), float("nan"))
    left = torch.full((R + 1,), POISON_IDX, dtype=torch.int32)
    left[0] = 0
    topk_mod.topk_rows(x, ks, ke, t0=0, lo=0, topk=k, out_idx=idx, out_val=val,
                       left=(left[1:], left[:1]))
    n_left = int(left[0])
    assert sorted(left[1:1 + n_left].tolist()) == [2, 3, 4, 6]
    for r in range(R):
        ref_cols, ref_vals = naive_topk(x[r:r + 1, :int(ke[r])], k)
        assert sorted(idx[r].tolist()) == sorted(ref_cols[0].tolist()), r
        n = int((ref_cols >= 0).sum())
        torch.testing.assert_close(val[r, :n].sort().values, ref_vals[0, :n].sort().values)


@pytest.mark.parametrize("kind", ["plain", "ties", "nan", "inf", "outside"])
def test_topk_rows_fast_and_general_paths_equal_the_reference(monkeypatch, kind):
    """Random windows over rows with ties, NaN, +-inf or outside entries: whichever kernel
    takes a row (fast direct, fast sampled with its float compare, listed), the set is the
    reference's."""
    g = torch.Generator().manual_seed(["plain", "ties", "nan", "inf", "outside"].index(kind))
    R, W, k = 6, 3000, 16
    x = torch.randn(R, W, generator=g)
    if kind == "ties":
        x = torch.round(x * 2) / 2
    elif kind == "nan":
        x[:, ::5] = float("nan")
    elif kind == "inf":
        x[:, 1::3] = float("-inf")
        x[:, ::11] = float("inf")
    elif kind == "outside":
        mark_outside(x, torch.rand(R, W, generator=g) < 0.5)
    ks = torch.randint(0, 500, (R,), generator=g, dtype=torch.int32)
    ke = torch.clamp(ks + torch.randint(0, W, (R,), generator=g, dtype=torch.int32), max=W)
    ke[0] = ks[0] + 100                           # fast, direct
    ke[1] = ks[1] + 1000                          # fast, sampled
    for name, value in (("TOPK_CHUNK", 64), ("TOPK_FAST_CHUNK", 32), ("TOPK_SCRATCH", 256),
                        ("TOPK_FAST_CAP", 128), ("TOPK_SAMPLE", 128)):
        monkeypatch.setattr(topk_mod, name, value)
    idx = torch.full((R, k), POISON_IDX, dtype=torch.int32)
    val = torch.full((R, k), float("nan"))
    topk_mod.topk_rows(x, ks, ke, t0=0, lo=0, topk=k, out_idx=idx, out_val=val)
    for r in range(R):
        ref, _ = naive_topk(x[r:r + 1, int(ks[r]):int(ke[r])], k)
        assert sorted(idx[r].tolist()) == sorted(ref[0].tolist()), r


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qpd", [1, 2, 4])
def test_dsa_logits_match_naive(dtype, qpd):
    # 107 queries: the last query tile is partial and, for qpd > 1, so is its last dot group.
    inp = _inputs([37, 0, 70], dtype, seed=1)
    q, k, prec = prepare_operands(inp.q, inp.k)
    T, S = q.shape[0], k.shape[0]
    out = torch.full((T, S), float("nan"))
    dsa_logits(q, k, inp.weights, inp.ks, inp.ke, k_scale=inp.k_scale, t0=0, n_rows=T, lo=0,
               out=out, prec=prec, queries_per_dot=qpd)
    ref = naive_dsa_logits(*inp.args(), k_scale=inp.k_scale)
    inwin = torch.isfinite(ref)
    torch.testing.assert_close(out[inwin], ref[inwin], rtol=SCORE_RTOL, atol=SCORE_ATOL)
    assert bool(torch.isnan(out[~inwin]).all())          # nothing written outside the window


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_lens,topk", [([1], 8), ([63, 0, 66], 24), ([129], 200)])
def test_dsa_index_matches_naive(dtype, seq_lens, topk):
    inp = _inputs(seq_lens, dtype, seed=2)
    out = torch.full((inp.num_queries, topk), POISON_IDX, dtype=torch.int32)
    idx, vals = dsa_index_triton(*inp.args(), k_scale=inp.k_scale, topk=topk, out=out,
                                 need_scores=True)
    assert idx.data_ptr() == out.data_ptr()
    check_index_format(idx, inp.ks, inp.ke, topk)
    ref_idx, ref_vals = naive_dsa_index(*inp.args(), k_scale=inp.k_scale, topk=topk)
    logits = naive_dsa_logits(*inp.args(), k_scale=inp.k_scale)
    assert_same_selection(idx, ref_idx, inp.ks, logits)
    srt = torch.sort(vals, dim=1, descending=True).values
    _assert_close_with_inf(srt, ref_vals)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", [5, 16, 70])
def test_pool_blocks_matches_naive(dtype, S):
    # fp32 means here; the FP8 re-quantization is checked on the GPU tier (Triton 3.6's
    # interpreter rounds fp32 -> e4m3 wrongly: 124.2 becomes 64).
    inp = _inputs([S], dtype, seed=4)
    means, no_scale = pool_blocks(inp.k, inp.k_scale, block_size=B, out_dtype=torch.float32)
    ref = N.naive_pool_blocks(inp.k, inp.k_scale, B)
    assert no_scale is None
    torch.testing.assert_close(means, ref, rtol=1e-6, atol=1e-6)
    if dtype == torch.float8_e4m3fn:
        _, scale = pool_blocks(inp.k, inp.k_scale, block_size=B)
        torch.testing.assert_close(scale, quantize_fp8(ref, group_size=D)[1])


def _pooled(inp):
    """Pool with the kernel; the references then score the same representatives."""
    q, k, prec = prepare_operands(inp.q, inp.k)
    pooled, pscale = pool_blocks(k, inp.k_scale, block_size=B)
    return q, k, prec, pooled, pscale


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_scores_and_selection_match_naive(dtype):
    # Packed sequences whose blocks straddle boundaries; an empty one; a 1-token one; windows
    # of at most m blocks (kept whole without a search) and of up to 7 (scored and searched).
    inp = _inputs([37, 0, 50, 1, 12, 100], dtype, seed=5)
    q, k, prec, pooled, pscale = _pooled(inp)
    got = block_scores(q, pooled, inp.weights, inp.ks, inp.ke, block_size=B,
                       pooled_scale=pscale, prec=prec)
    ref = N.naive_block_scores(inp.q, pooled.float(), inp.weights, inp.ks, inp.ke,
                               block_size=B, pooled_scale=pscale)
    _assert_close_with_inf(got, ref)
    # Standalone selection on the same scores: exact (same tie rule).
    ids = select_blocks(got, inp.ks, inp.ke, block_size=B, block_topk=M)
    assert torch.equal(ids, N.naive_select_blocks(got, M))
    # Fused scores + selection: same ids.
    fused = torch.full_like(ids, POISON_IDX)
    block_select(q, pooled, inp.weights, inp.ks, inp.ke, block_size=B, block_topk=M,
                 pooled_scale=pscale, prec=prec, out=fused)
    assert torch.equal(fused, ids)
    n_blocks = (inp.ke + B - 1) // B - inp.ks // B
    assert bool((n_blocks <= M).any()) and bool((n_blocks > M).any())


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_scores_and_selection_match_naive(dtype):
    inp = _inputs([37, 0, 50, 1, 12], dtype, seed=6)
    q, k, prec, pooled, pscale = _pooled(inp)
    ids = N.naive_select_blocks(
        N.naive_block_scores(inp.q, pooled.float(), inp.weights, inp.ks, inp.ke,
                             block_size=B, pooled_scale=pscale), M)
    got = token_scores(q, k, inp.weights, inp.ks, inp.ke, ids, block_size=B,
                       k_scale=inp.k_scale, prec=prec)
    ref, pos = N.naive_token_scores(inp.q, inp.k, inp.weights, inp.ks, inp.ke, ids,
                                    block_size=B, k_scale=inp.k_scale)
    _assert_close_with_inf(got, ref)
    # Standalone token selection on the same scores: exact (same tie rule).
    idx, vals = select_tokens(got, ids, inp.ks, block_size=B, topk=K, need_scores=True)
    ref_sel, ref_vals = N.naive_select_tokens(got, pos, K)
    assert torch.equal(canonical_rows(idx), canonical_rows(N.naive_to_offsets(ref_sel, inp.ks)))
    assert torch.equal(torch.sort(vals, dim=1, descending=True).values, ref_vals)
    # Fused scores + selection: same offsets.
    fused = torch.full_like(idx, POISON_IDX)
    token_select(q, k, inp.weights, inp.ks, inp.ke, ids, block_size=B, topk=K,
                 k_scale=inp.k_scale, prec=prec, out=fused)
    assert_same_selection(fused, idx, inp.ks, naive_dsa_logits(*inp.args(),
                                                                k_scale=inp.k_scale))


def _poison_keys(k, k_scale, rows):
    """Copies of k (and k_scale) whose ``rows`` hold NaN keys (and infinite scales)."""
    k, k_scale = k.clone(), None if k_scale is None else k_scale.clone()
    k.view(torch.uint8)[rows] = 0x7F if k.dtype == torch.float8_e4m3fn else 0
    if k.dtype != torch.float8_e4m3fn:
        k[rows] = float("nan")
    if k_scale is not None:
        k_scale[rows] = float("inf")
    return k, k_scale


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_scores_ignore_the_keys_outside_every_window(dtype):
    # The token stage reads whole blocks (rows outside the window at a clamped position, no
    # per-row mask) and marks those rows outside afterwards: keys no window holds, in the
    # kept blocks and past the last window (a partial tail block), must not change a bit.
    inp = _inputs([37, 50, 13], dtype, seed=8)
    ks = torch.minimum(inp.ks + 5, inp.ke)        # windows start inside a block
    ke = torch.maximum(inp.ke - 3, ks)            # and end before their sequence's last keys
    S = inp.k.shape[0]
    covered = torch.zeros(S + 7, dtype=torch.bool)
    for a, b in zip(ks.tolist(), ke.tolist()):
        covered[a:b] = True
    q, k, prec = prepare_operands(inp.q, inp.k)
    tail = torch.zeros(7, k.shape[1], dtype=k.dtype)          # S + 7 keys: a partial block
    k = torch.cat([k, tail])
    k_scale = None if inp.k_scale is None else torch.cat([inp.k_scale, torch.ones(7)])
    ids = N.naive_select_blocks(N.naive_block_scores(
        inp.q, pool_blocks(k, k_scale, block_size=B)[0].float(), inp.weights, ks, ke,
        block_size=B), M)
    assert (~covered).sum() > 20 and (ids >= 0).sum() > 0
    bad_k, bad_scale = _poison_keys(k, k_scale, ~covered)
    clean = token_scores(q, k, inp.weights, ks, ke, ids, block_size=B, k_scale=k_scale,
                         prec=prec)
    poisoned = token_scores(q, bad_k, inp.weights, ks, ke, ids, block_size=B,
                            k_scale=bad_scale, prec=prec)
    assert torch.equal(poisoned.view(torch.int32), clean.view(torch.int32))
    ref, _ = N.naive_token_scores(inp.q, k.float() if dtype == torch.float32 else k,
                                  inp.weights, ks, ke, ids, block_size=B, k_scale=k_scale)
    _assert_close_with_inf(clean, ref)
    want = torch.full((ks.shape[0], K), POISON_IDX, dtype=torch.int32)
    got = want.clone()
    token_select(q, k, inp.weights, ks, ke, ids, block_size=B, topk=K, k_scale=k_scale,
                 prec=prec, out=want)
    token_select(q, bad_k, inp.weights, ks, ke, ids, block_size=B, topk=K, k_scale=bad_scale,
                 prec=prec, out=got)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_scores_stop_at_the_last_kept_block(dtype, monkeypatch):
    # The MMA loop runs to the last non-padding id only, and the padding after it is marked
    # outside without a score: a poisoned output buffer must come back exactly as the loop over
    # all m ids writes it, for trailing padding, padding between kept blocks, no kept block,
    # and every id kept.
    from hisa.ops.indexer import token_scores as token_mod
    # Nine queries, more than the interpreter's persistent programs, so the fused path reuses
    # a program's scratch row after a query that filled it.
    inp = _inputs([70], dtype, seed=12)                  # 70 keys: blocks 0..4 of B = 16
    rows = torch.tensor([69, 69, 40, 69] * 2 + [69])
    qf, w = inp.q[rows], inp.weights[rows]
    ks = torch.zeros(9, dtype=torch.int32)
    ke = torch.tensor([70, 70, 41, 70] * 2 + [70], dtype=torch.int32)
    q, k, prec = prepare_operands(qf, inp.k)
    ids = torch.tensor([[0, 2, -1, -1], [-1, 1, -1, 3], [-1, -1, -1, -1], [0, 1, 2, 4]] * 2
                       + [[3, -1, -1, -1]], dtype=torch.int32)
    runs = {}
    for trip in ("live", "all"):
        monkeypatch.setattr(token_mod, "TOKEN_TRIP", trip)
        buf = torch.full((9 * M * B,), float("nan"))
        runs[trip] = token_scores(q, k, w, ks, ke, ids, block_size=B, k_scale=inp.k_scale,
                                  prec=prec, out=buf).clone()
    assert torch.equal(runs["live"].view(torch.int32), runs["all"].view(torch.int32))
    ref, pos = N.naive_token_scores(qf, inp.k, w, ks, ke, ids, block_size=B,
                                    k_scale=inp.k_scale)
    _assert_close_with_inf(runs["live"], ref)
    live = runs["live"]
    assert bool(is_outside(live[2]).all())
    assert not bool(is_outside(live[3, :3 * B]).any())      # blocks 0-2 whole, block 4 from 64
    monkeypatch.setattr(token_mod, "TOKEN_TRIP", "live")
    fused = torch.full((9, K), POISON_IDX, dtype=torch.int32)
    token_select(q, k, w, ks, ke, ids, block_size=B, topk=K, k_scale=inp.k_scale, prec=prec,
                 out=fused)
    ref_sel, _ = N.naive_select_tokens(ref, pos, K)
    assert torch.equal(canonical_rows(fused), canonical_rows(N.naive_to_offsets(ref_sel, ks)))


@pytest.mark.parametrize("radix", [1, 8, 0])
@pytest.mark.parametrize("n_valid", [K - 1, K, K + 1])
def test_token_selection_around_k_selectable_candidates(n_valid, radix):
    # Rows with at most K selectable candidates keep them all without the threshold search;
    # one more and the search runs. Ties and the outside marker included.
    T = 3
    g = torch.Generator().manual_seed(n_valid)
    scores = torch.randn(T, M * B, generator=g).round(decimals=1)     # many ties
    cols = torch.stack([torch.randperm(M * B, generator=g)[:n_valid] for _ in range(T)])
    keep = torch.zeros(T, M * B, dtype=torch.bool).scatter_(1, cols, True)
    mark_outside(scores, ~keep)
    ids = torch.arange(M, dtype=torch.int32).repeat(T, 1)
    ks = torch.zeros(T, dtype=torch.int32)
    idx, vals = select_tokens(scores, ids, ks, block_size=B, topk=K, need_scores=True,
                              radix=radix)
    pos = N.candidate_positions(ids, B, M * B)
    ref_sel, ref_vals = N.naive_select_tokens(scores, pos, K)
    assert torch.equal(canonical_rows(idx), canonical_rows(N.naive_to_offsets(ref_sel, ks)))
    assert torch.equal(torch.sort(vals, dim=1, descending=True).values, ref_vals)
    assert int((idx >= 0).sum(1).min()) == min(n_valid, K)


def test_token_stage_without_keys_reads_nothing():
    inp = _inputs([0, 0], torch.float32, seed=9)
    T = 3
    q = torch.randn(T, H, D)
    w = torch.randn(T, H)
    ks = ke = torch.zeros(T, dtype=torch.int32)
    ids = torch.full((T, M), -1, dtype=torch.int32)
    k = inp.k[:0]
    sc = token_scores(q, k, w, ks, ke, ids, block_size=B)
    assert sc.shape == (T, M * B) and bool(is_outside(sc).all())
    idx = torch.full((T, K), POISON_IDX, dtype=torch.int32)
    _, vals = token_select(q, k, w, ks, ke, ids, block_size=B, topk=K, out=idx,
                           need_scores=True)
    assert bool((idx == -1).all()) and bool(torch.isneginf(vals).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_hisa_index_matches_naive_pipeline(dtype):
    # Sequences longer than m*B = 64 keys, so blocks are really pruned; S < B and empty too.
    inp = _inputs([100, 0, 9, 12], dtype, seed=7)
    _, k, _, _, _ = _pooled(inp)
    # The pipeline's own representatives (fp32 means, see hisa.ops.indexer.reps)
    pooled, pscale = pool_blocks(k, inp.k_scale, block_size=B, out_dtype=rep_dtype(k.dtype))
    assert pscale is None
    out = torch.full((inp.num_queries, K), POISON_IDX, dtype=torch.int32)
    idx, vals = hisa_index_triton(*inp.args(), k_scale=inp.k_scale, topk=K, block_size=B,
                                  block_topk=M, out=out, need_scores=True)
    check_index_format(idx, inp.ks, inp.ke, K)
    ref_idx, ref_vals = N.naive_hisa_index(*inp.args(), k_scale=inp.k_scale, topk=K,
                                           block_size=B, block_topk=M, pooled=pooled.float(),
                                           pooled_scale=pscale)
    assert_same_selection(idx, ref_idx, inp.ks, naive_dsa_logits(*inp.args(),
                                                                  k_scale=inp.k_scale))
    _assert_close_with_inf(torch.sort(vals, dim=1, descending=True).values, ref_vals)


def test_prefill_stages_compute_the_end_to_end_result():
    # 600 keys = 38 blocks, past 8 m: the default runs the pre-selection.
    inp = _inputs([600, 0, 9, 12], torch.float8_e4m3fn, seed=10, query_lens=[16, 0, 9, 12])
    idx, _ = hisa_index_triton(*inp.args(), k_scale=inp.k_scale, topk=K, block_size=B,
                               block_topk=M)
    # FP8 keys: the FP8 pre-selection, then the re-score on the fp32 reps (the default)
    names = {None: ["pool", "block_select", "token_scores", "select_tokens"],
             "auto": ["pool", "pool_supers", "super_select", "block_select", "token_scores",
                      "select_tokens"]}
    for margin, want in names.items():
        stages = hisa_prefill_stages(*inp.args(), k_scale=inp.k_scale, topk=K, block_size=B,
                                     block_topk=M, rescore_margin=margin)
        assert [name for name, _ in stages] == want
        state = None
        for _, fn in stages:
            state = fn()
        assert torch.equal(state["idx"], hisa_index_triton(
            *inp.args(), k_scale=inp.k_scale, topk=K, block_size=B, block_topk=M,
            rescore_margin=margin)[0])
    assert torch.equal(state["idx"], idx)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hisa_equals_flat_when_every_block_fits(dtype):
    # Every query has at most m eligible blocks (windows <= (m-1)*B keys, any alignment).
    inp = _inputs([30, 3, 20], dtype, seed=8, heads=32, dim=128)
    hisa = hisa_index_triton(*inp.args(), k_scale=inp.k_scale, topk=K, block_size=B,
                             block_topk=M)[0]
    flat = dsa_index_triton(*inp.args(), k_scale=inp.k_scale, topk=K)[0]
    assert_same_selection(hisa, flat, inp.ks, naive_dsa_logits(*inp.args(),
                                                                k_scale=inp.k_scale))


def test_kernel_shape_errors_name_the_argument():
    inp = _inputs([20], torch.float32, seed=9)
    with pytest.raises(ValueError, match="block_size"):
        hisa_index_triton(*inp.args(), k_scale=None, topk=8, block_size=24, block_topk=4)
    with pytest.raises(ValueError, match="block_size"):
        hisa_index_triton(*inp.args(), k_scale=None, topk=8, block_size=8, block_topk=4)
    bad = _inputs([20], torch.float32, seed=9, dim=96)
    with pytest.raises(ValueError, match="q"):
        dsa_index_triton(*bad.args(), k_scale=None, topk=8)


def test_block_stage_on_fp32_reps_of_fp8_keys():
    # The pipeline's default: FP8 queries cast to fp32 in the kernel against fp32 reps.
    inp = _inputs([37, 0, 50, 1, 12], torch.float8_e4m3fn, seed=6)
    q, k, prec = prepare_operands(inp.q, inp.k)
    pooled, pscale = pool_blocks(k, inp.k_scale, block_size=B, out_dtype=rep_dtype(k.dtype))
    assert pooled.dtype == torch.float32 and pscale is None
    got = block_scores(q, pooled, inp.weights, inp.ks, inp.ke, block_size=B, prec=prec)
    want = N.naive_block_scores(inp.q, pooled, inp.weights, inp.ks, inp.ke, block_size=B)
    _assert_close_with_inf(got, want)
    ids = block_select(q, pooled, inp.weights, inp.ks, inp.ke, block_size=B, block_topk=M,
                       prec=prec)
    assert torch.equal(ids, N.naive_select_blocks(want, M))
    # Reps narrower than the queries would quantize them inside the kernel: refused.
    with pytest.raises(TypeError, match="pooled"):
        block_scores(q.float(), pooled.to(torch.float8_e4m3fn), inp.weights, inp.ks, inp.ke,
                     block_size=B, prec=prec)


def test_rescore_default_applies_to_fp8_keys_at_two_levels_only():
    from hisa.ops.indexer.pipeline import AUTO, resolve_rescore_margin
    fp8, bf16, fp32 = torch.float8_e4m3fn, torch.bfloat16, torch.float32
    kw = dict(super_size=None, block_topk=64, max_blocks=1000)
    assert resolve_rescore_margin(AUTO, key_dtype=fp8, reps=fp32, **kw) == 32
    assert resolve_rescore_margin(AUTO, key_dtype=fp8, reps=bf16, **kw) == 32
    assert resolve_rescore_margin(AUTO, key_dtype=bf16, reps=fp32, **kw) is None
    assert resolve_rescore_margin(AUTO, key_dtype=fp8, reps=fp8, **kw) is None
    assert resolve_rescore_margin(AUTO, key_dtype=fp8, reps=fp32, **dict(kw, super_size=4)) \
        is None
    # past the register row of the candidate selection: the fp32 scan instead of an error
    assert resolve_rescore_margin(AUTO, key_dtype=fp8, reps=fp32,
                                  **dict(kw, block_topk=30000)) is None
    # no window longer than m + m/2 blocks: the pre-selection would keep every block
    assert resolve_rescore_margin(AUTO, key_dtype=fp8, reps=fp32,
                                  **dict(kw, max_blocks=96)) is None
    assert resolve_rescore_margin(None, key_dtype=fp8, reps=fp32, **kw) is None
    assert resolve_rescore_margin(5, key_dtype=fp8, reps=fp32, **kw) == 5
    for bad in ("half", -1, 1.5, True):
        with pytest.raises(ValueError, match="rescore_margin"):
            resolve_rescore_margin(bad, key_dtype=fp8, reps=fp32, **kw)
    with pytest.raises(ValueError, match="rescore_margin"):
        resolve_rescore_margin(5, key_dtype=bf16, reps=fp32, **kw)
    with pytest.raises(ValueError, match="rescore_margin: block_topk \\+ rescore_margin"):
        resolve_rescore_margin(40000, key_dtype=fp8, reps=fp32, **kw)


def test_rescore_default_waits_for_windows_past_eight_m_blocks():
    # Shorter windows take the fp32 scan: the pre-selection's extra launches cost more than it
    # saves there (H200 16K-64K, RESCORE_MIN_BLOCKS_PER_M).
    from hisa.ops.indexer.pipeline import AUTO, RESCORE_MIN_BLOCKS_PER_M, resolve_rescore_margin
    fp8, fp32 = torch.float8_e4m3fn, torch.float32
    for m in (32, 64):
        edge = RESCORE_MIN_BLOCKS_PER_M * m
        kw = dict(key_dtype=fp8, reps=fp32, super_size=None, block_topk=m)
        assert resolve_rescore_margin(AUTO, max_blocks=edge, **kw) is None
        assert resolve_rescore_margin(AUTO, max_blocks=edge + 1, **kw) == m // 2
        assert resolve_rescore_margin(3, max_blocks=m + 4, **kw) == 3     # asked: applies


def test_rescore_margin_is_validated():
    inp = _inputs([100, 12], torch.float8_e4m3fn, seed=8)
    kw = dict(k_scale=inp.k_scale, topk=K, block_size=B, block_topk=M)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="rescore_margin"):
            hisa_index_triton(*inp.args(), rescore_margin=bad, **kw)
    with pytest.raises(ValueError, match="rescore_margin"):
        hisa_index_triton(*inp.args(), rescore_margin=2, reps_dtype=torch.float8_e4m3fn, **kw)


class _ConstexprSpy:
    """Stands in for a jitted kernel and records the value of one constexpr at each launch."""

    def __init__(self, kernel, name):
        self.kernel, self.name, self.seen = kernel, name, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(kwargs[self.name])
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("switch,constexpr", [("SELECT_TOKENS_RADIX", "RADIX"),
                                              ("SELECT_TOKENS_BLOCK_SLOTS", "BLOCK_SLOTS")])
def test_each_token_select_switch_reaches_both_token_selects_and_changes_nothing(
        monkeypatch, switch, constexpr):
    # SELECT_TOKENS_RADIX (0, the interpolation search, by default; 1 the bit search) and
    # SELECT_TOKENS_BLOCK_SLOTS (the store's slots per block or one scan over the row) reach
    # the unfused select of the end-to-end call and the fused token stage, and flipping
    # either changes no offset or score.
    from hisa.ops.indexer import select as select_mod
    from hisa.ops.indexer import token_scores as token_mod
    inp = _inputs([100, 0, 9, 12, 70], torch.float8_e4m3fn, seed=13)
    kw = dict(k_scale=inp.k_scale, topk=K, block_size=B, block_topk=M, need_scores=True)
    want = hisa_index_triton(*inp.args(), **kw)
    q, k, prec, pooled, pscale = _pooled(inp)
    ids = block_select(q, pooled, inp.weights, inp.ks, inp.ke, block_size=B, block_topk=M,
                       pooled_scale=pscale, prec=prec)
    fused_kw = dict(block_size=B, topk=K, k_scale=inp.k_scale, prec=prec, need_scores=True)
    fused_want = token_select(q, k, inp.weights, inp.ks, inp.ke, ids, **fused_kw)
    other = type(getattr(select_mod, switch))(1 - getattr(select_mod, switch))
    monkeypatch.setattr(select_mod, switch, other)
    unfused = _ConstexprSpy(select_mod._select_tokens_kernel, constexpr)
    fused = _ConstexprSpy(token_mod._token_scores_kernel, constexpr)
    monkeypatch.setattr(select_mod, "_select_tokens_kernel", unfused)
    monkeypatch.setattr(token_mod, "_token_scores_kernel", fused)
    got = hisa_index_triton(*inp.args(), **kw)
    fused_got = token_select(q, k, inp.weights, inp.ks, inp.ke, ids, **fused_kw)
    assert unfused.seen and set(unfused.seen) == {other}
    assert fused.seen and set(fused.seen) == {other}
    for a, b in ((got, want), (fused_got, fused_want)):
        assert torch.equal(a[0], b[0])
        assert torch.equal(a[1].view(torch.int32), b[1].view(torch.int32))


class _LaunchSpy:
    """Stands in for a kernel: records each launch's keyword options, then launches."""

    def __init__(self, kernel):
        self.kernel, self.kwargs = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kwargs.append(kwargs)
            return self.kernel[grid](*args, **{k: v for k, v in kwargs.items()
                                               if k != "maxnreg"})
        return launch


def test_the_token_select_register_cap_reaches_the_launch_on_cuda_only(monkeypatch):
    # The cap travels as Triton's maxnreg on CUDA devices; 0 lifts it, None takes the
    # module default. The launch is spied on with a CUDA-looking cap helper, since the CPU
    # run itself launches uncapped (the helper returns nothing for a CPU device).
    from hisa.ops.indexer import select as select_mod
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(select_mod, "SELECT_TOKENS_MAXNREG", 168)
    assert select_mod._register_cap(cuda, None) == {"maxnreg": 168}
    assert select_mod._register_cap(torch.device("cuda", 1), 128) == {"maxnreg": 128}
    assert select_mod._register_cap(cuda, 0) == {}
    assert select_mod._register_cap(cpu, None) == {}
    monkeypatch.setattr(select_mod, "SELECT_TOKENS_MAXNREG", None)
    assert select_mod._register_cap(cuda, None) == {}
    monkeypatch.setattr(select_mod, "SELECT_TOKENS_MAXNREG", 168)
    calls, real_cap = [], select_mod._register_cap

    def as_if_cuda(device, maxnreg):
        calls.append((device, maxnreg))
        return real_cap(cuda, maxnreg)

    spy = _LaunchSpy(select_mod._select_tokens_kernel)
    monkeypatch.setattr(select_mod, "_register_cap", as_if_cuda)
    monkeypatch.setattr(select_mod, "_select_tokens_kernel", spy)
    scores = torch.randn(3, M * B)
    ids = torch.arange(M, dtype=torch.int32).repeat(3, 1)
    ks = torch.zeros(3, dtype=torch.int32)
    want, _ = select_tokens(scores, ids, ks, block_size=B, topk=K, maxnreg=0)
    got, _ = select_tokens(scores, ids, ks, block_size=B, topk=K)
    assert calls == [(cpu, 0), (cpu, None)]
    assert "maxnreg" not in spy.kwargs[0] and spy.kwargs[1]["maxnreg"] == 168
    assert torch.equal(got, want)


@pytest.mark.parametrize("block_size,slots", [(16, None), (16, False), (12, None)])
def test_token_select_slots_per_block_and_per_row_match_the_twin(block_size, slots):
    # A power-of-two B takes the per-block slot scan of _store_candidates unless block_slots
    # is off, any other B the one scan over the row (select_tokens accepts both; the
    # pipeline only power-of-two B): each
    # must write the twin's set, the scores beside their own offsets, the valid entries in
    # ascending candidate order, then the padding. Blocks of -1 ids hold outside markers,
    # as the pipeline writes them; one row has fewer selectable candidates than k.
    T, M, K = 5, 5, 20
    g = torch.Generator().manual_seed(8)
    scores = torch.randn(T, M * block_size, generator=g)
    # Ids from 1 up: every offset is then >= B - ks > 0, so no valid entry can read as -1.
    ids = torch.stack([torch.randperm(40, generator=g)[:M].sort().values + 1 for _ in range(T)])
    ids = ids.to(torch.int32)
    ids[2, 3:] = -1
    mark_outside(scores[2], torch.arange(M * block_size) >= 3 * block_size)
    mark_outside(scores[4], torch.arange(M * block_size) >= 7)                  # 7 < K
    ks = torch.randint(0, 5, (T,), generator=g, dtype=torch.int32)
    idx, vals = select_tokens(scores, ids, ks, block_size=block_size, topk=K, need_scores=True,
                              block_slots=slots)
    col = torch.arange(M * block_size)
    pos = (ids.long().repeat_interleave(block_size, 1) * block_size + col % block_size)
    pos = torch.where(ids.long().repeat_interleave(block_size, 1) >= 0, pos, -1)
    ref_sel, ref_vals = N.naive_select_tokens(scores, pos, K)
    assert torch.equal(canonical_rows(idx), canonical_rows(N.naive_to_offsets(ref_sel, ks)))
    for t in range(T):
        n = int((idx[t] >= 0).sum())
        assert (idx[t, n:] == -1).all() and torch.isneginf(vals[t, n:]).all()
        assert (idx[t, 1:n] > idx[t, :n - 1]).all()              # index order, ids ascending
        c = (idx[t, :n].long() + ks[t]) // block_size
        slot_of = {int(b): j for j, b in enumerate(ids[t].tolist())}
        cand = torch.tensor([slot_of[int(b)] for b in c]) * block_size + \
            (idx[t, :n].long() + ks[t]) % block_size
        assert torch.equal(vals[t, :n], scores[t, cand])
    assert torch.equal(torch.sort(vals, 1, descending=True).values.view(torch.int32),
                       ref_vals.view(torch.int32))


def test_token_selection_by_byte_histogram_equals_the_bit_passes():
    """``select_tokens(radix=8)`` (the byte-histogram threshold search, a probe variant)
    returns RADIX = 1's indices and scores, slot for slot: continuous scores, scores tied in
    their high bytes, rows with fewer selectable candidates than k, NaN and infinities."""
    T, M, B, K = 6, 4, 16, 20
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(T, M * B, generator=g)
    scores[1] = torch.randint(0, 3, (M * B,), generator=g).float()           # 3 values
    scores[2] = 1.0 + torch.randint(0, 9, (M * B,), generator=g).float() * 2 ** -23
    mark_outside(scores[3], torch.arange(M * B) >= 11)                        # 11 < K
    scores[4, ::5] = float("nan")
    scores[4, 1::9] = float("inf")
    scores[5, ::2] = float("-inf")
    ids = torch.randint(0, 50, (T, M), generator=g, dtype=torch.int32)
    ks = torch.randint(0, 8, (T,), generator=g, dtype=torch.int32)
    a = select_tokens(scores, ids, ks, block_size=B, topk=K, need_scores=True, radix=1)
    for radix in (8, 0):        # 0: the interpolation search (the default)
        b = select_tokens(scores, ids, ks, block_size=B, topk=K, need_scores=True, radix=radix)
        assert torch.equal(a[0], b[0])
        assert torch.equal(a[1].view(torch.int32), b[1].view(torch.int32))
