"""Lifecycles of the pooled companion inside an engine (docs/engines.md, "Why it stays right").

The engines drive their cache as they do in production: pages from a shuffled free list,
page-granular prefix hits that share pages between requests, freeing and reuse of pages that
still carry old pooled rows, preemption by freeing and recomputing, and (SGLang) retraction
with a host copy of the request's pages. After each scenario every complete block of every live
request must have the pooled row that pooling from scratch gives, and decode must select what
this library's paged HISA selects with those scratch rows.
"""
import pytest
import torch

import hisa
from hisa.integrations import sglang as plug
from hisa.integrations._engine_common import PluginOptions, as_engine_pages

from .engine_ref import PAGE, D, Req, SglSim, VllmSim, random_keys
from .test_vllm_contract import TOPK, assert_live_rows, check_decode, live_rows, scratch_pooled

HISA = PluginOptions(block_size=128, block_topk=3, backend="torch")


def pooled_of(sim):
    return sim.registry.lookup(as_engine_pages(sim.kv, D))


def test_prefix_cache_hit_on_half_a_block():
    """B reuses A's first three pages (a page-granular hit that ends inside block 1): block 1
    of B spans a shared page and a page of its own, and is pooled from both when B's own
    token 255 is written; the shared pages' rows stay A's (same content)."""
    sim = VllmSim()
    a = sim.request(700, 1)
    sim.step([], [(a, 400)], HISA, topk=TOPK)
    sim.step([], [(a, 239)], HISA, topk=TOPK)
    b = sim.request(650, 2, prefix=a, shared=3)
    assert b.pages[:3] == a.pages[:3] and b.done == 3 * PAGE
    sim.step([], [(b, 447)], HISA, topk=TOPK)                      # b reaches 639
    res = sim.step([(a, 1), (b, 1)], [], HISA, topk=TOPK)         # both complete block 4
    check_decode(sim, res, [a, b], HISA)


def test_freed_pages_reused_with_stale_rows():
    """A request's pages are freed and handed to a new request while their pooled rows still
    hold the old request's blocks; the new request decodes before it completes those blocks
    (the stale row sits under its forced tail block) and after (the row is rewritten)."""
    sim = VllmSim(num_pages=12)
    a = sim.request(700, 3)
    sim.step([], [(a, 700)], HISA, topk=TOPK)
    old = pooled_of(sim).clone()
    sim.free(a)
    c = sim.request(700, 4)
    sim.step([], [(c, 200)], HISA, topk=TOPK)                      # block 1 incomplete
    tail_page = c.pages[3]                                         # block 1's last page
    assert bool(old[tail_page].any()), "the scenario needs a stale row under the tail block"
    assert torch.equal(pooled_of(sim)[tail_page], old[tail_page])
    res = sim.step([(c, 1)], [], HISA, topk=TOPK)
    check_decode(sim, res, [c], HISA)
    sim.step([], [(c, 438)], HISA, topk=TOPK)                      # c reaches 639
    res = sim.step([(c, 1)], [], HISA, topk=TOPK)
    check_decode(sim, res, [c], HISA)
    assert not torch.equal(pooled_of(sim)[tail_page], old[tail_page])


def test_preemption_with_recompute():
    """A is preempted (pages freed, num_computed_tokens = 0), another request takes its
    pages, and A is recomputed later by chunked prefill into different pages."""
    sim = VllmSim(num_pages=14)
    a = sim.request(700, 5)
    sim.step([], [(a, 600)], HISA, topk=TOPK)
    sim.step([(a, 1)], [], HISA, topk=TOPK)
    sim.free(a)                                                    # preempted
    b = sim.request(640, 6)
    sim.step([], [(b, 640)], HISA, topk=TOPK)
    sim.free(b)
    sim.step([], [(a, 300)], HISA, topk=TOPK, chunk_budget=300)   # recompute in chunks
    sim.step([], [(a, 339)], HISA, topk=TOPK)
    res = sim.step([(a, 1)], [], HISA, topk=TOPK)
    check_decode(sim, res, [a], HISA)


@pytest.fixture
def sgl():
    s = SglSim(num_pages=24, topk=TOPK)
    saved = (plug.FACTS.get_pool, plug.FACTS.decode_off)
    plug.FACTS.get_pool, plug.FACTS.decode_off = (lambda: s.pool), None
    plug.POOLED.clear()
    yield s
    plug.FACTS.get_pool, plug.FACTS.decode_off = saved
    plug.POOLED.clear()


