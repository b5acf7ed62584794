"""Launch every Triton kernel family of hisa once, at its smallest shape, for compute-sanitizer.

``compute-sanitizer --tool racecheck`` instruments every shared-memory access of every kernel
(torch's too), so the GPU test files, with their large shapes and torch references, do not
finish under it (the prefill selection alone ran past 380 s on an H200). This script builds,
per kernel family, the smallest inputs that still take the Triton path (pruning windows, so
HISA runs its pipeline rather than the flat route; super-blocks that really prune; FP8 keys
with ``k_scale`` and bf16 keys where the kernels take both) at the kernels' real head count and
tile sizes (H = 64, D = 128, B = 128, topk = 2048 = m * B), calls the op once with
``backend="triton"`` (so it cannot fall back to the reference), synchronizes, and compares the
result with the torch twin on the same inputs. Inputs are integer-valued
(:func:`hisa.testing.inputs.make_exact_indexer_inputs`, ``make_paged_inputs(exact=True)``), so
kernel and twin scores agree on the GPU too (FP8 and tf32 MMAs included; the one inexact
stage is the FP8 pre-selection's dot against re-quantized block means, whose error can move
a block only at a near-tie with the block ranked m + m/2) and the selections must agree up to
exact ties: a kernel that wrote nothing, or the wrong thing, fails its case.

Each case must launch at least one Triton kernel (counted by :mod:`hisa.testing.launches`),
and a full run fails when a ``@triton.jit`` kernel under hisa/ (a jitted function no other
jitted function calls) is launched by no case: a new kernel needs a case here.

    PYTHONPATH=. python3 tests/gpu/racecheck_kernels.py --device cuda
    PYTHONPATH=. python3 tests/gpu/racecheck_kernels.py --list
    PYTHONPATH=. python3 tests/gpu/racecheck_kernels.py --device cuda --only dsa_index_fp8
    compute-sanitizer --tool racecheck python3 tests/gpu/racecheck_kernels.py --device cuda
    PYTHONPATH=. nice -n 10 python3 tests/gpu/racecheck_kernels.py --device cpu

On the CPU the kernels run under the Triton interpreter with the shims (and the memcheck) of
tests/interpret/conftest.py; bf16 is wrong there, so the bf16 cases are skipped with a note.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch        # before the interpreter shims is fine; triton and hisa must come after

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)

#: DeepSeek-V3.2's indexer: 64 heads of 128; the defaults' block size; topk = m * B, the
#: smallest m the op accepts at topk 2048, so a window of more than 2048 keys prunes.
H, D, B, TOPK = 64, 128, 128, 2048
M = TOPK // B
#: Super-blocks of 4 blocks, 4 kept: ms * Bs = m, the smallest the op accepts.
BS, MS = 4, 4
#: Prefill: one chunk of a few queries at the end of a sequence of 32 blocks (prunes at two
#: and three levels; the FP8 pre-selection case lowers the length from which the default
#: pre-selects so that 32 > m + m/2 blocks run it), and a short one.
PREFILL_LENS, PREFILL_QLENS = [4096, 300], [4, 2]
#: 20 blocks: prunes, but within m + m/2, so FP8 keys take the full fp32-rep scan.
SCAN_LENS = [2560, 300]
#: Decode requests: empty, shorter than a block, 20 and 33 blocks (both prune).
DECODE_LENS = [0, 70, 2500, 4100]
POISON = -7
FP8 = torch.float8_e4m3fn


@dataclass
class Context:
    """The device and the paged inputs shared by the decode cases (built once: every build
    runs the append kernels)."""

    device: str
    paged: dict = field(default_factory=dict)

    @property
    def cpu(self) -> bool:
        return self.device == "cpu"

    def paged_inputs(self, next_n: int, super_size: int | None = None, backend: str = "triton"):
        key = (next_n, super_size, backend)
        if key not in self.paged:
            from hisa.cache.factory import make_paged_inputs
            self.paged[key] = make_paged_inputs(
                DECODE_LENS, next_n=next_n, heads=H, head_dim=D, block_size=B,
                super_size=super_size, q_dtype=FP8, exact=True, seed=next_n,
                device=self.device, backend=backend)
        return self.paged[key]


@dataclass(frozen=True)
class Case:
    """One launch of a kernel family: ``run(ctx)`` raises AssertionError on a mismatch and
    returns the shapes it ran; ``bf16`` cases are skipped on the CPU. ``launches``: kernels
    (ends of their ``module.name``) the case must launch, the proof that it took the path it
    is named for (the HISA pipeline, not the flat route; the super-block level)."""

    name: str
    run: Callable[[Context], str]
    bf16: bool = False
    launches: tuple = ()


def _prefill(ctx, dtype, lens=PREFILL_LENS, qlens=PREFILL_QLENS, seed=0):
    from hisa.testing.inputs import make_exact_indexer_inputs
    inp = make_exact_indexer_inputs(lens, heads=H, head_dim=D, dtype=dtype, query_lens=qlens,
                                    device=ctx.device, seed=seed)
    if inp.k_scale is not None:
        # Unit scales keep every fp32 block mean (a sum of B integers over B) within tf32's
        # 11 significant bits, so the GPU's tf32 dots against the means are exact as well and
        # the kernels' block choice is the twin's; the power-of-two scales would need 13.
        inp.k_scale = torch.ones_like(inp.k_scale)
    return inp


def _poisoned(inp):
    return torch.full((inp.num_queries, TOPK), POISON, dtype=torch.int32, device=inp.q.device)


def _describe(inp, **kw) -> str:
    extra = "".join(f" {k}={v}" for k, v in kw.items())
    return (f"T={inp.num_queries} S={inp.k.shape[0]} H={inp.q.shape[1]} D={inp.q.shape[2]} "
            f"{str(inp.k.dtype).replace('torch.', '')} topk={TOPK}{extra}")


def _check_prefill(got, want, inp, *, exact_count: bool) -> None:
    from hisa.ops.dsa.naive import naive_dsa_logits
    from hisa.testing.compare import assert_same_selection, check_index_format
    check_index_format(got, inp.ks, inp.ke, TOPK, exact_count=exact_count)
    assert_same_selection(got, want, inp.ks, naive_dsa_logits(*inp.args(), k_scale=inp.k_scale))


def _hisa_prefill(ctx, dtype, lens=PREFILL_LENS, **levels) -> str:
    import hisa
    inp = _prefill(ctx, dtype, lens)
    kw = dict(k_scale=inp.k_scale, topk=TOPK, block_size=B, block_topk=M, **levels)
    got = hisa.hisa_index(*inp.args(), out=_poisoned(inp), backend="triton", **kw)
    _sync(ctx)
    want = hisa.hisa_index(*inp.args(), backend="torch", **kw)
    _check_prefill(got, want, inp, exact_count=False)
    return _describe(inp, B=B, m=M, **levels)


def hisa_index_fp8(ctx):
    """Two levels, FP8 keys, windows of at most m + m/2 blocks: the fp32-rep block scan."""
    return _hisa_prefill(ctx, FP8, SCAN_LENS)


def hisa_index_bf16(ctx):
    return _hisa_prefill(ctx, torch.bfloat16)


def hisa_index_fp8_preselect(ctx):
    """Two levels, FP8 keys past m + m/2 blocks: the default FP8 pre-selection of m + m/2
    blocks re-scored on the fp32 means. Its twin is the three-level reference with super-blocks
    of one block given those FP8 copies (the public torch backend scans every block)."""
    import hisa
    from hisa.ops.indexer.naive import naive_pool_blocks
    from hisa.ops.indexer.naive_super import naive_hisa_index_super
    from hisa.ops.indexer import pipeline
    inp = _prefill(ctx, FP8)
    kw = dict(k_scale=inp.k_scale, topk=TOPK, block_size=B, block_topk=M)
    # The default pre-selects past 8 m blocks (16K keys here); a 32-block window stands in.
    least = pipeline.RESCORE_MIN_BLOCKS_PER_M
    pipeline.RESCORE_MIN_BLOCKS_PER_M = 1
    try:
        got = hisa.hisa_index(*inp.args(), out=_poisoned(inp), backend="triton", **kw)
        _sync(ctx)
    finally:
        pipeline.RESCORE_MIN_BLOCKS_PER_M = least
    means = naive_pool_blocks(inp.k, inp.k_scale, B)                 # fp32 [NB, D], exact here
    fp8_means, fp8_scale = hisa.quantize_fp8(means, group_size=D)
    want, _ = naive_hisa_index_super(*inp.args(), super_size=1, super_topk=M + M // 2,
                                     pooled=means, super_pooled=fp8_means,
                                     super_scale=fp8_scale, **kw)
    _check_prefill(got, want, inp, exact_count=False)
    return _describe(inp, B=B, m=M, preselect=M + M // 2)


def hisa_index_3level_fp8(ctx):
    return _hisa_prefill(ctx, FP8, super_size=BS, super_topk=MS)


def _dsa_prefill(ctx, dtype) -> str:
    import hisa
    inp = _prefill(ctx, dtype, [3000, 100], [4, 2])
    kw = dict(k_scale=inp.k_scale, topk=TOPK)
    got, scores = hisa.dsa_index(*inp.args(), out=_poisoned(inp), return_scores=True,
                                 backend="triton", **kw)
    _sync(ctx)
    want, want_scores = hisa.dsa_index(*inp.args(), return_scores=True, backend="torch", **kw)
    _check_prefill(got, want, inp, exact_count=True)
    torch.testing.assert_close(scores.sort(1).values, want_scores.sort(1).values, rtol=0, atol=0)
    return _describe(inp)


def dsa_index_fp8(ctx):
    return _dsa_prefill(ctx, FP8)


def dsa_index_bf16(ctx):
    return _dsa_prefill(ctx, torch.bfloat16)


def prefill_stages(ctx):
    """The stage kernels the public op does not launch: the standalone block scores and block
    selection, and the fused token scores + selection."""
    from hisa.ops.dsa.prefill import prepare_operands
    from hisa.ops.indexer import naive as N
    from hisa.ops.indexer.block_scores import block_scores
    from hisa.ops.indexer.select import select_blocks, select_tokens
    from hisa.ops.indexer.token_scores import token_scores, token_select
    inp = _prefill(ctx, FP8, SCAN_LENS)
    q, k, prec = prepare_operands(inp.q, inp.k)
    pooled = N.naive_pool_blocks(inp.k, inp.k_scale, B)              # fp32 [NB, D]
    scores = block_scores(q, pooled, inp.weights, inp.ks, inp.ke, block_size=B, prec=prec)
    ids = select_blocks(scores, inp.ks, inp.ke, block_size=B, block_topk=M)
    fused = _poisoned(inp)
    token_select(q, k, inp.weights, inp.ks, inp.ke, ids, block_size=B, topk=TOPK,
                 k_scale=inp.k_scale, prec=prec, out=fused)
    _sync(ctx)
    want_scores = N.naive_block_scores(inp.q, pooled, inp.weights, inp.ks, inp.ke, block_size=B)
    finite = torch.isfinite(want_scores)
    assert torch.equal(finite, torch.isfinite(scores)), "block score masks differ"
    assert torch.equal(scores[finite], want_scores[finite]), "block scores differ"
    assert torch.equal(ids, N.naive_select_blocks(want_scores, M)), "block ids differ"
    cand = token_scores(q, k, inp.weights, inp.ks, inp.ke, ids, block_size=B,
                        k_scale=inp.k_scale, prec=prec)
    unfused, _ = select_tokens(cand, ids, inp.ks, block_size=B, topk=TOPK)
    _check_prefill(fused, unfused, inp, exact_count=False)
    return _describe(inp, B=B, m=M)


def window_stats(ctx):
    """The one-launch window facts against the torch ops of plan_windows, two and three
    levels, on a prefill's windows and on more windows than one tile of the program holds."""
    from hisa.ops.indexer.prefill import plan_windows
    from hisa.ops.window_stats import STATS_BLOCK
    inp = _prefill(ctx, FP8)
    g = torch.Generator(device=ctx.device).manual_seed(5)
    S, T = inp.k.shape[0], STATS_BLOCK + 300
    ke = torch.randint(0, S + 1, (T,), generator=g, device=ctx.device)
    ks = (ke - torch.randint(0, S + 1, (T,), generator=g, device=ctx.device)).clamp_min(0)
    for windows in ((inp.ks, inp.ke), (ks.int(), ke.int())):
        for sup in ({}, dict(super_size=BS, super_topk=MS)):
            kw = dict(topk=TOPK, block_size=B, block_topk=M, **sup)
            got = plan_windows(*windows, S, fused=True, **kw)
            want = plan_windows(*windows, S, fused=False, **kw)
            assert got == want, f"{got} != {want}"
    return f"T={inp.num_queries} and T={T} windows over S={S}, 2 and 3 levels"


