"""The vLLM prefill plugin on its Triton path (the chunk layout and window launches, the
gather, the kernels) against its torch path, under the interpreter: several requests over
several chunks (one continuing the previous chunk's requests, ``skip_kv_gather``), a later
layer on the kept layout and windows, a bad page named from a fresh step, and every launch on
the layer's device."""
import pytest
import torch

from hisa.cache import chunk_windows as cw
from hisa.cache import gather as ga
from hisa.integrations._engine_common import PluginOptions
from hisa.integrations.vllm import run_indexer

from integrations.engine_ref import FakeVllmEngine, VllmSim
from test_device_guard import _Devices

TRITON = PluginOptions(block_size=64, block_topk=3, decode=False, backend="triton")
TORCH = PluginOptions(block_size=64, block_topk=3, decode=False, backend="torch")
KEPT = ("_hisa_request_layout", "_hisa_prefill_windows")


def _rerun(res, options, sim):
    """The step's indexer call again (another layer over the same cache), into a new buffer."""
    buf = torch.full_like(res.buf, 7777)
    call = {**res.call, "topk_indices_buffer": buf, "skip_k_cache_insert": True}
    run_indexer(call, res.md, FakeVllmEngine(res.md), options, sim.registry)
    return buf


def _forget(md):
    for chunk in md.prefill.chunks:
        for name in KEPT:
            if hasattr(chunk, name):
                delattr(chunk, name)


def test_triton_path_selects_what_the_torch_path_selects():
    sim = VllmSim(heads=16)
    reqs = [sim.request(n, s) for n, s in ((150, 1), (80, 2), (40, 3))]
    res = sim.step([], [(r, r.keys.shape[0]) for r in reqs], TRITON, topk=32,
                   chunk_budget=160, query_split=60)
    assert len(res.md.prefill.chunks) >= 2
    assert any(c.skip_kv_gather for c in res.md.prefill.chunks)
    _forget(res.md)
    want = _rerun(res, TORCH, sim)
    assert torch.equal(res.buf.sort(1).values, want.sort(1).values)
    later = _rerun(res, TRITON, sim)              # a later layer: the kept layout and windows
    chunks = res.md.prefill.chunks
    assert all(hasattr(c, "_hisa_prefill_windows") for c in chunks)
    assert all(hasattr(c, "_hisa_request_layout") for c in chunks if not c.skip_kv_gather)
    assert torch.equal(later.sort(1).values, want.sort(1).values)


def test_a_bad_page_is_named_and_every_launch_runs_on_the_layers_device(monkeypatch):
    sim = VllmSim(heads=16)
    a, b = sim.request(140, 1), sim.request(100, 2)
    seen, devices = {}, None
    for module, name in ((cw, "chunk_layout_triton"), (cw, "chunk_windows_triton"),
                         (ga, "gather_request_keys_triton")):
        real = getattr(module, name)

        def record(*args, _real=real, _name=name, **kw):
            if devices is not None:
                seen[_name] = devices.current
            return _real(*args, **kw)
        monkeypatch.setattr(module, name, record)
    res = sim.step([], [(a, 140), (b, 100)], TRITON, topk=32)
    devices = _Devices(monkeypatch, tensor_device=1, current=0)
    _forget(res.md)
    chunk = res.md.prefill.chunks[0]
    chunk.block_table[1, 1] = 10_000                       # a page outside the cache
    with pytest.raises(ValueError, match="maps to page 10000"):
        _rerun(res, TRITON, sim)
    assert seen == dict.fromkeys(["chunk_layout_triton", "chunk_windows_triton",
                                  "gather_request_keys_triton"], 1)
    assert int(chunk._hisa_request_layout.bad) == 1
