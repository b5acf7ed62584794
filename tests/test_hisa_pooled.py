"""hisa_index(pooled=): block representatives kept by the caller (a decode cache pools each
block once) instead of pooled from k on every call."""
import pytest
import torch

import hisa
from hisa.ops.indexer import naive as hn
from hisa.testing.inputs import make_indexer_inputs

B, M, K = 16, 4, 24          # m * B = 64 < the windows below: HISA prunes
LENS = [150, 70, 5]          # packed sequences; blocks straddle their boundaries


def run(inp, **kw):
    return hisa.hisa_index(*inp.args(), k_scale=inp.k_scale, topk=K, block_size=B,
                           block_topk=M, return_scores=True, backend="torch", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_given_means_equal_the_default_pooling(dtype):
    inp = make_indexer_inputs(LENS, heads=4, head_dim=32, dtype=dtype, clustered=True, seed=1)
    pooled = hn.naive_pool_blocks(inp.k, inp.k_scale, B)
    want_idx, want_scores = run(inp)
    idx, scores = run(inp, pooled=pooled)
    assert torch.equal(idx, want_idx) and torch.equal(scores, want_scores)


def test_tail_block_row_is_never_read():
    inp = make_indexer_inputs(LENS, heads=4, head_dim=32, dtype=torch.float32, clustered=True)
    assert sum(LENS) % B, "the key buffer must end in an incomplete block"
    pooled = hn.naive_pool_blocks(inp.k, None, B)
    pooled[-1] = 1e6                         # any finite placeholder
    assert torch.equal(run(inp, pooled=pooled)[0], run(inp)[0])


def test_given_rows_rank_the_blocks():
    """Not ignored: negated representatives pick other blocks wherever HISA prunes."""
    inp = make_indexer_inputs(LENS, heads=4, head_dim=32, dtype=torch.float32, clustered=True)
    pooled = hn.naive_pool_blocks(inp.k, None, B)
    assert not torch.equal(run(inp, pooled=-pooled)[0], run(inp)[0])


def test_pooled_validation():
    inp = make_indexer_inputs(LENS, heads=4, head_dim=32, dtype=torch.float32)
    nb = -(-sum(LENS) // B)
    for bad, err, match in [(torch.zeros(nb - 1, 32), ValueError, r"pooled: expected shape"),
                            (torch.zeros(nb, 16), ValueError, r"pooled: expected shape"),
                            (torch.zeros(nb, 32, dtype=torch.int32), TypeError, "pooled"),
                            (torch.zeros(nb, 32).to(torch.float8_e4m3fn), TypeError, "pooled"),
                            ("rows", TypeError, "pooled")]:
        with pytest.raises(err, match=match):
            run(inp, pooled=bad)


def test_fp32_representatives_on_every_path():
    """The prefill kernels, caller-supplied rows and the distributed prefill store block means
    as fp32 for every key dtype (FP8 re-quantized means swapped near-tied blocks, bf16 ones
    too at B = 64); the other formats stay available by name where they hold the queries
    exactly (the block kernels cast the queries to the reps' dtype)."""
    from hisa.distributed.pool import pool_sharded
    from hisa.ops.indexer.reps import rep_dtype
    fp8, bf16, fp32 = torch.float8_e4m3fn, torch.bfloat16, torch.float32
    assert rep_dtype(fp8) == rep_dtype(bf16) == rep_dtype(fp32) == fp32
    assert rep_dtype(fp8, fp8) == fp8 and rep_dtype(fp8, bf16) == rep_dtype(bf16, bf16) == bf16
    for key, reps in [(bf16, fp8), (fp32, bf16), (fp32, fp8), (fp8, torch.float16)]:
        with pytest.raises(ValueError, match="reps_dtype"):
            rep_dtype(key, reps)
    pytest.importorskip("triton")
    from hisa.ops.indexer.pipeline import given_pooled
    inp = make_indexer_inputs(LENS, heads=4, head_dim=32, dtype=fp8, clustered=True, seed=2)
    means = hn.naive_pool_blocks(inp.k, inp.k_scale, B)
    rows, scale = given_pooled(means, inp.k)
    assert rows.dtype == torch.float32 and scale is None and torch.equal(rows, means)
    rows8, scale8 = given_pooled(means, inp.k, fp8)
    assert rows8.dtype == fp8 and scale8.shape == (means.shape[0],)
    from hisa.distributed.layout import BlockMap, ShardLayout
    S = sum(LENS)                    # one rank holding every key; sharded blocks are 64-aligned
    bmap = BlockMap(ShardLayout.contiguous_for(S, 1, block_size=64), 0, 64)
    want = hn.naive_pool_blocks(inp.k, inp.k_scale, 64)
    for dtype in (torch.float32, torch.bfloat16, fp8):
        got, s = pool_sharded(inp.k, inp.k_scale, bmap, S, None, rep_dtype=dtype)
        assert got.dtype == dtype and (s is None) == (dtype != fp8)
        if dtype == torch.float32:
            torch.testing.assert_close(got, want)
