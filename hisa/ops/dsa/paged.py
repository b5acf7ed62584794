"""Flat DSA indexer over the paged FP8 key cache (decode), and the checks shared with HISA's.

Request ``b`` has ``seq_lens[b]`` keys in its pages ``block_table[b, :]`` (positions in order,
64 per page). Its ``next_n`` query rows are rows ``b * next_n + i`` of ``weights`` and of the
output; row ``i`` sees positions ``[0, seq_lens[b] - next_n + i + 1)`` (speculative decoding:
the last ``next_n`` cached keys are the rows' own tokens). With 2-D ``seq_lens`` [batch, next_n]
each row's length is given directly. A negative row length counts as 0 (an empty row, all -1),
so padded requests may carry ``seq_lens = 0``.
"""
from __future__ import annotations

import torch

from ...cache.layout import PAGE_SIZE, as_pages, cache_head_dim, gather_request_keys
from ...utils.backend import resolve_backend, runs_on_device_of
from ...utils.output import check_out_buffer, finish_output
from ...utils.validate import (FLOAT_DTYPES, check_positive_int, check_same_device, check_shape,
                               check_tensor)
from .naive import naive_dsa_index

#: next_n values (query rows per request) the paged ops accept, as DeepGEMM's SM90 kernel.
NEXT_N_SUPPORTED = (1, 2)


def check_paged_inputs(q, kv_cache, weights, seq_lens, block_table
                       ) -> tuple[int, int, int, int, torch.Tensor]:
    """Shapes, dtypes and devices of a paged decode call.

    Returns:
        (batch, next_n, H, D, pages) with ``pages`` the uint8 [P, 64 * (D + 4)] cache view.
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4)
    batch, next_n, H, D = q.shape
    if next_n not in NEXT_N_SUPPORTED:
        raise ValueError(f"q: expected next_n (dim 1) in {NEXT_N_SUPPORTED}, got {next_n}")
    if H < 1:
        raise ValueError(f"q: expected at least one head, got shape {list(q.shape)} "
                         f"[batch, next_n, H, D]")
    cache_d = cache_head_dim(kv_cache)
    if D != cache_d:
        raise ValueError(f"q: expected head_dim {cache_d} (that of kv_cache, shape "
                         f"{list(kv_cache.shape)}), got shape {list(q.shape)}")
    pages = as_pages(kv_cache, D)
    check_tensor("weights", weights, dtypes=(torch.float32,), ndim=2)
    check_shape("weights", weights, (batch * next_n, H))
    check_tensor("seq_lens", seq_lens, dtypes=(torch.int32,))
    if seq_lens.dim() == 1:
        check_shape("seq_lens", seq_lens, (batch,))
    else:
        check_shape("seq_lens", seq_lens, (batch, next_n))
    check_tensor("block_table", block_table, dtypes=(torch.int32,), ndim=2)
    check_shape("block_table", block_table, (batch, None))
    check_same_device(q=q, kv_cache=kv_cache, weights=weights, seq_lens=seq_lens,
                      block_table=block_table)
    return batch, next_n, H, D, pages


def paged_row_lengths(seq_lens: torch.Tensor, next_n: int) -> torch.Tensor:
    """Visible keys of each query row, int64 [batch, next_n] (negative lengths clamp to 0)."""
    if seq_lens.dim() == 2:
        return seq_lens.long().clamp_min(0)
    i = torch.arange(next_n, device=seq_lens.device)
    return (seq_lens.long().unsqueeze(1) - next_n + 1 + i).clamp_min(0)


def check_paged_values(seq_lens: torch.Tensor, block_table: torch.Tensor, num_pages: int
                       ) -> None:
    """Lengths fit the block table and every page a request uses exists (host sync)."""
    if seq_lens.numel() == 0:
        return
    if int(seq_lens.min()) < 0:
        raise ValueError(f"seq_lens: expected values >= 0, got min {int(seq_lens.min())}")
    cap = block_table.shape[1] * PAGE_SIZE
    lens = seq_lens.long().reshape(seq_lens.shape[0], -1).amax(1)
    if int(lens.max()) > cap:
        raise ValueError(f"seq_lens: expected values <= block_table pages * {PAGE_SIZE} = {cap}, "
                         f"got {int(lens.max())}")
    used = torch.arange(block_table.shape[1], device=lens.device) < \
        ((lens + PAGE_SIZE - 1) // PAGE_SIZE).unsqueeze(1)
    bad = used & ((block_table < 0) | (block_table >= num_pages))
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"block_table: expected page ids in [0, {num_pages}) for the pages a "
                         f"request uses, got block_table[{b}, {j}] = {int(block_table[b, j])}")


def per_request_reference(q: torch.Tensor, seq_lens: torch.Tensor, topk: int, select
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a packed reference request by request and stack the rows (the paged references).

    ``select(b, length, row_lens)`` returns (positions int32 [next_n, topk], scores) for
    request ``b`` whose rows see ``row_lens`` keys (``length`` = the longest); requests with no
    visible key keep -1 / -inf.
    """
    batch, next_n = q.shape[:2]
    lens = paged_row_lengths(seq_lens, next_n)
    idx = torch.full((batch * next_n, topk), -1, dtype=torch.int32, device=q.device)
    vals = torch.full((batch * next_n, topk), float("-inf"), device=q.device)
    for b in range(batch):
        length = int(lens[b].max())
        if length == 0:
            continue
        rows = slice(b * next_n, (b + 1) * next_n)
        idx[rows], vals[rows] = select(b, length, lens[b].to(torch.int32))
    return idx, vals


