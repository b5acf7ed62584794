"""The engine plugins' one-launch request gather (:mod:`hisa.cache.gather`) under the
interpreter, whose memcheck shim (conftest) fails any load or store outside its tensors, against
the torch twin in :func:`hisa.integrations._engine_common.gather_request_keys`."""
import pytest
import torch

from hisa.integrations._engine_common import as_engine_pages, gather_request_keys

from integrations.engine_ref import PAGE, D, engine_quant_and_cache, new_cache


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triton_gather_equals_the_torch_gather(seed):
    """The one-launch Triton gather (:mod:`hisa.cache.gather`, under the interpreter) writes the
    same bytes as the torch ops: keys, scales, the zero keys with scale 1 between requests and
    after the last, and the same bad-page flag; empty requests and requests ending mid-page
    included, and a table with a page outside the cache (the flag, and the clamped page read)."""
    g = torch.Generator().manual_seed(seed)
    num_pages = 40
    kv = new_cache(num_pages)
    engine_quant_and_cache(kv, torch.randn(num_pages * PAGE, D, generator=g),
                           torch.arange(num_pages * PAGE))
    R = 3 + seed * 4
    lens = torch.randint(0, 300, (R,), generator=g)
    lens[seed % R] = 0
    W = 6
    bt = torch.randint(0, num_pages, (R, W), generator=g, dtype=torch.int32)
    bt = bt[:, ::1] if seed != 1 else torch.randint(0, num_pages, (W, R), generator=g,
                                                    dtype=torch.int32).t()   # strided table
    pages = as_engine_pages(kv, D)
    for table in (bt, torch.where(torch.arange(W) == 2, num_pages + 3, bt).to(torch.int32)):
        want = gather_request_keys(pages, table, lens, total=int(lens.sum()), head_dim=D,
                                   block_size=128, backend="torch")
        got = gather_request_keys(pages, table, lens, total=int(lens.sum()), head_dim=D,
                                  block_size=128, backend="triton")
        assert torch.equal(got.k.view(torch.uint8), want.k.view(torch.uint8))
        assert torch.equal(got.k_scale, want.k_scale)
        assert torch.equal(got.starts, want.starts)
        assert bool(got.bad_pages) == bool(want.bad_pages)
    assert bool(got.bad_pages) == bool((lens > 128).any())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_request_longer_than_its_table_row_is_flagged(backend):
    """A request with more keys than its block-table row's W columns hold reads no table entry
    past the row (the Triton gather under the interpreter, the torch ops): both flag it, write
    the same bytes, and the error names the columns."""
    kv = new_cache(6)
    engine_quant_and_cache(kv, torch.randn(6 * PAGE, D), torch.arange(6 * PAGE))
    bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    lens = torch.tensor([10, 300])                        # request 1 needs 5 columns, has 2
    keys = gather_request_keys(as_engine_pages(kv, D), bt, lens, total=310, head_dim=D,
                               block_size=128, backend=backend)
    assert bool(keys.bad_pages)
    with pytest.raises(ValueError, match="request 1 position 128 lies past the table's 2 "
                                         "columns"):
        keys.raise_if_bad_pages()
    ok = gather_request_keys(as_engine_pages(kv, D), bt, torch.tensor([10, 128]), total=138,
                             head_dim=D, block_size=128, backend=backend)
    assert not bool(ok.bad_pages)
    if backend == "triton":
        twin = gather_request_keys(as_engine_pages(kv, D), bt, lens, total=310, head_dim=D,
                                   block_size=128, backend="torch")
        assert torch.equal(keys.k.view(torch.uint8), twin.k.view(torch.uint8))
        assert torch.equal(keys.k_scale, twin.k_scale)
    with pytest.raises(ValueError, match="table of 0 columns"):
        gather_request_keys(as_engine_pages(kv, D), bt[:, :0], lens, total=310, head_dim=D,
                            block_size=128, backend=backend)


def test_the_triton_gather_is_one_launch_and_no_sync():
    """Host work of the gather (hisa.testing.launches): the Triton path is one launch, no host
    sync and at most 10 small aten kernels (the layout's 7, negative counts clamped to empty
    since the layout launch does so too, and the 3 allocations); the torch path it replaces
    dispatches 36 (at this commit) and no launch."""
    from hisa.testing.launches import measure
    kv = new_cache(40)
    engine_quant_and_cache(kv, torch.randn(40 * PAGE, D), torch.arange(40 * PAGE))
    bt = torch.randint(0, 40, (3, 10), generator=torch.Generator().manual_seed(0),
                       dtype=torch.int32)
    lens = torch.tensor([300, 0, 500], dtype=torch.int32)

    def gather(backend):
        return measure(lambda: gather_request_keys(as_engine_pages(kv, D), bt, lens, total=800,
                                                   head_dim=D, block_size=128,
                                                   backend=backend))
    fused, torch_ops = gather("triton"), gather("torch")
    assert (fused.num_launches, fused.num_syncs) == (1, 0)
    assert fused.num_aten_kernels <= 10, fused.report()
    assert torch_ops.num_syncs == 0 and torch_ops.num_aten_kernels > 3 * fused.num_aten_kernels
