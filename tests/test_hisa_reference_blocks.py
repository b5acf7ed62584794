"""The HISA reference's token stage scores whole kept blocks (hisa.ops.indexer.naive).

It groups the (query, kept block) pairs by block; these tests pin that it computes the same
scores as gathering each query's candidate keys, on awkward block lists, and that it does no
work for padding or unkept blocks (the cost the vectorized reference removed).
"""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import hisa
from hisa.ops.dsa.naive import is_outside, naive_scores, window_mask
from hisa.ops.indexer import naive as hn
from hisa.testing.inputs import make_indexer_inputs

#: Scores of one (query, key) pair computed by a different fp32 summation order of the H heads
#: differ by a few ulps of the largest term; signed gates make the sum itself small at times.
SUM_ORDER_TOL = 1e-6


def gathered_token_scores(q, k, weights, ks, ke, block_ids, block_size, k_scale):
    """Per-query candidate keys [T, m*B, D] scored head by head: the reference's old method."""
    pos = hn.candidate_positions(block_ids, block_size, k.shape[0])
    safe = pos.clamp_min(0)
    scale = None if k_scale is None else k_scale[safe]
    scores = naive_scores(q, k[safe], weights, scale)
    valid = (pos >= 0) & window_mask(ks, ke, pos)
    return scores.masked_fill_(~valid, float("-inf")), pos


@pytest.mark.parametrize("chunk_rows", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
@pytest.mark.parametrize("lens,block_size", [([100], 16), ([37, 1, 90], 8), ([5], 16)])
def test_grouped_scores_equal_gathered_scores(dtype, lens, block_size, chunk_rows, monkeypatch):
    if chunk_rows:                           # a block's queries split over several chunks
        monkeypatch.setattr(hn, "TOKEN_CHUNK_BYTES", 4 * 3 * 16 * chunk_rows)
    inp = make_indexer_inputs(lens, heads=3, head_dim=16, dtype=dtype, seed=11)
    T, S = inp.num_queries, inp.k.shape[0]
    nb = -(-S // block_size)
    g = torch.Generator().manual_seed(3)
    # Unsorted unique ids per row, -1 padding anywhere, and a block id past the buffer.
    m = min(nb + 1, 6)
    ids = torch.stack([torch.randperm(nb + 1, generator=g)[:m] for _ in range(T)])
    ids[torch.rand(T, m, generator=g) < 0.3] = -1
    ids = ids.to(torch.int32)
    got, pos = hn.naive_token_scores(*inp.args(), ids, block_size=block_size,
                                     k_scale=inp.k_scale)
    want, want_pos = gathered_token_scores(*inp.args(), ids, block_size, inp.k_scale)
    assert torch.equal(pos, want_pos)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    fin = torch.isfinite(want)
    assert fin.any()
    tol = SUM_ORDER_TOL * float(want[fin].abs().max())
    torch.testing.assert_close(got[fin], want[fin], rtol=SUM_ORDER_TOL, atol=tol)


def test_no_blocks_and_no_keys():
    inp = make_indexer_inputs([20], heads=2, head_dim=16, dtype=torch.float32)
    none = torch.full((20, 3), -1, dtype=torch.int32)
    sc, pos = hn.naive_token_scores(*inp.args(), none, block_size=8)
    assert bool(is_outside(sc).all()) and bool((pos == -1).all())
    empty = torch.empty(0, 16)
    sc, _ = hn.naive_token_scores(inp.q, empty, inp.weights, inp.ks * 0, inp.ks * 0,
                                  torch.zeros(20, 1, dtype=torch.int32), block_size=8)
    assert bool(is_outside(sc).all())


def test_token_stage_scores_only_the_kept_blocks():
    # Full causal prefill with m * B > L: query t keeps its ceil((t + 1) / B) eligible blocks,
    # not m. Products must be spent on those blocks' tokens only, not on m * B padded slots
    # per query (the old reference scored every slot, gathering block 0 for padding).
    T, H, D, B, m = 256, 2, 16, 16, 32
    inp = make_indexer_inputs([T], heads=H, head_dim=D, dtype=torch.float32, seed=12)
    with FlopCounterMode(display=False) as counter:
        hisa.hisa_index(*inp.args(), topk=64, block_size=B, block_topk=m, backend="torch")
    kept_tokens = sum(-(-(t + 1) // B) * B for t in range(T))
    block_stage = 2 * T * H * D * (T // B)                 # q . kbar for every block
    token_stage = 2 * H * (D + 1) * kept_tokens            # dots, then the gated head sum
    assert counter.get_total_flops() <= block_stage + token_stage
