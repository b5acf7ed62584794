"""Contract of the vLLM plugin: vLLM's tensors and metadata in, vLLM's topk_indices_buffer out.

The cache is written with a restatement of vLLM's quantize-and-cache layout, the plugin's
replacement (:func:`hisa.integrations.vllm.run_indexer`) runs on vLLM-shaped metadata (packed
prefill chunks with query sub-chunks, mixed decode + prefill batches, next_n 1 / 2 / 3, the
flattened and the uneven decode paths, CUDA-graph padding), and the buffer is compared with
(a) the engine's own flat selection, restated with fp32 loops, in flat mode and (b) this
library's HISA ops run request by request on the same keys, in HISA mode.
"""
import pytest
import torch

import hisa
from hisa.cache.paged import naive_cache_append
from hisa.integrations._engine_common import PluginOptions, as_engine_pages
from hisa.integrations.vllm import run_indexer
from hisa.testing.compare import assert_same_selection, check_index_format

from .engine_ref import (PAGE, D, FakeVllmEngine, VllmSim, decode_rows, engine_gather,
                         mqa_logits, request_keys, vllm_call, vllm_flat_reference)

TOPK = 32
#: m = 3 with B = 128: two slots go to the forced first/last block, the third is chosen by
#: the pooled block scores, so contexts of >= 4 blocks exercise the pooled rows.
HISA = PluginOptions(block_size=128, block_topk=3, backend="torch")
FLAT = PluginOptions(mode="flat", backend="torch")


