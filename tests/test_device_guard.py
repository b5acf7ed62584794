"""The public ops run on their tensors' CUDA device (hisa.utils.backend.runs_on_device_of).

Triton launches on the *current* device; these tests check the guard's wiring and mechanics on
the CPU with the device queries stubbed. The real two-device run is in
tests/gpu/test_hardening_gpu.py (skipped with fewer than two GPUs).
"""
import contextlib

import pytest
import torch

import hisa
from hisa.cache import paged as paged_module
from hisa.cache.slots import positions_to_slots
from hisa.integrations._engine_common import gather_request_keys
from hisa.testing.inputs import make_indexer_inputs
from hisa.utils import backend

#: Public ops that can launch a Triton kernel, with the argument whose device they run on.
GUARDED = {hisa.dsa_index: "q", hisa.dsa_index_paged: "q", hisa.hisa_index: "q",
           hisa.hisa_index_paged: "q", hisa.plan_windows: "ks", hisa.paged_cache_append: "k",
           positions_to_slots: "local", gather_request_keys: "pages"}
#: Public functions of ``hisa`` that never launch one (torch only, or no tensors).
UNGUARDED = {"HisaConfig", "WindowPlan", "PagedIndexerCache", "dequantize_fp8", "quantize_fp8",
             "sparse_attention_reference", "windows_from_cu_seqlens"}


def test_every_public_op_that_can_launch_a_kernel_is_guarded():
    for fn, arg in GUARDED.items():
        assert getattr(fn, "runs_on_device_of", None) == arg, fn.__name__
    exported = {n for n in hisa.__all__ if callable(getattr(hisa, n))}
    unguarded = {n for n in exported if not hasattr(getattr(hisa, n), "runs_on_device_of")}
    assert unguarded == UNGUARDED, "a new public op: guard it or list it as torch-only"


class _Devices:
    """Stubs: every tensor "lives" on device ``tensor_device``; a device guard, recorded when
    entered, makes its device current until it exits (as torch.cuda.device does)."""

    def __init__(self, monkeypatch, tensor_device: int, current: int):
        self.entered, self.current = [], current
        monkeypatch.setattr(backend, "_cuda_index",
                            lambda t: tensor_device if isinstance(t, torch.Tensor) else None)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "device", self._enter)

    @contextlib.contextmanager
    def _enter(self, index):
        self.entered.append(index)
        before, self.current = self.current, index
        try:
            yield
        finally:
            self.current = before


def _call():
    inp = make_indexer_inputs([300], heads=4, head_dim=32, seed=2)
    return hisa.hisa_index(*inp.args(), k_scale=inp.k_scale, topk=16, block_size=16,
                           block_topk=4, backend="torch")


def test_a_call_on_another_device_runs_under_that_devices_guard(monkeypatch):
    want = _call()
    devices = _Devices(monkeypatch, tensor_device=1, current=0)
    got = _call()
    assert devices.entered == [1]            # once: inside it cuda:1 is current
    assert devices.current == 0              # restored after the call
    assert torch.equal(got, want)
    cache = hisa.PagedIndexerCache(4, head_dim=32, block_size=64)
    cache.append(torch.randn(70, 32), torch.arange(70), torch.arange(70))
    assert devices.entered == [1, 1]         # the cache's append through paged_cache_append


def test_a_call_on_the_current_device_enters_no_guard(monkeypatch):
    devices = _Devices(monkeypatch, tensor_device=0, current=0)
    _call()
    assert devices.entered == []


def test_keyword_arguments_find_the_device_too(monkeypatch):
    devices = _Devices(monkeypatch, tensor_device=3, current=0)
    inp = make_indexer_inputs([100], heads=4, head_dim=32, seed=2)
    hisa.dsa_index(q=inp.q, k=inp.k, weights=inp.weights, ks=inp.ks, ke=inp.ke,
                   k_scale=inp.k_scale, topk=8, backend="torch")
    assert devices.entered == [3]
    assert paged_module.paged_cache_append.runs_on_device_of == "k"
