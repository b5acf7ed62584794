"""Interpreter tier: the Triton HISA pipeline ranks blocks by caller-given representatives
(``hisa_index(pooled=)``) exactly as the reference does."""
import pytest
import torch

import hisa
from hisa.testing.compare import check_index_format
from hisa.testing.inputs import make_indexer_inputs

pytest.importorskip("triton")

from hisa.ops.indexer.pool import pool_blocks  # noqa: E402

H, D = 16, 64
B, M, K = 16, 4, 24
LENS = [100, 9]              # 7 blocks, the last one incomplete; windows up to 100 > m * B
QLENS = [30, 9]              # the last 30 queries of the first sequence: windows 71-100 prune


#: Three levels: super-blocks of 2 blocks (32 keys), 3 kept of the up to 4 a window spans; the
#: block stage keeps 4 of their 6 blocks: the given rows rank at both levels.
SUPER = dict(super_size=2, super_topk=3)


@pytest.mark.parametrize("levels", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_triton_ranks_blocks_by_given_rows(dtype, levels):
    inp = make_indexer_inputs(LENS, heads=H, head_dim=D, dtype=dtype, clustered=True, seed=3,
                              query_lens=QLENS)
    # The kernel's own representatives, negated: a ranking its own pooling would not give, so
    # agreement proves the rows were used. The pipeline stores given rows as it stores its own
    # (fp32 for FP8 keys, hisa.ops.indexer.reps), so the reference scores the same values.
    own, scale = pool_blocks(inp.k, inp.k_scale, block_size=B)
    pooled = -(own.float() if scale is None else hisa.dequantize_fp8(own, scale))
    sup = SUPER if levels == 3 else {}
    kw = dict(k_scale=inp.k_scale, topk=K, block_size=B, block_topk=M, **sup)
    got = hisa.hisa_index(*inp.args(), pooled=pooled, backend="triton", **kw)
    want = hisa.hisa_index(*inp.args(), pooled=pooled, backend="torch", **kw)
    check_index_format(got, inp.ks, inp.ke, K, exact_count=False)
    assert [set(r.tolist()) for r in got] == [set(r.tolist()) for r in want]
    assert not torch.equal(want, hisa.hisa_index(*inp.args(), backend="torch", **kw))
