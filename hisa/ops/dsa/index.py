"""Public flat DSA indexer (the baseline HISA replaces): packed prefill."""
from __future__ import annotations

import torch

from ...utils.backend import resolve_backend, runs_on_device_of, triton_installed
from ...utils.output import check_out_buffer, finish_output
from ...utils.validate import (check_indexer_inputs, check_positive_int, check_windows,
                               raise_bad_windows)
from .naive import naive_dsa_index


def _kernel_check(q: torch.Tensor, k: torch.Tensor) -> None:
    from .prefill import check_kernel_shapes
    check_kernel_shapes(q, k)


def read_flat_windows(ks: torch.Tensor, ke: torch.Tensor, num_keys: int, *,
                      fused: bool | None = None) -> tuple[int, int]:
    """:func:`check_windows` for the flat op (same errors, same order): (min(ks), max(ke)).

    ``fused``: read the facts from one Triton launch (:func:`hisa.ops.window_stats.window_bounds`)
    instead of five torch kernels; the call waits for the read either way, so on a host-bound
    call (a 1,024-query chunk) the launches saved are latency saved. None picks it for CUDA
    windows when Triton is installed; ``dsa_index(backend="torch")`` passes False (that
    backend must not need Triton).
    """
    if fused is None:
        fused = ks.device.type == "cuda" and triton_installed()
    if not fused or ks.numel() == 0:
        return check_windows(ks, ke, num_keys)
    from ..window_stats import window_bounds
    any_bad, lo, hi = window_bounds(ks, ke)
    raise_bad_windows(ks, ke, num_keys, any_bad=any_bad, lo=lo, hi=hi)
    return lo, hi


@runs_on_device_of("q")
def dsa_index(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, ks: torch.Tensor,
              ke: torch.Tensor, *, k_scale: torch.Tensor | None = None, topk: int = 2048,
              return_scores: bool = False, out: torch.Tensor | None = None,
              backend: str = "auto"):
    """Flat DSA lightning-indexer selection for a packed batch of queries.

    Scores every key of each query's window, ``I[t, s] = k_scale[s] * sum_h w[t, h] *
    ReLU(q[t, h] . k[s])``, and keeps the top ``topk``.

    Args:
        q: [T, H, D] float8_e4m3fn (scale folded into ``weights``), bf16 or fp32.
        k: [S, D] float8_e4m3fn (needs ``k_scale``), bf16 or fp32: the packed key buffer.
        weights: fp32 [T, H] per-head gate (signed).
        ks, ke: int32 [T]; query t sees keys [ks[t], ke[t]) of ``k``.
        k_scale: fp32 [S] positive per-token scales, or None.
        topk: keys kept per query.
        return_scores: also return the fp32 scores aligned with the indices (-inf when unused).
        out: optional caller-owned int32 [T, topk] buffer, written in place and returned.
        backend: "auto" (Triton on CUDA, else torch), "triton" or "torch".

    Returns:
        int32 [T, topk] key offsets relative to ks[t], valid entries first, -1 padded; with
        ``return_scores`` a tuple (indices, scores).

    Example:
        >>> T, H, D = 16, 4, 128
        >>> q, k, w = torch.randn(T, H, D), torch.randn(T, D), torch.randn(T, H)
        >>> ks, ke = hisa.windows_from_cu_seqlens(torch.tensor([0, T], dtype=torch.int32))
        >>> idx = hisa.dsa_index(q, k, w, ks, ke, topk=8)
    """
    T, _, _, S = check_indexer_inputs(q, k, weights, ks, ke, k_scale)
    topk = check_positive_int("topk", topk)
    check_out_buffer(out, T, topk, q.device)
    span = read_flat_windows(ks, ke, S, fused=False if backend == "torch" else None)
    if resolve_backend(backend, q.device, lambda: _kernel_check(q, k)) == "torch":
        idx, scores = naive_dsa_index(q, k, weights, ks, ke, k_scale=k_scale, topk=topk)
    else:
        from .prefill import dsa_index_triton
        idx, scores = dsa_index_triton(q, k, weights, ks, ke, k_scale=k_scale, topk=topk,
                                       out=out, need_scores=return_scores, span=span)
    return finish_output(idx, scores, out=out, return_scores=return_scores)
