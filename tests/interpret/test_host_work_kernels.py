"""Host work of one call of the public prefill ops on the Triton backend, pinned.

On a GPU each host sync stalls the CPU until the queue drains (the launch gap behind it is
exposed) and each kernel launch or small torch op costs a few microseconds of host time; the
counts below are what one call does, measured by :mod:`hisa.testing.launches` under the
interpreter (the code path is the GPU's). A later change that adds a read of the windows, a
launch or a handful of small ops fails here and names the function in the report.
"""
from __future__ import annotations

import pytest
import torch

import hisa
from hisa.testing.inputs import make_indexer_inputs
from hisa.testing.launches import count_host_work, measure

triton = pytest.importorskip("triton")

H, D, B, M, K = 16, 64, 16, 4, 24

#: Host syncs of any prefill call: the window check, which carries every window fact the
#: call needs (kernel limits, route, pooling start, selection rows, short-window repair).
CALL_SYNCS = 1
#: Launches of the two-level pipeline over FP8 keys with windows past 8 m blocks: pool, FP8
#: copies of the block means, the FP8 pre-selection of m + m/2 blocks, their re-score on the
#: fp32 means + top-m, token scores, token selection (one token tile at these sizes).
#: Without the pre-selection (shorter windows, or fp32 / bf16 keys): 4, the block stage being
#: one fused launch.
TWO_LEVEL_LAUNCHES = 6
TWO_LEVEL_SCAN_LAUNCHES = 4
#: Three levels add the super-block pooling and the candidate-block selection.
THREE_LEVEL_LAUNCHES = 6
#: The flat path: logits, then the top-k (one logits tile no wider than the general kernel's
#: register row: its one launch; a wider tile adds the fast kernel before it).
FLAT_LAUNCHES = 2
#: aten ops of the flat op (measured 9: the window check's 5, the 4 buffers) plus slack for
#: a small change; the 3 host syncs of commit 222f707 came with 12. On a GPU the window check
#: is one launch and its output buffer (``read_flat_windows``, tests/interpret/test_window_stats.py).
FLAT_ATEN_BUDGET = 10
#: aten ops the window plan adds to the window check (measured 13 at two levels: the block
#: counts, the route and the short-window mask); before it the separate reads cost 23 more.
PLAN_ATEN_BUDGET = 14
#: aten ops of a pruning two-level call (measured 24: the plan's 18, the pipeline's 6
#: buffers); 62 at commit 222f707, whose windows were read four times.
TWO_LEVEL_ATEN_BUDGET = 26
#: Three levels (measured 38: the super-block counts and 4 more buffers).
THREE_LEVEL_ATEN_BUDGET = 40
#: aten ops of a later indexer layer of a vLLM prefill step at three levels (measured 11: the
#: gather's 2 buffers, the row clear, the pipeline's 8 buffers); 19 when every layer rebuilt
#: the request layout of the gather (lengths, padding, starts) that the step now keeps, 12
#: while each gather zeroed its own bad-page flag.
VLLM_LATER_LAYER_ATEN_BUDGET = 11
#: The step's first layer (measured 36 under the interpreter, whose window plan is torch ops:
#: the 2 layout and windows launches' 5 buffers instead of 11 small torch kernels, the plan's
#: 20, the gather's and pipeline's buffers, the row clear); 45 before those launches. On a GPU
#: the plan is one launch too, so the first layer's kernels before its window read are 7
#: (layout, gather, windows, two window copies, the plan's launch and its read), not 17.
VLLM_FIRST_LAYER_ATEN_BUDGET = 36


def _inputs(seq, ql=None):
    return make_indexer_inputs(seq, query_lens=ql, heads=H, head_dim=D, seed=1)


def _hisa(inp, **kw):
    out = torch.empty(inp.num_queries, K, dtype=torch.int32)
    return lambda: hisa.hisa_index(*inp.args(), k_scale=inp.k_scale, topk=K, block_size=B,
                                   block_topk=M, backend="triton", out=out, **kw)


def _flat(inp):
    out = torch.empty(inp.num_queries, K, dtype=torch.int32)
    return lambda: hisa.dsa_index(*inp.args(), k_scale=inp.k_scale, topk=K, backend="triton",
                                  out=out)


