"""The interpreter shims of this folder's conftest do what they claim: out-of-bounds loads and
stores fail, e4m3 NaN survives conversions and ``tl.dot``, saturation matches the hardware,
bf16 dots multiply values (not their bits)."""
import pytest
import torch
import triton
import triton.language as tl


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, OFFSET: tl.constexpr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y_ptr + i, tl.load(x_ptr + i + OFFSET, mask=i < n), mask=i < n)


@triton.jit
def _convert_kernel(x_ptr, x8_ptr, y_ptr, z_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(x8_ptr + i, tl.load(x_ptr + i).to(tl.float8e4nv))
    tl.store(y_ptr + i, tl.load(x8_ptr + i).to(tl.float32))
    a = tl.load(x8_ptr + i[:, None] * 0 + i[None, :])                 # [N, N], rows equal
    ones = tl.full([N, N], 1.0, tl.float32).to(tl.float8e4nv)
    tl.store(z_ptr + i, tl.sum(tl.dot(a, ones), axis=1))


@triton.jit
def _bf16_dot_kernel(a_ptr, b8_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    a = tl.load(a_ptr + i[:, None] * N + i[None, :])                  # bf16 [N, N]
    b = tl.load(b8_ptr + i[:, None] * N + i[None, :]).to(tl.bfloat16)  # fp8 -> bf16, exact
    tl.store(out_ptr + i[:, None] * N + i[None, :], tl.dot(a, b))


def test_bf16_dot_multiplies_values():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=g).bfloat16()
    b8 = torch.randn(16, 16, generator=g).to(torch.float8_e4m3fn)
    out = torch.empty(16, 16)
    _bf16_dot_kernel[(1,)](a, b8, out, N=16)
    want = a.float() @ b8.float()                           # exact products, fp32 sums
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


def test_e4m3_rounding_carries_into_the_exponent():
    # 125 rounds up to 128 (the next binade); the interpreter's own converter gave 64.
    x = torch.tensor([125.0, -125.0, 124.0, 0.3, 17.0, 1e-5, 240.5, 0.0] * 2)
    x8 = torch.empty(16, dtype=torch.float8_e4m3fn)
    y, z = torch.empty(16), torch.empty(16)
    _convert_kernel[(1,)](x, x8, y, z, N=16)
    # e4m3fn bytes worked by hand: 125 and the tie 124 -> 128 (0x70, even mantissa), 0.3 ->
    # 1.25 * 2**-2 (0x2A), the tie 17 -> 16 (0x58), 1e-5 -> 0 (below the smallest
    # subnormal 2**-9), 240.5 -> 240 (0x77)
    want = torch.tensor([0x70, 0xF0, 0x70, 0x2A, 0x58, 0x00, 0x77, 0x00] * 2, dtype=torch.uint8)
    assert torch.equal(x8.view(torch.uint8), want)
    assert y[0] == 128.0 and y[1] == -128.0


def test_memcheck_catches_out_of_bounds_load_and_store():
    x, y = torch.zeros(16), torch.zeros(16)
    _copy_kernel[(1,)](x, y, 16, OFFSET=0, N=16)                     # in bounds: fine
    with pytest.raises(Exception, match="interpreter memcheck: load"):
        _copy_kernel[(1,)](x, y, 16, OFFSET=1, N=16)                 # reads x[16]
    with pytest.raises(Exception, match="interpreter memcheck: store"):
        _copy_kernel[(1,)](x, y[:15], 16, OFFSET=0, N=16)            # writes past the view
    _copy_kernel[(1,)](x, y, 15, OFFSET=1, N=16)                     # masked: fine


def test_e4m3_nan_and_saturation_like_hardware():
    x = torch.tensor([float("nan"), 1.0, float("inf"), -500.0, 448.0, -0.5, 0.0, 3.0] * 2)
    x8 = torch.empty(16, dtype=torch.float8_e4m3fn)
    y, z = torch.empty(16), torch.empty(16)
    _convert_kernel[(1,)](x, x8, y, z, N=16)
    want = x.clamp(-448, 448).to(torch.float8_e4m3fn)                 # torch saturates too
    assert torch.equal(x8.view(torch.uint8) & 0x7F, want.view(torch.uint8) & 0x7F)
    assert torch.isnan(y[0]) and torch.equal(y[1:8], want.float()[1:8])
    assert bool(torch.isnan(z).all())                                 # NaN in the dot row
