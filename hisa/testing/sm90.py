"""Compile the decode selection kernels for the H200 (sm_90) on any machine, GPU or not.

Triton compiles to PTX and SASS in-process (it ships ``ptxas``), so a kernel's code can be
inspected before a GPU is lent: ``benchmarks/sass_count.py`` counts its instructions and
``tests/test_pdl.py`` checks its grid-dependency instructions. Import this module only in a
process without ``TRITON_INTERPRET=1``: under the interpreter ``triton.jit`` yields functions
that cannot be compiled.
"""
from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..ops.indexer import decode_kernels as dk

#: (kernel, runtime signature, constexprs at the bench's decode shape: B = 128, m = 64,
#: k = 2048, 128K keys).
SELECT_KERNELS = {
    "token_select": (dk._token_select_kernel,
                     {"cand_ptr": "*fp32", "ids_ptr": "*i32", "seq_lens_ptr": "*i32",
                      "out_idx_ptr": "*i32", "out_val_ptr": "*fp32", "max_pages": "i32",
                      "hisa_min_keys": "i32"},
                     {"NEXT_N": 1, "SEQ_2D": False, "B": 128, "M": 64, "MB_PAD": 8192,
                      "K": 2048, "K_PAD": 2048, "PAGE": 64, "WRITE_VALS": False, "RADIX": 1}),
    "block_select": (dk._block_select_kernel,
                     {"scratch_ptr": "*fp32", "seq_lens_ptr": "*i32", "ids_ptr": "*i32",
                      "max_pages": "i32", "hisa_min_keys": "i32"},
                     {"NEXT_N": 1, "B": 128, "SEQ_2D": False, "M": 64, "M_PAD": 64,
                      "NB_PAD": 1024, "PAGE": 64, "RADIX": 1}),
}


def aligned_pointer_attrs(fn, signature: dict) -> dict:
    """``tt.divisibility = 16`` on every pointer argument, as Triton's launcher specializes a
    16-byte-aligned pointer at run time (torch allocations are). Without it the compile
    assumes unaligned pointers: narrower loads, and no asynchronous copies of fp8 tiles, so
    registers and instruction counts differ from what the GPU runs."""
    return {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
            if str(signature.get(arg, "")).startswith("*")}


def compile_sm90(name: str, warps: int, *, pdl: bool = False, **constexprs):
    """The compiled kernel ``name`` of :data:`SELECT_KERNELS` (``.asm["ptx"]``,
    ``.asm["cubin"]``), with ``constexprs`` overriding its shape and ``pdl`` its launch; its
    pointers taken as 16-byte aligned, as at run time."""
    fn, sig, const = SELECT_KERNELS[name]
    const = dict(const, PDL=pdl, **constexprs)
    attrs = aligned_pointer_attrs(fn, sig)
    sig = dict(sig, **{k: "constexpr" for k in const})
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "launch_pdl": pdl})


__all__ = ["SELECT_KERNELS", "aligned_pointer_attrs", "compile_sm90"]