def paged_cache_append(ctx):
    """Block and super-block pooling of appends (exact keys, so every block mean is exact and
    the Triton cache's key and block bytes equal the torch cache's; super rows within one FP8
    step), and the raw-key quantization."""
    from hisa.cache import PagedIndexerCache
    from hisa.testing.compare import assert_pooled_rows_close
    got = ctx.paged_inputs(1, BS)
    want = ctx.paged_inputs(1, BS, backend="torch")
    _sync(ctx)
    assert torch.equal(got.cache.kv_cache, want.cache.kv_cache), "key pages differ"
    assert torch.equal(got.cache.pooled_cache, want.cache.pooled_cache), "pooled rows differ"
    # A super row averages FP8 block rows with plain fp32 scales: not an exact sum, so the
    # GPU's reduction order can move a value one FP8 step (an H200 run did).
    assert_pooled_rows_close(got.cache.super_cache, want.cache.super_cache, D)
    g = torch.Generator(device=ctx.device).manual_seed(7)
    raw = torch.randn(300, D, generator=g, device=ctx.device) * 3          # quantized in-kernel
    slots = torch.arange(300, device=ctx.device)
    caches = []
    for backend in ("triton", "torch"):
        # B = 64: one page per block, so the raw append needs no block table
        cache = PagedIndexerCache(5, head_dim=D, block_size=64, device=ctx.device)
        cache.append(raw, slots, slots, backend=backend)
        caches.append(cache)
    assert torch.equal(caches[0].kv_cache, caches[1].kv_cache), "raw-key pages differ"
    return f"requests {DECODE_LENS} D={D} B={B} super_size={BS}; 300 raw fp32 keys"


