"""The one-transfer window plan of the public prefill op: its facts are those the separate host
reads computed (window_blocks, the route, keep_short_windows' mask), with the same
errors; the flat op's tiles from the known span equal the read ones."""
from __future__ import annotations

import pytest
import torch

from hisa.ops.dsa.prefill import FLAT_LOGITS_BYTES, query_tiles
from hisa.ops.indexer.block_scores import window_blocks
from hisa.ops.indexer.naive import eligible_blocks
from hisa.ops.indexer.naive_super import eligible_supers
from hisa.ops.indexer.prefill import plan_windows
from hisa.testing.launches import count_host_work
from hisa.utils.validate import check_windows


def _t(values):
    return torch.tensor(values, dtype=torch.int32)


def test_check_windows_reads_extra_facts_in_its_one_transfer():
    ks, ke = _t([0, 3, 5]), _t([2, 7, 5])
    with count_host_work() as work:
        got = check_windows(ks, ke, 8, [(ke - ks).max(), (ke > ks).any()])
    assert got == (0, 7, 4, 1)
    assert work.num_syncs == 1, work.report()
    assert check_windows(_t([]), _t([]), 8, [_t(0)]) == (0, 0, 0)


def _random_windows(g, T, S):
    ks = torch.randint(0, S + 1, (T,), generator=g, dtype=torch.int32)
    ke = torch.minimum(ks + torch.randint(0, S + 1, (T,), generator=g, dtype=torch.int32),
                       torch.tensor(S, dtype=torch.int32))
    ke[::5] = ks[::5]                                   # empty windows
    return ks, ke


@pytest.mark.parametrize("sup", [{}, {"super_size": 2, "super_topk": 2},
                                 {"super_size": 3, "super_topk": 4}])
def test_plan_equals_the_separate_reads(sup):
    """Every fact of the plan, on random windows (empty ones included), is the value the
    separate host reads it replaces gave: window_blocks (first block, block count; at the
    super span for three levels), whether anything is pruned, and keep_short_windows' row mask."""
    g = torch.Generator().manual_seed(5)
    B, m, K = 16, 4, 40
    for trial in range(40):
        S = int(torch.randint(1, 400, (1,), generator=g))
        ks, ke = _random_windows(g, int(torch.randint(1, 30, (1,), generator=g)), S)
        plan = plan_windows(ks, ke, S, topk=K, block_size=B, block_topk=m, **sup)
        first, most = window_blocks(ks, ke, B)
        assert (plan.first_block, plan.max_blocks) == (first, most), trial
        fb, eb = eligible_blocks(ks, ke, B)
        pruned = (eb - fb) > m
        if sup:
            span = B * sup["super_size"]
            assert (plan.first_super, plan.max_supers) == window_blocks(ks, ke, span), trial
            fs, es = eligible_supers(ks, ke, B, sup["super_size"])
            pruned |= (es - fs) > sup["super_topk"]
        nothing = int((eb - fb).max()) <= m and (
            not sup or int((es - fs).max()) <= sup["super_topk"])
        assert plan.nothing_pruned == nothing, trial
        assert plan.short_pruned == bool((pruned & ((ke - ks) <= K)).any()), trial
        assert plan.span == (int(ks.min()), int(ke.max()))


def test_plan_keeps_the_window_errors():
    with pytest.raises(ValueError, match=r"ks\[1\] = 5 > ke\[1\] = 4"):
        plan_windows(_t([0, 5]), _t([1, 4]), 8, topk=8, block_size=16, block_topk=4)
    with pytest.raises(ValueError, match="at most|<= the number of keys"):
        plan_windows(_t([0, 1]), _t([1, 9]), 8, topk=8, block_size=16, block_topk=4)
    with pytest.raises(ValueError, match="ks: expected values >= 0"):
        plan_windows(_t([-1, 1]), _t([1, 2]), 8, topk=8, block_size=16, block_topk=4)
    empty = plan_windows(_t([]), _t([]), 8, topk=8, block_size=16, block_topk=4)
    assert empty.nothing_pruned and not empty.short_pruned


def test_query_tiles_with_the_known_span_equal_the_read_ones():
    g = torch.Generator().manual_seed(2)
    for cap in (FLAT_LOGITS_BYTES, 4 * 64, 4 * 1000):
        for _ in range(20):
            ks, ke = _random_windows(g, int(torch.randint(1, 40, (1,), generator=g)), 300)
            span = (int(ks.min()), int(ke.max()))
            assert query_tiles(ks, ke, cap, span) == query_tiles(ks, ke, cap)


def test_query_tiles_skip_the_read_when_one_tile_fits():
    ks, ke = _t([0, 0, 2]), _t([1, 2, 9])
    with count_host_work() as work:
        tiles = query_tiles(ks, ke, FLAT_LOGITS_BYTES, (0, 9))
    assert tiles == [(0, 3, 0, 9)] and work.num_syncs == 0
    with count_host_work() as work:
        query_tiles(ks, ke, FLAT_LOGITS_BYTES)
    assert work.num_syncs == 1, work.report()      # ks and ke in one transfer


def _indexer_call():
    from hisa.testing.inputs import make_indexer_inputs
    inp = make_indexer_inputs([300, 40, 200], query_lens=[6, 40, 4], heads=4, head_dim=32,
                              seed=3)
    kw = dict(k_scale=inp.k_scale, topk=24, block_size=16, block_topk=4)
    return inp, kw


