"""Interpreter tier: run the real Triton kernels on the CPU (``TRITON_INTERPRET=1``).

The variable must be set before triton is first imported, so this conftest sets it at import
time, and every test in this folder is marked ``interpret``. If triton is not installed the
tests of this folder are skipped.

Shims of Triton 3.6's interpreter, touching only the interpreter (never compiled kernels):

* Scalar kernel arguments are converted to Python ints with ``int()`` on a one-element array,
  which NumPy >= 2.3 rejects ("only 0-dimensional arrays can be converted"): any
  ``range(0, n)`` over a runtime ``n`` then fails. The shim converts through ``.item()``.
* Its bit-level float converter does not know that e4m3fn has a NaN (0x7F / 0xFF) and no
  infinity: e4m3 NaN upcasts to 480 (also inside ``tl.dot``), and NaN, infinities and values
  past 448 downcast to arbitrary bytes; its downcast also drops the carry of a rounding that
  bumps the exponent (125.0 -> 64.0). The shim gives the hardware behaviour
  (``cvt.rn.satfinite``): NaN <-> NaN, round to nearest even, everything past 448 saturates to
  +-448.
* Its ``tl.dot`` multiplies bf16 operands as their raw uint16 bits (bf16 is stored as
  uint16), so any bf16 dot is garbage. The shim multiplies their fp32 values (bf16 -> fp32 is
  exact; the accumulation is fp32, as the MMA's). Other bf16 arithmetic is still not emulated:
  kernels that only load, convert and dot bf16 (the block stage's bf16 representatives) are
  testable here; anything else bf16 belongs in tests/gpu.
* Speed: a call of a ``@triton.jit`` helper from inside a kernel re-patches ``triton.language``
  each time (``_patch_lang``, about 4 ms), although the launch has already patched the same
  module objects; inside a launch the shim skips that repeat. This halves the tier's run time
  and changes nothing else (the patch it skips would install the same builtins again).
* Memory checking: every load and store of an interpreted kernel is checked against the extents
  of that launch's tensor arguments (:class:`InterpreterMemcheck`), so an out-of-bounds access
  fails the test with the kernel, the address and the arguments instead of reading (or
  corrupting) whatever lies there. It plays the part of ``compute-sanitizer --tool memcheck``
  for the CPU tier.
"""
import os

import numpy as np
import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton  # noqa: F401
    import triton.language as tl
    import triton.runtime.interpreter as _interp
    HAVE_TRITON = True
except ImportError:  # pragma: no cover - CI installs triton with the dev extra
    HAVE_TRITON = False

if HAVE_TRITON and hasattr(_interp, "_patch_lang_tensor"):
    _orig_patch = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor


def _as_float32(data: np.ndarray, dtype) -> np.ndarray:
    """Values of an interpreter float array (bf16 is stored as uint16 bits) as float32."""
    if dtype == tl.bfloat16:
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32)


if HAVE_TRITON and hasattr(_interp, "_convert_float"):
    _orig_convert_float = _interp._convert_float

    def _convert_float(input, input_dtype, output_dtype, rounding_mode):
        out = _orig_convert_float(input, input_dtype, output_dtype, rounding_mode)
        if input_dtype == tl.float8e4nv and output_dtype.primitive_bitwidth > 8:
            bits = input.view(np.uint8)
            nan = (bits & 0x7F) == 0x7F
            if nan.any():
                width, mant = output_dtype.primitive_bitwidth, output_dtype.fp_mantissa_width
                exp_ones = ((1 << (width - mant - 1)) - 1) << mant
                sign = (bits >> 7).astype(out.dtype) << (width - 1)
                out = np.where(nan, sign | exp_ones | (1 << (mant - 1)), out).astype(out.dtype)
        elif output_dtype == tl.float8e4nv and input_dtype.primitive_bitwidth > 8:
            # Round to nearest even on the e4m3 grid, saturating (torch's cast of the clamped
            # value is exactly that); the interpreter's own converter drops the carry of a
            # rounding that bumps the exponent (125.0 -> 64.0).
            x = _as_float32(input, input_dtype)
            sign = np.signbit(x).astype(np.uint8) << 7
            clamped = torch.from_numpy(np.clip(np.nan_to_num(x), -448.0, 448.0).astype(np.float32))
            out = clamped.to(torch.float8_e4m3fn).view(torch.uint8).numpy().astype(out.dtype)
            out = np.where(np.isnan(x), sign | 0x7F, out).astype(out.dtype)
        return out

    _interp._convert_float = _convert_float


def _dot_operand(handle) -> np.ndarray:
    """fp32 values of a dot operand: bf16 from its uint16 bits, fp8 through the (patched)
    bit-level converter, anything else by value."""
    if handle.dtype == tl.bfloat16:
        return _as_float32(handle.data, tl.bfloat16)
    if handle.dtype.primitive_bitwidth == 8 and handle.dtype.is_floating():
        return _interp._convert_float(handle.data, handle.dtype, tl.float16, None).view(
            np.float16).astype(np.float32)
    return handle.data.astype(np.float32)