def _decode_logits(inp):
    """Reference logits [rows, longest] of every decode row (-inf past its length)."""
    from hisa.ops.dsa.naive import naive_dsa_logits
    lens = inp.row_lengths()
    n, dev = inp.next_n, inp.q.device
    out = torch.full((lens.numel(), max(int(lens.max()), 1)), float("-inf"), device=dev)
    for b in range(inp.q.shape[0]):
        k, s = inp.keys[b]
        rows = slice(b * n, (b + 1) * n)
        ref = naive_dsa_logits(inp.q[b], k, inp.weights[rows],
                               torch.zeros(n, dtype=torch.int32, device=dev),
                               lens[rows].int(), k_scale=s)
        out[rows, :ref.shape[1]] = ref
    return out


def _check_decode(got, want, inp, *, exact_count: bool) -> None:
    from hisa.testing.compare import assert_same_selection, check_index_format
    lens = inp.row_lengths()
    zero = torch.zeros_like(lens)
    check_index_format(got, zero, lens, TOPK, exact_count=exact_count)
    assert_same_selection(got, want, zero, _decode_logits(inp))


def _describe_paged(inp, **kw) -> str:
    extra = "".join(f" {k}={v}" for k, v in kw.items())
    return (f"lens={DECODE_LENS} next_n={inp.next_n} H={inp.q.shape[2]} D={inp.q.shape[3]} "
            f"q {str(inp.q.dtype).replace('torch.', '')} topk={TOPK}{extra}")