#: Windows of 600 keys = 38 blocks, past 8 m (the length from which the default pre-selects).
@pytest.mark.parametrize("seq,ql", [([600], [8]), ([600, 40, 200], [6, 40, 4])],
                         ids=["chunk", "packed"])
def test_pruning_call_two_levels(seq, ql):
    work = measure(_hisa(_inputs(seq, ql)))
    assert work.num_syncs == CALL_SYNCS, work.report()
    assert work.num_launches == TWO_LEVEL_LAUNCHES, work.report()
    assert work.num_aten_kernels <= TWO_LEVEL_ATEN_BUDGET, work.report()


def test_pruning_call_on_windows_up_to_eight_m_blocks():
    # 400 keys = 25 blocks: prunes, but the default scans every block on the fp32 means.
    work = measure(_hisa(_inputs([400], [8])))
    assert work.num_syncs == CALL_SYNCS, work.report()
    assert work.num_launches == TWO_LEVEL_SCAN_LAUNCHES, work.report()
    assert work.num_aten_kernels <= TWO_LEVEL_ATEN_BUDGET, work.report()


def test_pruning_call_three_levels():
    work = measure(_hisa(_inputs([400], [8]), super_size=2, super_topk=2))
    assert work.num_syncs == CALL_SYNCS, work.report()
    assert work.num_launches == THREE_LEVEL_LAUNCHES, work.report()
    assert work.num_aten_kernels <= THREE_LEVEL_ATEN_BUDGET, work.report()


def test_exact_regime_costs_the_flat_op_plus_the_plan():
    """A full causal prefill of M * B keys routes to the flat kernels: the HISA call costs
    what ``dsa_index`` does (one sync, two launches) plus the plan's few small ops."""
    inp = _inputs([M * B])
    flat = measure(_flat(inp))
    routed = measure(_hisa(inp))
    assert flat.num_syncs == routed.num_syncs == CALL_SYNCS, (flat.report(), routed.report())
    assert flat.num_launches == routed.num_launches == FLAT_LAUNCHES
    assert flat.num_aten_kernels <= FLAT_ATEN_BUDGET, flat.report()
    assert routed.num_aten_kernels - flat.num_aten_kernels <= PLAN_ATEN_BUDGET, routed.report()


def test_short_window_repair_still_runs_when_the_plan_flags_it():
    """A window of <= topk keys spanning m + 1 blocks must come back whole (contract section
    2): the plan flags it and the repair runs (its row read and the reference it calls are
    its own syncs, paid only by calls that have such a row); the row is the whole window."""
    inp = make_indexer_inputs([200], query_lens=[3], heads=H, head_dim=D, seed=2)
    topk, m = 2 * B, 2                                       # m * B = topk
    ks = torch.tensor([8, 0, 0], dtype=torch.int32)          # [8, 8 + topk): blocks 0..2
    ke = torch.tensor([8 + topk, 200, 199], dtype=torch.int32)
    kw = dict(k_scale=inp.k_scale, topk=topk, backend="triton")
    args = (inp.q, inp.k, inp.weights, ks, ke)
    hisa.hisa_index(*args, block_size=B, block_topk=m, **kw)
    with count_host_work() as work:
        got = hisa.hisa_index(*args, block_size=B, block_topk=m, **kw)
    repair = [e for e in work.syncs
              if "keep_short_windows" in e.site or e.site.startswith("hisa.ops.dsa.naive.")]
    assert any("keep_short_windows" in e.site for e in repair), work.report()
    assert work.num_syncs - len(repair) == CALL_SYNCS, work.report()
    flat = hisa.dsa_index(*args, **kw)
    assert torch.equal(got[0].sort().values, torch.arange(topk, dtype=torch.int32))
    assert torch.equal(got[0].sort().values, flat[0].sort().values)


