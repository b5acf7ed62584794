"""Overhead of the engine plugins over calling this library's ops directly (benchmark rows).

Decode: the vLLM replacement for one layer (pooling of the step's completed blocks + HISA
decode into vLLM's top-k buffer) against what a hand integration with the public ops does for
that layer (read the step's keys back from the cache, ``paged_cache_append`` them,
``hisa_index_paged`` on ``[B, next_n]`` into the buffer), both timed as CUDA-graph replays. The
step's token grid (slots, positions, block-table rows), which the plugin builds once per step
for all layers, is timed separately (``grid_ms``, once per step, not per layer). The SGLang paged
hook (pooling + HISA + the fused page-table transform) against the direct ops plus that
transform (one Triton launch on both sides, :mod:`hisa.cache.slots`), timed as a step of
``SGLANG_LAYERS`` layers (both sides build the step's token grid
once per step, as the hook does since it keeps the grid on the ForwardBatch) and reported per
layer. Prefill: the vLLM replacement for one chunk (B-aligned gather + HISA) against gathering
the request's keys and calling ``hisa_index``, timed as steps of each of
``PREFILL_LAYER_COUNTS`` layers in which both sides read the windows once
(``hisa.plan_windows``), then a line through each side's step times splits them into a fixed
part per step and a part per layer, projected to DeepSeek-V3.2's 61 indexer layers (the fit
row). Each row is preceded by a check that both sides select the same indices. Target:
overhead <= 2 %.

Run on a GPU (no vLLM / SGLang needed):

    PYTHONPATH=. python3 tests/gpu/engines_overhead.py [--out rows.jsonl]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from types import SimpleNamespace

import torch

import hisa
from hisa.cache.slots import positions_to_slots
from hisa.bench.rows import append_rows, environment, make_row
from hisa.bench.timer import time_op
from hisa.integrations import sglang as sgl_plugin
from hisa.integrations._engine_common import (PluginOptions, as_engine_pages, read_back_keys,
                                              step_tokens)
from hisa.integrations.vllm import run_indexer, vllm_step_tokens
from tests.integrations.engine_ref import (PAGE, D, FakeVllmEngine, Mode, Pages, Req,
                                          SglMetadata, Step, VllmSim, engine_quant_and_cache,
                                          random_keys, random_queries, table, to_device,
                                          vllm_call, vllm_step_metadata)

H, TOPK = 64, 2048
OPTS = PluginOptions(block_size=128, block_topk=64)
TARGET_OVERHEAD = 0.02
#: Where the cases are built: "cuda" for the timings; a CPU host-work count sets "cpu".
DEVICE = "cuda"
#: Indexer layers per timed SGLang step (both sides build the step's token grid once and run
#: the layer's work this many times; DSA models have 61-78 layers, so 4 is conservative).
SGLANG_LAYERS = 4
#: Indexer layers of the timed vLLM prefill steps (each layer with its own cache; the step's
#: first layer reads the windows, the later ones reuse them, on both sides). A step costs a
#: fixed part (the first layer's work before its window read, exposed while the GPU waits)
#: plus a part per layer: the steps of several lengths separate the two (a line through the
#: times), and the fit row gives the overhead per layer at MODEL_LAYERS.
PREFILL_LAYER_COUNTS = (1, 4, 16)
#: Indexer layers of DeepSeek-V3.2 (every one of its 61 layers has one).
MODEL_LAYERS = 61


def fill_context(sim, reqs):
    """Write every request's context keys and pool them (what their prefill would have done)."""
    pages = as_engine_pages(sim.kv, D)
    pooled = sim.registry.get_or_create(pages, D, capturing=False)
    for r in reqs:
        r.grow(sim.alloc, r.done + 2)
        pos = torch.arange(r.done, device=DEVICE)
        slots = torch.tensor(r.slots(0, r.done), device=DEVICE)
        engine_quant_and_cache(sim.kv, r.keys[:r.done].to(DEVICE), slots)
        bt = torch.tensor([r.pages], dtype=torch.int32, device=DEVICE)
        tokens = step_tokens(slots, pos, bt, torch.zeros_like(pos), pages.shape[0])
        k, s = read_back_keys(pages, tokens, D)
        hisa.paged_cache_append(pages, pooled, k, tokens.slots, pos, k_scale=s, block_table=bt,
                                req_indices=tokens.req, block_size=OPTS.block_size)
    return pages, pooled


