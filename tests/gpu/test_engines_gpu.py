"""GPU tier of the engine plugins (no vLLM / SGLang needed: the plugins' cores run on restated
engine metadata). The vLLM replacement and the SGLang paged hook run the Triton kernels at the
DeepSeek-V3.2 shapes; their output equals calling this library's ops directly on the same keys,
and the decode paths replay under CUDA-graph capture equal to eager.

Run: PYTHONPATH=. python3 -m pytest -q tests/gpu/test_engines_gpu.py
"""
import pytest
import torch

import hisa
from hisa.integrations import sglang as sgl_plugin
from hisa.integrations._engine_common import PluginOptions, as_engine_pages
from hisa.integrations.vllm import run_indexer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

if torch.cuda.is_available():
    from tests.integrations.engine_ref import (PAGE, D, FakeVllmEngine, Step, VllmSim,
                                               engine_quant_and_cache, random_queries,
                                               to_device, vllm_call, vllm_step_metadata)

H, TOPK = 64, 2048
OPTS = PluginOptions(block_size=128, block_topk=64)                  # backend "auto": Triton
#: Prefill rows are scored by the same kernels as the direct call but over a longer (B-aligned,
#: multi-request) key buffer; tiles differ, so near-tied scores may swap at the k-th place.
PREFILL_MIN_RECALL = 0.995


def recall(a: torch.Tensor, b: torch.Tensor) -> float:
    hit = tot = 0
    for x, y in zip(a.tolist(), b.tolist()):
        sx, sy = {v for v in x if v >= 0}, {v for v in y if v >= 0}
        hit += len(sx & sy)
        tot += max(len(sy), 1)
    return hit / tot


