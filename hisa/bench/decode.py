"""Decode benchmark: flat paged DSA vs HISA paged decode (two levels, and three with
``super_size``: op "hisa3"), and the automatic choice.

Each shape is checked before it is timed, on two sampled requests: the flat kernel must select
the reference's set (up to score ties) and HISA the HISA reference's set (same pooled cache,
so the same blocks up to near-ties). Timings replay a CUDA graph of the op, as serving engines
run decode; memory-bound, so each row carries GB/s from the byte model in :mod:`.models`.
"""
from __future__ import annotations

import torch

import hisa

from ..cache.factory import build_super_cache, make_paged_inputs
from ..ops.dsa.naive import naive_dsa_logits
from ..ops.dsa.paged import paged_row_lengths
from ..testing.compare import FP8_MMA_ROW_TOL, assert_same_selection, check_index_format
from .models import hisa_decode_bytes, paged_decode_bytes
from .prefill import HISA_MIN_IOU, iou
from .rows import make_row
from .timer import time_op


def _sub_batch(inp, reqs: list[int]):
    nn = inp.next_n
    rows = torch.tensor([b * nn + i for b in reqs for i in range(nn)], device=inp.q.device)
    r = torch.tensor(reqs, device=inp.q.device)
    return inp.q[r], inp.weights[rows], inp.seq_lens[r], inp.block_table[r], rows


def check_decode(inp, flat_idx, hisa_idx, *, topk: int, block_size: int, block_topk: int,
                 super_cache: torch.Tensor | None = None, super_size: int | None = None,
                 super_topk: int | None = None) -> float:
    """Raise AssertionError unless both outputs are right on two sampled requests (HISA
    against the two- or three-level reference on the same cached rows)."""
    lens = paged_row_lengths(inp.seq_lens, inp.next_n).flatten()
    zeros = torch.zeros_like(lens, dtype=torch.int32)
    check_index_format(flat_idx, zeros, lens.to(torch.int32), topk)
    check_index_format(hisa_idx, zeros, lens.to(torch.int32), topk, exact_count=False)
    batch = inp.q.shape[0]
    reqs = sorted({0, batch - 1})
    q, w, seq, bt, rows = _sub_batch(inp, reqs)
    ref_flat = hisa.dsa_index_paged(q, inp.cache.kv_cache, w, seq, bt, topk=topk,
                                    backend="torch")
    sup = {} if super_size is None else dict(super_cache=super_cache, super_size=super_size,
                                             super_topk=super_topk)
    ref_hisa = hisa.hisa_index_paged(q, inp.cache.kv_cache, inp.cache.pooled_cache, w, seq, bt,
                                     topk=topk, block_size=block_size, block_topk=block_topk,
                                     backend="torch", **sup)
    nn = inp.next_n
    for j, b in enumerate(reqs):
        r = slice(j * nn, (j + 1) * nn)
        row_lens = lens[rows[r]]
        k, k_scale = inp.cache.request_keys(bt[j], int(row_lens.max()))
        zeros_r = torch.zeros(nn, dtype=torch.int32, device=q.device)
        logits = naive_dsa_logits(q[j], k, w[r], zeros_r, row_lens.to(torch.int32),
                                  k_scale=k_scale)
        assert_same_selection(flat_idx[rows[r]], ref_flat[r], zeros_r, logits,
                              row_tol=FP8_MMA_ROW_TOL)
    score = iou(hisa_idx[rows], ref_hisa)
    assert score >= HISA_MIN_IOU, f"HISA decode vs reference IoU {score:.4f} < {HISA_MIN_IOU}"
    return score


def _time(fn):
    """Graph replay when capture works (the serving setting), else eager launches."""
    try:
        return time_op(fn, warmup=3, runs=50, max_seconds=1.0, cuda_graph=True), True
    except RuntimeError:
        torch.cuda.synchronize()
        return time_op(fn, warmup=3, runs=50, max_seconds=1.0), False


