"""Compile the decode selections and the flat top-k kernels for the H200 (sm_90) on any
machine, GPU or not.

Triton compiles to PTX and SASS in-process (it ships ``ptxas``), so a kernel's code can be
inspected before a GPU is lent: ``benchmarks/sass_count.py`` counts its instructions and
registers and ``tests/test_pdl.py`` checks its grid-dependency instructions. Import this module only in a
process without ``TRITON_INTERPRET=1``: under the interpreter ``triton.jit`` yields functions
that cannot be compiled.
"""
from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..ops.dsa import prefill as flat
from ..ops.indexer import decode_kernels as dk
from ..ops.indexer import select as sel
from ..ops.indexer import token_scores as tok
from ..ops.indexer import topk

#: The flat top-k's tile arguments (both kernels).
_TOPK_SIG = {"x_ptr": "*fp32", "stride_x": "i32", "ks_ptr": "*i32", "ke_ptr": "*i32",
             "t0": "i32", "lo": "i32", "n_rows": "i32", "out_idx_ptr": "*i32",
             "out_val_ptr": "*i32", "stride_out": "i32", "scr_key_ptr": "*u32",
             "scr_col_ptr": "*i32"}

#: (kernel, runtime signature, constexprs): the decode selections at the bench's decode shape
#: (B = 128, m = 64, k = 2048, 128K keys); the flat top-k's two kernels at k = 2048, the
#: prefill token scores (unfused) and the flat logits at H = 64, D = 128, FP8, each with its
#: module's settings.
SELECT_KERNELS = {
    "token_select": (dk._token_select_kernel,
                     {"cand_ptr": "*fp32", "ids_ptr": "*i32", "seq_lens_ptr": "*i32",
                      "out_idx_ptr": "*i32", "out_val_ptr": "*fp32", "max_pages": "i32",
                      "hisa_min_keys": "i32"},
                     {"NEXT_N": 1, "SEQ_2D": False, "B": 128, "M": 64, "MB_PAD": 8192,
                      "K": 2048, "K_PAD": 2048, "PAGE": 64, "WRITE_VALS": False,
                      "RADIX": dk.SELECT_RADIX, "BLOCK_SLOTS": dk.SELECT_BLOCK_SLOTS}),
    "prefill_select": (sel._select_tokens_kernel,
                       {"scores_ptr": "*fp32", "ids_ptr": "*i32", "ks_ptr": "*i32",
                        "out_idx_ptr": "*i32", "out_val_ptr": "*fp32"},
                       {"B": 128, "M": 64, "MB_PAD": 8192, "K": 2048, "K_PAD": 2048,
                        "WRITE_VALS": False, "RADIX": sel.SELECT_TOKENS_RADIX,
                        "BLOCK_SLOTS": sel.SELECT_TOKENS_BLOCK_SLOTS}),
    "block_select": (dk._block_select_kernel,
                     {"scratch_ptr": "*fp32", "seq_lens_ptr": "*i32", "ids_ptr": "*i32",
                      "max_pages": "i32", "hisa_min_keys": "i32"},
                     {"NEXT_N": 1, "B": 128, "SEQ_2D": False, "M": 64, "M_PAD": 64,
                      "NB_PAD": 1024, "PAGE": 64, "RADIX": dk.SELECT_RADIX, "TIER1": 0,
                      "TIER2": 0}),
    "topk_fast": (topk._topk_rows_fast_kernel,
                  dict(_TOPK_SIG, left_ptr="*i32", n_left_ptr="*i32"),
                  {"K": 2048, "K_PAD": 2048, "CHUNK": topk.TOPK_FAST_CHUNK,
                   "CAP": topk.TOPK_FAST_CAP, "SCR": topk.TOPK_SCRATCH,
                   "NS": topk.TOPK_SAMPLE, "WRITE_VALS": False,
                   "PREFETCH": topk.TOPK_FAST_PREFETCH}),
    "topk_general": (topk._topk_rows_kernel,
                     dict(_TOPK_SIG, rows_ptr="*i32", n_listed_ptr="*i32"),
                     {"K": 2048, "K_PAD": 2048, "CHUNK": topk.TOPK_CHUNK,
                      "HBITS": topk.TOPK_HIST_BITS, "CAP": topk.TOPK_SCRATCH,
                      "NS": topk.TOPK_SAMPLE, "WRITE_VALS": False, "LISTED": True}),
    "token_scores": (tok._token_scores_kernel,
                     {"q_ptr": "*fp8e4nv", "k_ptr": "*fp8e4nv", "k_scale_ptr": "*fp32",
                      "w_ptr": "*fp32", "ks_ptr": "*i32", "ke_ptr": "*i32", "ids_ptr": "*i32",
                      "scores_ptr": "*fp32", "out_idx_ptr": "*i32", "out_val_ptr": "*fp32",
                      "T": "i32", "S": "i32"},
                     {"H": 64, "D": 128, "B": 128, "M": 64, "MB_PAD": 8192, "K": 2048,
                      "K_PAD": 2048, "HAS_SCALE": True, "SELECT": False, "WRITE_VALS": False,
                      "PREC": "tf32", "STAGES": tok.TOKEN_STAGES, "M_PAD": 64,
                      "LIVE_TRIP": tok.TOKEN_TRIP == "live",
                      "RADIX": sel.SELECT_TOKENS_RADIX,
                      "BLOCK_SLOTS": sel.SELECT_TOKENS_BLOCK_SLOTS}),
    "flat_logits": (flat._dsa_logits_kernel,
                    {"q_ptr": "*fp8e4nv", "k_ptr": "*fp8e4nv", "k_scale_ptr": "*fp32",
                     "w_ptr": "*fp32", "ks_ptr": "*i32", "ke_ptr": "*i32", "out_ptr": "*fp32",
                     "t0": "i32", "n_rows": "i32", "lo": "i32", "W": "i32", "S": "i32"},
                    {"H": 64, "D": 128, "BQ": flat.FLAT_BQ, "BS": flat.FLAT_BS,
                     "QPD": flat.FLAT_QPD, "HAS_SCALE": True, "PREC": "tf32",
                     "STAGES": flat.FLAT_STAGES}),
}


def aligned_pointer_attrs(fn, signature: dict) -> dict:
    """``tt.divisibility = 16`` on every pointer argument, as Triton's launcher specializes a
    16-byte-aligned pointer at run time (torch allocations are). Without it the compile
    assumes unaligned pointers: narrower loads, and no asynchronous copies of fp8 tiles, so
    registers and instruction counts differ from what the GPU runs."""
    return {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
            if str(signature.get(arg, "")).startswith("*")}


def compile_sm90(name: str, warps: int, *, pdl: bool = False, maxnreg: int | None = None,
                 **constexprs):
    """The compiled kernel ``name`` of :data:`SELECT_KERNELS` (``.asm["ptx"]``,
    ``.asm["cubin"]``), with ``constexprs`` overriding its shape, ``pdl`` its launch (the
    decode kernels) and ``maxnreg`` its register cap; its pointers taken as 16-byte aligned,
    as at run time."""
    fn, sig, const = SELECT_KERNELS[name]
    const = dict(const, **constexprs)
    if "PDL" in fn.arg_names:
        const["PDL"] = pdl
    attrs = aligned_pointer_attrs(fn, sig)
    sig = dict(sig, **{k: "constexpr" for k in const})
    options = {"num_warps": warps, "launch_pdl": pdl}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


__all__ = ["SELECT_KERNELS", "aligned_pointer_attrs", "compile_sm90"]