def same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    return [sorted(x) for x in a.tolist()] == [sorted(x) for x in b.tolist()]


def decode_case(batch: int, context: int, next_n: int):
    sim = VllmSim(num_pages=batch * (context // PAGE + 4) + 8, heads=H, device=DEVICE)
    reqs = [Req(random_keys(context + next_n, 100 + i)) for i in range(batch)]
    for r in reqs:
        r.done = context
    pages, pooled = fill_context(sim, reqs)
    md = to_device(vllm_step_metadata(Step([(r, next_n) for r in reqs], [],
                                            width=context // PAGE + 4)), DEVICE)
    engine_quant_and_cache(sim.kv, torch.cat([r.keys[context:] for r in reqs]).to(DEVICE),
                           md.slot_mapping)
    q, w = (x.to(DEVICE) for x in random_queries(batch * next_n, H, 7))
    call = vllm_call(sim.kv, md, q, w, topk=TOPK)
    rows = batch * next_n
    call["topk_indices_buffer"] = torch.full((rows, TOPK), -1, dtype=torch.int32, device=DEVICE)
    call["skip_topk_buffer_clear"] = True             # as DeepseekV32Attention calls it
    engine = FakeVllmEngine(md)
    tok = torch.arange(rows, device=DEVICE)
    tokens = step_tokens(md.slot_mapping, md.decode.seq_lens.flatten().long() - 1,
                         md.decode.block_table, tok // next_n, pages.shape[0])
    q4 = q.view(batch, next_n, H, D)
    out = torch.empty(rows, TOPK, dtype=torch.int32, device=DEVICE)

    def plugin():
        run_indexer(call, md, engine, OPTS, sim.registry)

    def direct():
        k8, ks = read_back_keys(pages, tokens, D)
        hisa.paged_cache_append(pages, pooled, k8, tokens.slots, tokens.positions, k_scale=ks,
                                block_table=md.decode.block_table, req_indices=tokens.req,
                                block_size=OPTS.block_size)
        return hisa.hisa_index_paged(q4, pages, pooled, w, md.decode.seq_lens,
                                     md.decode.block_table, topk=TOPK, out=out,
                                     block_size=OPTS.block_size, block_topk=OPTS.block_topk)

    def grid():
        md.__dict__.pop("_hisa_step_tokens", None)
        vllm_step_tokens(md, pages.shape[0])

    plugin()
    ok = same_rows(call["topk_indices_buffer"][:rows, :TOPK], direct())
    return plugin, direct, ok, grid


def sglang_decode_case(batch: int, context: int):
    pool = SimpleNamespace(index_page_size=PAGE, index_kpool=1)
    num_pages = batch * (context // PAGE + 4) + 8
    pool.buf = torch.zeros(num_pages, PAGE * (D + 4), dtype=torch.uint8, device=DEVICE)
    pool.get_index_k_with_scale_buffer = lambda layer_id: pool.buf
    sgl_plugin.FACTS.get_pool = lambda: pool
    sgl_plugin.FACTS.state_reason = None
    sgl_plugin.POOLED.clear()
    alloc = Pages(num_pages)
    reqs = [Req(random_keys(context + 1, 200 + i)) for i in range(batch)]
    pages = as_engine_pages(pool.buf, D)
    pooled = sgl_plugin.POOLED.get_or_create(pages, D, capturing=False)
    for r in reqs:
        r.grow(alloc, context + 1)
        slots = torch.tensor(r.slots(0, context + 1), device=DEVICE)
        engine_quant_and_cache(pool.buf.view(-1, PAGE, D + 4), r.keys.to(DEVICE), slots)
        pos = torch.arange(context, device=DEVICE)
        row = torch.tensor([r.pages], dtype=torch.int32, device=DEVICE)
        ctx = step_tokens(slots[:-1], pos, row, torch.zeros_like(pos), num_pages)
        k8, ks = read_back_keys(pages, ctx, D)
        hisa.paged_cache_append(pages, pooled, k8, ctx.slots, pos, k_scale=ks, block_table=row,
                                req_indices=ctx.req, block_size=OPTS.block_size)
        r.done = context
    slots = torch.tensor([r.slots(context, context + 1)[0] for r in reqs], device=DEVICE)
    seq = torch.full((batch,), context + 1, dtype=torch.int32, device=DEVICE)
    bt = table(reqs, context // PAGE + 4).to(DEVICE)
    md = SglMetadata(ks=None, ke=None, token_to_batch=None, table=bt, seq_lens=seq,
                     extend_lens=[1] * batch, method="PAGED", expanded=seq)
    fb = SimpleNamespace(out_cache_loc=slots, forward_mode=Mode("decode"),
                         positions=torch.full((batch,), context, device=DEVICE))
    q, w = (x.to(DEVICE) for x in random_queries(batch, H, 9))
    indexer = SimpleNamespace(index_topk=TOPK, num_init_tokens=0, num_local_tokens=0,
                              dsa_enable_prefill_cp=False)
    req = torch.arange(batch, device=DEVICE)

    def plugin():
        for layer in range(SGLANG_LAYERS):
            out = sgl_plugin.around_get_topk_paged(None, indexer, fb, layer, q, w.unsqueeze(-1),
                                                   md, options=OPTS)
        return out

    def direct():
        tokens = step_tokens(slots, fb.positions, bt, req, num_pages)
        for _ in range(SGLANG_LAYERS):
            k8, ks = read_back_keys(pages, tokens, D)
            hisa.paged_cache_append(pages, pooled, k8, tokens.slots, tokens.positions,
                                    k_scale=ks, block_table=bt, req_indices=req,
                                    block_size=OPTS.block_size)
            local = hisa.hisa_index_paged(q.unsqueeze(1), pages, pooled, w, seq.view(-1, 1), bt,
                                          topk=TOPK, block_size=OPTS.block_size,
                                          block_topk=OPTS.block_topk)
            out = positions_to_slots(local, table=bt)
        return out

    ok = same_rows(plugin(), direct())
    return plugin, direct, ok, None


def prefill_case(context: int, queries: int, layers: int):
    sim = VllmSim(num_pages=context // PAGE + 8, heads=H, device=DEVICE)
    r = Req(random_keys(context, 300))
    r.done = context - queries
    fill_context(sim, [r])
    r.grow(sim.alloc, context)
    md = to_device(vllm_step_metadata(Step([], [(r, queries)], width=context // PAGE + 4)),
                   DEVICE)
    engine_quant_and_cache(sim.kv, r.keys[context - queries:].to(DEVICE), md.slot_mapping)
    caches = [sim.kv] + [sim.kv.clone() for _ in range(layers - 1)]   # one per layer
    q, w = (x.to(DEVICE) for x in random_queries(queries, H, 11))
    calls = []
    for kv in caches:
        call = vllm_call(kv, md, q, w, topk=TOPK)
        call["topk_indices_buffer"] = torch.full((queries, TOPK), -1, dtype=torch.int32,
                                                 device=DEVICE)
        call["skip_topk_buffer_clear"] = True
        calls.append(call)
    opts = dataclasses.replace(OPTS, decode=False)
    engine = FakeVllmEngine(md)
    c = md.prefill.chunks[0]
    lens = c.cu_seqlen_ke - c.cu_seqlen_ks
    starts = torch.zeros_like(lens)
    row = torch.tensor(r.pages, dtype=torch.int32, device=DEVICE)

    def plugin():
        for chunk in md.prefill.chunks:       # a new step: the engine builds new metadata
            for name in [n for n in vars(chunk) if n.startswith("_hisa_")]:
                delattr(chunk, name)
        for call in calls:
            run_indexer(call, md, engine, opts, sim.registry)

    def direct():
        # A hand integration reads the step's windows once for all layers, as the plugin does.
        plan = hisa.plan_windows(starts, lens, context, topk=TOPK, block_size=OPTS.block_size,
                                 block_topk=OPTS.block_topk)
        for kv in caches:
            k, s = hisa.cache.gather_request_keys(as_engine_pages(kv, D), row, context, D)
            idx = hisa.hisa_index(q, k.contiguous(), w, starts, lens, k_scale=s.contiguous(),
                                  topk=TOPK, block_size=OPTS.block_size,
                                  block_topk=OPTS.block_topk, plan=plan)
        return idx

    plugin()
    ok = same_rows(calls[-1]["topk_indices_buffer"][:queries, :TOPK], direct())
    return plugin, direct, ok, None


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ``points`` (x, y)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - slope * mx, slope


def step_fit_row(env: dict, steps: list[tuple[int, float, float]]) -> dict:
    """The prefill steps' times as fixed + per-layer parts on each side, and the overhead per
    layer they give at the model's layer count (and of one more layer)."""
    fixed_p, per_p = fit_line([(n, p) for n, p, _ in steps])
    fixed_d, per_d = fit_line([(n, d) for n, _, d in steps])
    at_model = (fixed_p + MODEL_LAYERS * per_p) / (fixed_d + MODEL_LAYERS * per_d) - 1.0
    return make_row(env, op="vllm prefill plugin overhead, fit over step lengths", mode="hisa",
                    ms=(fixed_p + MODEL_LAYERS * per_p) / MODEL_LAYERS,
                    direct_ms=(fixed_d + MODEL_LAYERS * per_d) / MODEL_LAYERS,
                    overhead=at_model, within_target=at_model <= TARGET_OVERHEAD,
                    layers_per_step=MODEL_LAYERS, fitted_from_layers=[n for n, _, _ in steps],
                    fixed_ms_plugin=fixed_p, fixed_ms_direct=fixed_d,
                    per_layer_ms_plugin=per_p, per_layer_ms_direct=per_d,
                    marginal_layer_overhead=per_p / per_d - 1.0, cuda_graph=False,
                    context=32768, queries=4096)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="append JSON rows to this file")
    ap.add_argument("--commit", default=None,
                    help="commit recorded in the rows (default: the checkout's git HEAD)")
    args = ap.parse_args()
    env = environment(args.commit)
    rows = []
    cases = [("vllm decode", dict(batch=32, context=32768, next_n=1), decode_case, True),
             ("vllm decode", dict(batch=8, context=65536, next_n=2), decode_case, True),
             ("sglang decode", dict(batch=32, context=32768), sglang_decode_case, True)]
    cases += [("vllm prefill", dict(context=32768, queries=4096, layers=n), prefill_case, False)
              for n in PREFILL_LAYER_COUNTS]
    steps = []                                   # (layers, plugin ms, direct ms) of prefill
    for name, shape, make, graph in cases:
        plugin, direct, ok, grid = make(**shape)
        if not ok:
            raise SystemExit(f"{name} {shape}: plugin and direct ops select different indices")
        layers = SGLANG_LAYERS if name.startswith("sglang") else shape.get("layers", 1)
        t_plugin = time_op(plugin, cuda_graph=graph, runs=50).median_ms / layers
        t_direct = time_op(direct, cuda_graph=graph, runs=50).median_ms / layers
        if name.endswith("prefill"):
            steps.append((layers, t_plugin * layers, t_direct * layers))
        overhead = t_plugin / t_direct - 1.0
        grid_ms = time_op(grid, runs=50).median_ms if grid is not None else None
        row = make_row(env, op=f"{name} plugin overhead", mode="hisa", ms=t_plugin,
                       direct_ms=t_direct, overhead=overhead, grid_ms_per_step=grid_ms,
                       within_target=overhead <= TARGET_OVERHEAD, cuda_graph=graph,
                       layers_per_step=layers,
                       context=shape["context"], batch=shape.get("batch"),
                       next_n=shape.get("next_n"), queries=shape.get("queries"))
        rows.append(row)
        print(json.dumps(row))
    rows.append(step_fit_row(env, steps))
    print(json.dumps(rows[-1]))
    if args.out:
        append_rows(args.out, rows)


if __name__ == "__main__":
    main()