def scratch_pooled_gpu(sim, reqs):
    """Pooled rows of the requests' cached keys, appended from scratch by this library."""
    pages = as_engine_pages(sim.kv, D)
    pooled = torch.zeros(pages.shape[0], D + 4, dtype=torch.uint8, device="cuda")
    for r in reqs:
        bt = torch.tensor([r.pages], dtype=torch.int32, device="cuda")
        k, s = hisa.cache.gather_request_keys(pages, bt[0], r.done, D)
        pos = torch.arange(r.done, device="cuda")
        slots = bt[0, pos // PAGE].long() * PAGE + pos % PAGE
        hisa.paged_cache_append(pages, pooled, k.contiguous(), slots, pos,
                                k_scale=s.contiguous(), block_table=bt,
                                req_indices=torch.zeros_like(pos), block_size=OPTS.block_size)
    return pooled


def direct_decode(sim, res, reqs, pooled):
    """hisa_index_paged called directly on the step's rows ([B, next_n] as the engine)."""
    dec = res.md.decode
    B = dec.decode_lens.shape[0]
    n = res.md.num_decode_tokens // B
    q = res.q[:B * n].view(B, n, H, D)
    return hisa.hisa_index_paged(q, as_engine_pages(sim.kv, D), pooled, res.w[:B * n],
                                 dec.seq_lens, dec.block_table, topk=TOPK,
                                 block_size=OPTS.block_size, block_topk=OPTS.block_topk)


@pytest.mark.parametrize("next_n", [1, 2])
def test_vllm_plugin_prefill_and_decode(next_n):
    sim = VllmSim(num_pages=700, heads=H, device="cuda")
    a, b = sim.request(20000, 1), sim.request(12000, 2)
    res = sim.step([], [(a, 19990 - next_n), (b, 11800)], OPTS, topk=TOPK, query_split=4096)
    for c in res.md.prefill.chunks:                      # prefill rows vs hisa_index per request
        for r, req in enumerate((a, b)):
            sel = torch.searchsorted(c.cu_seq_lens[1:], c.cu_seqlen_ks, right=True) == r
            rows = torch.arange(c.token_start, c.token_end, device="cuda")[sel]
            if rows.numel() == 0:
                continue
            lens = (c.cu_seqlen_ke - c.cu_seqlen_ks)[sel]
            k, s = hisa.cache.gather_request_keys(as_engine_pages(sim.kv, D),
                                                  torch.tensor(req.pages, device="cuda"),
                                                  int(lens.max()), D)
            want = hisa.hisa_index(res.q[rows], k.contiguous(), res.w[rows],
                                   torch.zeros_like(lens), lens, k_scale=s.contiguous(),
                                   topk=TOPK, block_size=OPTS.block_size,
                                   block_topk=OPTS.block_topk)
            assert recall(res.buf[rows, :TOPK], want) >= PREFILL_MIN_RECALL
    res = sim.step([(a, next_n), (b, next_n)], [], OPTS, topk=TOPK)
    pooled = sim.registry.lookup(as_engine_pages(sim.kv, D))
    assert torch.equal(pooled, scratch_pooled_gpu(sim, [a, b]))
    want = direct_decode(sim, res, [a, b], pooled)
    got = res.buf[:2 * next_n, :TOPK]
    assert [sorted(x) for x in got.tolist()] == [sorted(x) for x in want.tolist()]


def test_vllm_decode_under_cuda_graph():
    """Capture the replacement for a decode step, then replay it for the next step's keys,
    lengths and queries: equal to running it eagerly, pooled rows included. The prompts end
    so that one request completes a block at the captured step and one at each replayed
    step (positions 127, 8703, 14719, 19711), so the replays must pool blocks the capture
    never saw complete."""
    sim = VllmSim(num_pages=700, heads=H, device="cuda")
    lengths, prompts = (9000, 15000, 140, 20000), (8702, 14717, 127, 19708)
    reqs = [sim.request(n, 10 + i) for i, n in enumerate(lengths)]
    sim.step([], list(zip(reqs, prompts)), OPTS, topk=TOPK, query_split=4096)
    static = None
    graph, engine = torch.cuda.CUDAGraph(), FakeVllmEngine()
    for step in range(4):
        for r in reqs:
            r.grow(sim.alloc, r.done + 1)
        # a fixed table width: the captured graph replays on tensors of the same shapes
        width = max(r.keys.shape[0] for r in reqs) // 64 + 2
        md = to_device(vllm_step_metadata(Step([(r, 1) for r in reqs], [], width=width)),
                       "cuda")
        keys = torch.cat([r.keys[r.done:r.done + 1] for r in reqs]).cuda()
        engine_quant_and_cache(sim.kv, keys, md.slot_mapping)
        q, w = (x.cuda() for x in random_queries(len(reqs), H, 100 + step))
        if static is None:                                 # warm up eagerly, then capture
            static = vllm_call(sim.kv, md, q, w, topk=TOPK)
            static["topk_indices_buffer"] = static["topk_indices_buffer"].cuda()
            static_md = md
            engine.md = static_md
            run_indexer(static, static_md, engine, OPTS, sim.registry)
            torch.cuda.synchronize()
            engine._capturing = True
            with torch.cuda.graph(graph):
                run_indexer(static, static_md, engine, OPTS, sim.registry)
            engine._capturing = False
        else:                                              # new inputs into the static tensors
            static["q_quant"].copy_(q)
            static["weights"].copy_(w)
            static_md.slot_mapping.copy_(md.slot_mapping)
            static_md.seq_lens.copy_(md.seq_lens)
            static_md.decode.seq_lens.copy_(md.decode.seq_lens)
            static_md.decode.block_table.copy_(md.decode.block_table)
            graph.replay()
            torch.cuda.synchronize()
            replayed = static["topk_indices_buffer"].clone()
            pooled = sim.registry.lookup(as_engine_pages(sim.kv, D)).clone()
            eager = vllm_call(sim.kv, md, q, w, topk=TOPK)
            eager["topk_indices_buffer"] = eager["topk_indices_buffer"].cuda()
            run_indexer(eager, md, FakeVllmEngine(md), OPTS, sim.registry)
            assert torch.equal(replayed[:len(reqs)], eager["topk_indices_buffer"][:len(reqs)])
            assert torch.equal(pooled, sim.registry.lookup(as_engine_pages(sim.kv, D)))
        for r in reqs:
            r.done += 1
        if step:                                 # every complete block pooled, as from scratch
            assert torch.equal(sim.registry.lookup(as_engine_pages(sim.kv, D)),
                               scratch_pooled_gpu(sim, reqs))


def test_sglang_paged_under_cuda_graph(monkeypatch):
    """The SGLang paged hook (decode rows, fused page-table transform) captured and replayed."""
    from tests.integrations.engine_ref import Mode, Req, SglMetadata, SglPool, random_keys, table
    from types import SimpleNamespace
    pool = SglPool(600)
    pool.buf = pool.buf.cuda()
    monkeypatch.setattr(sgl_plugin.FACTS, "get_pool", lambda: pool)
    sgl_plugin.POOLED.clear()
    from tests.integrations.engine_ref import Pages
    alloc = Pages(600)
    reqs = [Req(random_keys(n, 20 + i)) for i, n in enumerate((16000, 9000, 300))]
    indexer = SimpleNamespace(index_topk=TOPK, num_init_tokens=0, num_local_tokens=0,
                              dsa_enable_prefill_cp=False)
    pages = as_engine_pages(pool.buf, D)
    for r in reqs:                                    # context written and pooled (as prefill)
        r.grow(alloc, r.keys.shape[0])
        r.done = r.keys.shape[0] - 50
        slots = torch.tensor(r.slots(0, r.done), device="cuda")
        engine_quant_and_cache(pool.buf.view(-1, PAGE, D + 4), r.keys[:r.done].cuda(), slots)
        sgl_plugin.pool_tokens(pages, slots, torch.arange(r.done, device="cuda"),
                               torch.tensor([r.pages], dtype=torch.int32, device="cuda"),
                               torch.zeros(r.done, dtype=torch.long, device="cuda"), OPTS)

    def inputs(step):
        slots = torch.tensor([r.slots(r.done, r.done + 1)[0] for r in reqs], device="cuda")
        engine_quant_and_cache(pool.buf.view(-1, PAGE, D + 4),
                               torch.cat([r.keys[r.done:r.done + 1] for r in reqs]).cuda(),
                               slots)
        seq = torch.tensor([r.done + 1 for r in reqs], dtype=torch.int32, device="cuda")
        md = SglMetadata(ks=None, ke=None, token_to_batch=None,
                         table=table(reqs, 300).cuda(), seq_lens=seq,
                         extend_lens=[1] * len(reqs), method="PAGED", expanded=seq)
        fb = SimpleNamespace(out_cache_loc=slots, forward_mode=Mode("decode"),
                             positions=torch.tensor([r.done for r in reqs], device="cuda"))
        q, w = (x.cuda() for x in random_queries(len(reqs) + 2, H, 200 + step))
        return fb, q, w.unsqueeze(-1), md

    def call(fb, q, w, md):
        return sgl_plugin.around_get_topk_paged(None, indexer, fb, 0, q, w, md, options=OPTS)

    fb, q, w, md = inputs(0)
    call(fb, q, w, md)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(fb, q, w, md)
    for r in reqs:
        r.done += 1
    for step in range(1, 3):
        fb2, q2, w2, md2 = inputs(step)
        fb.out_cache_loc.copy_(fb2.out_cache_loc)
        fb.positions.copy_(fb2.positions)
        q.copy_(q2)
        w.copy_(w2)
        md._seq.copy_(md2._seq)
        graph.replay()
        torch.cuda.synchronize()
        eager = call(fb2, q2, w2, md2)
        assert torch.equal(out, eager)
        assert bool((out[len(reqs):] == -1).all())
        for r in reqs:
            r.done += 1
    sgl_plugin.POOLED.clear()


@pytest.mark.parametrize("bad_page", [False, True])
def test_triton_request_gather_equals_torch_on_gpu(bad_page):
    """The one-launch request gather on the GPU writes the torch gather's bytes (64 requests up
    to 40K keys each, empty ones included, a strided block table) and the same bad-page flag."""
    from hisa.integrations._engine_common import gather_request_keys
    from tests.integrations.engine_ref import new_cache
    g = torch.Generator().manual_seed(5)
    num_pages = 9000
    kv = new_cache(num_pages).cuda()
    kv.view(torch.uint8).copy_(torch.randint(0, 256, kv.view(torch.uint8).shape, generator=g,
                                             dtype=torch.uint8).cuda())
    R, W = 64, 40000 // PAGE + 1
    lens = torch.randint(0, 40000, (R,), generator=g)
    lens[::7] = 0
    table = torch.randint(0, num_pages, (W, R), generator=g, dtype=torch.int32).t()
    if bad_page:
        table[3, 5] = num_pages
        lens[3] = max(int(lens[3]), 6 * PAGE)
    table, lens = table.cuda(), lens.cuda()
    pages = as_engine_pages(kv, D)
    args = dict(total=int(lens.sum()), head_dim=D, block_size=128)
    want = gather_request_keys(pages, table, lens, backend="torch", **args)
    got = gather_request_keys(pages, table, lens, backend="triton", **args)
    assert torch.equal(got.k.view(torch.uint8), want.k.view(torch.uint8))
    assert torch.equal(got.k_scale.view(torch.int32), want.k_scale.view(torch.int32))
    assert bool(got.bad_pages) == bool(want.bad_pages) == bad_page
