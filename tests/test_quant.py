import math

import pytest
import torch

from hisa import dequantize_fp8, quantize_fp8
from hisa.utils.quant import FP8_MAX, fp8_scale_from_amax

# e4m3 keeps 3 mantissa bits: relative rounding error at most 2^-4 for normal values.
E4M3_REL_ERR = 2.0 ** -4


def test_scale_follows_deepseek_rule():
    x = torch.randn(5, 256) * 3
    v, s = quantize_fp8(x, group_size=128)
    assert v.dtype == torch.float8_e4m3fn and s.shape == (5, 2)
    amax = x.view(5, 2, 128).abs().amax(-1)
    torch.testing.assert_close(s, amax / FP8_MAX)
    # The group maximum maps to +-448 exactly.
    assert torch.allclose(v.float().view(5, 2, 128).abs().amax(-1), torch.full((5, 2), FP8_MAX))


def test_roundtrip_error_bounded():
    x = torch.randn(64, 128)
    v, s = quantize_fp8(x)
    assert s.shape == (64,)  # one group per row squeezes to a per-token scale
    err = (dequantize_fp8(v, s) - x).abs()
    bound = E4M3_REL_ERR * x.abs() + s.unsqueeze(1) * 2.0 ** -9  # subnormal step of e4m3
    assert bool((err <= bound + 1e-7).all())


def test_ue8m0_scales_are_powers_of_two_and_cover_amax():
    x = torch.randn(32, 128) * 7
    _, s = quantize_fp8(x, ue8m0=True)
    log = torch.log2(s)
    assert torch.equal(log, torch.round(log))
    assert bool((x.abs().amax(1) <= s * FP8_MAX * (1 + 1e-6)).all())


def test_zero_group_uses_floor():
    v, s = quantize_fp8(torch.zeros(2, 128))
    assert torch.all(s == fp8_scale_from_amax(torch.zeros(1)))
    assert torch.all(v.float() == 0)


def test_errors_name_argument():
    with pytest.raises(ValueError, match="x: .*multiple of group_size=128.*pass group_size"):
        quantize_fp8(torch.randn(3, 200))
    with pytest.raises(TypeError, match="x: expected dtype"):
        quantize_fp8(torch.zeros(3, 128, dtype=torch.int32))
    with pytest.raises(TypeError, match="values"):
        dequantize_fp8(torch.zeros(3, 128), torch.ones(3))
