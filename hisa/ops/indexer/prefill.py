"""Public HISA indexer for packed prefill: block-then-token selection."""
from __future__ import annotations

import torch

from ...utils.backend import resolve_backend
from ...utils.output import check_out_buffer, finish_output
from ...utils.validate import check_hisa_params, check_indexer_inputs, check_windows
from ..dsa.naive import naive_dsa_index
from .naive import eligible_blocks, naive_hisa_index


def keep_short_windows(idx: torch.Tensor, scores: torch.Tensor | None, q: torch.Tensor,
                       k: torch.Tensor, weights: torch.Tensor, ks: torch.Tensor,
                       ke: torch.Tensor, *, k_scale: torch.Tensor | None, topk: int,
                       block_size: int, block_topk: int) -> None:
    """Rows whose window holds <= topk keys return all of them (contract section 2).

    With m * B >= k a window of at most k keys spans at most m + 1 blocks; when it spans
    exactly m + 1 (unaligned, and m * B close to k) the block stage would drop one block.
    Those rare rows are recomputed by the flat path, which keeps every key.
    """
    first, end = eligible_blocks(ks, ke, block_size)
    rows = (((ke - ks) <= topk) & ((end - first) > block_topk)).nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    sub_idx, sub_scores = naive_dsa_index(q[rows], k, weights[rows], ks[rows], ke[rows],
                                          k_scale=k_scale, topk=topk)
    idx[rows] = sub_idx
    if scores is not None:
        scores[rows] = sub_scores


def _kernel_check(q: torch.Tensor, k: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor,
                  block_size: int, block_topk: int) -> None:
    """Every limit of the Triton pipeline (``backend="auto"`` falls back to the reference when
    one is exceeded); it reads the windows (a host sync, as :func:`check_windows` does)."""
    from ..dsa.prefill import check_kernel_shapes
    from .block_scores import check_window_blocks, window_blocks
    from .pool import check_block_size
    from .select import SELECT_MAX_ROW
    check_kernel_shapes(q, k)
    check_block_size(block_size)
    if block_size * block_topk > SELECT_MAX_ROW:
        raise ValueError(f"block_topk * block_size: expected at most {SELECT_MAX_ROW} candidates "
                         f"for the Triton token selection, got {block_size * block_topk}")
    check_window_blocks(window_blocks(ks, ke, block_size)[1], block_size)


def hisa_index(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, ks: torch.Tensor,
               ke: torch.Tensor, *, k_scale: torch.Tensor | None = None, topk: int = 2048,
               block_size: int = 128, block_topk: int = 64, return_scores: bool = False,
               out: torch.Tensor | None = None, backend: str = "auto"):
    """HISA selection: score mean-pooled key blocks, keep the best ``block_topk`` (the first
    and last eligible block always among them), then keep the top ``topk`` tokens of those
    blocks by the exact DSA score.

    Same inputs and output format as :func:`hisa.dsa_index`; when a query has at most
    ``block_topk`` eligible blocks the selection equals the flat indexer's.

    Args:
        q, k, weights, ks, ke, k_scale, topk, return_scores, out, backend: as in
            :func:`hisa.dsa_index`.
        block_size: B, tokens per block (blocks tile the key buffer from position 0).
        block_topk: m, blocks kept per query; ``block_topk * block_size >= topk`` is required.

    Returns:
        int32 [T, topk] offsets relative to ks[t], -1 padded (and fp32 scores when asked).

    Example:
        >>> idx = hisa.hisa_index(q, k, w, ks, ke, topk=2048, block_size=128, block_topk=64)
    """
    T, _, _, S = check_indexer_inputs(q, k, weights, ks, ke, k_scale)
    topk, block_size, block_topk = check_hisa_params(topk=topk, block_size=block_size,
                                                     block_topk=block_topk)
    check_out_buffer(out, T, topk, q.device)
    check_windows(ks, ke, S)
    if resolve_backend(backend, q.device,
                       lambda: _kernel_check(q, k, ks, ke, block_size, block_topk)) == "torch":
        idx, scores = naive_hisa_index(q, k, weights, ks, ke, k_scale=k_scale, topk=topk,
                                       block_size=block_size, block_topk=block_topk)
    else:
        from .pipeline import hisa_index_triton
        idx, scores = hisa_index_triton(q, k, weights, ks, ke, k_scale=k_scale, topk=topk,
                                        block_size=block_size, block_topk=block_topk, out=out,
                                        need_scores=return_scores)
    keep_short_windows(idx, scores, q, k, weights, ks, ke, k_scale=k_scale, topk=topk,
                       block_size=block_size, block_topk=block_topk)
    return finish_output(idx, scores, out=out, return_scores=return_scores)
