"""The contract's output format: int32 [T, K] offsets, -1 padded, optional aligned scores."""
from __future__ import annotations

import torch

from .validate import check_out


def finish_output(idx: torch.Tensor, scores: torch.Tensor | None, *, out: torch.Tensor | None,
                  return_scores: bool):
    """Copy into the caller's buffer when given; return indices (and scores when asked)."""
    if out is not None:
        if out.data_ptr() != idx.data_ptr():
            out.copy_(idx)
        idx = out
    if return_scores:
        return idx, scores
    return idx


def check_out_buffer(out: torch.Tensor | None, rows: int, topk: int, device) -> None:
    if out is not None:
        check_out("out", out, (rows, topk), torch.int32, device)
