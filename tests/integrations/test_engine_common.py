"""The engine-independent pieces of the plugins: options, cache views, the B-aligned gather, the
pooled-companion registry, the post-import hook, argument binding and the entry points' guards."""
import sys
import types

import pytest
import torch

from hisa.integrations import _engine_common as common
from hisa.integrations import sglang as sgl_plugin
from hisa.integrations import vllm as vllm_plugin
from hisa.integrations._engine_common import (PluginOptions, PooledCacheRegistry, after_import,
                                              as_engine_pages, gather_request_keys, parse_options,
                                              prefill_select, prefill_windows, request_layout)

from .engine_ref import PAGE, ROW, D, engine_gather, engine_quant_and_cache, new_cache


@pytest.mark.parametrize("value", [None, "", "0", "off", "OFF", "false"])
def test_options_off(value):
    assert parse_options("HISA_VLLM", value) is None


def test_options_on_and_fields():
    assert parse_options("HISA_VLLM", "1") == PluginOptions()
    got = parse_options("HISA_VLLM", "block_size=256, block_topk=32,decode=off,mode=flat")
    assert got == PluginOptions(block_size=256, block_topk=32, decode=False, mode="flat")


@pytest.mark.parametrize("value, words", [
    ("block_size=100", ["HISA_SGLANG", "multiple of 64", "100"]),
    ("block_topk=1", ["HISA_SGLANG", "block_topk >= 2"]),
    ("speed=fast", ["HISA_SGLANG", "unknown key 'speed'"]),
    ("decode=maybe", ["HISA_SGLANG", "decode=", "'maybe'"]),
    ("block_size", ["HISA_SGLANG", "key=value"]),
    ("backend=cuda", ["HISA_SGLANG", "backend="]),
])
def test_options_errors_name_the_variable(value, words):
    with pytest.raises(ValueError) as err:
        parse_options("HISA_SGLANG", value)
    for w in words:
        assert w in str(err.value)


def test_options_reason():
    assert common.options_reason(PluginOptions(), 2048, "decode") is None
    assert "topk" in common.options_reason(PluginOptions(block_topk=8), 2048, "prefill")
    assert "turned off" in common.options_reason(PluginOptions(decode=False), 64, "decode")


def test_engine_cache_views():
    kv = new_cache(3)                                                     # vLLM [P, 64, 132]
    flat = as_engine_pages(kv, D)
    assert flat.shape == (3, PAGE * ROW) and flat.data_ptr() == kv.data_ptr()
    assert as_engine_pages(kv.unsqueeze(2), D).shape == (3, PAGE * ROW)   # DeepGEMM 4-D view
    assert as_engine_pages(kv.view(3, -1), D).shape == (3, PAGE * ROW)    # SGLang 2-D
    with pytest.raises(ValueError, match="densely packed"):
        as_engine_pages(torch.zeros(3, PAGE, ROW + 4, dtype=torch.uint8)[:, :, :ROW], D)
    with pytest.raises(ValueError, match="pages of 64"):
        as_engine_pages(torch.zeros(3, 32, ROW, dtype=torch.uint8), D)
    with pytest.raises(ValueError, match="uint8"):
        as_engine_pages(kv.float(), D)