def locations(req):
    return torch.tensor(req.slots(0, req.done), dtype=torch.int64)


def _swap_cycle(sgl, hooked: bool):
    """A is retracted to host memory, B overwrites A's pages, A comes back in new pages."""
    a = Req(random_keys(700, 7))
    sgl.extend([(a, 639)], HISA)
    pool = sgl.pool
    get = lambda idx: pool.get_cpu_copy(idx)                              # noqa: E731
    load = lambda cpu, idx: pool.load_cpu_copy(cpu, idx)                  # noqa: E731
    if hooked:
        get = lambda idx: plug.around_get_cpu_copy(type(pool).get_cpu_copy, pool, idx)  # noqa
        load = lambda cpu, idx: plug.around_load_cpu_copy(                             # noqa
            type(pool).load_cpu_copy, pool, cpu, idx)
    saved = get(locations(a))
    old_pages = a.pages
    sgl.alloc.give(old_pages)
    b = Req(random_keys(700, 8))
    sgl.extend([(b, 640)], HISA)
    a.pages = []
    a.grow(sgl.alloc, a.done)
    load(saved, locations(a))
    return a, b


def test_retract_to_host_and_back(sgl):
    """SGLang's retraction with a host copy: the pooled rows of A's whole pages travel with
    the copy and land at A's new pages; decode then selects as if A had never left."""
    a, b = _swap_cycle(sgl, hooked=True)
    assert_live_rows(plug.POOLED.lookup(as_engine_pages(sgl.pool.buf, D)),
                     sgl.pool.buf.view(-1, PAGE, D + 4), [a], 128)
    res = sgl.decode([a], HISA)
    assert sgl.original_calls == 0
    local = hisa.hisa_index_paged(res.q[:1].unsqueeze(1), sgl.pool.buf,
                                  scratch_pooled(sgl.pool.buf.view(-1, PAGE, D + 4), [a], 128),
                                  res.w[:1], res.lens.view(-1, 1), res.md.get_page_table_64(),
                                  topk=TOPK, block_size=128, block_topk=3, backend="torch")
    pages = torch.tensor(a.pages)
    pos = local[0].long().clamp_min(0)
    want_slots = torch.where(local[0] >= 0, pages[pos // PAGE] * PAGE + pos % PAGE, -1)
    assert sorted(res.out[0].tolist()) == sorted(want_slots.tolist())


def test_retract_without_the_hook_leaves_wrong_rows(sgl):
    """The same cycle without the plugin's copy hooks: A's new pages carry B's rows, which is
    what the hooks exist to prevent (this test guards the one above against passing vacuously)."""
    a, _ = _swap_cycle(sgl, hooked=False)
    pooled = plug.POOLED.lookup(as_engine_pages(sgl.pool.buf, D))
    want = scratch_pooled(sgl.pool.buf.view(-1, PAGE, D + 4), [a], 128)
    last = live_rows([a], 128)
    assert not torch.equal(pooled[last], want[last])


def test_whole_page_move_carries_rows(sgl):
    """A move of whole pages (every location of a page, in order) takes the rows along."""
    a = Req(random_keys(300, 9))
    sgl.extend([(a, 256)], HISA)
    pooled = plug.POOLED.lookup(as_engine_pages(sgl.pool.buf, D))
    src_page = a.pages[1]
    dst_page = sgl.alloc.take(1)[0]
    src = torch.arange(src_page * PAGE, (src_page + 1) * PAGE)
    dst = torch.arange(dst_page * PAGE, (dst_page + 1) * PAGE)
    row = pooled[src_page].clone()
    plug.around_move_kv_cache(type(sgl.pool).move_kv_cache, sgl.pool, dst, src)
    assert plug.FACTS.decode_off is None
    assert torch.equal(pooled[dst_page], row)


def test_host_copy_without_rows_turns_decode_off(sgl):
    """A host copy made without the rows (or that cannot be paired page for page) is not
    restored silently: decode HISA turns off for the process."""
    a = Req(random_keys(300, 10))
    sgl.extend([(a, 256)], HISA)
    saved = sgl.pool.get_cpu_copy(locations(a))                     # unhooked copy
    plug.around_load_cpu_copy(type(sgl.pool).load_cpu_copy, sgl.pool, saved, locations(a))
    assert plug.FACTS.decode_off is not None
    assert plug.POOLED.lookup(as_engine_pages(sgl.pool.buf, D)) is None
