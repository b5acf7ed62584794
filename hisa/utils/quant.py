"""FP8 e4m3 activation quantization the way DeepSeek-V3.2 does it.

Groups of ``group_size`` consecutive values along the last axis share one fp32 scale:
``scale = max(amax, 1e-4) / 448`` (optionally rounded up to a power of two, "ue8m0"), values
``clamp(x / scale, -448, 448)`` cast to float8_e4m3fn. For indexer keys [S, 128] one group is one
token, so the scale is the per-token ``k_scale`` [S].
"""
from __future__ import annotations

import torch

from .validate import FP8_DTYPE, check_positive_int, check_tensor

FP8_MAX = 448.0
AMAX_FLOOR = 1e-4  # keeps an all-zero group from dividing by zero


def fp8_scale_from_amax(amax: torch.Tensor, *, ue8m0: bool = False) -> torch.Tensor:
    """Scale for groups whose absolute maximum is ``amax`` (fp32)."""
    scale = amax.float().clamp_min(AMAX_FLOOR) / FP8_MAX
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def quantize_fp8(x: torch.Tensor, *, group_size: int | None = None, ue8m0: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` [..., N] to e4m3 with one scale per group of ``group_size`` values.

    ``group_size`` defaults to min(128, N): DeepSeek's 128-value groups, or one group per row
    for a narrower last axis (keys of head_dim 64). A NaN in a group gives that group a NaN
    scale and NaN values (the e4m3 NaN, 0x7F); an infinity gives an infinite scale, NaN for
    the infinite entries and 0 for the others.

    Returns:
        (values float8_e4m3fn [..., N], scales float32 [..., N // group_size]); when
        ``group_size == N`` the trailing group axis is squeezed, so keys [S, D] give scales [S].

    Example:
        >>> k_fp8, k_scale = quantize_fp8(torch.randn(4, 128))
    """
    check_tensor("x", x, dtypes=(torch.float32, torch.bfloat16, torch.float16))
    n = x.shape[-1]
    group_size = min(128, n) if group_size is None else check_positive_int("group_size",
                                                                           group_size)
    if n == 0 or n % group_size:
        raise ValueError(f"x: expected the last dimension to be a positive multiple of "
                         f"group_size={group_size}, got {n} (pass group_size=N for one group "
                         f"per row, or a divisor of N)")
    groups = x.float().reshape(*x.shape[:-1], n // group_size, group_size)
    scale = fp8_scale_from_amax(groups.abs().amax(dim=-1), ue8m0=ue8m0)
    values = (groups / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX)
    values = values.masked_fill(values.isnan(), float("nan")).to(FP8_DTYPE)  # one NaN byte
    values = values.reshape(x.shape)
    if group_size == n:
        scale = scale.squeeze(-1)
    return values, scale


def dequantize_fp8(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8` (fp32 result); ``scale`` is [...] or [..., G]."""
    check_tensor("values", values, dtypes=(FP8_DTYPE,))
    check_tensor("scale", scale, dtypes=(torch.float32,))
    n = values.shape[-1]
    if scale.dim() == values.dim() - 1:
        scale = scale.unsqueeze(-1)
    groups = scale.shape[-1]
    if n % groups:
        raise ValueError(f"scale: expected a group count dividing {n}, got {groups}")
    v = values.float().reshape(*values.shape[:-1], groups, n // groups)
    return (v * scale.unsqueeze(-1)).reshape(values.shape)


def to_float(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 view of an indexer operand: dequantized when a per-row scale is given."""
    x = x.float()
    if scale is not None:
        x = x * scale.float().unsqueeze(-1)
    return x
