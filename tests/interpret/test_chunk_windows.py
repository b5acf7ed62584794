"""The vLLM prefill chunk's layout and window launches (:mod:`hisa.cache.chunk_windows`) under
the interpreter (its memcheck shim fails any access outside the tensors) against their torch
twins: :func:`request_layout` and :func:`prefill_windows` over :func:`chunk_requests`."""
from types import SimpleNamespace

import pytest
import torch

from hisa.cache.chunk_windows import LAYOUT_TILE, chunk_layout_triton, chunk_windows_triton
from hisa.integrations import vllm as vllm_plugin
from hisa.integrations._engine_common import (PluginOptions, RequestKeys,
                                              packed_request_layout, request_layout)
from hisa.integrations.vllm import chunk_requests


def _chunk(lens: list[int], queries: list[int], generator):
    """cu_seq_lens of requests with ``lens`` keys and, per request, ``queries[r]`` queries at
    its end (each seeing its request's keys up to and including itself)."""
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    ks, ke = [], []
    for r, (L, n) in enumerate(zip(lens, queries)):
        for i in range(min(n, L)):
            ks.append(int(cu[r]))
            ke.append(int(cu[r]) + L - min(n, L) + i + 1)
    return SimpleNamespace(cu_seq_lens=cu, cu_seqlen_ks=torch.tensor(ks, dtype=torch.int32),
                           cu_seqlen_ke=torch.tensor(ke, dtype=torch.int32))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layout_and_windows_equal_the_torch_ops(seed):
    g = torch.Generator().manual_seed(seed)
    R = [3, 9, LAYOUT_TILE + 5][seed]                 # the last: more requests than one tile
    lens = torch.randint(0, 400, (R,), generator=g).tolist()
    lens[0] = 0                                       # empty requests, first and inside
    lens[R // 2] = 0
    queries = torch.randint(0, 5, (R,), generator=g).tolist()
    chunk = _chunk(lens, queries, g)
    B = 128
    got_lens, got_starts, bad = chunk_layout_triton(chunk.cu_seq_lens, B)
    want = request_layout(chunk.cu_seq_lens[1:] - chunk.cu_seq_lens[:-1], total=sum(lens),
                          block_size=B)
    assert torch.equal(got_lens, want.lens) and torch.equal(got_starts, want.starts)
    assert int(bad) == 0
    ks, ke = chunk.cu_seqlen_ks, chunk.cu_seqlen_ke
    req = chunk_requests(chunk, ks)
    want_ks = want.starts[req]
    want_ke = want_ks + (ke - ks)
    got_ks, got_ke = chunk_windows_triton(chunk.cu_seq_lens, ks, ke, got_starts, bad)
    assert torch.equal(got_ks, want_ks) and torch.equal(got_ke, want_ke)
    bad.fill_(1)                                      # a bad page: every window poisoned
    got_ks, got_ke = chunk_windows_triton(chunk.cu_seq_lens, ks, ke, got_starts, bad)
    assert torch.equal(got_ke, want_ke) and torch.equal(got_ks, want_ke + 1)
    layout = packed_request_layout(chunk.cu_seq_lens, total=sum(lens), block_size=B,
                                   backend="triton")
    assert torch.equal(layout.starts, want.starts) and layout.size == want.size
    assert layout.bad is not None and int(layout.bad) == 0


def test_a_query_past_the_last_request_gets_a_poisoned_window():
    """Inconsistent metadata (a ks at or past the last request's end) is not read out of the
    starts: the window comes back the wrong way round, so the op's window check names it, on
    the torch path too; a negative key count is an empty request in both; starts of another
    request count are refused."""
    cu = torch.tensor([0, 100, 90, 300], dtype=torch.int32)          # request 1: -10 keys
    lens, starts, bad = chunk_layout_triton(cu, 64)
    want = request_layout(cu[1:] - cu[:-1], total=300, block_size=64)
    assert lens.tolist() == [100, 0, 210] == want.lens.tolist()
    assert torch.equal(starts, want.starts)
    ks = torch.tensor([0, 300, 1000], dtype=torch.int32)
    ke = ks + 5
    got_ks, got_ke = chunk_windows_triton(cu, ks, ke, starts, None)
    assert got_ks[0] == 0 and got_ke[0] == 5
    assert bool((got_ks[1:] > got_ke[1:]).all())
    # The vLLM plugin's torch path poisons the same windows (it indexed past the starts).
    chunk = SimpleNamespace(cu_seq_lens=cu, cu_seqlen_ks=ks, cu_seqlen_ke=ke)
    keys = RequestKeys(torch.zeros(500, 64, dtype=torch.float8_e4m3fn), torch.ones(500), starts)
    opts = PluginOptions(block_size=64, block_topk=2, mode="flat", backend="torch")
    twin = vllm_plugin.chunk_windows(chunk, keys, 16, opts)
    assert torch.equal(twin.ks, got_ks) and torch.equal(twin.ke, got_ke)
    with pytest.raises(ValueError, match="starts: expected one start per request"):
        chunk_windows_triton(cu, ks, ke, starts[:2], None)