def _dsa_decode(ctx, next_n) -> str:
    import hisa
    inp = ctx.paged_inputs(next_n)
    out = torch.full((inp.weights.shape[0], TOPK), POISON, dtype=torch.int32, device=ctx.device)
    got = hisa.dsa_index_paged(*inp.args(), topk=TOPK, out=out, backend="triton")
    _sync(ctx)
    want = hisa.dsa_index_paged(*inp.args(), topk=TOPK, backend="torch")
    _check_decode(got, want, inp, exact_count=True)
    return _describe_paged(inp)


def _hisa_decode(ctx, next_n, super_size=None) -> str:
    import hisa
    inp = ctx.paged_inputs(next_n, super_size)
    kw = dict(topk=TOPK, block_size=B, block_topk=M)
    if super_size is not None:
        kw.update(inp.super_kwargs(MS))
    out = torch.full((inp.weights.shape[0], TOPK), POISON, dtype=torch.int32, device=ctx.device)
    got = hisa.hisa_index_paged(*inp.hisa_args(), out=out, backend="triton", **kw)
    _sync(ctx)
    want = hisa.hisa_index_paged(*inp.hisa_args(), backend="torch", **kw)
    _check_decode(got, want, inp, exact_count=False)
    return _describe_paged(inp, B=B, m=M, **({} if super_size is None else
                                             dict(super_size=super_size, super_topk=MS)))


