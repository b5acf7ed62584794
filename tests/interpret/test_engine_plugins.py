"""Interpreter tier of the engine plugins: the vLLM replacement's decode step (pooling through the
Triton append, HISA through the Triton paged kernels: the path CUDA graphs capture) against the
same step on the torch twins."""
import torch

from hisa.integrations._engine_common import PluginOptions, as_engine_pages

from integrations.engine_ref import D, VllmSim
from integrations.test_vllm_contract import live_rows

TOPK = 32
TORCH = PluginOptions(block_size=128, block_topk=3, backend="torch")
TRITON = PluginOptions(block_size=128, block_topk=3, backend="triton")
#: The Triton pool sums a block in another order than its twin: an FP8 pooled value may move
#: by one e4m3 step, and a block whose score then ties the kept ones may swap.
MIN_RECALL = 0.95


def run(options):
    sim = VllmSim(num_pages=40, heads=16)
    a, b = sim.request(700, 1), sim.request(300, 2)
    sim.step([], [(a, 637), (b, 254)], TORCH, topk=TOPK)
    res = sim.step([(a, 2), (b, 2)], [], options, topk=TOPK)       # a: 637, 638 / b: 254, 255
    return sim, res, [a, b]


def test_decode_step_triton_equals_torch():
    sim_t, res_t, reqs_t = run(TRITON)
    sim_r, res_r, reqs_r = run(TORCH)
    rows = live_rows(reqs_t, 128)
    got = sim_t.registry.lookup(as_engine_pages(sim_t.kv, D))[rows]
    want = sim_r.registry.lookup(as_engine_pages(sim_r.kv, D))[rows]
    gv, wv = got[:, :D].view(torch.float8_e4m3fn).float(), want[:, :D].view(torch.float8_e4m3fn)
    gs, ws = got[:, D:].view(torch.float32), want[:, D:].view(torch.float32)
    assert torch.allclose(gv * gs, wv.float() * ws, rtol=2.0 ** -3, atol=1e-6)
    hit = total = 0
    for x, y in zip(res_t.buf[:4, :TOPK].tolist(), res_r.buf[:4, :TOPK].tolist()):
        sx, sy = {v for v in x if v >= 0}, {v for v in y if v >= 0}
        assert len(sx) == len(sy)
        hit, total = hit + len(sx & sy), total + len(sy)
    assert hit / total >= MIN_RECALL
