"""Prefill benchmark: flat DSA vs HISA, full causal and the 1,024-query chunk setting.

Every shape is checked before it is timed: on sampled query rows the Triton outputs must match
the plain-PyTorch references (flat: the same set up to score ties; HISA: the same set for
contexts <= m*B, and a near-identical set beyond, where FP8 pooled keys may reorder near-tied
blocks). A failed check raises; no number is printed for it.
"""
from __future__ import annotations

import torch

import hisa

from ..ops.dsa.naive import naive_dsa_index, naive_dsa_logits
from ..ops.indexer.naive import eligible_blocks, naive_hisa_index
from ..testing.compare import FP8_MMA_ROW_TOL, assert_same_selection, check_index_format
from ..testing.inputs import make_indexer_inputs
from .models import flat_prefill_flops, hisa_prefill_flops
from .rows import make_row
from .timer import time_op

#: Sampled rows of a long HISA run must agree with the reference this closely on average
#: (intersection over union). FP8 re-quantized pooled keys may swap near-tied blocks, which
#: moves a few tokens; a wrong kernel drops to IoU far below this.
HISA_MIN_IOU = 0.97
CHECK_ROWS = 24


def sample_rows(T: int, n: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(T)
    rnd = torch.randint(0, max(T, 1), (max(n - 8, 0),), generator=g)
    fixed = torch.tensor([0, 1, T // 2, T - 4, T - 3, T - 2, T - 1, min(127, T - 1)])
    return torch.unique(torch.cat([rnd, fixed]).clamp(0, T - 1)).to(device)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    vals = []
    for ra, rb in zip(a.tolist(), b.tolist()):
        sa, sb = {x for x in ra if x >= 0}, {x for x in rb if x >= 0}
        vals.append(len(sa & sb) / max(len(sa | sb), 1))
    return sum(vals) / max(len(vals), 1)


def check_prefill(inp, flat_idx, hisa_idx, *, topk, block_size, block_topk) -> float:
    """Raise AssertionError unless both outputs are right on sampled rows; return HISA IoU."""
    check_index_format(flat_idx, inp.ks, inp.ke, topk)
    check_index_format(hisa_idx, inp.ks, inp.ke, topk, exact_count=False)
    rows = sample_rows(inp.num_queries, CHECK_ROWS, inp.q.device)
    q, w, ks, ke = inp.q[rows], inp.weights[rows], inp.ks[rows], inp.ke[rows]
    logits = naive_dsa_logits(q, inp.k, w, ks, ke, k_scale=inp.k_scale)
    ref_flat, _ = naive_dsa_index(q, inp.k, w, ks, ke, k_scale=inp.k_scale, topk=topk)
    assert_same_selection(flat_idx[rows], ref_flat, ks, logits, row_tol=FP8_MMA_ROW_TOL)
    ref_hisa, _ = naive_hisa_index(q, inp.k, w, ks, ke, k_scale=inp.k_scale, topk=topk,
                                   block_size=block_size, block_topk=block_topk)
    first, end = eligible_blocks(ks, ke, block_size)
    if int((end - first).max()) <= block_topk:        # every block kept: must equal flat
        assert_same_selection(hisa_idx[rows], ref_flat, ks, logits, row_tol=FP8_MMA_ROW_TOL)
    score = iou(hisa_idx[rows], ref_hisa)
    assert score >= HISA_MIN_IOU, f"HISA vs reference IoU {score:.4f} < {HISA_MIN_IOU}"
    return score


def bench_prefill_point(context: int, *, queries: int | None, env: dict, topk: int,
                        block_size: int, block_topk: int, heads: int = 64, head_dim: int = 128,
                        stages: bool = True) -> list[dict]:
    """Check then time flat and HISA at one shape; returns two result rows."""
    device = "cuda"
    mode = "prefill" if queries is None else "prefill_chunk"
    inp = make_indexer_inputs([context], query_lens=None if queries is None else [queries],
                              heads=heads, head_dim=head_dim, device=device, clustered=True,
                              seed=context)
    T = inp.num_queries
    kw = dict(k_scale=inp.k_scale, topk=topk, backend="triton")
    hkw = dict(kw, block_size=block_size, block_topk=block_topk)
    flat_out = torch.full((T, topk), -7, dtype=torch.int32, device=device)   # poisoned
    hisa_out = torch.full((T, topk), -7, dtype=torch.int32, device=device)
    hisa.dsa_index(*inp.args(), out=flat_out, **kw)
    hisa.hisa_index(*inp.args(), out=hisa_out, **hkw)
    quality = check_prefill(inp, flat_out, hisa_out, topk=topk, block_size=block_size,
                            block_topk=block_topk)
    t_flat = time_op(lambda: hisa.dsa_index(*inp.args(), out=flat_out, **kw))
    t_hisa = time_op(lambda: hisa.hisa_index(*inp.args(), out=hisa_out, **hkw))
    stage_ms = {}
    if stages:
        from ..ops.indexer.pipeline import hisa_prefill_stages
        for name, fn in hisa_prefill_stages(*inp.args(), k_scale=inp.k_scale, topk=topk,
                                            block_size=block_size, block_topk=block_topk):
            stage_ms[name] = round(time_op(fn, warmup=1, runs=10).median_ms, 4)
    f_flat = flat_prefill_flops(inp.ks, inp.ke, heads, head_dim)
    f_hisa = hisa_prefill_flops(inp.ks, inp.ke, heads, head_dim, block_size=block_size,
                                block_topk=block_topk)
    common = dict(mode=mode, context=context, queries=T, batch=1, next_n=None, topk=topk,
                  heads=heads, head_dim=head_dim, dtype="float8_e4m3fn")
    flat_row = make_row(env, op="flat", ms=t_flat.median_ms, p20_ms=t_flat.p20_ms,
                        p80_ms=t_flat.p80_ms, tflops=f_flat / t_flat.median_ms / 1e9,
                        **common)
    hisa_row = make_row(env, op="hisa", ms=t_hisa.median_ms, p20_ms=t_hisa.p20_ms,
                        p80_ms=t_hisa.p80_ms, tflops=f_hisa / t_hisa.median_ms / 1e9,
                        speedup_vs_flat=t_flat.median_ms / t_hisa.median_ms,
                        block_size=block_size, block_topk=block_topk, stage_ms=stage_ms,
                        iou_vs_reference=round(quality, 5),
                        flat_equivalent_tflops=f_flat / t_hisa.median_ms / 1e9, **common)
    del inp, flat_out, hisa_out
    torch.cuda.empty_cache()
    return [flat_row, hisa_row]