def request_gather(ctx):
    """The engines' request gather (one launch) against its torch twin on the decode cache."""
    from hisa.integrations._engine_common import as_engine_pages, gather_request_keys
    inp = ctx.paged_inputs(1)
    pages = as_engine_pages(inp.cache.kv_cache, D)
    kw = dict(total=sum(DECODE_LENS), head_dim=D, block_size=B)
    got = gather_request_keys(pages, inp.block_table, inp.seq_lens, backend="triton", **kw)
    _sync(ctx)
    want = gather_request_keys(pages, inp.block_table, inp.seq_lens, backend="torch", **kw)
    assert torch.equal(got.k.view(torch.uint8), want.k.view(torch.uint8)), "keys differ"
    assert torch.equal(got.k_scale, want.k_scale), "scales differ"
    assert torch.equal(got.starts, want.starts), "starts differ"
    assert not bool(got.bad_pages) and not bool(want.bad_pages), "a page flagged bad"
    return f"requests {DECODE_LENS} D={D} B={B}"


def chunk_windows(ctx):
    """The vLLM chunk's layout and window launches against their torch twins (requests of the
    decode cache's lengths, a few queries each at its request's end)."""
    from hisa.cache.chunk_windows import chunk_layout_triton, chunk_windows_triton
    from hisa.integrations._engine_common import request_layout
    dev = ctx.device
    lens = torch.tensor(DECODE_LENS, device=dev)
    cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(torch.int32)
    ks = torch.cat([cu[r].repeat(3) for r in range(len(DECODE_LENS)) if DECODE_LENS[r] >= 3])
    ke = torch.cat([cu[r] + DECODE_LENS[r] - 2 + torch.arange(3, device=dev)
                    for r in range(len(DECODE_LENS)) if DECODE_LENS[r] >= 3]).to(torch.int32)
    got_lens, got_starts, bad = chunk_layout_triton(cu, B)
    got_ks, got_ke = chunk_windows_triton(cu, ks, ke, got_starts, bad)
    _sync(ctx)
    want = request_layout(lens, total=sum(DECODE_LENS), block_size=B)
    assert torch.equal(got_lens, want.lens) and torch.equal(got_starts, want.starts), "layout"
    req = torch.searchsorted(cu[1:].contiguous(), ks, right=True)
    assert torch.equal(got_ks, want.starts[req]), "window starts differ"
    assert torch.equal(got_ke, want.starts[req] + (ke - ks)), "window ends differ"
    assert int(bad) == 0, "bad-page flag not zeroed"
    return f"requests {DECODE_LENS} B={B}, {ks.numel()} queries"


def slot_transform(ctx):
    """Positions -> KV slots through the page table (rows given: prefill rows read their
    request's table row) and ragged offsets, against the torch ops of transform_output."""
    from hisa.integrations.sglang import transform_output
    import hisa
    inp = ctx.paged_inputs(2)
    positions = hisa.dsa_index_paged(*inp.args(), topk=TOPK, backend="torch")   # [R, K]
    rows = torch.arange(positions.shape[0], device=ctx.device) // inp.next_n
    table = inp.block_table.clamp_min(0)
    offset = torch.arange(0, rows.numel() * 5000, 5000, dtype=torch.int32, device=ctx.device)
    for method, am, row_batch in (
            ("PAGED", SimpleNamespace(real_page_table=table), rows.int()),
            ("RAGGED", SimpleNamespace(topk_indices_offset=offset), None)):
        md = SimpleNamespace(force_unfused_topk=False, attn_metadata=am,
                             topk_transform_method=SimpleNamespace(name=method))
        got = transform_output(positions, md, fused=True, row_batch=row_batch,
                               backend="triton")
        _sync(ctx)
        want = transform_output(positions, md, fused=True, row_batch=row_batch,
                                backend="torch")
        assert torch.equal(got, want), f"{method} slots differ"
    return f"R={positions.shape[0]} K={TOPK}, PAGED and RAGGED"


