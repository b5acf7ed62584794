"""Prefill benchmark: flat DSA vs HISA (two levels, and three with ``super_size``), full causal
and the chunk setting (the last ``queries`` tokens of a long context).

Every shape is checked before it is timed: on sampled query rows the Triton outputs must match
the plain-PyTorch references (flat: the same set up to score ties; HISA: the same set for
contexts <= m*B, and a near-identical set beyond, where tf32 block scores may reorder near-tied
blocks). A failed check raises; no number is printed for it.

``check_reps``: "exact" compares HISA with the reference on fp32 block means (what the
contract defines); "kernel" gives the reference the kernels' own block and super-block
representatives (:mod:`hisa.ops.indexer.reps`; fp32 now, so the two nearly agree; while the
reps were FP8 re-quantized means the difference was ~3 IoU points at 1M keys). The two-level
default's FP8 pre-selection is not modelled by either reference: both score every block on
the fp32 means. The row records the IoU against both.
"""
from __future__ import annotations

import torch

import hisa

from ..ops.dsa.naive import naive_dsa_index, naive_dsa_logits
from ..ops.indexer.naive import eligible_blocks, naive_hisa_index
from ..ops.indexer.naive_super import naive_hisa_index_super
from ..ops.indexer.prefill import plan_windows
from ..testing.compare import FP8_MMA_ROW_TOL, assert_same_selection, check_index_format
from ..testing.inputs import make_indexer_inputs
from .models import flat_prefill_flops, hisa_prefill_flops
from .rows import make_row
from .timer import time_op

#: Sampled rows of a long HISA run must agree with the reference this closely on average
#: (intersection over union). The kernels' tf32 scores of fp32 block reps may still swap a
#: near-tied block now and then, which moves a few tokens; a wrong kernel drops far below. (It
#: was 0.97 while prefill reps were FP8 re-quantized means: IoU 0.966 for a 1M-token chunk.)
HISA_MIN_IOU = 0.995
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


def kernel_reps(inp, *, block_size: int, super_size: int | None = None,
                reps_dtype: torch.dtype | None = None) -> dict:
    """The Triton path's block (and super-block) representatives of ``inp``'s keys, as
    reference keywords (pooled, pooled_scale[, super_pooled, super_scale])."""
    from ..ops.dsa.prefill import prepare_operands
    from ..ops.indexer.pool import pool_blocks
    from ..ops.indexer.reps import rep_dtype
    _, k, _ = prepare_operands(inp.q, inp.k)
    pooled, pscale = pool_blocks(k, inp.k_scale, block_size=block_size,
                                 out_dtype=rep_dtype(k.dtype, reps_dtype))
    reps = {"pooled": pooled, "pooled_scale": pscale}
    if super_size is not None:
        from ..ops.indexer.super_blocks import pool_supers
        sup, sscale = pool_supers(pooled, pscale, k.shape[0], block_size=block_size,
                                  super_size=super_size)
        reps.update(super_pooled=sup, super_scale=sscale)
    return reps


def hisa_reference_iou(inp, idx, rows, *, topk: int, block_size: int, block_topk: int,
                       super_size: int | None = None, super_topk: int | None = None,
                       reps: dict | None = None) -> float:
    """Mean IoU of ``idx[rows]`` with the (two- or three-level) reference on those rows."""
    q, w, ks, ke = inp.q[rows], inp.weights[rows], inp.ks[rows], inp.ke[rows]
    kw = dict(k_scale=inp.k_scale, topk=topk, block_size=block_size, block_topk=block_topk,
              **(reps or {}))
    if super_size is None:
        ref, _ = naive_hisa_index(q, inp.k, w, ks, ke, **kw)
    else:
        ref, _ = naive_hisa_index_super(q, inp.k, w, ks, ke, super_size=super_size,
                                        super_topk=super_topk, **kw)
    return iou(idx[rows], ref)


