"""How the prefill path stores block (and super-block) representatives; no Triton import, so
the torch-only paths (the reference, the distributed fallback) can read the same rule."""
from __future__ import annotations

import torch

from ...utils.validate import FP8_DTYPE

#: How the prefill path stores the block (and super-block) representatives, for every key
#: dtype: fp32 means, scored by tf32 MMAs (FP8 and bf16 queries are exact in tf32; the means
#: keep 10 mantissa bits).
#: A mean re-quantized to e4m3 (one scale per row) moves each value by up to 2**-4 relative,
#: and block means lie close together, so near-tied blocks swap: on the bench's inputs the
#: selection's mean IoU against the exact fp32 means was 0.982 at a 128K prefill and 0.966 for
#: a 1,024-query chunk at 1M keys (H200, ffc2a0c; three levels 16 x 64: 0.929). Emulated on the
#: CPU (benchmarks/pooled_precision_probe.py, 48 sampled queries per shape), bf16 means reach
#: 0.997-0.9995 at B = 128 but only 0.992 at B = 64, m = 32 and with three levels (16 x 64) at
#: 1M; fp32 means in tf32 give 0.9992-1.0 (0.9987 if the MMA truncates to tf32 instead of
#: rounding). The price: 4 bytes per value (4 MiB of reps for 1M keys at B = 128) and tf32
#: instead of FP8 MMAs in the block stage
#: (benchmarks/pooled_format_cost.py times the formats side by side). On a real indexer (the
#: trained Gemma-3 ones, 16K tokens) even FP8 reps kept flat's recall to 4 decimals
#: (benchmarks/pooled_precision_real.py). The paged decode cache keeps its FP8 rows (its page
#: layout); decode's reference reads those same rows.
REP_DTYPE = torch.float32


def rep_dtype(key_dtype: torch.dtype, reps_dtype: torch.dtype | None = None) -> torch.dtype:
    """dtype of the prefill path's representatives for keys of ``key_dtype``: :data:`REP_DTYPE`,
    or ``reps_dtype`` (bf16, or float8_e4m3fn re-quantized with one scale per row, the formats
    benchmarks/pooled_format_cost.py times). The block kernels cast the queries to the reps'
    dtype, so the reps must hold the keys' dtype exactly: FP8 reps for FP8 keys only, bf16 reps
    for FP8 or bf16 keys."""
    dtype = REP_DTYPE if reps_dtype is None else reps_dtype
    if dtype not in (FP8_DTYPE, torch.bfloat16, torch.float32):
        raise ValueError(f"reps_dtype: expected float32, bfloat16 or float8_e4m3fn, got {dtype}")
    if not holds(dtype, key_dtype):
        raise ValueError(f"reps_dtype: {dtype} representatives cannot hold {key_dtype} queries "
                         f"exactly (the block kernels cast the queries to the reps' dtype)")
    return dtype


def holds(reps: torch.dtype, queries: torch.dtype) -> bool:
    """Whether every value of ``queries``' dtype is exact in ``reps``' dtype."""
    if reps == queries or reps == torch.float32:
        return True
    return reps == torch.bfloat16 and queries == FP8_DTYPE


def check_reps_hold_queries(pooled: torch.Tensor, q: torch.Tensor) -> None:
    """TypeError unless the block kernels' cast of ``q`` to ``pooled``'s dtype is exact."""
    if not holds(pooled.dtype, q.dtype):
        raise TypeError(f"pooled: {pooled.dtype} representatives cannot hold {q.dtype} queries "
                        f"exactly (the block kernels cast the queries to the reps' dtype); "
                        f"store them as float32")


#: Dot precisions a caller may ask for when the block (and super-block) reps are fp32:
#: "tf32" (the default: one tf32 MMA, the means rounded to 10 mantissa bits), "tf32x3" (three
#: tf32 MMAs on split operands, about fp32's accuracy at three times the MMA work) and "ieee"
#: (fp32 FMAs). ``benchmarks/pooled_format_cost.py --precision`` measures what each costs and
#: buys.
REP_DOT_PRECISIONS = ("tf32", "tf32x3", "ieee")


def rep_dot_precision(reps: torch.dtype, prec: str, reps_prec: str | None) -> str:
    """The precision of the dots against representatives stored as ``reps``: ``reps_prec`` for
    fp32 reps when given (ValueError if not one of :data:`REP_DOT_PRECISIONS`), else ``prec``
    (the key dots' own; FP8 and bf16 reps are exact in their MMAs)."""
    if reps_prec is None:
        return prec
    if reps_prec not in REP_DOT_PRECISIONS:
        raise ValueError(f"reps_prec: expected one of {REP_DOT_PRECISIONS}, got {reps_prec!r}")
    return reps_prec if reps == torch.float32 else prec