def _sync(ctx) -> None:
    if not ctx.cpu:
        torch.cuda.synchronize()


#: The HISA prefill pipeline's kernels at two levels (the fp32-rep scan), and through a
#: super-block level (the caller's, or the FP8 pre-selection's super-blocks of one block).
_TWO = ("pool._pool_blocks_kernel", "block_scores._block_scores_kernel",
        "token_scores._token_scores_kernel", "select._select_tokens_kernel")
_SUPER = ("pool._pool_blocks_kernel", "super_blocks._pool_supers_kernel",
          "block_scores._block_scores_kernel", "super_blocks._candidate_blocks_kernel",
          "token_scores._token_scores_kernel", "select._select_tokens_kernel")
_FLAT = ("dsa.prefill._dsa_logits_kernel", "topk._topk_rows_fast_kernel",
         "topk._topk_rows_kernel")
_DECODE_FLAT = ("dsa.decode_kernels._paged_logits_kernel", "decode_kernels._chunk_topk_kernel",
                "decode_kernels._merge_topk_kernel")
_DECODE = ("indexer.decode_kernels._block_scores_kernel", "decode_kernels._block_select_kernel",
           "indexer.decode_kernels._token_scores_kernel", "decode_kernels._token_select_kernel")

CASES = [
    Case("hisa_index_fp8", hisa_index_fp8, launches=_TWO),
    Case("hisa_index_fp8_preselect", hisa_index_fp8_preselect, launches=_SUPER),
    Case("hisa_index_bf16", hisa_index_bf16, bf16=True, launches=_TWO),
    Case("hisa_index_3level_fp8", hisa_index_3level_fp8, launches=_SUPER),
    Case("dsa_index_fp8", dsa_index_fp8, launches=_FLAT),
    Case("dsa_index_bf16", dsa_index_bf16, bf16=True, launches=_FLAT),
    Case("prefill_stages", prefill_stages,
         launches=("block_scores._block_scores_kernel", "select._select_blocks_kernel",
                   "token_scores._token_scores_kernel")),
    Case("window_stats", window_stats, launches=("window_stats._window_stats_kernel",)),
    Case("paged_cache_append", paged_cache_append,
         launches=("append._append_kernel", "append._pool_kernel",
                   "append_super._pool_super_kernel")),
    Case("dsa_index_paged_n1", lambda ctx: _dsa_decode(ctx, 1), launches=_DECODE_FLAT),
    Case("dsa_index_paged_n2", lambda ctx: _dsa_decode(ctx, 2), launches=_DECODE_FLAT),
    Case("hisa_index_paged_n1", lambda ctx: _hisa_decode(ctx, 1), launches=_DECODE),
    Case("hisa_index_paged_n2", lambda ctx: _hisa_decode(ctx, 2), launches=_DECODE),
    Case("hisa_index_paged_3level", lambda ctx: _hisa_decode(ctx, 1, BS),
         launches=("decode_super._candidate_scores_kernel",
                   "decode_super._candidate_select_kernel")),
    Case("request_gather", request_gather, launches=("gather._gather_kernel",)),
    Case("slot_transform", slot_transform, launches=("slots._slots_kernel",)),
    Case("chunk_windows", chunk_windows, launches=("chunk_windows._layout_kernel",
                                                   "chunk_windows._windows_kernel")),
]


def jitted_kernels(package_dir: str | None = None) -> set[str]:
    """``module.name`` of every ``@triton.jit`` kernel under hisa/: the jitted functions that no
    jitted function uses (the rest are helpers, inlined into their callers). A use is a name in
    a jitted function's body that its module binds to a jitted function, called (``name(``) or
    passed (the combine function of a ``tl.reduce``): two modules may define kernels of the
    same name, so names alone would not do."""
    from hisa.testing.launches import _launch_classes, kernel_key
    package_dir = package_dir or os.path.join(ROOT, "hisa")
    classes = tuple(_launch_classes())
    jitted = {}
    for folder, _, files in os.walk(package_dir):
        for name in sorted(files):
            path = os.path.join(folder, name)
            if not name.endswith(".py") or "@triton.jit" not in open(path).read():
                continue
            rel = os.path.relpath(path[:-3], os.path.dirname(package_dir))
            module = importlib.import_module(rel.replace(os.sep, "."))
            for obj in vars(module).values():
                if isinstance(obj, classes) and obj.fn.__module__ == module.__name__:
                    jitted[kernel_key(obj)] = obj
    called = set()
    for obj in jitted.values():
        body = inspect.getsource(obj.fn).split(":\n", 1)[-1]        # past the signature
        for ident in set(re.findall(r"\b(\w+)\b", body)):
            target = obj.fn.__globals__.get(ident)
            if isinstance(target, classes):
                called.add(kernel_key(target))
    return set(jitted) - called


