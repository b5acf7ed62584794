"""SGLang's fused top-k output transform in one Triton launch (:mod:`hisa.cache.slots`, under
the interpreter and its memcheck shim) equals its torch twin in
:func:`hisa.integrations.sglang.transform_output`: PAGED through the rows' own table rows or
their requests', RAGGED by the rows' offsets, -1 kept, a strided table."""
from types import SimpleNamespace

import pytest
import torch

from hisa.integrations.sglang import transform_output


def metadata(method, table=None, offset=None):
    return SimpleNamespace(force_unfused_topk=False,
                           topk_transform_method=SimpleNamespace(name=method),
                           attn_metadata=SimpleNamespace(real_page_table=table,
                                                         topk_indices_offset=offset))


def positions(g, R, K, longest):
    local = torch.randint(0, longest, (R, K), generator=g, dtype=torch.int32)
    local[torch.rand(R, K, generator=g) < 0.2] = -1
    local[0, :] = -1
    local[1, :20] = torch.arange(20)                 # the first page's positions, each once
    return local


@pytest.mark.parametrize("rows_given", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_paged_slots_equal_the_torch_transform(rows_given, strided):
    g = torch.Generator().manual_seed(int(rows_given) * 2 + int(strided))
    R, K, W = 6, 700, 9                               # two tiles of 512 per row
    full = torch.randint(0, 5000, (2 * W, R + 3) if strided else (R + 3, W), generator=g,
                         dtype=torch.int32)
    table = full.t()[:, ::2] if strided else full    # [R + 3, W]
    local = positions(g, R, K, W * 64)
    rows = torch.randint(0, R + 3, (R,), generator=g, dtype=torch.int32) if rows_given else None
    md = metadata("PAGED", table=table)
    got = transform_output(local, md, fused=True, row_batch=rows, backend="triton")
    want = transform_output(local, md, fused=True, row_batch=rows, backend="torch")
    assert got.dtype == want.dtype == torch.int32
    assert torch.equal(got, want)


def test_ragged_offsets_equal_the_torch_transform():
    g = torch.Generator().manual_seed(9)
    local = positions(g, 5, 300, 4000)
    md = metadata("RAGGED", offset=torch.randint(0, 10**6, (8,), generator=g,
                                                 dtype=torch.int32))
    got = transform_output(local, md, fused=True, row_batch=None, backend="triton")
    assert torch.equal(got, transform_output(local, md, fused=True, row_batch=None,
                                             backend="torch"))
    with pytest.raises(ValueError, match="topk_transform_method"):
        transform_output(local, metadata("OTHER"), fused=True, row_batch=None, backend="triton")


def test_the_transform_is_one_launch():
    """Host work (hisa.testing.launches): one launch and its output allocation, against the 10
    aten kernels of the torch ops, none syncing."""
    from hisa.testing.launches import measure
    g = torch.Generator().manual_seed(2)
    local = positions(g, 4, 64, 500)
    md = metadata("PAGED", table=torch.randint(0, 99, (4, 9), generator=g, dtype=torch.int32))
    fused = measure(lambda: transform_output(local, md, fused=True, row_batch=None,
                                             backend="triton"))
    ops = measure(lambda: transform_output(local, md, fused=True, row_batch=None,
                                           backend="torch"))
    assert (fused.num_launches, fused.num_syncs, fused.num_aten_kernels) == (1, 0, 1)
    assert ops.num_syncs == 0 and ops.num_aten_kernels >= 10, ops.report()
