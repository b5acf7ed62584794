"""The one-launch window facts (:mod:`hisa.ops.window_stats`, under the interpreter) equal the
torch ops of :func:`read_window_plan` on random windows, at two and three levels, and raise the
same errors in the same order on bad ones; so do the flat op's (:func:`read_flat_windows`)
against :func:`check_windows`."""
import pytest
import torch

import hisa
from hisa.ops.dsa.index import read_flat_windows
from hisa.ops.indexer.prefill import read_window_plan
from hisa.testing.launches import count_host_work
from hisa.utils.validate import check_windows


def random_windows(g, T, S, topk=64):
    ke = torch.randint(0, S + 1, (T,), generator=g)
    ks = (ke - torch.randint(0, S + 1, (T,), generator=g)).clamp_min(0)
    if T > 3:
        ks[1] = ke[1]                             # an empty window
        ks[2], ke[2] = 0, min(S, 200)             # a short one (fewer keys than topk)
        ks[3], ke[3] = 100, 100 + topk            # exactly topk keys, over several blocks
    return ks.to(torch.int32), ke.to(torch.int32)


def broken_windows(breakage, S, seed):
    """300 random windows over S keys with one kind of bad window (two for "order": the
    order error must be named before the negative start)."""
    ks, ke = random_windows(torch.Generator().manual_seed(seed), 300, S)
    if breakage == "order":
        ks[17], ke[17] = 40, 30
        ks[200] = -1                              # the order error is named first
    elif breakage == "negative":
        ks[5] = -3
    else:
        ke[250] = S + 1
    return ks, ke


@pytest.mark.parametrize("T", [1, 7, 1024, 2500])
@pytest.mark.parametrize("levels", [2, 3])
def test_fused_plan_equals_torch_plan(T, levels):
    g = torch.Generator().manual_seed(T * levels)
    S = 20000
    sup = dict(super_size=4, super_topk=6) if levels == 3 else {}
    for topk in (64, 2048):
        ks, ke = random_windows(g, T, S, topk)
        kw = dict(topk=topk, block_size=128, block_topk=8, **sup)
        assert read_window_plan(ks, ke, S, fused=True, **kw) == \
            read_window_plan(ks, ke, S, fused=False, **kw)
        # strided windows (every other entry of a longer tensor)
        ks2 = torch.stack([ks, ks]).t().reshape(-1)[::2]
        ke2 = torch.stack([ke, ke]).t().reshape(-1)[::2]
        assert read_window_plan(ks2, ke2, S, fused=True, **kw) == \
            read_window_plan(ks, ke, S, fused=False, **kw)


@pytest.mark.parametrize("breakage", ["order", "negative", "past_end"])
def test_fused_plan_raises_the_same_errors(breakage):
    S = 5000
    ks, ke = broken_windows(breakage, S, seed=3)
    kw = dict(topk=64, block_size=128, block_topk=8)
    with pytest.raises(ValueError) as want:
        read_window_plan(ks, ke, S, fused=False, **kw)
    with pytest.raises(ValueError) as got:
        read_window_plan(ks, ke, S, fused=True, **kw)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("levels", [2, 3])
def test_fused_plan_edges(levels):
    """Hand-made windows at the edges each fact turns on: a window of exactly topk keys that
    loses blocks (short_pruned, and only it), one just over (not short), the block count of a
    window ending on a block boundary, and a window past the tile of one program."""
    sup = dict(super_size=2, super_topk=5) if levels == 3 else {}
    kw = dict(topk=2048, block_size=128, block_topk=8, **sup)
    T = 1500                                      # two tiles of 1024
    ks = torch.full((T,), 5000, dtype=torch.int32)
    ke = torch.full((T,), 9000, dtype=torch.int32)    # 4000 keys: pruned, longer than topk
    for exact in (True, False):
        ke[1300] = 5000 + 2048 + (0 if exact else 1)
        plan = read_window_plan(ks, ke, 20000, fused=True, **kw)
        assert plan == read_window_plan(ks, ke, 20000, fused=False, **kw)
        assert plan.short_pruned is exact
    ks[1400], ke[1400] = 0, 128 * 30              # ends on a block boundary: 30 blocks
    plan = read_window_plan(ks, ke, 20000, fused=True, **kw)
    assert plan == read_window_plan(ks, ke, 20000, fused=False, **kw)
    assert plan.max_blocks == 32 and plan.span == (0, 9000)      # [5000, 9000): blocks 39-70
    one = read_window_plan(ks[1400:1401], ke[1400:1401], 20000, fused=True, **kw)
    assert one.max_blocks == 30 and one == read_window_plan(ks[1400:1401], ke[1400:1401], 20000,
                                                        fused=False, **kw)