def uncovered(launched: set[str], kernels: set[str] | None = None) -> list[str]:
    """The kernels (:func:`jitted_kernels` by default) that no launch in ``launched`` ran."""
    kernels = jitted_kernels() if kernels is None else kernels
    return sorted(kernels - launched)


@dataclass
class Result:
    name: str
    ok: bool
    seconds: float
    shapes: str = ""
    kernels: set = field(default_factory=set)
    error: str = ""


def run_case(case: Case, ctx: Context) -> Result:
    """Run one case, counting its Triton launches; a case that launched none fails (it fell
    back to torch somewhere)."""
    from hisa.testing.launches import count_launches
    t0 = time.perf_counter()
    try:
        with count_launches() as work:
            shapes = case.run(ctx)
        kernels = {e.kernel for e in work.launches}
        absent = [k for k in case.launches if not any(key.endswith(k) for key in kernels)]
        if not kernels or absent:
            raise AssertionError(f"kernels not launched: {absent or 'any'}; launched "
                                 f"{sorted(kernels)}")
    except Exception:                   # a mismatch, or an error the kernel path raised
        return Result(case.name, False, time.perf_counter() - t0,
                      error=traceback.format_exc())
    return Result(case.name, True, time.perf_counter() - t0, shapes, kernels)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--only", default=None, help="comma-separated case names")
    ap.add_argument("--list", action="store_true", help="print the case names and exit")
    args = ap.parse_args(argv)
    if args.list:
        for case in CASES:
            print(case.name + (" (bf16: GPU only)" if case.bf16 else ""))
        return 0
    picked = CASES
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {c.name for c in CASES})
        if unknown:
            ap.error(f"--only: unknown case(s) {unknown}; --list names them")
        picked = [c for c in CASES if c.name in names]
    if args.device == "cpu":
        _load_interpreter_shims()
    sys.path.insert(0, ROOT)
    import triton
    if args.device == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"triton {triton.__version__}", flush=True)
    ctx = Context(args.device)
    launched, failed, skipped = set(), [], []
    for case in picked:
        if case.bf16 and ctx.cpu:
            print(f"skip       {case.name}: bf16 is wrong under the Triton interpreter", flush=True)
            skipped.append(case.name)
            continue
        r = run_case(case, ctx)
        launched |= r.kernels
        if r.ok:
            print(f"ok   {r.seconds:6.1f}s {r.name}: {r.shapes}", flush=True)
        else:
            print(f"FAIL {r.seconds:6.1f}s {r.name}: {r.error}", flush=True)
            failed.append(r.name)
    kernels = jitted_kernels()
    print(f"kernels launched ({len(launched & kernels)} of the {len(kernels)} under hisa/):")
    for key in sorted(launched):
        print(f"  {key}")
    missing = uncovered(launched, kernels)
    if picked is not CASES:
        print("coverage not checked (--only)")
    elif missing:
        # The bf16 cases, skipped on the CPU, launch no kernel the FP8 ones do not (bf16 is a
        # dtype of the same kernels): the check holds on the CPU too.
        print(f"FAIL coverage: no case launches {missing}: add a case for each", flush=True)
        failed.append("coverage")
    if failed:
        print(f"failed: {failed}")
        return 1
    print(f"all {len(picked) - len(skipped)} cases passed" +
          (f" ({len(skipped)} bf16 skipped)" if skipped else ""))
    return 0


def _load_interpreter_shims() -> None:
    """Import tests/interpret/conftest.py (it sets TRITON_INTERPRET=1 before importing triton
    and installs the interpreter shims and memcheck), as tests/gpu/replay_fuzz.py does."""
    spec = importlib.util.spec_from_file_location("_interpret_conftest",
                                                  os.path.join(TESTS, "interpret", "conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


if __name__ == "__main__":
    sys.exit(main())
