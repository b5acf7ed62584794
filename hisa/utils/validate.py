"""Input validation shared by every public op.

Each check raises ``ValueError`` or ``TypeError`` naming the argument, what was expected and
what was given, so a wrong call fails loudly at the public boundary instead of producing a
silently wrong selection (or an illegal memory access inside a kernel).
"""
from __future__ import annotations

import numbers
from typing import Iterable, Sequence

import torch

FP8_DTYPE = torch.float8_e4m3fn
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, FP8_DTYPE)
BACKENDS = ("auto", "triton", "torch")


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, x, *, dtypes: Sequence[torch.dtype] | None = None,
                 ndim: int | None = None, contiguous: bool = False) -> torch.Tensor:
    """Check type, dtype, rank and (optionally) contiguity of one argument."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_dtype_names(dtypes)}, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(x.shape)}")
    if contiguous and not x.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {tuple(x.stride())}")
    return x


def check_shape(name: str, x: torch.Tensor, expected: Sequence[int | None]) -> None:
    """Check a shape; ``None`` in ``expected`` matches any size on that axis."""
    ok = x.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, x.shape))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(x.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """All given tensors must live on one device."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name}: expected device {first.device} (that of {first_name}), "
                             f"got {t.device}")


def check_positive_int(name: str, value, *, minimum: int = 1) -> int:
    """An integer >= ``minimum``, returned as a Python int. Integral numpy scalars
    (``np.int64(32)``) are accepted; bools, floats and tensors are not."""
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Integral) or \
            type(value).__name__ == "bool_":
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def check_device(name: str, device) -> torch.device:
    """A torch device that exists on this machine (ValueError otherwise, not torch's
    AssertionError from deep inside an allocation)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{name}: expected a torch device such as 'cpu' or 'cuda', got "
                         f"{device!r} ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: got {device!r} but CUDA is not available on this "
                             f"machine (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: got {device!r} but only {torch.cuda.device_count()} "
                             f"CUDA device(s) exist")
    return dev


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


def check_hisa_params(*, topk: int, block_size: int, block_topk: int) -> tuple[int, int, int]:
    """Validated (topk, block_size, block_topk) as Python ints."""
    topk = check_positive_int("topk", topk)
    block_size = check_positive_int("block_size", block_size)
    block_topk = check_positive_int("block_topk", block_topk, minimum=2)  # two forced blocks
    if block_size * block_topk < topk:
        raise ValueError(f"block_topk * block_size must be >= topk (the candidate pool must hold "
                         f"topk tokens): got {block_topk} * {block_size} = "
                         f"{block_topk * block_size} < topk = {topk}")
    return topk, block_size, block_topk


def check_super_params(*, block_topk: int, super_size, super_topk) -> dict:
    """The optional third level: both of ``super_size`` / ``super_topk`` or neither.

    Returns the level's keywords with Python ints (``{"super_size": ..., "super_topk": ...}``,
    integral numpy scalars accepted) when it is on, ``{}`` for two levels. The rules and why
    each is needed:

    * ``super_size >= 2``: a super-block of one block scores the same rows as the block stage,
      so the level would cost a pass and decide nothing.
    * ``super_topk >= 2``: the first eligible super-block (the attention sink) and the query's
      own are forced and take two of the slots, as the forced blocks do.
    * ``super_topk * super_size >= block_topk``: the block stage keeps m blocks among those of
      the kept super-blocks; with fewer than m there, m would be unreachable at every long
      window and the candidate pool would shrink below m * B tokens (possibly below topk),
      silently changing what ``block_topk`` and ``topk`` mean.
    """
    if super_size is None and super_topk is None:
        return {}
    if super_size is None or super_topk is None:
        raise ValueError(f"super_size/super_topk: expected both (three levels) or neither (two "
                         f"levels), got super_size={super_size!r}, super_topk={super_topk!r}")
    super_size = check_positive_int("super_size", super_size, minimum=2)
    super_topk = check_positive_int("super_topk", super_topk, minimum=2)
    if super_topk * super_size < block_topk:
        raise ValueError(f"super_topk * super_size must be >= block_topk (the kept super-blocks "
                         f"must hold the block budget): got {super_topk} * {super_size} = "
                         f"{super_topk * super_size} < block_topk = {block_topk}")
    return {"super_size": super_size, "super_topk": super_topk}


def check_indexer_inputs(q, k, weights, ks, ke, k_scale) -> tuple[int, int, int, int]:
    """Shapes and dtypes of a packed (prefill) indexer call. Returns (T, H, D, S)."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("weights", weights, dtypes=(torch.float32,), ndim=2)
    check_tensor("ks", ks, dtypes=(torch.int32,), ndim=1)
    check_tensor("ke", ke, dtypes=(torch.int32,), ndim=1)
    T, H, D = q.shape
    S = k.shape[0]
    if H < 1 or D < 1:
        raise ValueError(f"q: expected at least one head and a head_dim >= 1, got shape "
                         f"{list(q.shape)} [T, H, D]")
    check_shape("k", k, (None, D))
    check_shape("weights", weights, (T, H))
    check_shape("ks", ks, (T,))
    check_shape("ke", ke, (T,))
    check_key_scale(k, k_scale, "S")
    if k_scale is not None:
        check_tensor("k_scale", k_scale, dtypes=(torch.float32,), ndim=1)
        check_shape("k_scale", k_scale, (S,))
    check_same_device(q=q, k=k, weights=weights, ks=ks, ke=ke, k_scale=k_scale)
    return T, H, D, S