def scratch_pooled(kv, reqs, block_size):
    """Pooled rows computed from scratch by this library's own append for each request."""
    pages = as_engine_pages(kv, D)
    pooled = torch.zeros(pages.shape[0], D + 4, dtype=torch.uint8)
    for r in reqs:
        if r.done == 0:
            continue
        bt = torch.tensor([r.pages], dtype=torch.int32)
        k, s = hisa.cache.gather_request_keys(pages, bt[0], r.done, D)
        pos = torch.arange(r.done)
        slots = bt[0, pos // PAGE].long() * PAGE + pos % PAGE
        naive_cache_append(pages, pooled, k.contiguous(), slots, pos, k_scale=s.contiguous(),
                           block_table=bt, req_indices=torch.zeros(r.done, dtype=torch.long),
                           block_size=block_size)
    return pooled


def prefill_groups(res):
    """(rows, request keys (fp8, scales), lengths, block-table row) per request of each chunk."""
    for c in res.md.prefill.chunks:
        k8, sc = engine_gather(res.call["kv_cache"], c.block_table, c.cu_seq_lens)
        ks, ke = c.cu_seqlen_ks.long(), c.cu_seqlen_ke.long()
        rows = torch.arange(c.token_start, c.token_end)
        for start in ks.unique().tolist():
            sel = ks == start
            r = int(torch.searchsorted(c.cu_seq_lens[1:], torch.tensor(start, dtype=torch.int32),
                                       right=True))
            end = int(c.cu_seq_lens[r + 1])
            yield rows[sel], (k8[start:end], sc[start:end]), (ke[sel] - start), c.block_table[r]


def check_prefill(sim, res, options):
    """Each request's rows equal this library's op on that request's keys alone (ks = 0)."""
    for rows, (k8, sc), lens, bt_row in prefill_groups(res):
        zeros = torch.zeros(rows.numel(), dtype=torch.int32)
        args = (res.q[rows], k8, res.w[rows], zeros, lens.to(torch.int32))
        if options.mode == "flat":
            want = hisa.dsa_index(*args, k_scale=sc, topk=TOPK, backend="torch")
        else:
            want = hisa.hisa_index(*args, k_scale=sc, topk=TOPK, block_size=options.block_size,
                                   block_topk=options.block_topk, backend="torch")
        got = res.buf[rows, :TOPK]
        check_index_format(got, zeros, lens, TOPK, exact_count=options.mode == "flat")
        lg = mqa_logits(res.q[rows], request_keys(sim.kv, bt_row, int(lens.max())), res.w[rows])
        assert_same_selection(got, want, zeros, lg)


def decode_expect(sim, res, reqs, options):
    """Every decode row as a one-row request through this library's paged op, on the engine
    pages with pooled rows computed from scratch."""
    rows = decode_rows(res.md)
    toks = sorted(rows)
    bt = res.md.decode.block_table[[rows[t][0] for t in toks]]
    lens = torch.tensor([[rows[t][2]] for t in toks], dtype=torch.int32)
    q = res.q[toks].unsqueeze(1)
    kv = sim.kv.view(sim.kv.shape[0], -1)
    if options.mode == "flat":
        idx = hisa.dsa_index_paged(q, kv, res.w[toks], lens, bt, topk=TOPK, backend="torch")
    else:
        pooled = scratch_pooled(sim.kv, reqs, options.block_size)
        idx = hisa.hisa_index_paged(q, kv, pooled, res.w[toks], lens, bt, topk=TOPK,
                                    block_size=options.block_size, block_topk=options.block_topk,
                                    backend="torch")
    return {t: (idx[i], bt[i], int(lens[i])) for i, t in enumerate(toks)}


def sorted_valid(row):
    return sorted(x for x in row.tolist() if x >= 0)


def live_rows(reqs, block_size):
    """Pages holding the last 64 keys of a complete block of a live request (the only rows a
    decode reads); other rows may hold anything, e.g. a freed request's blocks."""
    per = block_size // PAGE
    return sorted({r.pages[(j + 1) * per - 1] for r in reqs for j in range(r.done // block_size)})


def assert_live_rows(pooled, kv, reqs, block_size):
    rows = live_rows(reqs, block_size)
    assert torch.equal(pooled[rows], scratch_pooled(kv, reqs, block_size)[rows])


def check_decode(sim, res, reqs, options):
    if options.mode == "hisa":
        assert_live_rows(sim.registry.lookup(as_engine_pages(sim.kv, D)), sim.kv, reqs,
                         options.block_size)
    for t, (want, bt_row, length) in decode_expect(sim, res, reqs, options).items():
        got = res.buf[t, :TOPK]
        assert sorted_valid(got) == sorted_valid(want), f"decode row {t}"
        assert int((got >= 0).sum()) == min(length, TOPK) or options.mode == "hisa"
        assert bool((got[(got >= 0).sum():] == -1).all()), f"decode row {t}: -1 not last"


def check_flat_against_engine(sim, res):
    """Flat mode: the buffer equals the engine's own selection up to ties."""
    ref = torch.full_like(res.buf, -1)
    vllm_flat_reference(sim.kv, res.md, res.q, res.w, TOPK, ref)
    groups = []
    if res.md.prefill is not None:
        groups += [(rows, lens, bt_row) for rows, _, lens, bt_row in prefill_groups(res)]
    if res.md.decode is not None:
        for t, (b, _, length) in decode_rows(res.md).items():
            groups.append((torch.tensor([t]), torch.tensor([length]),
                           res.md.decode.block_table[b]))
    for rows, lens, bt_row in groups:
        lg = mqa_logits(res.q[rows], request_keys(sim.kv, bt_row, int(lens.max())), res.w[rows])
        assert_same_selection(res.buf[rows, :TOPK], ref[rows, :TOPK],
                              torch.zeros(rows.numel(), dtype=torch.int32), lg)


def check_untouched(res):
    """Rows of the batch are -1 past topk (cleared whole, as the engine does); rows past the
    batch keep their poison."""
    T = res.q.shape[0]
    assert bool((res.buf[:T, TOPK:] == -1).all())
    assert bool((res.buf[T:] == 7777).all())


@pytest.mark.parametrize("options", [HISA, FLAT], ids=["hisa", "flat"])
def test_packed_prefill_chunks(options):
    """Three fresh prompts split into two chunks, the first into query sub-chunks that reuse
    its gathered keys (skip_kv_gather)."""
    sim = VllmSim()
    reqs = [sim.request(n, seed) for n, seed in ((400, 1), (260, 2), (100, 3))]
    res = sim.step([], [(r, r.keys.shape[0]) for r in reqs], options, topk=TOPK,
                   chunk_budget=450, query_split=150)
    assert sum(c.skip_kv_gather for c in res.md.prefill.chunks) >= 1
    assert len({c.num_reqs for c in res.md.prefill.chunks}) == 2
    check_prefill(sim, res, options)
    if options.mode == "flat":
        check_flat_against_engine(sim, res)
    check_untouched(res)
    if options.mode == "hisa":                       # the pooled companion is right
        got = sim.registry.lookup(as_engine_pages(sim.kv, D))
        assert torch.equal(got, scratch_pooled(sim.kv, reqs, options.block_size))


@pytest.mark.parametrize("next_n", [1, 2])
@pytest.mark.parametrize("options", [HISA, FLAT], ids=["hisa", "flat"])
def test_mixed_decode_and_prefill(next_n, options):
    """Decodes of running requests (native [B, next_n] rows) with a chunked prefill that
    continues a prompt (cached context) and a new prompt in the same step."""
    sim = VllmSim()
    a, b, c = sim.request(700, 4), sim.request(300, 5), sim.request(400, 6)
    sim.step([], [(a, 600), (b, 255)], options, topk=TOPK)       # b's block 1 ends at 255
    sim.step([], [(a, 40 - next_n), (c, 150)], options, topk=TOPK)   # a's block 4 ends at 639
    d = sim.request(90, 7)
    res = sim.step([(a, next_n), (b, next_n)], [(c, 150), (d, 90)], options, topk=TOPK)
    assert res.md.num_decode_tokens == 2 * next_n
    check_prefill(sim, res, options)
    check_decode(sim, res, [a, b, c, d], options)
    if options.mode == "flat":
        check_flat_against_engine(sim, res)
    check_untouched(res)


@pytest.mark.parametrize("native", [True, False], ids=["native", "flattened"])
def test_speculative_rows(native):
    """next_n = 2 served natively ([B, 2] rows) or flattened (one row per query, expanded
    block table): same rows, same selections."""
    sim = VllmSim()
    a, b = sim.request(700, 8), sim.request(300, 9)
    sim.step([], [(a, 638), (b, 255)], HISA, topk=TOPK)
    res = sim.step([(a, 2), (b, 2)], [], HISA, topk=TOPK, native_next_n=native)
    assert res.md.decode.seq_lens.shape == ((2, 2) if native else (4, 1))
    check_decode(sim, res, [a, b], HISA)
    check_untouched(res)


def test_uneven_decode_rows():
    """A short extend classified as a decode (1 token where next_n = 2): vLLM's
    requires_padding path; rows are packed and unpacked by token."""
    sim = VllmSim()
    a, b = sim.request(700, 10), sim.request(400, 11)
    sim.step([], [(a, 638), (b, 300)], HISA, topk=TOPK)
    res = sim.step([(a, 2), (b, 1)], [], HISA, topk=TOPK)
    assert res.md.decode.requires_padding
    check_decode(sim, res, [a, b], HISA)
    check_untouched(res)


def test_next_n_three():
    """next_n = 3 (native on SM90's kernel set only for 1, 2, 4): rows are served as single-row
    requests sharing the request's block-table row."""
    sim = VllmSim()
    a = sim.request(700, 12)
    sim.step([], [(a, 638)], HISA, topk=TOPK)
    res = sim.step([(a, 3)], [], HISA, topk=TOPK)
    assert res.md.decode.seq_lens.shape == (1, 3)
    check_decode(sim, res, [a], HISA)


@pytest.mark.parametrize("native", [True, False], ids=["native", "flattened"])
def test_cuda_graph_padded_batch(native):
    """A decode batch padded to a capture size: padding requests (seq_len 0, slot -1) get all
    -1 rows, real rows are unaffected, nothing is pooled from padding."""
    sim = VllmSim()
    a, b = sim.request(700, 13), sim.request(300, 14)
    sim.step([], [(a, 639), (b, 200)], HISA, topk=TOPK)
    res = sim.step([(a, 1), (b, 1)], [], HISA, topk=TOPK, pad_decodes=3, native_next_n=native)
    assert res.md.num_decode_tokens == 5
    assert bool((res.buf[2:5, :TOPK] == -1).all())
    check_decode(sim, res, [a, b], HISA)
    pooled = sim.registry.lookup(as_engine_pages(sim.kv, D))
    assert torch.equal(pooled, scratch_pooled(sim.kv, [a, b], HISA.block_size))


def test_topk_and_columns_from_the_call():
    """topk_tokens comes from the call; the buffer may be wider and longer than the batch."""
    sim = VllmSim()
    a = sim.request(300, 15)
    res = sim.step([], [(a, 300)], PluginOptions(block_size=64, block_topk=2, backend="torch"),
                   topk=TOPK)
    check_untouched(res)
    short = res.buf[5, :TOPK]                       # position 5 sees 6 keys: all of them, then -1
    assert sorted_valid(short) == list(range(6)) and bool((short[6:] == -1).all())


def test_decode_off_runs_engine_decode():
    """decode=off: HISA prefill, the engine's own decode on the decode half of the metadata."""
    sim = VllmSim()
    a, b = sim.request(500, 16), sim.request(300, 17)
    sim.step([], [(a, 400)], HISA, topk=TOPK)
    options = PluginOptions(block_size=128, block_topk=3, decode=False, backend="torch")
    res = sim.step([(a, 1)], [(b, 300)], options, topk=TOPK)
    (md,) = res.engine.original_calls
    assert md.num_prefills == 0 and md.prefill is None and md.num_decodes == 1
    check_prefill(sim, res, options)
    ref = torch.full_like(res.buf, -1)
    vllm_flat_reference(sim.kv, md, res.q, res.w, TOPK, ref)
    assert torch.equal(res.buf[0, :TOPK], ref[0, :TOPK])


def test_unsupported_call_runs_engine():
    """A shape the plugin does not serve (here the MXFP4 cache flag) runs the engine's own
    function on the untouched call, and nothing is pooled."""
    sim = VllmSim()
    a = sim.request(300, 18)
    for r, n in [(a, 300)]:
        r.grow(sim.alloc, n)
    from .engine_ref import Step, engine_quant_and_cache, random_queries, vllm_step_metadata
    md = vllm_step_metadata(Step([], [(a, 300)]))
    engine_quant_and_cache(sim.kv, a.keys, md.slot_mapping)
    q, w = random_queries(300, 4, 0)
    call = vllm_call(sim.kv, md, q, w, topk=TOPK)
    call["use_fp4_cache"] = True
    engine = FakeVllmEngine(md)
    run_indexer(call, md, engine, HISA, sim.registry)
    assert engine.original_calls == [md]
    assert sim.registry.lookup(as_engine_pages(sim.kv, D)) is None


def test_insert_keys_when_the_call_asks():
    """skip_k_cache_insert=False: the plugin runs the engine's insert before pooling."""
    sim = VllmSim()
    a = sim.request(256, 19)
    a.grow(sim.alloc, 256)
    from .engine_ref import Step, random_queries, vllm_step_metadata
    md = vllm_step_metadata(Step([], [(a, 256)]))
    q, w = random_queries(256, 4, 1)
    call = vllm_call(sim.kv, md, q, w, topk=TOPK, k=a.keys.clone(), skip_insert=False)
    run_indexer(call, md, FakeVllmEngine(md), HISA, sim.registry)
    a.done = 256
    assert torch.equal(sim.registry.lookup(as_engine_pages(sim.kv, D)),
                       scratch_pooled(sim.kv, [a], 128))


def test_first_seen_in_capture_falls_back_for_good():
    """A layer first met inside CUDA-graph capture gets no pooled cache (it could not be
    zeroed outside the graph): its decode runs the engine's kernels, then and afterwards."""
    sim = VllmSim()
    a = sim.request(400, 20)
    engine = FakeVllmEngine(capturing=True)
    res = sim.step([], [(a, 399)], HISA, topk=TOPK, engine=engine)
    res = sim.step([(a, 1)], [], HISA, topk=TOPK, engine=FakeVllmEngine())
    assert len(res.engine.original_calls) == 1            # decode went to the engine
    assert sim.registry.stale_reason(as_engine_pages(sim.kv, D)) is not None


def test_kv_connector_keeps_hisa_prefill_and_engine_decode():
    """With a KV connector (pages written outside the forward pass) decode runs the engine's
    kernels and nothing is pooled; prefill HISA does not read pooled rows and stays on."""
    from types import SimpleNamespace

    from hisa.integrations import vllm as plugin
    sim = VllmSim()
    a, b = sim.request(500, 21), sim.request(300, 22)
    sim.step([], [(a, 400)], HISA, topk=TOPK, engine=FakeVllmEngine(decode_off="connector"))
    res = sim.step([(a, 1)], [(b, 300)], HISA, topk=TOPK,
                   engine=FakeVllmEngine(decode_off="connector"))
    (md,) = res.engine.original_calls
    assert md.num_prefills == 0 and md.num_decodes == 1
    check_prefill(sim, res, HISA)
    assert sim.registry.lookup(as_engine_pages(sim.kv, D)) is None
    saved = plugin.DECODE_OFF[0]
    try:
        plugin.record_config(SimpleNamespace(kv_transfer_config=None))
        assert plugin.DECODE_OFF[0] is saved
        plugin.record_config(SimpleNamespace(kv_transfer_config=object()))
        assert "KV connector" in plugin.DECODE_OFF[0]
    finally:
        plugin.DECODE_OFF[0] = saved


def test_layers_share_the_step_tokens_and_write_the_buffer_in_place():
    """Two indexer layers (two caches, different keys) in one step: the step's token grid is
    built once on the metadata and reused, each layer's companion is right, and a buffer exactly
    topk wide is written in place by the ops (no copy)."""
    from .engine_ref import Step, engine_quant_and_cache, new_cache, random_keys, \
        random_queries, vllm_step_metadata
    sim = VllmSim()
    a, b = sim.request(700, 23), sim.request(300, 24)
    sim.step([], [(a, 639), (b, 200)], HISA, topk=TOPK)
    other = new_cache(sim.kv.shape[0])                     # layer 2: same slots, other keys
    for r in (a, b):
        keys2 = random_keys(r.keys.shape[0], 99)
        engine_quant_and_cache(other, keys2[:r.done], torch.tensor(r.slots(0, r.done)))
        r.keys2 = keys2
    sim.registry.get_or_create(as_engine_pages(other, D), D, capturing=False).copy_(
        scratch_pooled(other, [a, b], HISA.block_size))      # as if layer 2 ran the prefill
    for r in (a, b):
        r.grow(sim.alloc, r.done + 1)
    md = vllm_step_metadata(Step([(a, 1), (b, 1)], []))
    engine_quant_and_cache(sim.kv, torch.cat([a.keys[639:640], b.keys[200:201]]), md.slot_mapping)
    engine_quant_and_cache(other, torch.cat([a.keys2[639:640], b.keys2[200:201]]),
                           md.slot_mapping)
    q, w = random_queries(2, 4, 5)
    registry = sim.registry
    bufs = []
    for kv in (sim.kv, other):
        buf = torch.full((2, TOPK), 7777, dtype=torch.int32)
        call = vllm_call(kv, md, q, w, topk=TOPK, buf=buf)
        run_indexer(call, md, FakeVllmEngine(md), HISA, registry)
        bufs.append(buf)
    assert len(md._hisa_step_tokens[1]) == 1
    for r in (a, b):
        r.done += 1
    for kv, buf in zip((sim.kv, other), bufs):
        assert_live_rows(registry.lookup(as_engine_pages(kv, D)), kv, [a, b], HISA.block_size)
        pooled = scratch_pooled(kv, [a, b], HISA.block_size)
        want = hisa.hisa_index_paged(q.unsqueeze(1), kv.view(kv.shape[0], -1), pooled, w,
                                     md.decode.seq_lens, md.decode.block_table, topk=TOPK,
                                     block_size=128, block_topk=3, backend="torch")
        assert [sorted(x) for x in buf.tolist()] == [sorted(x) for x in want.tolist()]
    assert not torch.equal(bufs[0], bufs[1])


def test_capture_after_eager_warmup_on_one_metadata_object():
    """An eager warm-up and a CUDA-graph capture on the same metadata object (the GPU tier's
    harness does this; vLLM builds a fresh object per run): the captured call must derive the
    step's tokens from the metadata's tensors, which a replay reads after the engine copies a
    later step's values into them, not reuse what the eager warm-up derived (graph constants:
    every replay would pool the warm-up step's tokens again and never a block that completes
    later). On the CPU the capturing call runs at once, so it reads the next step's values
    copied into the static tensors, as a replay would."""
    from .engine_ref import Step, engine_quant_and_cache, random_queries, vllm_step_metadata
    sim = VllmSim()
    a, b = sim.request(700, 31), sim.request(300, 32)
    sim.step([], [(a, 638), (b, 200)], HISA, topk=TOPK)   # a's block 4 ends at 639: step 1
    static = call = None
    for step in range(2):
        for r in (a, b):
            r.grow(sim.alloc, r.done + 1)
        md = vllm_step_metadata(Step([(a, 1), (b, 1)], [], width=16))
        engine_quant_and_cache(sim.kv, torch.cat([r.keys[r.done:r.done + 1] for r in (a, b)]),
                               md.slot_mapping)
        q, w = random_queries(2, 4, 40 + step)
        if static is None:                                 # eager warm-up
            static, call = md, vllm_call(sim.kv, md, q, w, topk=TOPK)
            run_indexer(call, static, FakeVllmEngine(static), HISA, sim.registry)
        else:                                              # the captured call, new values
            call["q_quant"].copy_(q)
            call["weights"].copy_(w)
            for name in ("slot_mapping", "seq_lens"):
                getattr(static, name).copy_(getattr(md, name))
            static.decode.seq_lens.copy_(md.decode.seq_lens)
            static.decode.block_table.copy_(md.decode.block_table)
            run_indexer(call, static, FakeVllmEngine(static, capturing=True), HISA,
                        sim.registry)
        for r in (a, b):
            r.done += 1
    pooled = sim.registry.lookup(as_engine_pages(sim.kv, D))
    assert_live_rows(pooled, sim.kv, [a, b], HISA.block_size)
    want = hisa.hisa_index_paged(q.unsqueeze(1), as_engine_pages(sim.kv, D),
                                 scratch_pooled(sim.kv, [a, b], HISA.block_size), w,
                                 md.decode.seq_lens, md.decode.block_table, topk=TOPK,
                                 block_size=HISA.block_size, block_topk=HISA.block_topk,
                                 backend="torch")
    assert [sorted_valid(x) for x in call["topk_indices_buffer"][:2, :TOPK]] == \
        [sorted_valid(x) for x in want]


def test_step_rejects_token_counts_the_request_cannot_give():
    """The metadata builder refuses a step that would cache fewer than one or more keys than
    the request has left (a negative prefill once reached the GPU tier as a RuntimeError deep
    inside the chunk builder)."""
    from .engine_ref import Req, Step
    r = Req(torch.zeros(130, D))
    for n in (-170, 0, 131):
        with pytest.raises(ValueError, match="new tokens"):
            Step([], [(r, n)])
    Step([], [(r, 130)])


def test_kept_prefill_windows_serve_only_a_matching_layer(monkeypatch):
    """A prefill chunk's windows and plan, kept by the step's first layer, serve a later
    layer over a cache of the same page count; a layer whose cache has another page count
    (a page outside a smaller cache would go unnamed) plans its own, and selects the same."""
    from hisa.integrations import vllm as plug

    from .engine_ref import new_cache
    built = []
    real = plug.prefill_windows
    monkeypatch.setattr(plug, "prefill_windows",
                        lambda *a, **kw: built.append(1) or real(*a, **kw))
    sim = VllmSim()
    a = sim.request(700, 31)
    res = sim.step([], [(a, 700)], HISA, topk=TOPK)
    assert len(built) == 1
    md, call = res.md, {**res.call, "skip_k_cache_insert": True}

    def layer(kv):
        buf = torch.full_like(res.buf, 7777)
        run_indexer({**call, "kv_cache": kv, "topk_indices_buffer": buf}, md,
                    FakeVllmEngine(md), HISA, sim.registry)
        return buf
    assert torch.equal(layer(call["kv_cache"]), res.buf) and len(built) == 1
    bigger = torch.cat([call["kv_cache"], new_cache(4)])     # the same pages, and 4 more
    assert torch.equal(layer(bigger), res.buf) and len(built) == 2