def naive_dsa_index_paged(q: torch.Tensor, pages: torch.Tensor, weights: torch.Tensor,
                          seq_lens: torch.Tensor, block_table: torch.Tensor, *, topk: int = 2048
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: gather each request's keys from its pages and run :func:`naive_dsa_index`.

    Returns:
        (positions int32 [batch * next_n, topk], -1 padded; scores fp32, -inf padded).
    """
    next_n, D = q.shape[1], q.shape[3]
    zeros = torch.zeros(next_n, dtype=torch.int32, device=q.device)

    def select(b, length, row_lens):
        k, k_scale = gather_request_keys(pages, block_table[b], length, D)
        return naive_dsa_index(q[b], k, weights[b * next_n:(b + 1) * next_n], zeros, row_lens,
                               k_scale=k_scale, topk=topk)

    return per_request_reference(q, seq_lens, topk, select)


def _kernel_check(q: torch.Tensor, pages: torch.Tensor) -> None:
    from .decode_kernels import decode_operands
    decode_operands(q, pages)


@runs_on_device_of("q")
def dsa_index_paged(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                    seq_lens: torch.Tensor, block_table: torch.Tensor, *, topk: int = 2048,
                    return_scores: bool = False, out: torch.Tensor | None = None,
                    backend: str = "auto"):
    """Flat DSA selection for decode over the paged FP8 key cache.

    Args:
        q: [batch, next_n, H, D] float8_e4m3fn (scale folded into ``weights``), bf16 or fp32;
            next_n in {1, 2}.
        kv_cache: uint8 [num_pages, 64 * (D + 4)] (or [num_pages, 64, 1, D + 4]): pages of 64
            tokens, FP8 values then fp32 scales (see :mod:`hisa.cache.layout`).
        weights: fp32 [batch * next_n, H].
        seq_lens: int32 [batch] (row i of next_n sees ``seq_len - next_n + i + 1`` keys) or
            [batch, next_n] (each row's length).
        block_table: int32 [batch, max_pages], physical page of each 64-token page of a request.
        topk: keys kept per query row.
        return_scores: also return fp32 scores aligned with the indices (-inf when unused).
        out: optional int32 [batch * next_n, topk] buffer, written in place and returned.
        backend: "auto" (Triton on CUDA, else torch), "triton" or "torch". The torch path checks
            lengths and page ids (ValueError, with a host sync); the Triton path never syncs and
            clamps lengths to the block table and skips out-of-range page ids instead of
            reading out of bounds.

    Returns:
        int32 [batch * next_n, topk] request-relative positions, valid entries first, -1 padded
        (a tuple with the scores when ``return_scores``).

    Example:
        >>> idx = hisa.dsa_index_paged(q, cache.kv_cache, w, seq_lens, block_table, topk=2048)
    """
    batch, next_n, _, _, pages = check_paged_inputs(q, kv_cache, weights, seq_lens, block_table)
    topk = check_positive_int("topk", topk)
    check_out_buffer(out, batch * next_n, topk, q.device)
    if resolve_backend(backend, q.device, lambda: _kernel_check(q, pages)) == "torch":
        check_paged_values(seq_lens, block_table, pages.shape[0])
        idx, scores = naive_dsa_index_paged(q, pages, weights, seq_lens, block_table, topk=topk)
    else:
        from .decode_kernels import dsa_decode
        idx, scores = dsa_decode(q, pages, weights, seq_lens, block_table, topk=topk, out=out,
                                 need_scores=return_scores)
    return finish_output(idx, scores, out=out, return_scores=return_scores)
