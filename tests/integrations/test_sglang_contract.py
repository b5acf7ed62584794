"""Contract of the SGLang plugin: the DSA Indexer's ragged (extend) and paged (decode /
target-verify) top-k, driven with SGLang-shaped metadata over a cache written in the engine's
layout, compared with this library's ops on the same keys and mapped through the same output
transform the engine's fused top-k applies."""
import pytest
import torch

import hisa
from hisa.integrations import sglang as plug
from hisa.integrations._engine_common import PluginOptions, as_engine_pages
from hisa.testing.compare import assert_same_selection

from .engine_ref import PAGE, D, SglSim, mqa_logits, request_keys

TOPK = 32
HISA = PluginOptions(block_size=128, block_topk=3, backend="torch")
FLAT = PluginOptions(mode="flat", backend="torch")


@pytest.fixture
def sim():
    s = SglSim(topk=TOPK)
    saved = (plug.FACTS.get_pool, plug.FACTS.fused_topk, plug.FACTS.decode_off)
    plug.FACTS.get_pool, plug.FACTS.fused_topk, plug.FACTS.decode_off = (lambda: s.pool), \
        True, None
    plug.POOLED.clear()
    yield s
    plug.FACTS.get_pool, plug.FACTS.fused_topk, plug.FACTS.decode_off = saved
    plug.POOLED.clear()


def local_expect(sim, req, q, w, lens, options):
    """This library's op on one request's keys (positions, -1 padded)."""
    pages = as_engine_pages(sim.pool.buf, D)
    k, s = hisa.cache.gather_request_keys(pages, torch.tensor(req.pages, dtype=torch.int32),
                                          int(lens.max()), D)
    zeros = torch.zeros(lens.numel(), dtype=torch.int32)
    args = (q, k.contiguous(), w, zeros, lens.to(torch.int32))
    if options.mode == "flat":
        return hisa.dsa_index(*args, k_scale=s.contiguous(), topk=TOPK, backend="torch")
    return hisa.hisa_index(*args, k_scale=s.contiguous(), topk=TOPK,
                           block_size=options.block_size, block_topk=options.block_topk,
                           backend="torch")