def bench_decode_point(context: int, *, batch: int, next_n: int, env: dict, topk: int,
                       block_size: int, block_topk: int, heads: int = 64, head_dim: int = 128,
                       super_configs: tuple = (), auto: bool = True, device: str = "cuda"
                       ) -> list[dict]:
    """Check then time flat, HISA and auto paged decode at one shape; two result rows, plus
    one of op "hisa3" per (super_size, super_topk) of ``super_configs`` (the cache carries the
    first super size's rows from its appends; other sizes are pooled from its block rows)."""
    first_bs = super_configs[0][0] if super_configs else None
    inp = make_paged_inputs([context] * batch, next_n=next_n, heads=heads, head_dim=head_dim,
                            block_size=block_size, super_size=first_bs, device=device,
                            backend="triton", keep_keys=False, seed=context + batch)
    super_caches = {first_bs: inp.cache.super_cache} if super_configs else {}
    for bs, _ in super_configs:
        if bs not in super_caches:
            super_caches[bs] = build_super_cache(inp, bs, backend="triton")
    rows_n = batch * next_n
    hkw = dict(topk=topk, block_size=block_size, block_topk=block_topk)
    variants = {"hisa": {}}
    for bs, ms in super_configs:
        variants[f"hisa3 {bs}x{ms}"] = dict(super_cache=super_caches[bs], super_size=bs,
                                             super_topk=ms)
    names = ["flat", *variants] + (["auto"] if auto else [])
    outs = {name: torch.full((rows_n, topk), -7, dtype=torch.int32, device=device)
            for name in names}                                          # poisoned
    ops = {"flat": lambda: hisa.dsa_index_paged(*inp.args(), topk=topk, out=outs["flat"],
                                                backend="triton")}
    for name, sup in variants.items():
        ops[name] = lambda name=name, sup=sup: hisa.hisa_index_paged(
            *inp.hisa_args(), out=outs[name], backend="triton", **hkw, **sup)
    if auto:
        ops["auto"] = lambda: hisa.hisa_index_paged(*inp.hisa_args(), out=outs["auto"],
                                                    backend="auto", **hkw)
    for fn in ops.values():
        fn()
    quality = {}
    for name, sup in variants.items():
        quality[name] = check_decode(inp, outs["flat"], outs[name], **hkw, **sup)
    if auto:
        check_decode(inp, outs["flat"], outs["auto"], **hkw)
    times, graphed = {}, {}
    for name, fn in ops.items():
        times[name], graphed[name] = _time(fn)
    lens = inp.seq_lens if inp.seq_lens.dim() == 1 else inp.seq_lens[:, -1]
    bkw = dict(rows_per_request=next_n, heads=heads, topk=topk)
    b_flat = paged_decode_bytes(lens, head_dim, **bkw)
    common = dict(mode="decode", context=context, queries=rows_n, batch=batch, next_n=next_n,
                  topk=topk, heads=heads, head_dim=head_dim, dtype="float8_e4m3fn")
    flat_ms, hisa_ms = times["flat"].median_ms, times["hisa"].median_ms
    out = [make_row(env, op="flat", ms=flat_ms, gbps=b_flat / flat_ms / 1e6,
                    cuda_graph=graphed["flat"], **common)]
    for name, sup in variants.items():
        ms = times[name].median_ms
        extra = {}
        if name == "hisa" and auto:
            auto_ms = times["auto"].median_ms
            extra = dict(auto_ms=auto_ms, auto_vs_best=auto_ms / min(flat_ms, hisa_ms))
        if sup:
            extra = dict(levels=3, super_size=sup["super_size"], super_topk=sup["super_topk"],
                         speedup_vs_two_level=hisa_ms / ms)
        b = hisa_decode_bytes(lens, head_dim, block_size=block_size, block_topk=block_topk,
                              super_size=sup.get("super_size"),
                              super_topk=sup.get("super_topk"), **bkw)
        out.append(make_row(env, op=name.split()[0], ms=ms, gbps=b / ms / 1e6,
                            speedup_vs_flat=flat_ms / ms, block_size=block_size,
                            block_topk=block_topk, iou_vs_reference=round(quality[name], 5),
                            cuda_graph=graphed[name], **extra, **common))
    del inp, outs
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out