def test_vllm_prefill_reads_the_windows_once_per_step():
    """The plugin's prefill chunk (request-aligned gather + HISA) reads the host once in the
    step's first indexer layer, as the bare op does per call (a sync in the gather, its page
    check, once left the GPU idle while the host launched the rest: 30 % over the direct ops
    on an H200), and never in the step's later layers: they reuse the chunk's windows and
    plan (and the gather's request layout), so the host runs ahead of the GPU. A later layer (other keys, same pages) selects
    what a freshly planned call selects; the next step's metadata plans again."""
    from hisa.integrations._engine_common import PluginOptions
    from hisa.integrations.vllm import run_indexer
    from integrations.engine_ref import (PAGE, FakeVllmEngine, Req, Step, VllmSim,
                                         engine_quant_and_cache, random_keys, random_queries,
                                         vllm_call, vllm_step_metadata)
    context, queries, topk = 1024, 8, 64
    sim = VllmSim(num_pages=context // PAGE + 4, heads=H, device="cpu")
    r = Req(random_keys(context, 300))
    r.done = context - queries
    r.grow(sim.alloc, context)
    slots = torch.tensor(r.slots(0, context))
    engine_quant_and_cache(sim.kv, r.keys, slots)
    other = torch.zeros_like(sim.kv)                      # a second layer's cache, same pages
    engine_quant_and_cache(other, random_keys(context, 301), slots)
    step = Step([], [(r, queries)], width=context // PAGE + 2)
    q, w = random_queries(queries, H, 11)
    opts = PluginOptions(block_size=B, block_topk=M, decode=False, backend="triton")

    def layer(md, kv):
        call = vllm_call(kv, md, q, w, topk=topk)
        call["topk_indices_buffer"] = torch.full((queries, topk), -1, dtype=torch.int32)
        return lambda: run_indexer(call, md, FakeVllmEngine(md), opts, sim.registry)

    md = vllm_step_metadata(step)
    first = layer(md, sim.kv)
    first()                                   # compile (kernels are shared by the steps)
    md = vllm_step_metadata(step)             # a new step: nothing kept
    first = layer(md, sim.kv)
    with count_host_work() as work:
        first()
    assert work.num_syncs == CALL_SYNCS, work.report()
    assert work.num_aten_kernels <= VLLM_FIRST_LAYER_ATEN_BUDGET, work.report()
    second = layer(md, other)
    with count_host_work() as work:
        got = second()
    assert work.num_syncs == 0, work.report()
    assert work.num_aten_kernels <= VLLM_LATER_LAYER_ATEN_BUDGET, work.report()
    fresh_md = vllm_step_metadata(step)
    with count_host_work() as work:
        want = layer(fresh_md, other)()
    assert work.num_syncs == CALL_SYNCS, work.report()
    assert torch.equal(got, want)
    assert not torch.equal(got, layer(vllm_step_metadata(step), sim.kv)())   # keys matter


@pytest.mark.parametrize("sup", [{}, {"super_size": 2, "super_topk": 2}], ids=["2L", "3L"])
def test_a_call_with_a_plan_makes_no_host_sync(sup):
    """With the plan of its windows read beforehand (``hisa.plan_windows``, the one sync), a
    pruning call reads nothing: the layers of an engine step share one read."""
    inp = _inputs([600], [8])
    plan = hisa.plan_windows(inp.ks, inp.ke, inp.k.shape[0], topk=K, block_size=B,
                             block_topk=M, **sup)
    work = measure(_hisa(inp, plan=plan, **sup))
    assert work.num_syncs == 0, work.report()
    assert work.num_launches == (THREE_LEVEL_LAUNCHES if sup else TWO_LEVEL_LAUNCHES)


def test_a_plan_carries_the_flat_routes_tiles(monkeypatch):
    """On the flat route (nothing pruned) the logits tiles need the windows read when one
    tile cannot hold every query; the plan reads them with its facts, so the call given it
    reads nothing, and selects what the unplanned call selects."""
    import hisa.ops.dsa.prefill as flat
    monkeypatch.setattr(flat, "FLAT_TILE_QUERIES", 2)           # 5 queries: 3 tiles
    inp = _inputs([M * B], [5])
    plan = hisa.plan_windows(inp.ks, inp.ke, inp.k.shape[0], topk=K, block_size=B,
                             block_topk=M)
    assert plan.nothing_pruned and len(plan.flat_tiles) == 3
    work = measure(_hisa(inp, plan=plan))
    assert work.num_syncs == 0, work.report()
    unplanned = measure(_hisa(inp))
    assert unplanned.num_syncs == 2, unplanned.report()          # facts, then the tiles
    assert torch.equal(_hisa(inp, plan=plan)(), _hisa(inp)())