def to_slots(local, req):
    pages = torch.tensor(req.pages)
    pos = local.long().clamp_min(0)
    return torch.where(local >= 0, pages[pos // PAGE] * PAGE + pos % PAGE, -1)


@pytest.mark.parametrize("options", [HISA, FLAT], ids=["hisa", "flat"])
@pytest.mark.parametrize("method", ["RAGGED", "PAGED"])
def test_extend(sim, options, method):
    """An extend batch (one request continuing a cached prefix, one fresh) through the ragged
    hook; padding rows past the real tokens stay -1."""
    from .engine_ref import Req, random_keys
    a, b = Req(random_keys(420, 1)), Req(random_keys(200, 2))
    sim.extend([(a, 300)], options)
    res = sim.extend([(a, 120), (b, 200)], options, method=method, pad_rows=5)
    assert sim.original_calls == 0
    out, md = res.out, res.md
    assert bool((out[320:] == -1).all())
    ks, ke = md.get_indexer_kvcache_range()
    for bi, (req, rows) in enumerate(((a, slice(0, 120)), (b, slice(120, 320)))):
        lens = (ke - ks)[rows]
        local = local_expect(sim, req, res.q[rows], res.w[rows], lens, options)
        got = out[rows]
        if method == "RAGGED":
            got = torch.where(got >= 0, got - md.attn_metadata.topk_indices_offset[rows, None], -1)
            lg = mqa_logits(res.q[rows], request_keys(sim.pool.buf.view(-1, PAGE, D + 4),
                                                      torch.tensor(req.pages), int(lens.max())),
                            res.w[rows])
            assert_same_selection(got, local, torch.zeros_like(lens), lg)
        else:
            want = to_slots(local, req)
            assert [sorted(r.tolist()) for r in got] == [sorted(r.tolist()) for r in want]


def test_unfused_topk_returns_positions(sim):
    from .engine_ref import Req, random_keys
    plug.FACTS.fused_topk = False
    a = Req(random_keys(300, 3))
    res = sim.extend([(a, 300)], HISA)
    lens = res.md.get_indexer_kvcache_range()[1] - res.md.get_indexer_kvcache_range()[0]
    want = local_expect(sim, a, res.q, res.w, lens, HISA)
    assert [sorted(r.tolist()) for r in res.out] == [sorted(r.tolist()) for r in want]


@pytest.mark.parametrize("next_n", [1, 2])
def test_paged_rows(sim, next_n):
    """Decode (next_n 1) and target-verify (next_n 2) rows, with CUDA-graph padding rows: each
    row's slots equal this library's paged HISA over the engine pages and scratch pooled rows."""
    from .engine_ref import Req, random_keys
    from .test_vllm_contract import scratch_pooled
    a, b = Req(random_keys(700, 4)), Req(random_keys(300, 5))
    sim.extend([(a, 640 - next_n), (b, 256 - next_n)], HISA)
    res = sim.decode([a, b], HISA, next_n=next_n, pad_rows=3)
    assert sim.original_calls == 0
    rows = 2 * next_n
    assert bool((res.out[rows:] == -1).all())
    pooled = scratch_pooled(sim.pool.buf.view(-1, PAGE, D + 4), [a, b], 128)
    assert torch.equal(plug.POOLED.lookup(as_engine_pages(sim.pool.buf, D)), pooled)
    bt = res.md.get_page_table_64()
    local = hisa.hisa_index_paged(res.q[:rows].unsqueeze(1), sim.pool.buf, pooled,
                                  res.w[:rows], res.lens.view(-1, 1), bt, topk=TOPK,
                                  block_size=128, block_topk=3, backend="torch")
    for i, req in enumerate([a] * next_n + [b] * next_n):
        assert sorted(res.out[i].tolist()) == sorted(to_slots(local[i], req).tolist())


def test_unsupported_layer_runs_engine(sim):
    from .engine_ref import Req, random_keys
    sim.indexer.num_init_tokens = 4
    a = Req(random_keys(200, 6))
    res = sim.extend([(a, 200)], HISA)
    assert sim.original_calls == 1 and bool((res.out == -2).all())
    assert plug.POOLED.lookup(as_engine_pages(sim.pool.buf, D)) is None


def test_k_only_shortcut_pools(sim):
    """The engine's key-only shortcut (every window fits in the top-k) still pools."""
    from types import SimpleNamespace

    from .engine_ref import Mode, Req, random_keys
    a = Req(random_keys(200, 7))
    slots, pos = sim.store([(a, 128)])
    a.done = 128
    md = SimpleNamespace(get_token_to_batch_idx=lambda: torch.zeros(128, dtype=torch.int32),
                         get_page_table_64=lambda: torch.tensor([a.pages], dtype=torch.int32))
    fb = SimpleNamespace(out_cache_loc=slots, positions=pos, forward_mode=Mode("extend"))
    calls = []
    plug.around_forward_k_only(lambda *a, **k: calls.append(1), sim.indexer, None, pos, fb, 0,
                               None, md, True, options=HISA)
    from .test_vllm_contract import scratch_pooled
    assert calls == [1]
    assert torch.equal(plug.POOLED.lookup(as_engine_pages(sim.pool.buf, D)),
                       scratch_pooled(sim.pool.buf.view(-1, PAGE, D + 4), [a], 128))


def test_sub_page_move_turns_decode_off(sim):
    """EAGLE's token-granular KV moves: pooled rows cannot follow, so decode stops using them."""
    from .engine_ref import Req, random_keys
    a = Req(random_keys(300, 8))
    sim.extend([(a, 255)], HISA)
    plug.around_move_kv_cache(sim.pool.__class__.move_kv_cache, sim.pool,
                              torch.tensor([5, 6]), torch.tensor([70, 71]))
    assert plug.FACTS.decode_off is not None
    sim.decode([a], HISA)
    assert sim.original_calls == 1


def test_page_table_not_expanded_marks_the_layer_stale(sim):
    """Rows that cannot be paired with page-table rows are never pooled through wrong rows: the
    layer goes stale and decodes with the engine's kernels."""
    from .engine_ref import Req, random_keys
    a = Req(random_keys(400, 9))
    sim.extend([(a, 254)], HISA)
    sim.decode([a], HISA, next_n=2, expand_table=False)
    assert sim.original_calls == 1
    assert "expanded" in plug.POOLED.stale_reason(as_engine_pages(sim.pool.buf, D))


def test_layers_of_a_step_share_the_token_grid(sim, monkeypatch):
    """The step's token grid is built once per forward pass: a later indexer layer of the same
    pass reuses it (and selects the same as the first), a new step builds its own, a batch
    whose inputs moved (another tensor) does not reuse a grid built from the old ones, and a
    batch object run again (its buffers refilled in place, as the CUDA-graph runners' warm-up
    and debug replays do) rebuilds it at its first layer."""
    from .engine_ref import Req, random_keys
    built = []
    real = plug.step_tokens
    monkeypatch.setattr(plug, "step_tokens", lambda *a: built.append(1) or real(*a))
    a, b = Req(random_keys(700, 10)), Req(random_keys(300, 11))
    sim.extend([(a, 639), (b, 255)], HISA)
    assert len(built) == 1
    res = sim.decode([a, b], HISA)
    assert len(built) == 2
    again = plug.around_get_topk_paged(sim._original_paged, sim.indexer, res.fb, 1, res.q,
                                       res.w.unsqueeze(-1), res.md, options=HISA)
    assert len(built) == 2 and torch.equal(again, res.out)
    res.fb.positions = res.fb.positions.clone()
    plug.around_get_topk_paged(sim._original_paged, sim.indexer, res.fb, 2, res.q,
                               res.w.unsqueeze(-1), res.md, options=HISA)
    assert len(built) == 3
    res.fb.out_cache_loc.add_(0)                  # the same buffers, refilled in place
    plug.around_get_topk_paged(sim._original_paged, sim.indexer, res.fb, 0, res.q,
                               res.w.unsqueeze(-1), res.md, options=HISA)
    assert len(built) == 4
    sim.decode([a, b], HISA)
    assert len(built) == 5 and sim.original_calls == 0


def test_layers_of_an_extend_pass_share_the_windows_and_their_plan(sim, monkeypatch):
    """The extend's windows and their plan (the call's one host read) are built by the pass's
    first indexer layer; a later layer of the pass reuses them and selects what a fresh build
    selects, and a new pass (a layer not above the last one) builds them again."""
    from .engine_ref import Req, random_keys
    built = []
    real = plug.prefill_windows
    monkeypatch.setattr(plug, "prefill_windows",
                        lambda *a, **kw: built.append(1) or real(*a, **kw))
    a, b = Req(random_keys(700, 12)), Req(random_keys(300, 13))
    res = sim.extend([(a, 639), (b, 255)], HISA)
    assert len(built) == 1

    def layer(i):
        return plug.around_get_topk_ragged(sim._original_ragged, sim.indexer, False, res.fb,
                                           i, res.q, res.w.unsqueeze(-1), res.md,
                                           options=HISA)
    assert torch.equal(layer(1), res.out) and len(built) == 1
    assert torch.equal(layer(0), res.out) and len(built) == 2
    assert sim.original_calls == 0


def test_kept_windows_serve_only_the_metadata_they_were_read_from(sim, monkeypatch):
    """A later layer on the same batch object with other extend metadata (other windows over
    a key buffer of the same size, pages, top-k and options) builds its own windows: the
    pass's key names the metadata tensors, not only the sizes a plan was checked against."""
    from .engine_ref import Req, random_keys
    built = []
    real = plug.prefill_windows
    monkeypatch.setattr(plug, "prefill_windows",
                        lambda *a, **kw: built.append(1) or real(*a, **kw))
    first = sim.extend([(Req(random_keys(639, 14)), 639), (Req(random_keys(255, 15)), 255)],
                       HISA)
    other = sim.extend([(Req(random_keys(600, 16)), 600), (Req(random_keys(294, 17)), 294)],
                       HISA)                                  # 894 keys over 2 requests too
    assert len(built) == 2
    other.fb._hisa_prefill_windows = first.fb._hisa_prefill_windows    # kept at layer 0
    got = plug.around_get_topk_ragged(sim._original_ragged, sim.indexer, False, other.fb, 1,
                                      other.q, other.w.unsqueeze(-1), other.md, options=HISA)
    assert len(built) == 3 and torch.equal(got, other.out)
    assert sim.original_calls == 0