def check_prefill(inp, flat_idx, hisa_idx, *, topk, block_size, block_topk,
                  super_size=None, super_topk=None, check_reps: str = "exact",
                  label: str = "HISA"
                  ) -> tuple[float, float]:
    """Raise AssertionError unless both outputs are right on sampled rows.

    Returns (IoU against the reference the gate used, IoU against the exact fp32-mean
    reference); the two are equal when ``check_reps == "exact"``.
    """
    check_index_format(flat_idx, inp.ks, inp.ke, topk)
    check_index_format(hisa_idx, inp.ks, inp.ke, topk, exact_count=False)
    rows = sample_rows(inp.num_queries, CHECK_ROWS, inp.q.device)
    q, w, ks, ke = inp.q[rows], inp.weights[rows], inp.ks[rows], inp.ke[rows]
    logits = naive_dsa_logits(q, inp.k, w, ks, ke, k_scale=inp.k_scale)
    ref_flat, _ = naive_dsa_index(q, inp.k, w, ks, ke, k_scale=inp.k_scale, topk=topk)
    assert_same_selection(flat_idx[rows], ref_flat, ks, logits, row_tol=FP8_MMA_ROW_TOL)
    first, end = eligible_blocks(ks, ke, block_size)
    if int((end - first).max()) <= block_topk:        # every block kept: must equal flat
        assert_same_selection(hisa_idx[rows], ref_flat, ks, logits, row_tol=FP8_MMA_ROW_TOL)
    kw = dict(topk=topk, block_size=block_size, block_topk=block_topk, super_size=super_size,
              super_topk=super_topk)
    exact = hisa_reference_iou(inp, hisa_idx, rows, **kw)
    gate = exact
    if check_reps == "kernel":
        gate = hisa_reference_iou(inp, hisa_idx, rows, reps=kernel_reps(
            inp, block_size=block_size, super_size=super_size), **kw)
    assert gate >= HISA_MIN_IOU, (f"{label} vs reference IoU {gate:.4f} < {HISA_MIN_IOU} "
                                  f"(exact-mean reference: {exact:.4f})")
    return gate, exact


def _peak_mib(fn) -> float | None:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before (MiB); None
    off CUDA (``fn`` still runs)."""
    if not torch.cuda.is_available():
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def _super_params(variant: dict) -> dict:
    """A variant's super-block parameters ({} at two levels)."""
    return {k: variant[k] for k in ("super_size", "super_topk") if k in variant}


def _planned_times(inp, variants: dict, plans: dict, outs: dict, runs: int) -> dict:
    """Each HISA variant's call given its :func:`plan_windows` plan, read once outside the
    timing, as an engine reads it once for all layers of a step: no host read in the call,
    so a chunk's GPU is not left idle behind its launches (a 1,024-query chunk's kernels take
    ~0.3-0.5 ms, the unplanned call's host work about as long). Its output must equal the
    unplanned call's, bit for bit, before it is timed."""
    times = {}
    for name, vkw in variants.items():
        got = torch.full_like(outs[name], -7)
        hisa.hisa_index(*inp.args(), out=got, plan=plans[name], **vkw)
        if not torch.equal(got, outs[name]):
            raise RuntimeError(f"{name}: the planned call selected other indices than the "
                               f"unplanned one; no timing")
        times[name] = time_op(lambda plan=plans[name], got=got, vkw=vkw: hisa.hisa_index(
            *inp.args(), out=got, plan=plan, **vkw), runs=runs)
    return times