def test_aligned_gather_matches_engine_gather():
    """Each request's keys are the engine's gathered keys, starting at a multiple of B, and
    the rows between requests are covered by no window."""
    kv = new_cache(12)
    lens = [70, 0, 200, 1]
    bt = torch.full((4, 5), -1, dtype=torch.int32)
    free = torch.randperm(12).tolist()
    slots = []
    for r, L in enumerate(lens):
        n = -(-L // PAGE)
        bt[r, :n] = torch.tensor(free[:n], dtype=torch.int32)
        free = free[n:]
        slots += [int(bt[r, p // PAGE]) * PAGE + p % PAGE for p in range(L)]
    engine_quant_and_cache(kv, torch.randn(sum(lens), D), torch.tensor(slots))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    k_ref, s_ref = engine_gather(kv, bt, cu)
    keys = gather_request_keys(as_engine_pages(kv, D), bt, torch.tensor(lens), total=sum(lens),
                               head_dim=D, block_size=128)
    assert keys.starts.tolist() == [0, 128, 128, 384]
    for r, L in enumerate(lens):
        s0 = int(keys.starts[r])
        assert torch.equal(keys.k[s0:s0 + L].view(torch.uint8),
                           k_ref[int(cu[r]):int(cu[r]) + L].view(torch.uint8))
        assert torch.equal(keys.k_scale[s0:s0 + L], s_ref[int(cu[r]):int(cu[r]) + L])
    # A layout built once for the step (as the plugins keep it) gathers the same buffer; one
    # built for another block size, request count or total is refused.
    layout = request_layout(torch.tensor(lens), total=sum(lens), block_size=128)
    again = gather_request_keys(as_engine_pages(kv, D), bt, torch.tensor(lens), total=sum(lens),
                                head_dim=D, block_size=128, layout=layout)
    assert torch.equal(again.k.view(torch.uint8), keys.k.view(torch.uint8))
    assert torch.equal(again.starts, keys.starts)
    for wrong in (request_layout(torch.tensor(lens), total=sum(lens), block_size=64),
                  request_layout(torch.tensor(lens[:3]), total=sum(lens[:3]), block_size=128)):
        with pytest.raises(ValueError, match="layout: built for"):
            gather_request_keys(as_engine_pages(kv, D), bt, torch.tensor(lens), total=sum(lens),
                                head_dim=D, block_size=128, layout=wrong)


@pytest.mark.parametrize("mode", ["hisa", "flat"])
def test_a_missing_page_is_named_at_the_ops_one_window_read(mode):
    from hisa.testing.launches import count_host_work
    kv = new_cache(2)
    bt = torch.tensor([[0, -1]], dtype=torch.int32)
    with count_host_work() as work:          # the gather flags the page without a host read
        keys = gather_request_keys(as_engine_pages(kv, D), bt, torch.tensor([100]),
                                   total=100, head_dim=D, block_size=128)
    assert work.num_syncs == 0
    with pytest.raises(ValueError, match="block_table: request 0 position 64 maps to page -1"):
        keys.raise_if_bad_pages()
    q = torch.zeros(3, 4, D, dtype=torch.float8_e4m3fn)
    opts = PluginOptions(block_size=128, block_topk=2, mode=mode)
    with pytest.raises(ValueError, match="block_table: request 0 position 64 maps to page -1"):
        prefill_select(q, torch.ones(3, 4), torch.tensor([98, 99, 100]),
                       torch.zeros(3, dtype=torch.long), keys, topk=16, options=opts)
    with pytest.raises(ValueError, match="block_table: requests with keys over a cache of 0"):
        gather_request_keys(as_engine_pages(new_cache(0), D), bt, torch.tensor([100]),
                            total=100, head_dim=D, block_size=128)
    good = gather_request_keys(as_engine_pages(kv, D), torch.tensor([[0, 1]], dtype=torch.int32),
                               torch.tensor([100]), total=100, head_dim=D, block_size=128)
    good.raise_if_bad_pages()
    idx = prefill_select(q, torch.ones(3, 4), torch.tensor([98, 99, 100]),
                         torch.zeros(3, dtype=torch.long), good, topk=16, options=opts)
    assert idx.shape == (3, 16)
    # Windows kept from a layer serve a later layer only for the same buffer, pages, top-k
    # and options; otherwise the call is refused (their plan would size the kernels wrongly).
    kept = prefill_windows(good, torch.tensor([98, 99, 100]), torch.zeros(3, dtype=torch.long),
                           topk=16, options=opts)
    assert torch.equal(prefill_select(q, torch.ones(3, 4), None, None, good, topk=16,
                                      options=opts, windows=kept), idx)
    with pytest.raises(ValueError, match="windows: planned for"):
        prefill_select(q, torch.ones(3, 4), None, None, good, topk=8, options=opts,
                       windows=kept)


def test_registry_capture_and_stale():
    reg = PooledCacheRegistry()
    a, b = new_cache(4), new_cache(4)
    pa = as_engine_pages(a, D)
    rows = reg.get_or_create(pa, D, capturing=False)
    assert rows.shape == (4, D + 4) and not rows.any()
    assert reg.get_or_create(pa, D, capturing=True) is rows            # known layer: fine
    pb = as_engine_pages(b, D)
    assert reg.get_or_create(pb, D, capturing=True) is None            # first seen in capture
    assert reg.get_or_create(pb, D, capturing=False) is None           # ... and for good
    assert "capture" in reg.stale_reason(pb)
    reg.mark_all_stale("moved")
    assert reg.get_or_create(pa, D, capturing=False) is None


def test_after_import_runs_once_the_module_executes(tmp_path, monkeypatch):
    (tmp_path / "hisa_probe_mod.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    after_import("hisa_probe_mod", lambda m: seen.append(m.VALUE))
    assert seen == []
    import hisa_probe_mod  # noqa: F401
    assert seen == [1]
    after_import("hisa_probe_mod", lambda m: seen.append(2))           # already loaded: now
    assert seen == [1, 2]
    sys.modules.pop("hisa_probe_mod")


def test_bind_call_positional_keyword_defaults():
    args = tuple(range(17))
    call = vllm_plugin.bind_call(args, {"dense_mha_metadata_layer_name": "x", "dcp_rank": 3})
    assert call["hidden_states"] == 0 and call["pcp_shard_decode_requests"] == 16
    assert call["dcp_rank"] == 3 and call["topk_backend"] == "auto"
    with pytest.raises(TypeError, match="missing"):
        vllm_plugin.bind_call(args, {})
    with pytest.raises(TypeError, match="unexpected"):
        vllm_plugin.bind_call(args, {"dense_mha_metadata_layer_name": "", "bogus": 1})


def test_rebind_replaces_every_copy():
    def original():
        return 1

    def replacement():
        return 2

    mod = types.ModuleType("hisa_probe_copy")
    mod.fn, mod.other = original, original
    sys.modules["hisa_probe_copy"] = mod
    try:
        assert vllm_plugin.rebind(original, replacement) >= 2
        assert mod.fn is replacement and mod.other is replacement
    finally:
        sys.modules.pop("hisa_probe_copy")


def test_entry_points_do_nothing_when_unset(monkeypatch):
    monkeypatch.delenv("HISA_VLLM", raising=False)
    monkeypatch.delenv("HISA_SGLANG", raising=False)
    before = set(sys.modules)
    vllm_plugin.register()
    sgl_plugin.register()
    assert not {m for m in set(sys.modules) - before if m.startswith(("vllm", "sglang"))}


def test_sglang_entry_point_refuses_another_version(monkeypatch):
    import importlib.metadata
    monkeypatch.setenv("HISA_SGLANG", "1")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.5.99")
    with pytest.raises(RuntimeError, match="0.5.23"):
        sgl_plugin.register()


def test_vllm_entry_point_refuses_another_version(monkeypatch):
    fake = types.ModuleType("vllm")
    fake.__version__ = "0.34.0"
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setenv("HISA_VLLM", "1")
    with pytest.raises(RuntimeError, match="0.33.0"):
        vllm_plugin.register()


def test_gather_refuses_more_rows_than_int32_windows_address():
    """The B-aligned buffer's rows become int32 windows: a gather that would need more rows is
    refused before anything is allocated, and the starts come back int32."""
    kv = new_cache(2)
    bt = torch.tensor([[0, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="seq_lens: .* more than the int32 windows"):
        gather_request_keys(as_engine_pages(kv, D), bt, torch.tensor([2**31 - 100]),
                            total=2**31 - 100, head_dim=D, block_size=128)
    keys = gather_request_keys(as_engine_pages(kv, D), bt, torch.tensor([100]), total=100,
                               head_dim=D, block_size=128)
    assert keys.starts.dtype == torch.int32