def test_a_plan_read_once_serves_later_calls_with_the_same_result():
    import hisa
    inp, kw = _indexer_call()
    q, k, w, ks, ke = inp.args()
    plan = hisa.plan_windows(ks, ke, k.shape[0], topk=24, block_size=16, block_topk=4)
    want = hisa.hisa_index(q, k, w, ks, ke, **kw)
    for _ in range(2):
        assert torch.equal(hisa.hisa_index(q, k, w, ks, ke, plan=plan, **kw), want)
    sup = dict(super_size=2, super_topk=2)
    plan3 = hisa.plan_windows(ks, ke, k.shape[0], topk=24, block_size=16, block_topk=4, **sup)
    assert torch.equal(hisa.hisa_index(q, k, w, ks, ke, plan=plan3, **kw, **sup),
                       hisa.hisa_index(q, k, w, ks, ke, **kw, **sup))


def test_a_plan_of_other_windows_or_parameters_is_refused():
    """The kernels size grids and workspaces from the plan: one read from other windows
    (another tensor even with equal values, or these written since), another key count or
    other parameters would drop blocks or index past a buffer, so it is refused by name."""
    import hisa
    inp, kw = _indexer_call()
    q, k, w, ks, ke = inp.args()
    S = k.shape[0]
    plan = hisa.plan_windows(ks, ke, S, topk=24, block_size=16, block_topk=4)
    with pytest.raises(ValueError, match="plan: it was read from other ks/ke"):
        hisa.hisa_index(q, k, w, ks.clone(), ke, plan=plan, **kw)
    with pytest.raises(ValueError, match="plan: read for"):
        hisa.hisa_index(q, k, w, ks, ke, plan=plan, **{**kw, "block_topk": 5})
    with pytest.raises(ValueError, match="plan: read for"):
        hisa.hisa_index(q, k, w, ks, ke, plan=plan, super_size=2, super_topk=2, **kw)
    shorter = ke.clamp_max(S - 1)                       # valid for one key less too
    with pytest.raises(ValueError, match="plan: read for num_keys"):
        hisa.hisa_index(q, k[:-1], w, ks, shorter, plan=hisa.plan_windows(
            ks, shorter, S, topk=24, block_size=16, block_topk=4), **{
            **kw, "k_scale": inp.k_scale[:-1]})
    with pytest.raises(TypeError, match="plan: expected the WindowPlan"):
        hisa.hisa_index(q, k, w, ks, ke, plan=(0, 1), **kw)
    ke[0] -= 1                                           # an in-place write after the read
    with pytest.raises(ValueError, match="written in place"):
        hisa.hisa_index(q, k, w, ks, ke, plan=plan, **kw)


def test_plan_windows_checks_its_arguments_as_hisa_index_does():
    """The public plan checks the windows and each parameter as hisa_index does, with its
    errors (a block_size of 0 divided by zero deep inside, float windows were planned)."""
    import hisa
    ks, ke = _t([0, 0]), _t([5, 9])
    kw = dict(topk=8, block_size=16, block_topk=4)
    with pytest.raises(ValueError, match="block_size: expected an int >= 1"):
        hisa.plan_windows(ks, ke, 9, **{**kw, "block_size": 0})
    with pytest.raises(ValueError, match="block_topk: expected an int >= 2"):
        hisa.plan_windows(ks, ke, 9, **{**kw, "block_topk": 1})
    with pytest.raises(TypeError, match="topk: expected an int"):
        hisa.plan_windows(ks, ke, 9, **{**kw, "topk": 8.0})
    with pytest.raises(ValueError, match="super_size/super_topk: expected both"):
        hisa.plan_windows(ks, ke, 9, super_size=2, **kw)
    with pytest.raises(TypeError, match="ks: expected dtype int32"):
        hisa.plan_windows(ks.float(), ke, 9, **kw)
    with pytest.raises(TypeError, match="ke: expected dtype int32"):
        hisa.plan_windows(ks, ke.long(), 9, **kw)
    with pytest.raises(ValueError, match="ke: expected shape \\[2\\]"):
        hisa.plan_windows(ks, _t([5, 9, 9]), 9, **kw)
    with pytest.raises(ValueError, match="num_keys: expected an int >= 0"):
        hisa.plan_windows(ks, ke, -1, **kw)
    with pytest.raises(TypeError, match="num_keys: expected an int"):
        hisa.plan_windows(ks, ke, 9.0, **kw)


def test_a_plan_computes_on_its_own_copies_of_the_windows():
    """An engine's forward runs under inference mode, where tensors keep no write counter, so
    an in-place write after planning goes unseen; the call then computes on the windows as
    planned (the plan's copies), never on windows its grids were not sized for."""
    import hisa
    inp, kw = _indexer_call()
    q, k, w, ks, ke = inp.args()
    want = hisa.hisa_index(q, k, w, ks, ke, **kw)
    with torch.inference_mode():
        ks_i, ke_i = ks.clone(), ke.clone()
        plan = hisa.plan_windows(ks_i, ke_i, k.shape[0], topk=24, block_size=16, block_topk=4)
        ks_i.zero_()                        # every window now starts at key 0: unseen
        got = hisa.hisa_index(q, k, w, ks_i, ke_i, plan=plan, **kw)
    assert torch.equal(got, want)
    assert plan.windows[0] is not ks_i and torch.equal(plan.windows[0], ks)