if HAVE_TRITON and hasattr(_interp, "InterpreterBuilder"):
    _orig_create_dot = _interp.InterpreterBuilder.create_dot

    def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 not in (a.dtype, b.dtype):
            return _orig_create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        out = np.matmul(_dot_operand(a), _dot_operand(b), dtype=np.float32).astype(d.data.dtype)
        return _interp.TensorHandle(out + d.data, d.dtype.scalar)

    _interp.InterpreterBuilder.create_dot = _create_dot


class InterpreterMemcheck:
    """Bounds checking of interpreted loads and stores against the launch's tensor arguments.

    A launch may touch the bytes of the tensors it was given, each from its first element to
    its last (the view's extent, not the whole storage), and nothing else.
    """

    def __init__(self):
        self.launch = None          # (kernel name, sorted disjoint [lo, hi) address ranges)

    @staticmethod
    def _extent(t):
        if t.numel() == 0:
            return None
        span = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) + 1
        return t.data_ptr(), t.data_ptr() + span * t.element_size()

    def begin(self, name, tensors):
        spans = sorted(e for e in (self._extent(t) for t in tensors) if e is not None)
        merged = []
        for lo, hi in spans:
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        los = np.array([m[0] for m in merged], dtype=np.uint64)
        his = np.array([m[1] for m in merged], dtype=np.uint64)
        self.launch = (name, los, his)

    def check(self, kind, ptrs, mask, elem_bytes):
        if self.launch is None:
            return
        addr = np.asarray(ptrs).astype(np.uint64)
        m = np.broadcast_to(np.asarray(mask, dtype=bool), addr.shape)
        addr = addr[m]
        if addr.size == 0:
            return
        name, los, his = self.launch
        i = np.searchsorted(los, addr, side="right").astype(np.int64) - 1
        ok = (i >= 0) & (addr + np.uint64(elem_bytes) <= his[np.maximum(i, 0)])
        if not ok.all():
            bad = int(addr[~ok][0])
            near = ", ".join(f"[{int(lo):#x}, {int(hi):#x})" for lo, hi in zip(los, his))
            raise AssertionError(f"interpreter memcheck: {kind} of {(~ok).sum()} element(s) "
                                 f"outside every tensor argument of kernel {name}, first at "
                                 f"{bad:#x}; arguments span {near}")


MEMCHECK = InterpreterMemcheck()

if HAVE_TRITON and hasattr(_interp, "GridExecutor"):
    import torch

    def _tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, (tuple, list)):
            for o in obj:
                yield from _tensors(o)

    _orig_init_args = _interp.GridExecutor._init_args_hst

    def _init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = _orig_init_args(self, args_dev, kwargs)
        tensors = list(_tensors(list(args_hst))) + list(_tensors(list(kwargs_hst.values())))
        MEMCHECK.begin(getattr(self.fn, "__name__", str(self.fn)),
                       [_interp._unwrap_tensor(t) for t in tensors])
        return args_hst, kwargs_hst

    _interp.GridExecutor._init_args_hst = _init_args_hst

    _PATCHED = []               # per launch: the language modules patched so far
    _orig_grid_call = _interp.GridExecutor.__call__

    def _grid_call(self, *args, **kwargs):
        _PATCHED.append(set())
        try:
            return _orig_grid_call(self, *args, **kwargs)
        finally:
            _PATCHED.pop()

    _interp.GridExecutor.__call__ = _grid_call
    _orig_device_call = _interp.InterpretedFunction.__call__

    def _device_call(self, *args, **kwargs):
        if not _PATCHED:
            return _orig_device_call(self, *args, **kwargs)
        langs = frozenset(id(v) for v in self.fn.__globals__.values()
                          if v is tl or v is tl.core)
        if not langs <= _PATCHED[-1]:
            _interp._patch_lang(self.fn)
            _PATCHED[-1].update(langs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise _interp.InterpreterError(repr(e)) from e

    _interp.InterpretedFunction.__call__ = _device_call

    _Builder = _interp.InterpreterBuilder
    _orig_load, _orig_store = _Builder.create_masked_load, _Builder.create_masked_store

    def _elem_bytes(ptrs):
        return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)

    def create_masked_load(self, ptrs, mask, other, cache_modifier, eviction_policy,
                           is_volatile):
        MEMCHECK.check("load", ptrs.data, mask.data, _elem_bytes(ptrs))
        return _orig_load(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile)

    def create_masked_store(self, ptrs, value, mask, cache_modifier, eviction_policy):
        MEMCHECK.check("store", ptrs.data, mask.data, _elem_bytes(ptrs))
        return _orig_store(self, ptrs, value, mask, cache_modifier, eviction_policy)

    _Builder.create_masked_load = create_masked_load
    _Builder.create_masked_store = create_masked_store


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.interpret)
            if not HAVE_TRITON:
                item.add_marker(pytest.mark.skip(reason="triton is not installed"))