def check_key_scale(k: torch.Tensor, k_scale, rows: str) -> None:
    """One rule for every op that takes keys: ``k_scale`` (the per-token dequantization scale)
    is required with float8_e4m3fn keys and refused with any other dtype."""
    if k.dtype == FP8_DTYPE and k_scale is None:
        raise ValueError(f"k_scale: expected a float32 [{rows}] tensor of per-token scales "
                         f"because k is float8_e4m3fn, got None")
    if k.dtype != FP8_DTYPE and k_scale is not None:
        raise ValueError(f"k_scale: expected None because k is {k.dtype} (only float8_e4m3fn "
                         f"keys carry a per-token scale), got a tensor")


def check_windows(ks: torch.Tensor, ke: torch.Tensor, num_keys: int,
                  extra: Sequence[torch.Tensor] = ()) -> tuple[int, ...]:
    """0 <= ks <= ke <= num_keys for every query (reads the values: one host sync).

    ``extra``: 0-d integer or bool tensors the caller also needs on the host, read in the same
    transfer (each host sync costs the launch gap behind it). They are computed from windows
    not yet checked, so a caller uses them only when this returns.

    Returns:
        (min(ks), max(ke), *extra) as Python ints; with no query (0, 0) and a 0 per extra,
        which are not read.
    """
    if ks.numel() == 0:
        return (0, 0) + (0,) * len(extra)
    bad_order = ks > ke
    # stack promotes (bool -> int32, the windows' dtype): no cast per fact
    any_bad, lo, hi, *rest = torch.stack([bad_order.any(), ks.min(), ke.max(),
                                          *extra]).tolist()
    raise_bad_windows(ks, ke, num_keys, any_bad=bool(any_bad), lo=lo, hi=hi)
    return (lo, hi, *rest)


def raise_bad_windows(ks: torch.Tensor, ke: torch.Tensor, num_keys: int, *, any_bad: bool,
                      lo: int, hi: int) -> None:
    """:func:`check_windows`' errors (in its order) from facts already read on the host; only
    a failing call reads the windows again, to name the first bad query."""
    if any_bad:
        i = int((ks > ke).nonzero()[0, 0])
        raise ValueError(f"ks/ke: expected ks[t] <= ke[t] for every query, got ks[{i}] = "
                         f"{int(ks[i])} > ke[{i}] = {int(ke[i])}")
    if lo < 0:
        raise ValueError(f"ks: expected values >= 0, got min(ks) = {lo}")
    if hi > num_keys:
        raise ValueError(f"ke: expected values <= the number of keys in k ({num_keys}), "
                         f"got max(ke) = {hi}")


def check_out(name: str, out, shape: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
    check_tensor(name, out, dtypes=(dtype,), contiguous=True)
    check_shape(name, out, shape)
    if out.device != torch.device(device) and not (
            out.device.type == torch.device(device).type and torch.device(device).index is None):
        raise ValueError(f"{name}: expected device {device}, got {out.device}")
    return out