@pytest.mark.parametrize("sup", [{}, dict(super_size=2, super_topk=6)], ids=["two", "three"])
def test_fused_plan_is_one_launch(sup):
    """Host work (hisa.testing.launches): the fused plan is one launch, one allocation and the
    one host read; the torch ops it replaces dispatch 18 (two levels) and 28 (three) kernels."""
    from hisa.testing.launches import measure
    ke = torch.arange(4000, 4064, dtype=torch.int32)
    ks = torch.zeros_like(ke)
    kw = dict(topk=256, block_size=128, block_topk=8, **sup)
    fused = measure(lambda: read_window_plan(ks, ke, 5000, fused=True, **kw))
    ops = measure(lambda: read_window_plan(ks, ke, 5000, fused=False, **kw))
    assert (fused.num_launches, fused.num_syncs, fused.num_aten_kernels) == (1, 1, 1)
    assert ops.num_syncs == 1 and ops.num_aten_kernels >= 18, ops.report()


# The flat op's window read (hisa.dsa_index): one launch in place of check_windows' five
# torch kernels, the same facts and errors.

@pytest.mark.parametrize("T", [1, 7, 1024, 2500])
def test_fused_flat_windows_equal_check_windows(T):
    g = torch.Generator().manual_seed(T)
    S = 20000
    ks, ke = random_windows(g, T, S)
    want = tuple(check_windows(ks, ke, S))
    assert read_flat_windows(ks, ke, S, fused=True) == want
    ks2 = torch.stack([ks, ks]).t().reshape(-1)[::2]            # strided windows
    ke2 = torch.stack([ke, ke]).t().reshape(-1)[::2]
    assert read_flat_windows(ks2, ke2, S, fused=True) == want


@pytest.mark.parametrize("breakage", ["order", "negative", "past_end"])
def test_fused_flat_windows_raise_the_same_errors(breakage):
    S = 5000
    ks, ke = broken_windows(breakage, S, seed=4)
    with pytest.raises(ValueError) as want:
        check_windows(ks, ke, S)
    with pytest.raises(ValueError) as got:
        read_flat_windows(ks, ke, S, fused=True)
    assert str(got.value) == str(want.value)


def test_fused_flat_windows_are_one_launch_and_one_read():
    g = torch.Generator().manual_seed(5)
    ks, ke = random_windows(g, 64, 4000)
    with count_host_work() as fused:
        read_flat_windows(ks, ke, 4000, fused=True)
    with count_host_work() as torch_ops:
        read_flat_windows(ks, ke, 4000, fused=False)
    assert fused.num_syncs == torch_ops.num_syncs == 1, (fused.report(), torch_ops.report())
    assert fused.num_launches == 1 and fused.num_aten_kernels == 1, fused.report()   # + out
    assert torch_ops.num_launches == 0 and torch_ops.num_aten_kernels == 5, torch_ops.report()
    assert read_flat_windows(ks[:0], ke[:0], 4000, fused=True) == (0, 0)     # no query: no read


def test_the_torch_backend_reads_windows_without_triton(monkeypatch):
    """``dsa_index(backend="torch")`` must not need Triton, on CUDA tensors too: it asks for
    the torch ops; the other backends let the device decide."""
    from hisa.ops.dsa import index as flat_index
    seen = []
    real = flat_index.read_flat_windows

    def spy(ks, ke, num_keys, *, fused=None):
        seen.append(fused)
        return real(ks, ke, num_keys, fused=fused)

    monkeypatch.setattr(flat_index, "read_flat_windows", spy)
    T, H, D = 8, 16, 64
    q, k, w = torch.randn(T, H, D), torch.randn(T, D), torch.randn(T, H)
    ks, ke = torch.zeros(T, dtype=torch.int32), torch.arange(1, T + 1, dtype=torch.int32)
    for backend in ("torch", "triton", "auto"):
        hisa.dsa_index(q, k, w, ks, ke, topk=4, backend=backend)
    assert seen == [False, None, None]