def bench_prefill_point(context: int, *, queries: int | None, env: dict, topk: int,
                        block_size: int, block_topk: int, heads: int = 64, head_dim: int = 128,
                        stages: bool = True, super_configs: tuple = (),
                        check_reps: str = "exact", timing_runs: int = 20,
                        device: str = "cuda") -> list[dict]:
    """Check then time flat and HISA at one shape; returns two result rows, plus one row of op
    "hisa3" per (super_size, super_topk) of ``super_configs`` (three levels)."""
    mode = "prefill" if queries is None else "prefill_chunk"
    inp = make_indexer_inputs([context], query_lens=None if queries is None else [queries],
                              heads=heads, head_dim=head_dim, device=device, clustered=True,
                              seed=context)
    T = inp.num_queries
    kw = dict(k_scale=inp.k_scale, topk=topk, backend="triton")
    variants = {"hisa": dict(kw, block_size=block_size, block_topk=block_topk)}
    for bs, ms in super_configs:
        variants[f"hisa3 {bs}x{ms}"] = dict(variants["hisa"], super_size=bs, super_topk=ms)
    outs = {name: torch.full((T, topk), -7, dtype=torch.int32, device=device)   # poisoned
            for name in ["flat", *variants]}
    ops = {"flat": lambda: hisa.dsa_index(*inp.args(), out=outs["flat"], **kw)}
    for name, vkw in variants.items():
        ops[name] = lambda name=name, vkw=vkw: hisa.hisa_index(*inp.args(), out=outs[name],
                                                                **vkw)
    peak = {name: _peak_mib(fn) for name, fn in ops.items()}
    quality = {name: check_prefill(inp, outs["flat"], outs[name], topk=topk,
                                   block_size=block_size, block_topk=block_topk,
                                   super_size=vkw.get("super_size"),
                                   super_topk=vkw.get("super_topk"), check_reps=check_reps,
                                   label=f"{name} at {context} keys, {T} queries")
               for name, vkw in variants.items()}
    times = {name: time_op(fn, runs=timing_runs) for name, fn in ops.items()}
    # One plan per variant: the route its rows report and, for chunks, the planned call.
    plans = {name: plan_windows(inp.ks, inp.ke, inp.k.shape[0], topk=topk, block_size=block_size,
                                block_topk=block_topk, **_super_params(vkw))
             for name, vkw in variants.items()}
    planned = (_planned_times(inp, variants, plans, outs, timing_runs)
               if mode == "prefill_chunk" else {})
    f_flat = flat_prefill_flops(inp.ks, inp.ke, heads, head_dim)
    common = dict(mode=mode, context=context, queries=T, batch=1, next_n=None, topk=topk,
                  heads=heads, head_dim=head_dim, dtype="float8_e4m3fn")
    t_flat = times["flat"]
    rows = [make_row(env, op="flat", ms=t_flat.median_ms, p20_ms=t_flat.p20_ms,
                     p80_ms=t_flat.p80_ms, tflops=f_flat / t_flat.median_ms / 1e9,
                     peak_mib=peak["flat"], **common)]
    for name, vkw in variants.items():
        sup = _super_params(vkw)
        stage_ms = {}
        if stages:
            from ..ops.indexer.pipeline import hisa_prefill_stages
            for stage, fn in hisa_prefill_stages(*inp.args(), k_scale=inp.k_scale, topk=topk,
                                                 block_size=block_size, block_topk=block_topk,
                                                 **sup):
                stage_ms[stage] = round(time_op(fn, warmup=1, runs=10).median_ms, 4)
        t = times[name]
        f = hisa_prefill_flops(inp.ks, inp.ke, heads, head_dim, block_size=block_size,
                               block_topk=block_topk, **sup)
        extra = {}
        if sup:
            extra = dict(levels=3, speedup_vs_two_level=times["hisa"].median_ms / t.median_ms,
                         **sup)
        gate, exact = quality[name]
        # What the public op ran: in the exact regime (no query prunes) it routes to flat.
        extra["route"] = "flat" if plans[name].nothing_pruned else "hisa"
        if name in planned:
            extra["planned_ms"] = planned[name].median_ms
        rows.append(make_row(env, op=name.split()[0], ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                             tflops=f / t.median_ms / 1e9,
                             speedup_vs_flat=t_flat.median_ms / t.median_ms,
                             block_size=block_size, block_topk=block_topk, stage_ms=stage_ms,
                             iou_vs_reference=round(gate, 5),
                             iou_vs_exact_reference=round(exact, 5), check_reps=check_reps,
                             flat_equivalent_tflops=f_flat / t.median_ms / 1e9,
                             peak_mib=peak[name], **extra, **common))
    del inp, outs
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows
