"""Memory caps of the 256K-1M regime, proven on the plans (no 16 GB run): the flat baseline's
query tiling never holds a [T, S] fp32 logits matrix, and HISA's temporaries (two and three
levels) stay O(T * m * B) with the candidate buffer capped."""
import pytest
import torch

from hisa.ops.dsa.prefill import FLAT_LOGITS_BYTES, flat_workspace_bytes, query_tiles
from hisa.ops.indexer.pipeline import TOKEN_TILE_BYTES, prefill_workspace_bytes

ONE_M = 1 << 20
#: Persistent programs of an H200 (132 SMs) at the grids the kernels use.
H200_SELECT_PROGRAMS = 132 * 4
H200_TOPK_PROGRAMS = 132 * 8


def chunk_windows(context, queries, sequences=1):
    """The last ``queries`` tokens of each of ``sequences`` packed ``context``-token runs."""
    ks, ke = [], []
    for b in range(sequences):
        start = b * context
        ks.append(torch.full((queries,), start, dtype=torch.int64))
        ke.append(start + context - queries + 1 + torch.arange(queries))
    return torch.cat(ks).to(torch.int32), torch.cat(ke).to(torch.int32)


@pytest.mark.parametrize("context,queries,sequences", [(ONE_M, 4096, 1), (ONE_M, 1024, 1),
                                                       (ONE_M // 4, 4096, 4)])
def test_flat_tiles_never_hold_t_by_s_logits(context, queries, sequences):
    ks, ke = chunk_windows(context, queries, sequences)
    tiles = query_tiles(ks, ke, FLAT_LOGITS_BYTES)
    t = 0
    for t0, n, lo, W in tiles:                       # contiguous, in order, covering every query
        assert t0 == t and n >= 1
        assert lo <= int(ks[t0:t0 + n].min()) and lo + W >= int(ke[t0:t0 + n].max())
        assert 4 * n * W <= FLAT_LOGITS_BYTES
        t += n
    assert t == ks.numel()
    ws = flat_workspace_bytes(ks, ke, programs=H200_TOPK_PROGRAMS)
    full = 4 * ks.numel() * context                   # the [T, S] matrix: 16 GiB at 4096 x 1M
    assert ws["logits"] <= FLAT_LOGITS_BYTES < full
    assert sum(ws.values()) <= FLAT_LOGITS_BYTES + (80 << 20)


def test_flat_plan_of_a_full_causal_1m_prefill():
    ks = torch.zeros(ONE_M, dtype=torch.int32)
    ke = torch.arange(1, ONE_M + 1, dtype=torch.int32)
    tiles = query_tiles(ks, ke, FLAT_LOGITS_BYTES)
    assert sum(n for _, n, _, _ in tiles) == ONE_M
    assert max(4 * n * W for _, n, _, W in tiles) <= FLAT_LOGITS_BYTES


#: Caps documented in hisa/ops/indexer/README.md ("Memory at 1M keys"): HISA's temporaries
#: for a 4,096-query chunk over 1M FP8 keys, B = 128, m = 64, two levels or three at the two
#: settings the sweep times (2 x 128, 16 x 64).
#: (Representatives are fp32 since FP8 reps swapped near-tied blocks: 4 MiB of block reps and
#: up to 2 MiB of super-block reps where FP8 rows took 1 MiB and 0.5 MiB.)
#: Two levels run the FP8 pre-selection by default (FP8 copies of the block reps and m + m/2
#: candidate ids per query: 2.7 MiB more than the 150 MiB of the fp32 scan).
HISA_4096_X_1M_TWO_LEVEL_CAP = 153 << 20
HISA_4096_X_1M_THREE_LEVEL_CAP = 147 << 20
#: The super level's own scratch rows at those settings (NS = 4,096 or 512 per program).
SUPER_SCRATCH_CAP = 10 << 20


@pytest.mark.parametrize("sup", [{}, dict(super_size=2, super_topk=128),
                                 dict(super_size=16, super_topk=64)])
def test_hisa_workspace_at_1m_keys(sup):
    ws = prefill_workspace_bytes(4096, ONE_M, head_dim=128, key_bytes=1, block_size=128,
                                 block_topk=64, programs=H200_SELECT_PROGRAMS, **sup)
    assert ws["token_scores"] == 4 * 4096 * 64 * 128                  # one tile: 128 MiB
    cap = HISA_4096_X_1M_THREE_LEVEL_CAP if sup else HISA_4096_X_1M_TWO_LEVEL_CAP
    assert sum(ws.values()) <= cap
    if sup:
        assert ws["super_scratch"] + ws["candidate_scratch"] <= SUPER_SCRATCH_CAP
    # At 16K queries (a long prefill chunk) the candidate buffer stops at its cap.
    big = prefill_workspace_bytes(1 << 16, ONE_M, head_dim=128, key_bytes=1, block_size=128,
                                  block_topk=64, programs=H200_SELECT_PROGRAMS, **sup)
    assert big["token_scores"] <= TOKEN_TILE_BYTES
